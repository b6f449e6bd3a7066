"""Stage `train`: recovery-train one arm for one seed.

baseline starts from the pretrained model, monotonic from monotonic_init (V = the softplus parameter,
its own optimizer group), flipped from monotonic_init's materialized W with no constraint. All get
params.train_for_arm(arm) with the learning rate select_lr chose for the arm (paths.LR_SELECTION): identical
budget, data order (seeded by --seed), optimizer and schedule unless train.arm_overrides says otherwise,
which is recorded in metrics.json and flagged loudly. Resumes automatically from paths.checkpoint_dir(arm, seed); exits with
REQUEUE_EXIT_CODE (75) when it stops early with resumable state. The final outputs appear only once
training is complete, the models in paths.train_dir(arm, seed):
  model/        plain HF checkpoint (monotonic: materialized W + V, re-verified W >= 0)
  steps/step<N> the same at each step N of frontier.recovery_steps (exported into the resumable checkpoint
                directory as training passes N, so a requeued run keeps them; copied here at the end)
and what the report reads in paths.train_log_dir(arm, seed):
  metrics.json  validation loss/perplexity, budget, throughput, update norms per group, overrides
  log.csv       per logged step: step, loss, lr, grad_norm, update_norm_<group>
  val_log.csv   step, val_loss, val_ppl
The CSVs' provenance is metrics.json's (same directory, with their sha256). Wall times, throughput and
the number of restarts go to the run record (pipeline.provenance.record_run), not to these outputs."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

from .. import arms
from .. import data
from .. import launch, lr_select
from ..checkpoints import sha256
from ..io import read_json, staged_dir, write_csv, write_json
from ..loading import load_start_model
from ..models import load_causal_lm, save_causal_lm
from ..monotonic import MONOTONICITY_SCOPE, load_parametrized, nonnegative_share, save_parametrized, verify
from ..params import TrainParams
from ..paths import DATA_DIR, LR_SELECTION, checkpoint_dir, run_name, train_dir, train_log_dir
from ..provenance import provenance, record_run
from ..training import (REQUEUE_EXIT_CODE, accumulation_per_process, data_order_sha256, epochs, seed_everything,
                        split_log, train, update_norms_from)


def export_model(model, out: Path, arm: arms.Arm, variant: str | None, tokenizer, meta: dict) -> dict | None:
    """Write `model` as a plain HF directory; constrained: verified W >= 0 before and after writing, V kept."""
    if not arm.constrained:
        save_causal_lm(model, tokenizer, out, meta)
        return None
    report = verify(model, variant)
    save_parametrized(model, tokenizer, out, variant, meta)
    load_parametrized(out, expected_variant=variant)
    return {k: v for k, v in report.items() if k != "modules"}


def step_exporter(steps, arm: arms.Arm, variant: str | None, tokenizer, meta: dict):
    """after_step for the trainer: at each of `steps`, the model exported into <checkpoint root>/steps/step<N>."""
    def export(step: int, model, root: Path) -> None:
        if step in steps:
            with staged_dir(root / "steps" / f"step{step}") as out:
                export_model(model, out, arm, variant, tokenizer,
                             {**meta, "arm": arms.at_step(arm.name, step).name, "checkpoint": f"step{step}"})
    return export


def copy_step_exports(root: Path, steps, out: Path) -> None:
    for step in steps:
        exported = root / "steps" / f"step{step}"
        if not exported.is_dir():
            raise FileNotFoundError(f"{exported}: the export at recovery step {step} is missing (the run resumed "
                                    "from a checkpoint without it): remove the checkpoint directory and retrain")
        shutil.copytree(exported, out / f"step{step}")


def nonnegative_shares(params, start, trained, steps_dir: Path) -> dict[str, float]:
    """The share of monotonic.variant's weights that are >= 0: at the start, at each recovery export and at
    the end (1.0 throughout for a constrained arm; an unconstrained one started from |W| may stay near it)."""
    variant = params.monotonic.variant
    return {"start": nonnegative_share(start, variant),
            **{f"step{s}": nonnegative_share(load_causal_lm(steps_dir / f"step{s}"), variant)
               for s in params.frontier.recovery_steps},
            "final": nonnegative_share(trained, variant)}


def warn_overrides(arm_overrides: dict) -> None:
    bar = "!" * 100
    print(f"{bar}\nWARNING: train.arm_overrides is set: the arms do NOT get the same training "
          f"({json.dumps(arm_overrides)}). Recorded in metrics.json as `overrides`; any comparison must say so.\n"
          f"{bar}", file=sys.stderr, flush=True)


def run(params, args) -> int:
    arm, seed = arms.get(args.arm), args.seed
    name = arm.name
    if params.train.arm_overrides:
        warn_overrides(params.train.arm_overrides)
    variant = params.monotonic.variant if arm.constrained else None
    processes = launch.requested_processes()
    if (processes > 1 or launch.nodes() > 1) and not launch.under_launcher():
        accumulation_per_process(params.train_for_arm(name).grad_accum, processes * launch.nodes())   # before any worker starts
        return launch.relaunch(sys.argv[1:], processes)
    selection = read_json(LR_SELECTION)["arms"][name]
    tp = lr_select.selected(params, arm, selection)

    seq_len = params.data.seq_len
    train_data = data.PackedSequences(DATA_DIR, "train", seq_len)
    passes = epochs(tp, train_data, f"train {name} s{seed}")     # before any model is loaded
    seed_everything(seed)
    model, constrained, source = load_start_model(params, arm, seed)
    tokenizer = data.load_tokenizer(DATA_DIR / "tokenizer")
    val_data = data.PackedSequences(DATA_DIR, "validation", seq_len)
    upstream = {k: v for k, v in params.to_dict().items() if k in ("data", "tokenizer", "model", "pretrain", "monotonic")}
    identity = {"arm": name, "seed": seed, "start": str(source), "upstream": upstream,
                "recovery_exports": params.frontier.recovery_steps}
    prov = provenance(params, "train", seed=seed, arm=name)
    meta = {"arm": name, "seed": seed, "variant": variant, "trained_from": str(source), "provenance": prov}

    result = train(model, tp, train_data, val_data, seed=seed, constrained=constrained,
                   checkpoint_base=checkpoint_dir(name, seed), identity=identity, desc=f"train {name} s{seed}",
                   export_best=lambda m, out: export_model(m, out, arm, variant, tokenizer,
                                                          {**meta, "checkpoint": "best"}),
                   after_step=step_exporter(set(params.frontier.recovery_steps), arm, variant, tokenizer, meta))
    state = result.state
    if not result.completed:
        if result.is_main_process:
            print(f"train {name} s{seed}: STOPPED EARLY ({result.stop_reason}) at step {state.step}/{tp.max_steps}; "
                  f"resumable state in {result.checkpoint_root}; exiting with status {REQUEUE_EXIT_CODE} "
                  "(requeue to continue)", flush=True)
        return REQUEUE_EXIT_CODE
    if not result.is_main_process:
        return 0

    reference, _, _ = load_start_model(params, arm, seed)
    total_update = update_norms_from(result.model, reference, result.groups)
    still = {g: n for g, n in total_update.items() if n < tp.min_update_norm}
    if still:
        raise RuntimeError(f"train {name} s{seed}: groups {sorted(still)} ended at distance {still} from the start "
                           f"model, below train.min_update_norm={tp.min_update_norm}: nothing was trained")
    with staged_dir(train_dir(name, seed)) as out:
        verify_report = export_model(result.model, out / "model", arm, variant, tokenizer, {**meta, "checkpoint": "final"})
        (out / "steps").mkdir()
        copy_step_exports(result.checkpoint_root, params.frontier.recovery_steps, out / "steps")
    shares = nonnegative_shares(params, reference, result.model, result.checkpoint_root / "steps")
    trained = Trained(tp, passes, source, selection, train_data, verify_report, shares, total_update)
    write_logs(params, arm, seed, result, trained, prov)
    return 0


@dataclasses.dataclass(frozen=True)
class Trained:
    """What a finished run's logs report beyond the trainer's result."""
    tp: TrainParams             # the arm's, with its selected lr
    passes: float               # epochs over the train split
    source: Path                # the start model
    selection: dict             # the arm's lr selection record
    train_data: data.PackedSequences
    verify_report: dict | None  # non-negativity of the exported model's constrained weights
    shares: dict                # share of constrained-variant weights non-negative, per checkpoint
    total_update: dict          # W-space distance from the start model, per parameter group


def write_logs(params, arm: arms.Arm, seed: int, result, trained: Trained, prov: dict) -> None:
    """metrics.json, log.csv and val_log.csv into paths.train_log_dir; how it ran into the run record."""
    name, state, seq_len = arm.name, result.state, params.data.seq_len
    tokens_seen = state.step * result.global_batch * seq_len
    final = state.val_log[-1]
    log_columns, log, timing = split_log(result.log_columns, state.log)
    with staged_dir(train_log_dir(name, seed)) as out:
        write_csv(out / "log.csv", log_columns, log)
        write_csv(out / "val_log.csv", ["step", "val_loss", "val_ppl"], state.val_log)
        metrics = {
            "arm": name, "seed": seed, "variant": params.monotonic.variant if arm.constrained else None,
            "validation_loss": final["val_loss"], "validation_perplexity": math.exp(final["val_loss"]),
            "validation_windows": result.val_windows, "validation_tokens": result.val_windows * seq_len,
            "best_validation_loss": state.best_val_loss, "best_step": state.best_step,
            "steps": state.step, "tokens_seen": tokens_seen, "epochs": trained.passes,
            "sequences_seen": state.step * result.global_batch, "global_batch_sequences": result.global_batch,
            "update_norm_total": trained.total_update, "update_norm_path": state.update_norm_sum,
            "nonnegative_share": trained.shares,
            "param_groups": {g: len(names) for g, names in result.groups.items()},
            "overrides": dict(params.train.arm_overrides.get(name, {})),
            "budgets_equal": not params.train.arm_overrides,
            "train": dataclasses.asdict(trained.tp), "lr_selection": trained.selection,
            "precision_autocast": result.precision,
            "data_order_sha256": data_order_sha256(trained.train_data, seed, state.step * result.global_batch),
            "trained_from": str(trained.source), "fingerprint": result.fingerprint,
            "checkpoint_dir": str(result.checkpoint_root),
            "monotonic_verify": trained.verify_report,
            "monotonicity_scope": MONOTONICITY_SCOPE if arm.constrained else None,
            "files": {f: sha256(out / f) for f in ("log.csv", "val_log.csv")},
            "provenance": prov,
        }
        write_json(out / "metrics.json", metrics)
    tokens_per_s = tokens_seen / state.step_seconds
    record_run(f"train-{run_name(name, seed)}", prov, result.model, seconds=round(state.wall_seconds, 2),
               step_seconds=round(state.step_seconds, 2), tokens_per_s=tokens_per_s, runs=state.runs, timing=timing,
               processes=result.num_processes)     # how it ran, not what it made: outside the hashed metrics
    moved = ", ".join(f"{g} {n:.3g}" for g, n in trained.total_update.items())
    print(f"train {name} s{seed}: validation perplexity {metrics['validation_perplexity']:.2f} after {state.step} "
          f"steps ({tokens_seen} tokens, {tokens_per_s:.0f} tokens/s); total update norm: {moved}")
