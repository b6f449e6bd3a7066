"""Stage `hotflip`: iterative HotFlip on the prompt tokens of each attack-evaluation example."""
from __future__ import annotations

import time

from ..attacks import load_setup, run_hotflip, write_result


def attack(params, setup, arm: str, seed: int) -> dict:
    t0 = time.time()
    found = run_hotflip(setup, params.attack, seed, "gradient")
    seconds = write_result(params, "hotflip", arm, seed, setup, found, t0)
    s = found["summary"]
    print(f"hotflip {arm} s{seed}: NLL {s['clean_nll']:.3f} -> {s['attacked_nll']:.3f} "
          f"(+{s['abs_increase']:.3f} nats/token), success {s['success_rate_abs']:.0%}, {seconds} s")
    return found


def run(params, args) -> int:
    attack(params, load_setup(params, args.arm, args.seed), args.arm, args.seed)
    return 0
