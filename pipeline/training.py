"""The one training loop, shared by the embedded pretraining and the recovery training of both arms.

Built on HF accelerate, so the same code runs on CPU, one GPU, or several processes and nodes
(`accelerate launch --multi_gpu --num_processes N -m pipeline train ...`; on CPU `torchrun` with
ACCELERATE_USE_CPU=true gives gloo). Data-parallel (DDP) only: every process holds the whole model.

Data: each optimizer step consumes one fixed window of the seeded stream of packed training windows,
positions [step * G, (step + 1) * G) of PackedSequences.sequence_ids(seed, ...), where the global batch
G = batch_size * grad_accum * processes. Process r's micro-batch m starts at step * G + (m * P + r) *
batch_size. The data of a step is therefore a function of (seed, step) alone: resume needs no replay,
and any process count with the same global batch sees the same sequences.

Numerics: master weights stay fp32 (checked); bf16 is autocast for compute only (precision auto: on a
CUDA device that supports it). Per logged step the actual update norm of every parameter group is
measured from the weights themselves, and a group whose accumulated update stays below
train.min_update_norm fails the run (the prior implementation's bf16 rounding froze the weights).

Stopping early: SIGUSR1/SIGTERM or the stop file (pipeline/stopping.py), train.max_steps_per_run and
train.wall_clock_limit_s make the loop checkpoint at the next step boundary and return completed=False;
the stage exits with REQUEUE_EXIT_CODE.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoints as ckpt
from .params import TrainParams
from .provenance import staged_dir
from .stopping import REQUEUE_EXIT_CODE, StopRequests  # noqa: F401  (REQUEUE_EXIT_CODE: re-exported)

GROUPS = ("decay", "no_decay", "constrained")
# train keys that do not change the weights a run produces; everything else is part of its fingerprint
OPERATIONAL_KEYS = ("eval_interval", "eval_batches", "log_interval", "checkpoint_interval", "keep_checkpoints",
                    "max_steps_per_run", "wall_clock_limit_s", "min_update_norm", "gradient_checkpointing",
                    "arm_overrides")


class FrozenParametersError(RuntimeError):
    """A trained parameter group did not move."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Linear warmup, then cosine decay to peak * min_lr_ratio at the last step."""
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a [B, T+1] packed batch."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def mixed_precision(precision: str) -> str:
    """accelerate's mixed_precision for train.precision (autocast only; weights stay fp32)."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16"}[precision]


def parameter_groups(model, constrained: Sequence[nn.Parameter]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """decay: 2-D weights except embedding tables; no_decay: biases, norms, embeddings;
    constrained: the softplus V tensors (their own lr multiplier and weight decay)."""
    constrained_ids = {id(p) for p in constrained}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list] = {name: [] for name in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in constrained_ids:
            groups["constrained"].append((name, p))
        elif p.ndim >= 2 and id(p) not in embedding_ids:
            groups["decay"].append((name, p))
        else:
            groups["no_decay"].append((name, p))
    if len(groups["constrained"]) != len(constrained_ids):
        raise ValueError("some constrained parameters are not trainable parameters of the model")
    return {k: v for k, v in groups.items() if v}


def group_settings(tp: TrainParams) -> dict[str, dict]:
    return {"decay": {"lr": tp.lr, "weight_decay": tp.weight_decay},
            "no_decay": {"lr": tp.lr, "weight_decay": 0.0},
            "constrained": {"lr": tp.lr * tp.constrained_lr_multiplier, "weight_decay": tp.constrained_weight_decay}}


TRAJECTORY_CODE = ("training.py", "checkpoints.py", "monotonic.py", "models.py", "data.py")


def code_hash() -> str:
    """Hash of the modules that shape a training trajectory: a code change never resumes old state."""
    h = hashlib.sha256()
    for name in TRAJECTORY_CODE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def run_fingerprint(identity: dict, tp: TrainParams, global_batch: int) -> str:
    """Everything that determines the weights a run produces; checkpoints live under it, so changed
    params or code can never resume another configuration's state."""
    trajectory = {k: v for k, v in dataclasses.asdict(tp).items() if k not in OPERATIONAL_KEYS}
    payload = {"identity": identity, "train": trajectory, "global_batch": global_batch, "code": code_hash()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validation_windows(val_data, count: int) -> np.ndarray:
    """A fixed, seed-independent set of validation windows, evenly spaced over the split."""
    if count >= val_data.num_sequences:
        return np.arange(val_data.num_sequences)
    return np.unique(np.linspace(0, val_data.num_sequences - 1, count).round().astype(np.int64))


def data_order_sha256(train_data, seed: int, sequences: int) -> str:
    return hashlib.sha256(train_data.sequence_ids(seed, 0, sequences).tobytes()).hexdigest()


@dataclass
class TrainState:
    """Everything besides tensors and RNG that a checkpoint restores (trainer.json)."""
    step: int = 0
    step_seconds: float = 0.0      # time inside optimizer steps, all runs
    wall_seconds: float = 0.0      # everything incl. evaluation and checkpoints, all runs
    runs: int = 0                  # how many times this run was started (1 + resumes)
    best_val_loss: float | None = None
    best_step: int | None = None
    update_norm_sum: dict = field(default_factory=dict)   # group -> sum of logged per-step update norms
    log: list = field(default_factory=list)
    val_log: list = field(default_factory=list)


@dataclass
class TrainResult:
    completed: bool
    stop_reason: str | None
    state: TrainState
    model: nn.Module                # unwrapped
    is_main_process: bool
    num_processes: int
    global_batch: int
    fingerprint: str
    checkpoint_root: Path | None
    groups: dict[str, list[str]]    # group -> parameter names
    log_columns: list[str]
    precision: str
    val_windows: int


def train(model, tp: TrainParams, train_data, val_data, *, seed: int, constrained: Sequence[nn.Parameter] = (),
          checkpoint_base: Path | None = None, identity: dict | None = None, desc: str = "train",
          export_best: Callable[[nn.Module, Path], None] | None = None) -> TrainResult:
    """Train `model` (fp32 parameters) in place for tp.max_steps optimizer steps, resuming from the newest
    valid checkpoint under checkpoint_base/<fingerprint> if there is one. Without checkpoint_base the run
    neither checkpoints nor stops early."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    not_fp32 = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if not_fp32:
        raise ValueError(f"master weights must be fp32 (bf16 weights round small updates to zero); "
                         f"got {len(not_fp32)} non-fp32 parameters, e.g. {not_fp32[0]}")
    precision = mixed_precision(tp.precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    main, rank, procs = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    global_batch = tp.batch_size * tp.grad_accum * procs
    seq_len = train_data.seq_len
    fingerprint = run_fingerprint(identity or {}, tp, global_batch)
    root = checkpoint_base / fingerprint if checkpoint_base is not None else None

    if tp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(accelerator.device)
    groups = parameter_groups(model, constrained)
    settings = group_settings(tp)
    optimizer = torch.optim.AdamW(
        [{"params": [p for _, p in members], "name": g, **settings[g]} for g, members in groups.items()],
        lr=tp.lr, betas=(tp.adam_beta1, tp.adam_beta2))
    base_lrs = [settings[g]["lr"] for g in groups]   # the schedule scales these; never read back from a checkpoint
    columns = ["step", "loss", "lr", "grad_norm", *[f"update_norm_{g}" for g in groups], "tokens_per_s", "elapsed_s"]

    state = TrainState(update_norm_sum={g: 0.0 for g in groups})
    resume_from = None
    if root is not None:
        found = [ckpt.latest_valid(root, fingerprint) if main else None]
        broadcast_object_list(found)
        resume_from = found[0]
    if resume_from is not None:
        ckpt.load_model_state(resume_from, model)
        optimizer.load_state_dict(ckpt.read_optimizer(resume_from))
        saved = ckpt.read_json(resume_from / "trainer.json")
        if saved["data"] != data_position(seed, saved["state"]["step"], global_batch, seq_len):
            raise ckpt.CheckpointError(f"{resume_from}: data position {saved['data']} does not match this run")
        state = TrainState(**saved["state"])
        if main:
            print(f"{desc}: resuming from {resume_from} (step {state.step}/{tp.max_steps})", flush=True)
    elif root is not None and main:
        others = [p.name for p in checkpoint_base.iterdir() if p.is_dir() and p.name != fingerprint] \
            if checkpoint_base.exists() else []
        note = f" (checkpoints of other configurations left untouched: {', '.join(others)})" if others else ""
        print(f"{desc}: no checkpoint for run {fingerprint}, starting at step 0{note}", flush=True)
    state.runs += 1

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if resume_from is not None and not ckpt.read_rng(resume_from, rank):
        print(f"WARNING: {resume_from} has no RNG state for process {rank} (process count changed); "
              "its RNG streams continue from the seeding of this run", file=sys.stderr, flush=True)
    val_ids = validation_windows(val_data, tp.eval_batches * global_batch)
    group_params = {g: [p for _, p in members] for g, members in groups.items()}

    def evaluate() -> float:
        raw_model.eval()
        batches = [val_ids[i:i + tp.batch_size] for i in range(0, len(val_ids), tp.batch_size)][rank::procs]
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            for ids in batches:
                batch = torch.from_numpy(val_data.batch(ids)).to(accelerator.device)
                total[0] += lm_loss(raw_model, batch).double() * batch[:, 1:].numel()
                total[1] += batch[:, 1:].numel()
        total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1])

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        if main:
            staging = ckpt.begin(root, state.step)
        accelerator.wait_for_everyone()
        staging = ckpt.staging_path(root, state.step)
        ckpt.write_rng(staging, rank)
        if main:
            ckpt.write_model(staging / "model.safetensors", raw_model)
            ckpt.write_optimizer(staging, optimizer.state_dict())
            ckpt.write_json(staging / "trainer.json", {
                "state": dataclasses.asdict(state), "fingerprint": fingerprint,
                "data": data_position(seed, state.step, global_batch, seq_len),
                "schedule": {"kind": "linear warmup + cosine", "total_steps": tp.max_steps, "base_lrs": base_lrs,
                             "warmup_ratio": tp.warmup_ratio, "min_lr_ratio": tp.min_lr_ratio,
                             "next_lr_factor": lr_at(state.step, tp.max_steps, 1.0, tp.warmup_ratio,
                                                     tp.min_lr_ratio)}})
        accelerator.wait_for_everyone()
        if main:
            ckpt.finalize(root, state.step, fingerprint, tp.keep_checkpoints)

    def check_moving() -> None:
        frozen = {g: s for g, s in state.update_norm_sum.items() if s < tp.min_update_norm}
        if frozen and state.log:
            raise FrozenParametersError(
                f"{desc}: parameter groups {sorted(frozen)} have moved a total of "
                f"{', '.join(f'{s:.3g}' for s in frozen.values())} (sum of per-step update norms) after "
                f"{state.step} steps, below train.min_update_norm={tp.min_update_norm}: the weights are not "
                "training (updates rounding to zero?)")

    run_t0 = time.time()
    wall_at_start = state.wall_seconds
    steps_at_start = state.step
    stop_reason = None
    bar = tqdm(total=tp.max_steps, initial=state.step, desc=desc, dynamic_ncols=True, **({} if main else {"disable": True}))
    with StopRequests(enabled=root is not None) as stops:
        while state.step < tp.max_steps:
            step = state.step
            t0 = time.perf_counter()
            factor = lr_at(step, tp.max_steps, 1.0, tp.warmup_ratio, tp.min_lr_ratio)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            model.train()
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro in range(tp.grad_accum):
                start = step * global_batch + (micro * procs + rank) * tp.batch_size
                batch = torch.from_numpy(train_data.batch(train_data.sequence_ids(seed, start, tp.batch_size)))
                last = micro == tp.grad_accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss = lm_loss(model, batch.to(accelerator.device))
                    accelerator.backward(loss / tp.grad_accum)
                loss_sum += loss.detach()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tp.grad_clip if tp.grad_clip > 0 else math.inf)
            logged = (step + 1) % tp.log_interval == 0 or step + 1 == tp.max_steps
            before = {g: [p.detach().clone() for p in ps] for g, ps in group_params.items()} if logged else {}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if logged:
                norms = {}
                for g, snapshot in before.items():   # snapshot := snapshot - weights, then one norm per group
                    torch._foreach_sub_(snapshot, [p.detach() for p in group_params[g]])
                    norms[g] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(snapshot))))
                loss_mean = float(accelerator.reduce(loss_sum / tp.grad_accum, reduction="mean"))
            seconds = time.perf_counter() - t0
            state.step_seconds += seconds
            state.wall_seconds = wall_at_start + time.time() - run_t0
            if logged:
                for g, n in norms.items():
                    state.update_norm_sum[g] += n
                tokens_per_s = global_batch * seq_len / seconds
                state.log.append({"step": state.step, "loss": loss_mean, "lr": optimizer.param_groups[0]["lr"],
                                  "grad_norm": float(grad_norm), **{f"update_norm_{g}": n for g, n in norms.items()},
                                  "tokens_per_s": tokens_per_s, "elapsed_s": round(state.wall_seconds, 3)})
                bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            bar.update(1)

            if state.step % tp.eval_interval == 0 or state.step == tp.max_steps:
                val_loss = evaluate()
                state.val_log.append({"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
                check_moving()
                if state.best_val_loss is None or val_loss < state.best_val_loss:
                    state.best_val_loss, state.best_step = val_loss, state.step
                    if export_best is not None and root is not None and main:
                        with staged_dir(root / "best") as out:
                            export_best(raw_model, out)
                            ckpt.write_json(out / "best.json", {"step": state.step, "val_loss": val_loss})
                if main:
                    bar.write(f"{desc}: step {state.step}/{tp.max_steps} val_loss {val_loss:.4f} "
                              f"(ppl {math.exp(val_loss):.2f})")

            if root is None:
                continue
            if stops.received:
                stop_reason = stops.received
            elif tp.max_steps_per_run and state.step - steps_at_start >= tp.max_steps_per_run:
                stop_reason = f"max_steps_per_run={tp.max_steps_per_run} reached"
            elif tp.wall_clock_limit_s and time.time() - run_t0 >= tp.wall_clock_limit_s:
                stop_reason = f"wall_clock_limit_s={tp.wall_clock_limit_s} reached"
            if procs > 1:   # every process stops at the same step
                stopping = accelerator.reduce(torch.tensor(float(stop_reason is not None),
                                                           device=accelerator.device), reduction="sum")
                if float(stopping) > 0 and stop_reason is None:
                    stop_reason = "another process stopped"
            finished = state.step == tp.max_steps
            if state.step % tp.checkpoint_interval == 0 or finished or stop_reason:
                state.wall_seconds = wall_at_start + time.time() - run_t0
                save_checkpoint()
            if stop_reason and not finished:
                break
    bar.close()
    state.wall_seconds = wall_at_start + time.time() - run_t0
    completed = state.step == tp.max_steps
    if completed:
        check_moving()
    accelerator.wait_for_everyone()
    raw_model.eval()
    return TrainResult(completed=completed, stop_reason=None if completed else stop_reason, state=state,
                       model=raw_model, is_main_process=main, num_processes=procs, global_batch=global_batch,
                       fingerprint=fingerprint, checkpoint_root=root,
                       groups={g: [n for n, _ in members] for g, members in groups.items()},
                       log_columns=columns, precision=precision, val_windows=len(val_ids))


def data_position(seed: int, step: int, global_batch: int, seq_len: int) -> dict:
    """Where in the seeded stream of training windows the next step starts."""
    return {"seed": seed, "next_sequence": step * global_batch, "global_batch": global_batch, "seq_len": seq_len}


def update_norms_from(model, reference, groups: dict[str, list[str]]) -> dict[str, float]:
    """Per group, the norm of (trained weights - reference weights): the total update of the run."""
    ref = dict(reference.named_parameters())
    params = dict(model.named_parameters())
    out = {}
    with torch.no_grad():
        for g, names in groups.items():
            sq = sum(float((params[n].detach().cpu().double() - ref[n].detach().double()).pow(2).sum()) for n in names)
            out[g] = math.sqrt(sq)
    return out
