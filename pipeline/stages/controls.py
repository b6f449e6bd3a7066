"""Stage `controls`: random substitution and gradient-free greedy search, each at the forward budget of
the gradient attack it controls for (UAT and HotFlip)."""
from __future__ import annotations

import time

from ..attacks import load_setup, run_hotflip, run_uat, write_result

METHODS = ("random", "greedy")


def attack(params, setup, arm: str, seed: int) -> dict:
    t0 = time.time()
    found = {method: {"uat": run_uat(setup, params.attack, seed, method),
                      "hotflip": run_hotflip(setup, params.attack, seed, method)} for method in METHODS}
    seconds = write_result(params, "controls", arm, seed, setup, found, t0)
    rows = ", ".join(f"{m} {a} +{found[m][a]['summary']['abs_increase']:.3f}"
                     for m in METHODS for a in ("uat", "hotflip"))
    print(f"controls {arm} s{seed}: {rows} nats/token, {seconds} s")
    return found


def run(params, args) -> int:
    attack(params, load_setup(params, args.arm, args.seed), args.arm, args.seed)
    return 0
