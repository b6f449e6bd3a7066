"""`python -m pipeline <stage>`: run one pipeline stage from params.yaml."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import oom
from . import params as params_mod
from . import arms as arms_mod
from .arms import ARM_NAMES, ARMS, TRAINED_ARMS

# name -> (module under pipeline.stages, one-line help, the arms --arm accepts (None: no --arm/--seed))
STAGES = {
    "data": ("data", "corpus, document-level splits, tokenizer, packed token ids", None),
    "pretrain": ("pretrain", "the pretrained arm: tiny GPT-NeoX trained here, or the pinned local checkpoint", None),
    "monotonic_init": ("monotonic_init", "apply the softplus constraint to the pretrained model (no training)", None),
    "select_lr": ("select_lr", "each trained arm's learning rate: the same grid and short budget, best validation loss",
                  None),
    "train": ("train", "recovery-train one arm (baseline, monotonic or flipped) for one seed", TRAINED_ARMS),
    "evaluate": ("evaluate", "held-out perplexity (sliding window) and per-document NLL of one arm", ARM_NAMES),
    "uat": ("attack", "universal adversarial trigger search (gradient top-k + true-loss re-scoring)", ARM_NAMES),
    "hotflip": ("attack", "iterative HotFlip on the prompt tokens of each attack-evaluation example", ARM_NAMES),
    "controls": ("attack", "greedy and random controls at the attacks' forward cap, gradient-masking diagnostics",
                 ARM_NAMES),
    "targeted": ("attack", "GCG's targeted objective with HotFlip's search toward another example's continuation, "
                 "and its random control", ARM_NAMES),
    "assess": ("assess", "evaluate, uat, hotflip, controls and targeted of one seed's arm(s), each model loaded once "
               "(dvc.yaml)",
               ARM_NAMES),
    "benchmarks": ("benchmarks", "zero-shot tasks through lm-evaluation-harness on the arm(s) of one seed", ARM_NAMES),
    "transfer": ("transfer", "triggers and flips found on each arm applied to every other arm (one seed)", None),
    "aggregate": ("aggregate", "multi-seed statistics, results JSON, Markdown report and plots", None),
}
MODEL_FREE_STAGES = ("data", "aggregate")    # every other stage loads or trains a model


class _OneLineHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each stage with its help on one line, whatever the terminal width: wide, and the help column
    starts past the longest stage name (argparse measures subcommand names two columns short)."""

    def __init__(self, prog):
        super().__init__(prog, width=160, max_help_position=40)
        self._action_max_length = max(map(len, STAGES)) + 6


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser whose `arguments(parser)` run when that subcommand is parsed (its --help too), so a
    tool's module is imported only by its own subcommand. Tools (preflight, fetch, verify) are imported by name,
    like the stages: a stage run loads this file, its stage module and their imports, never a tool
    (tests/test_pipeline_dvc.py compares that with dvc.yaml's code deps)."""

    def __init__(self, *args, arguments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._arguments = arguments

    def parse_known_args(self, args=None, namespace=None):
        if self._arguments is not None:
            self._arguments(self)
            self._arguments = None
        return super().parse_known_args(args, namespace)


def _preflight_arguments(sp: argparse.ArgumentParser) -> None:
    preflight = importlib.import_module("pipeline.preflight")
    sp.add_argument("--params", default="params.yaml")
    sp.add_argument("--gpu", choices=sorted(preflight.DEVICES), help="default: a100-80gb for model.source hf, else cpu")
    sp.add_argument("--mfu", type=float, help=f"achieved fraction of the dense peak (default {preflight.MFU_DEFAULT})")
    sp.add_argument("--resources", default=str(preflight.RESOURCES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=_OneLineHelpFormatter,
                                     epilog="Switch every setting at once: python -m pipeline profile cluster "
                                            "(profiles/: embedded = params.yaml default, smoke, rehearsal, cluster).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>", parser_class=_SubParser)
    for name, (_, help_text, arm_choices) in STAGES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if arm_choices:
            checkpoints = arm_choices == ARM_NAMES and name != "benchmarks"     # <arm>-step<N> too: check_arm
            sp.add_argument("--arm", required=name != "assess", choices=None if checkpoints else arm_choices,
                            nargs="+" if name in ("assess", "benchmarks") else None,
                            help="; ".join(f"{a}: {ARMS[a].description}" for a in arm_choices)
                            + ("; <arm>-step<N>: a checkpoint from along the arm's training (pretrained: N in "
                               "frontier.steps; baseline, monotonic: N in frontier.recovery_steps)"
                               if checkpoints else ""))
            sp.add_argument("--seed", required=True, type=int)
            if name == "assess":
                sp.add_argument("--frontier", action="store_true",
                                help="the frontier's checkpoints too: with no --arm, pretraining's (frontier.steps); "
                                     "with --arm, those arms' recovery checkpoints (frontier.recovery_steps)")
        elif name == "transfer":
            sp.add_argument("--seed", required=True, type=int)
    sp = sub.add_parser("check-params", help="validate a params file and its hub refs in refs.lock.yaml; print its hash")
    sp.add_argument("--params", default="params.yaml")
    sub.add_parser("preflight", help="memory, time and scratch of every stage vs slurm/resources.ini and a GPU",
                   arguments=_preflight_arguments)
    sp = sub.add_parser("fetch", help="resolve the params' hub refs into refs.lock.yaml and download what they name "
                                      "(network; login node)")
    sp.add_argument("--params", default="params.yaml")
    sp.add_argument("--update", action="store_true", help="resolve refs already in refs.lock.yaml again (moves entries)")
    sp = sub.add_parser("profile", help="switch params.yaml to a named profile (profiles/NAME.yaml), validated first")
    sp.add_argument("name")
    sp.add_argument("--params", default="params.yaml")
    sp = sub.add_parser("verify", help="check non-negativity of a saved model's constrained weights")
    sp.add_argument("model_dir")
    sp.add_argument("--variant", required=True, choices=params_mod.VARIANTS)
    return parser


def check_arm(name: str, params) -> None:
    """--arm of a stage without fixed choices: an arm of the table, or a checkpoint along an arm's training that
    params.frontier lists (pretraining: frontier.steps; recovery: frontier.recovery_steps)."""
    try:
        arm = arms_mod.get(name)
    except ValueError:
        raise params_mod.ParamsError("--arm", name, f"one of {', '.join(ARM_NAMES)} or <arm>-step<N>") from None
    if arm.checkpoint_of is not None and name not in arms_mod.checkpoints_of(arm.checkpoint_of, params.frontier):
        key = arms_mod.frontier_key(arm.checkpoint_of)
        raise params_mod.ParamsError(key, getattr(params.frontier, key.split(".")[1]),
                                     f"a list containing {arm.step} (--arm {name})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "profile":
            return switch_profile(args.name, args.params)
        if args.command == "verify":
            return importlib.import_module("pipeline.monotonic").verify_dir(args.model_dir, args.variant)
        params = params_mod.load(args.params)
        if args.command == "check-params":
            return check_params(params, args.params)
        if args.command == "preflight":
            return importlib.import_module("pipeline.preflight").run(params, args)
        if args.command == "fetch":
            return importlib.import_module("pipeline.fetch").run(params, update=args.update)
        if getattr(args, "seed", None) is not None and args.seed not in params.seeds:
            raise params_mod.ParamsError("seeds", params.seeds, f"a list containing the requested --seed {args.seed}")
        requested = getattr(args, "arm", None)
        for arm in [requested] if isinstance(requested, str) else requested or []:
            check_arm(arm, params)
    except params_mod.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipeline.stages.{STAGES[args.command][0]}")
    importlib.import_module("pipeline.device").tune_host_allocator()
    try:
        if args.command not in MODEL_FREE_STAGES:
            importlib.import_module("pipeline.device").require_capability(params.device.min_compute_capability)
        return module.run(params, args) or 0
    except (params_mod.InputError, params_mod.ParamsError, params_mod.HardwareError) as exc:
        # found before any compute: a pinned hub file missing or damaged, a value or GPU that does not fit the job
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = oom.advice(exc, args.command, params)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return oom.OOM_EXIT_CODE


def check_params(params, path: str) -> int:
    """Valid params, and a commit in refs.lock.yaml for every hub ref they name (else exit 2 naming fetch)."""
    refs = importlib.import_module("pipeline.refs")      # by name, like the tools: no stage's code dep

    missing = refs.unresolved(params)
    if missing:
        print(f"error: {path} is valid, but {refs.LOCK_FILE} has no commit for:\n  " + "\n  ".join(map(str, missing))
              + f"\nrun `{refs.FETCH}` on a login node with network, then commit {refs.LOCK_FILE}", file=sys.stderr)
        return 2
    print(f"{path}: valid (profile {params.profile}, hash {params.hash()}; {len(refs.requested(params))} hub refs "
          f"resolved in {refs.LOCK_FILE})")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
