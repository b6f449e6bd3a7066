"""Measured peak memory of training steps on CPU, for comparison with `python -m pipeline preflight`.

  python bench/bench_preflight.py --params profiles/embedded.yaml --data outputs/data [--steps 3]
                                  [--batch-size N] [--checkpointing]

Builds the profile's model exactly as preflight does (same config, random weights, fp32 on CPU), runs
`steps` optimizer steps of pipeline.training.train on the data's train split (every step logged, so the
update-norm snapshot is taken), and prints JSON: the preflight estimate of the train step and the peak
resident-set growth during train(): the kernel's RSS high-water mark (VmHWM), reset through
/proc/self/clear_refs once everything is imported and built, minus the RSS at that moment. glibc is told to
map every allocation over 64 KiB on its own (MALLOC_MMAP_THRESHOLD_, set by re-executing), so a freed tensor
leaves the RSS at once and the high-water mark is the peak of live memory, not of malloc's cached free blocks
(without it the embedded train step reads ~220 MiB instead of ~150 MiB); transparent huge pages are turned off
for the process (prctl PR_SET_THP_DISABLE, kept across exec), so a kernel with THP "always" does not round
those mappings up to 2 MiB pages."""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")       # 5: reset VmHWM to the current RSS


def disable_transparent_huge_pages() -> None:
    PR_SET_THP_DISABLE = 41
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


def measure(params_path: str, data_dir: str, steps: int, batch_size: int = 0, checkpointing: bool = False) -> dict:
    import accelerate  # noqa: F401  (imported before the baseline, as train() would)
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import data as D
    from pipeline import params as P
    from pipeline import preflight
    from pipeline.training import train

    params = P.load(params_path)
    tp = dataclasses.replace(params.train, max_steps=steps, eval_interval=steps, eval_batches=1, log_interval=1,
                             precision="fp32", gradient_checkpointing=checkpointing, grad_accum=1,
                             batch_size=batch_size or params.train.batch_size)
    seq = params.data.seq_len
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preflight.model_config(params)[0])
    shape = preflight.model_shape(params)
    estimate = preflight.train_memory(shape, tp.batch_size * seq, False, checkpointing, 1, False, False)
    train_data, val_data = D.PackedSequences(data_dir, "train", seq), D.PackedSequences(data_dir, "validation", seq)
    reset_high_water_mark()
    before = status_bytes("VmRSS")
    train(model, tp, train_data, val_data, seed=0, desc="measure")
    peak = status_bytes("VmHWM") - before
    return {"profile": params.profile, "parameters": shape.params, "micro_batch": [tp.batch_size, seq],
            "gradient_checkpointing": checkpointing,
            "steps": steps, "estimate_mib": round(estimate["peak"] * 1024, 1),
            "estimate_parts_mib": {k: round(v * 1024, 1) for k, v in estimate.items()},
            "measured_mib": round(peak / 2 ** 20, 1), "rss_before_mib": round(before / 2 ** 20, 1),
            "thp_enabled": status_bytes("THP_enabled") // 1024, "ratio": round(estimate["peak"] * 2 ** 30 / peak, 3)}


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}   # one arena: no per-thread arenas,
# which glibc adds when threads contend for malloc (more on a loaded machine) and which inflate the peak


def main() -> None:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        disable_transparent_huge_pages()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="outputs/data")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="micro-batch (default: train.batch_size)")
    ap.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing: true")
    args = ap.parse_args()
    print(json.dumps(measure(args.params, args.data, args.steps, args.batch_size, args.checkpointing)))


if __name__ == "__main__":
    main()
