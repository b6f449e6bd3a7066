"""Stage `uat`: a universal adversarial trigger (gradient top-k + true-loss re-scoring, restarts) learned
on the attack-optimisation examples and evaluated on the attack-evaluation examples."""
from __future__ import annotations

import time

from ..attacks import load_setup, run_uat
from ..paths import attack_dir
from ..provenance import provenance, write_json


def run(params, args) -> int:
    t0 = time.time()
    setup = load_setup(params, args.arm, args.seed)
    result = run_uat(setup, params.attack, args.seed, "gradient")
    result.update({"arm": args.arm, "seed": args.seed, "model_meta": setup.meta,
                   "seconds": round(time.time() - t0, 1)})
    write_json(attack_dir(args.arm, args.seed) / "uat.json", result,
               provenance(params, "uat", seed=args.seed, arm=args.arm))
    s = result["summary"]
    print(f"uat {args.arm} s{args.seed}: trigger {result['trigger_text']!r}, NLL {s['clean_nll']:.3f} -> "
          f"{s['attacked_nll']:.3f} (+{s['abs_increase']:.3f} nats/token), success {s['success_rate_abs']:.0%}, "
          f"{result['seconds']} s")
    return 0
