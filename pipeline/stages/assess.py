"""Stage `assess`: everything measured on the arms of one seed, in one process that loads each model once:
`evaluate` (test perplexity), then the attacks (`uat`, `hotflip`, `controls`; pipeline/assessment.py).
`--frontier` adds the frontier's checkpoints: alone, pretraining's (frontier.steps, written under
outputs/frontier/s<seed>/); with trained arms, their recovery checkpoints (frontier.recovery_steps, written
under outputs/recovery/<arm>-s<seed>/). A checkpoint gets what an arm gets (`evaluate`, `uat`, `hotflip`,
`controls`): gradient vs gradient-free and the worst case are compared along the curves, not only at the arms.
Each step writes exactly the files its own subcommand writes, with the same results (the attacks draw from
their own seeded streams). Stopped by SIGUSR1/SIGTERM it exits REQUEUE_EXIT_CODE; a rerun skips
every arm an earlier attempt finished (the record in its attack cache matches: same attack fingerprint,
evaluate's inputs and the outputs as written), then finished attack methods, and resumes the stopped search;
the caches go once every arm of the job is done.

dvc.yaml runs `assess` per trained arm and seed, and per untrained reference arm and seed (`assess-ref`: they
need no training, so on a cluster those jobs overlap the training jobs). A process that loads a model spends
~8 s importing torch and transformers on a 2-core machine, more than most of these steps compute at the
embedded scale."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..arms import checkpoints_of
from ..loading import load_arm_model
from ..params import STEPS, ParamsError
from ..paths import DATA_DIR, attack_dir, eval_dir, frontier_dir, recovery_dir
from .. import assessment

RECORD = "assessed"     # an arm's record in its attack cache: evaluate's inputs and the outputs as written


def outputs(arm: str, seed: int, steps) -> list[Path]:
    named = [*steps, "diagnostics"] if "controls" in steps else steps
    return [eval_dir(arm, seed) / "metrics.json", eval_dir(arm, seed) / "per_doc.json",
            *(attack_dir(arm, seed) / f"{name}.json" for name in named)]


def record(params, arm: str, seed: int, steps) -> dict:
    """What an arm's finished assessment depends on beyond its attack fingerprint (evaluate's params, test
    split and code), and the sha256 of every output as it stands."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(params.eval), sort_keys=True).encode())
    code = Path(assessment.__file__).parent
    assessment.hash_files(h, [DATA_DIR / "tokens/test.bin", DATA_DIR / "tokens/test.offsets.npy",
                              DATA_DIR / "docs/test.jsonl", code / "assessment.py", code / "evaluation.py"])
    files = {}
    for path in outputs(arm, seed, steps):
        files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return {"evaluate": h.hexdigest(), "outputs": files}


def run(params, args) -> int:
    if not (args.arm or args.frontier):
        raise ParamsError("--arm", None, "one or more arms, or --frontier")
    arms = list(args.arm or [])
    if args.frontier:      # the stage's outputs exist even with no checkpoints
        for name in args.arm or ["pretrained"]:
            arms += checkpoints_of(name, params.frontier)
            out = recovery_dir(name, args.seed) if args.arm else frontier_dir(args.seed)
            out.mkdir(parents=True, exist_ok=True)
    caches = []
    for arm in arms:
        model, meta = load_arm_model(params, arm, args.seed, scoring=True)
        setup = assessment.load_setup(params, arm, args.seed, loaded=(model, meta))
        cache = assessment.cache_for(params, setup, arm, args.seed)
        caches.append(cache)
        done = cache.result(RECORD)
        if done is not None and done == record(params, arm, args.seed, STEPS):
            print(f"assess {arm} s{args.seed}: finished by an earlier attempt, outputs unchanged; skipped")
            continue
        assessment.evaluate(params, arm, args.seed, model, meta)
        code = assessment.run_stopping(params, setup, arm, args.seed, STEPS, cache)
        if code:
            return code
        cache.put(RECORD, record(params, arm, args.seed, STEPS))
    for cache in caches:
        cache.clear()
    return 0
