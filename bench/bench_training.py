"""Training throughput, side by side in one process (run from the repository root after the data, pretrain and
monotonic_init stages; embedded workspace by default):
  1. this trainer (pipeline.training.train, logging every step incl. per-group update norms) against a
     minimal hand-written PyTorch AdamW loop on the same pretrained tiny model and the same batches
     (goal: >= 0.9x the loop's tokens/s);
  2. the monotonic arm (softplus-parametrized V) against the baseline arm, both through the trainer
     (goal: step time <= 1.10x).
Rounds alternate the three runs so machine load hits all of them alike. A step's cost is the fastest
step seen over all rounds (the first step of each run excluded): on a machine shared with other jobs, load
only ever adds time, so the minimum is the steadiest estimate; per-round medians are printed beside it.

    python bench/bench_training.py [--params params.yaml] [--steps 12] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline import data as D  # noqa: E402
from pipeline import params as params_mod  # noqa: E402
from pipeline.models import load_causal_lm  # noqa: E402
from pipeline.monotonic import constrained_parameters, load_parametrized  # noqa: E402
from pipeline.paths import DATA_DIR, model_dir  # noqa: E402
from pipeline.provenance import device_description  # noqa: E402
from pipeline.training import lm_loss, lr_at, train  # noqa: E402


def hand_loop_step_seconds(tp, packed, steps: int, seed: int) -> list[float]:
    """The minimal loop: same model, batches, optimizer and clipping; no logging, no checks."""
    model = load_causal_lm(model_dir("pretrained"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tp.lr, betas=(tp.adam_beta1, tp.adam_beta2),
                            weight_decay=tp.weight_decay)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, tp.lr, tp.warmup_ratio, tp.min_lr_ratio)
        batch = torch.from_numpy(packed.batch(packed.sequence_ids(seed, step * tp.batch_size, tp.batch_size)))
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def trainer_step_seconds(tp, packed, val, arm: str, seed: int) -> list[float]:
    if arm == "baseline":
        model, constrained = load_causal_lm(model_dir("pretrained")), []
    else:
        model, _ = load_parametrized(model_dir("monotonic_init"))
        constrained = constrained_parameters(model)
    result = train(model, tp, packed, val, seed=seed, constrained=constrained, desc=f"bench {arm}")
    tokens = tp.batch_size * tp.grad_accum * packed.seq_len
    return [tokens / row["tokens_per_s"] for row in result.state.log]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (1 is steadier on a machine shared with other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = params_mod.load(args.params)
    tp = dataclasses.replace(params.train, max_steps=args.steps, grad_accum=1, eval_interval=args.steps,
                             eval_batches=1, log_interval=1, warmup_ratio=0.0, precision="fp32")
    packed = D.PackedSequences(DATA_DIR, "train", params.data.seq_len)
    val = D.PackedSequences(DATA_DIR, "validation", params.data.seq_len)
    times = {"loop": [], "baseline": [], "monotonic": []}
    for r in range(args.rounds):
        rounds = {"loop": hand_loop_step_seconds(tp, packed, args.steps, seed=r)[1:]}
        for arm in ("baseline", "monotonic"):
            rounds[arm] = trainer_step_seconds(tp, packed, val, arm, seed=r)[1:]
        for k, v in rounds.items():
            times[k] += v
        print(f"round {r} (median ms/step): " + ", ".join(f"{k} {statistics.median(v) * 1000:.0f}"
                                                          for k, v in rounds.items()), flush=True)
    step = {k: min(v) for k, v in times.items()}
    tokens = tp.batch_size * params.data.seq_len
    print(f"\nmachine: {device_description()}; model {params.model.num_layers}x{params.model.hidden_size} "
          f"({params.profile}), batch {tp.batch_size}x{params.data.seq_len}, {args.steps} steps x {args.rounds} rounds")
    for k, s in step.items():
        print(f"  {k:10s} {s * 1000:8.1f} ms/step (fastest)  {tokens / s:9.0f} tokens/s  "
              f"(median {statistics.median(times[k]) * 1000:.1f} ms/step)")
    throughput_ratio = step["loop"] / step["baseline"]
    mono_ratio = step["monotonic"] / step["baseline"]
    print(f"trainer/hand-loop throughput: {throughput_ratio:.3f}x (goal >= 0.9) "
          f"{'OK' if throughput_ratio >= 0.9 else 'BELOW GOAL'}")
    print(f"monotonic/baseline step time: {mono_ratio:.3f}x (goal <= 1.10) {'OK' if mono_ratio <= 1.10 else 'ABOVE GOAL'}")
    return 0 if math.isfinite(throughput_ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
