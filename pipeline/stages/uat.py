"""Stage `uat`: a universal adversarial trigger (gradient top-k + true-loss re-scoring, restarts) learned
on the attack-optimisation examples and evaluated on the attack-evaluation examples."""
from __future__ import annotations

import time

from ..attacks import load_setup, run_uat, write_result


def attack(params, setup, arm: str, seed: int) -> dict:
    t0 = time.time()
    found = run_uat(setup, params.attack, seed, "gradient")
    seconds = write_result(params, "uat", arm, seed, setup, found, t0)
    s = found["summary"]
    print(f"uat {arm} s{seed}: trigger {found['trigger_text']!r}, NLL {s['clean_nll']:.3f} -> "
          f"{s['attacked_nll']:.3f} (+{s['abs_increase']:.3f} nats/token), success {s['success_rate_abs']:.0%}, "
          f"{seconds} s")
    return found


def run(params, args) -> int:
    attack(params, load_setup(params, args.arm, args.seed), args.arm, args.seed)
    return 0
