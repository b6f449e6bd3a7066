"""`python -m pipeline <stage>`: run one pipeline stage from params.yaml."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from . import params as params_mod
from .arms import ARM_NAMES, TRAINED_ARMS

# name -> (module under pipeline.stages, one-line help, the arms --arm accepts (None: no --arm/--seed))
STAGES = {
    "data": ("data", "corpus, document-level splits, tokenizer, packed token ids", None),
    "pretrain": ("pretrain", "the pretrained arm: tiny GPT-NeoX trained here, or the pinned local checkpoint", None),
    "monotonic_init": ("monotonic_init", "apply the softplus constraint to the pretrained model (no training)", None),
    "train": ("train", "recovery-train one arm (baseline or monotonic) for one seed", TRAINED_ARMS),
    "evaluate": ("evaluate", "held-out perplexity (sliding window) and per-document NLL of one arm", ARM_NAMES),
    "uat": ("attack", "universal adversarial trigger search (gradient top-k + true-loss re-scoring)", ARM_NAMES),
    "hotflip": ("attack", "iterative HotFlip on the prompt tokens of each attack-evaluation example", ARM_NAMES),
    "controls": ("attack", "greedy and random controls at the attacks' forward cap, gradient-masking diagnostics",
                 ARM_NAMES),
    "assess": ("assess", "evaluate, uat, hotflip and controls of one seed's arm(s), each model loaded once (dvc.yaml)",
               ARM_NAMES),
    "transfer": ("transfer", "triggers and flips found on each arm applied to every other arm (one seed)", None),
    "aggregate": ("aggregate", "multi-seed statistics, results JSON, Markdown report and plots", None),
}


class _OneLineHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each stage with its help on one line, whatever the terminal width: wide, and the help column
    starts past the longest stage name (argparse measures subcommand names two columns short)."""

    def __init__(self, prog):
        super().__init__(prog, width=160, max_help_position=40)
        self._action_max_length = max(map(len, STAGES)) + 6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=_OneLineHelpFormatter,
                                     epilog="Switch every setting at once: python -m pipeline profile cluster "
                                            "(profiles/: embedded = params.yaml default, smoke, cluster).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name, (_, help_text, arm_choices) in STAGES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if arm_choices:
            sp.add_argument("--arm", required=True, choices=arm_choices, nargs="+" if name == "assess" else None)
            sp.add_argument("--seed", required=True, type=int)
        elif name == "transfer":
            sp.add_argument("--seed", required=True, type=int)
    sp = sub.add_parser("check-params", help="validate a params file and print its hash")
    sp.add_argument("--params", default="params.yaml")
    sp = sub.add_parser("profile", help="switch params.yaml to a named profile (profiles/NAME.yaml), validated first")
    sp.add_argument("name")
    sp.add_argument("--params", default="params.yaml")
    sp = sub.add_parser("verify", help="check non-negativity of a saved model's constrained weights")
    sp.add_argument("model_dir")
    sp.add_argument("--variant", required=True, choices=params_mod.VARIANTS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "profile":
            return switch_profile(args.name, args.params)
        if args.command == "verify":
            return verify_dir(args.model_dir, args.variant)
        params = params_mod.load(args.params)
        if args.command == "check-params":
            print(f"{args.params}: valid (profile {params.profile}, hash {params.hash()})")
            return 0
        if getattr(args, "seed", None) is not None and args.seed not in params.seeds:
            raise params_mod.ParamsError("seeds", params.seeds, f"a list containing the requested --seed {args.seed}")
    except params_mod.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipeline.stages.{STAGES[args.command][0]}")
    return module.run(params, args) or 0


def switch_profile(name: str, target: str) -> int:
    from .io import atomic_write_text

    source = params_mod.profile_path(name)
    available = sorted(p.stem for p in source.parent.glob("*.yaml"))
    if name not in available:
        raise params_mod.ParamsError("profile", name, f"one of {', '.join(available)}")
    profile = params_mod.load(source).profile   # validate before touching params.yaml
    if profile != name:
        raise params_mod.ParamsError(f"{source}: profile", profile, f"'{name}', the file's own name")
    atomic_write_text(target, source.read_text())
    print(f"{target} now holds profile '{name}' ({source}); `dvc repro` will rerun what it changes")
    return 0


def verify_dir(model_dir: str, variant: str) -> int:
    """Verify the materialized weights (model.safetensors) of any saved model and, for a parametrized
    checkpoint, also its V (load_parametrized checks the recorded variant and that W = softplus(V))."""
    from .models import load_causal_lm
    from .monotonic import STATE_FILE, MonotonicityError, load_parametrized, verify

    try:
        report = verify(load_causal_lm(model_dir), variant)
        if (Path(model_dir) / STATE_FILE).exists():
            load_parametrized(model_dir, expected_variant=variant)
            report["parametrized_state_checked"] = True
    except (MonotonicityError, ValueError, OSError) as exc:
        print(f"FAILED: {model_dir}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
