"""Stage `controls`: random substitution and gradient-free greedy search, each at the forward budget of
the gradient attack it controls for (UAT and HotFlip)."""
from __future__ import annotations

import time

from ..attacks import load_setup, run_hotflip, run_uat
from ..paths import attack_dir
from ..provenance import provenance, write_json


def run(params, args) -> int:
    t0 = time.time()
    setup = load_setup(params, args.arm, args.seed)
    result = {method: {"uat": run_uat(setup, params.attack, args.seed, method),
                       "hotflip": run_hotflip(setup, params.attack, args.seed, method)}
              for method in ("random", "greedy")}
    result.update({"arm": args.arm, "seed": args.seed, "model_meta": setup.meta,
                   "seconds": round(time.time() - t0, 1)})
    write_json(attack_dir(args.arm, args.seed) / "controls.json", result,
               provenance(params, "controls", seed=args.seed, arm=args.arm))
    rows = ", ".join(f"{m} {a} +{result[m][a]['summary']['abs_increase']:.3f}"
                     for m in ("random", "greedy") for a in ("uat", "hotflip"))
    print(f"controls {args.arm} s{args.seed}: {rows} nats/token, {result['seconds']} s")
    return 0
