"""The GPU acceptance check: one command, no downloads, a few minutes on one GPU.

  python bench/gpu_check.py [--cpu] [--out FILE]

1. The smoke profile's whole `dvc repro` in a fresh clone of HEAD on the accelerator: the run record of every
   step but data and aggregate must name a CUDA device for its model (and the GPU with its compute capability),
   every output but train's must record bf16 autocast as its precision (the benchmarks' harness: fp32; with
   --cpu: fp32 everywhere), and every training run must finish (its metrics written after the total update norm).
2. Train-step throughput (MFU) and peak memory of a Pythia-410M-shaped, randomly initialised GPT-NeoX with the
   real trainer (pipeline.training.train, bf16 autocast, fp32 master weights) against `preflight`'s estimate.
3. Attack candidate scoring (pipeline.attacks.Scorer.nll) in bf16 autocast vs fp32: candidates/s and the
   largest loss difference; UAT trigger scoring over the cached prompt (Scorer.trigger_nll) vs whole sequences
   in bf16: the largest loss difference and the speed ratio; the targeted attack's greedy-match test runs there.
--cpu runs the same three checks on the CPU at toy size (CUDA hidden), so the script cannot rot where no GPU
is lent. Prints one JSON document (and writes it to --out)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline.__main__ import MODEL_FREE_STAGES  # noqa: E402  (every other stage's run record names its model's device)

PYTHIA_410M = {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096}
TOY = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 512}
FP32_STAGES = ("benchmarks",)                # the harness runs the fp32 model (pipeline/stages/benchmarks.py)


class RandomTokens:
    """What the trainer reads from a split (PackedSequences' interface), over seeded random token ids."""

    def __init__(self, vocab: int, seq_len: int, sequences: int, seed: int):
        self.seq_len, self.num_sequences = seq_len, sequences
        self.tokens = np.random.default_rng(seed).integers(0, vocab, (sequences, seq_len + 1))

    def sequence_ids(self, seed: int, start: int, count: int) -> np.ndarray:
        return (np.arange(start, start + count) * 7919 + seed) % self.num_sequences

    def batch(self, window_ids) -> np.ndarray:
        return self.tokens[np.asarray(window_ids)]


def env_for(cpu: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "DVC_NO_ANALYTICS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    return {**env, "CUDA_VISIBLE_DEVICES": ""} if cpu else env


def smoke_on_device(cpu: bool) -> dict:
    """The smoke pipeline in a fresh clone of HEAD; the device every step's model was on."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ws = Path(tmp) / "ws"
        subprocess.run(["git", "clone", "-q", str(REPO), str(ws)], check=True)
        (ws / "params.yaml").write_text((ws / "profiles/smoke.yaml").read_text())
        (ws / "dvc.lock").unlink(missing_ok=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env_for(cpu), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"smoke dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        records = {p.stem: json.loads(p.read_text()) for p in sorted((ws / "outputs/runs").glob("*.json"))}
        trained = [json.loads(p.read_text()) for p in sorted((ws / "outputs/train_logs").glob("*/metrics.json"))]
    stage = {name: r["provenance"]["stage"] for name, r in records.items()}
    devices = {name: r.get("model_device") for name, r in records.items()   # None: a model step that recorded none
               if stage[name] not in MODEL_FREE_STAGES}
    # the precision in each output's provenance (the trainer's is train.precision: train's metrics, select_lr's params)
    precisions = {name: records[name]["provenance"].get("precision") for name in devices
                  if stage[name] not in ("train", "select_lr")}
    expected = {name: "fp32" if cpu or stage[name] in FP32_STAGES else "bf16" for name in precisions}
    want = "cpu" if cpu else "cuda"
    gpus = {r["device"] for r in records.values() if r["device"].startswith("cuda")}
    return {"seconds": round(time.time() - t0, 1), "model_devices": devices, "precisions": precisions,
            "all_on_expected_device": bool(devices) and all(str(d).startswith(want) for d in devices.values()),
            "precisions_as_expected": precisions == expected,
            # the train stages ran to their end on the device (the total update norm, which crashed there before)
            "trained_to_the_end": bool(trained) and all("update_norm_total" in m for m in trained),
            "run_records_name_the_gpu": cpu or (bool(gpus) and all("compute capability" in g for g in gpus))}


def shaped_params(cpu: bool):
    """The cluster profile with the model shrunk to Pythia-410M's shape (toy shape with --cpu), no checkpoint."""
    from pipeline import params as P

    params = P.load(P.profile_path("cluster"))
    model = dataclasses.replace(params.model, hf_local_path=None, **(TOY if cpu else PYTHIA_410M))
    tokenizer = dataclasses.replace(params.tokenizer, vocab_size=4096 if cpu else params.tokenizer.vocab_size)
    return dataclasses.replace(params, model=model, tokenizer=tokenizer)


def train_step_check(cpu: bool, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import preflight
    from pipeline.training import train

    params = shaped_params(cpu)
    seq = 128 if cpu else params.data.seq_len
    tp = dataclasses.replace(params.train, max_steps=steps, batch_size=4, grad_accum=1, log_interval=1,
                             eval_interval=steps, eval_batches=1, gradient_checkpointing=False,
                             precision="fp32" if cpu else "bf16")
    shape = preflight.model_shape(params)
    data = RandomTokens(shape.vocab, seq, 4 * steps + 8, seed=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preflight.model_config(params)[0])
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    result = train(model, tp, data, data, seed=0, desc="gpu-check train")
    tokens_per_s = statistics.median(row["tokens_per_s"] for row in result.state.log[2:])
    device = preflight.DEVICES["cpu" if cpu else gpu_key(torch)]
    peak_flops = (device.fp32_tflops if cpu else device.bf16_tflops) * 1e12
    estimate = preflight.train_memory(shape, tp.batch_size * seq, not cpu, False, 1, False, not cpu)
    out = {"parameters": shape.params, "micro_batch": [tp.batch_size, seq], "steps": steps,
           "tokens_per_s": round(tokens_per_s, 1), "mfu": round(6 * shape.params * tokens_per_s / peak_flops, 3),
           "peak_estimate_gib": round(estimate["peak"], 2), "device": device.name}
    if not cpu:
        measured = torch.cuda.max_memory_allocated() / 2 ** 30
        out.update(peak_measured_gib=round(measured, 2), estimate_over_measured=round(estimate["peak"] / measured, 3))
    return out


def gpu_key(torch) -> str:
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100-80gb"
    return "a100-80gb" if memory > 45 else "a100-40gb"


def timed(way, rounds: int, cpu: bool) -> tuple[float, object]:
    """Seconds for `rounds` calls of way() after one warm-up call (the GPU synchronized), and the last result."""
    import torch

    way()
    if not cpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        result = way()
    if not cpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def scoring_check(cpu: bool, rounds: int) -> dict:
    """Candidates/s of Scorer.nll in fp32 and bf16 autocast on the same batch, and the largest difference."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import attacks as A
    from pipeline import device, preflight

    params = shaped_params(cpu)
    a = params.attack
    torch.manual_seed(0)
    model = device.place(AutoModelForCausalLM.from_config(preflight.model_config(params)[0]))
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = torch.randint(0, vocab, (4 * a.batch_size, a.uat.trigger_length + a.prompt_tokens + a.continuation_tokens))
    out, losses = {}, {}
    for precision in ("fp32", "bf16"):
        scorer = A.Scorer(model, a.continuation_tokens, a.batch_size, torch.arange(vocab), precision)
        seconds, losses[precision] = timed(lambda: scorer.nll(batch, count=False), rounds, cpu)
        out[f"{precision}_candidates_per_s"] = round(rounds * len(batch) / seconds, 1)
    out["bf16_over_fp32"] = round(out["bf16_candidates_per_s"] / out["fp32_candidates_per_s"], 2)
    out["max_abs_loss_difference"] = float((losses["bf16"] - losses["fp32"]).abs().max())
    return {**out, **cached_trigger_check(model, batch, a, vocab, cpu)}


def cached_trigger_check(model, batch, a, vocab: int, cpu: bool) -> dict:
    import torch

    from pipeline import attacks as A

    examples = batch[:16, a.uat.trigger_length:]
    triggers = batch[16: 16 + a.batch_size // 16, : a.uat.trigger_length]
    at = A.trigger_offset("before_continuation", a.prompt_tokens)
    scorer = A.Scorer(model, a.continuation_tokens, a.batch_size, torch.arange(vocab), "bf16")
    ways = {"whole": lambda: scorer.nll(A._triggered_batch(triggers, examples, at)).view(len(triggers), -1),
            "cached": lambda: scorer.trigger_nll(triggers, examples, at)}
    seconds, losses = {}, {}
    for name, way in ways.items():
        seconds[name], losses[name] = timed(way, 1, cpu)
    matched = scorer.greedy_match(batch[:8], 2)        # the targeted attack's success test, on the device
    return {"prompt_cached_over_whole": round(seconds["whole"] / seconds["cached"], 2),
            "prompt_cached_max_abs_loss_difference": float((losses["cached"] - losses["whole"]).abs().max()),
            "greedy_match_rows": len(matched)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the same checks on the CPU at toy size")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run with --cpu, or on a GPU")
    report = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "smoke": smoke_on_device(args.cpu), "train": train_step_check(args.cpu, args.steps),
              "scoring": scoring_check(args.cpu, rounds=3)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    smoke = report["smoke"]
    checks = ("all_on_expected_device", "precisions_as_expected", "trained_to_the_end", "run_records_name_the_gpu")
    return 0 if all(smoke[k] for k in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
