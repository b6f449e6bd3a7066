"""Stage `attack`, as subcommands `uat`, `hotflip`, `controls` and `targeted` (one step each; `assess` runs all
four after `evaluate`). The steps, their outputs and their resumable cache: pipeline/assessment.py."""
from __future__ import annotations

from ..assessment import load_setup, run_stopping


def run(params, args) -> int:
    return run_stopping(params, load_setup(params, args.arm, args.seed), args.arm, args.seed, (args.command,))
