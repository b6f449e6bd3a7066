"""Stage `assess`: everything measured on the arms of one seed, in one process that loads each model once:
`evaluate` (test perplexity), then the attacks (`uat`, `hotflip`, `controls`; pipeline/stages/attack.py).
`--frontier` adds the frontier's checkpoints: alone, pretraining's (frontier.steps, written under
outputs/frontier/s<seed>/); with trained arms, their recovery checkpoints (frontier.recovery_steps, written
under outputs/recovery/<arm>-s<seed>/). A checkpoint gets `evaluate`, `uat` and `hotflip`, what the matched-NLL
comparison reads; the controls and their diagnostics are the arms' own.
Each step writes exactly the files its own subcommand writes, with the same results (the attacks draw from
their own seeded streams). Stopped by SIGUSR1/SIGTERM it exits REQUEUE_EXIT_CODE; a rerun skips finished
arms' attack methods (their cached results) and resumes the stopped search.

dvc.yaml runs `assess` per trained arm and seed, and once per seed for both untrained reference arms (they
need no training, so on a cluster that job overlaps the training jobs; `assess --arm <one>` also works, so
a cluster can run one reference arm per job). A process that loads a model spends ~8 s importing torch and
transformers on a 2-core machine, more than most of these steps compute at the embedded scale."""
from __future__ import annotations

from ..arms import checkpoints_of, get
from ..loading import load_arm_model
from ..params import ParamsError
from ..paths import frontier_dir, recovery_dir
from . import attack, evaluate


def checkpoint_of(arm: str) -> str | None:
    return get(arm).checkpoint_of


def run(params, args) -> int:
    if not (args.arm or args.frontier):
        raise ParamsError("--arm", None, "one or more arms, or --frontier")
    arms = list(args.arm or [])
    if args.frontier:      # the stage's outputs exist even with no checkpoints
        for name in args.arm or ["pretrained"]:
            arms += checkpoints_of(name, params.frontier)
            out = recovery_dir(name, args.seed) if args.arm else frontier_dir(args.seed)
            out.mkdir(parents=True, exist_ok=True)
    for arm in arms:
        model, meta = load_arm_model(params, arm, args.seed)
        evaluate.evaluate(params, arm, args.seed, model, meta)
        setup = attack.load_setup(params, arm, args.seed, loaded=(model, meta))
        steps = attack.CHECKPOINT_STEPS if checkpoint_of(arm) else attack.STEPS
        code = attack.run_stopping(params, setup, arm, args.seed, steps)
        if code:
            return code
    return 0
