"""Stage `assess`: everything measured on the arms of one seed, in one process that loads each model once:
`evaluate` (test perplexity), then `uat`, `hotflip` and `controls`. Each step writes exactly the files its
own subcommand writes, with the same results (the attacks draw from their own seeded streams).

dvc.yaml runs `assess` per trained arm and seed, and once per seed for both untrained reference arms (they
need no training, so on a cluster that job overlaps the training jobs). A process that loads a model spends
~8 s importing torch and transformers on a 2-core machine, more than most of these steps compute at the
embedded scale; on a cluster it saves loading the checkpoint four times."""
from __future__ import annotations

from ..attacks import load_setup
from . import controls, evaluate, hotflip, uat


def run(params, args) -> int:
    for arm in args.arm:
        setup = load_setup(params, arm, args.seed)
        evaluate.evaluate(params, arm, args.seed, setup.model, setup.meta)
        for step in (uat, hotflip, controls):
            step.attack(params, setup, arm, args.seed)
    return 0
