"""Stage `hotflip`: iterative HotFlip on the prompt tokens of each attack-evaluation example."""
from __future__ import annotations

import time

from ..attacks import load_setup, run_hotflip
from ..paths import attack_dir
from ..provenance import provenance, write_json


def run(params, args) -> int:
    t0 = time.time()
    setup = load_setup(params, args.arm, args.seed)
    result = run_hotflip(setup, params.attack, args.seed, "gradient")
    result.update({"arm": args.arm, "seed": args.seed, "model_meta": setup.meta,
                   "seconds": round(time.time() - t0, 1)})
    write_json(attack_dir(args.arm, args.seed) / "hotflip.json", result,
               provenance(params, "hotflip", seed=args.seed, arm=args.arm))
    s = result["summary"]
    print(f"hotflip {args.arm} s{args.seed}: NLL {s['clean_nll']:.3f} -> {s['attacked_nll']:.3f} "
          f"(+{s['abs_increase']:.3f} nats/token), success {s['success_rate_abs']:.0%}, {result['seconds']} s")
    return 0
