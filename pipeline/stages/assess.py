"""Stage `assess`: everything measured on one arm of one seed, in one process that loads the model once:
`evaluate` (test perplexity), then `uat`, `hotflip` and `controls`. Each step writes exactly the files its
own subcommand writes, with the same results (the attacks draw from their own seeded streams).

dvc.yaml runs `assess` per arm x seed rather than the four steps as separate stages: a process that loads a
model spends ~8 s importing torch and transformers on a 2-core machine, more than most of these steps
compute at the embedded scale; on a cluster it saves loading the checkpoint four times."""
from __future__ import annotations

from ..attacks import load_setup
from . import controls, evaluate, hotflip, uat


def run(params, args) -> int:
    setup = load_setup(params, args.arm, args.seed)
    evaluate.evaluate(params, args.arm, args.seed, setup.model, setup.meta)
    for step in (uat, hotflip, controls):
        step.attack(params, setup, args.arm, args.seed)
    return 0
