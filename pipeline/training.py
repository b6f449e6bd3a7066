"""The one training loop, shared by the embedded pretraining and the recovery training of both arms.

Built on HF accelerate, so the same code runs on CPU, one GPU, or several processes and nodes
(the train stage re-launches itself as $PIPELINE_TRAIN_PROCESSES workers: pipeline/launch.py; torchrun
or `accelerate launch` work too; on CPU ACCELERATE_USE_CPU=true gives gloo). Data-parallel (DDP) only:
every process holds the whole model.

Data: each optimizer step consumes one fixed window of the seeded stream of packed training windows,
positions [step * G, (step + 1) * G) of PackedSequences.sequence_ids(seed, ...), where the global batch
G = batch_size * grad_accum whatever the number of processes P: each process accumulates grad_accum / P
micro-batches (pipeline/launch.py), and process r's micro-batch m starts at step * G + (m * P + r) *
batch_size. The data of a step is therefore a function of (seed, step) alone: resume needs no replay,
and any process count sees the same sequences (a run may even resume under another P).

Numerics: master weights stay fp32 (checked); bf16 is autocast for compute only (precision auto: on a
CUDA device that supports it). Per logged step the actual update norm of every parameter group is
measured from the weights themselves, and a group whose accumulated update stays below
train.min_update_norm fails the run.

Stopping early: SIGUSR1/SIGTERM or the stop file (pipeline/stopping.py), train.max_steps_per_run and
train.wall_clock_limit_s make the loop checkpoint at the next step boundary and return completed=False;
the stage exits with REQUEUE_EXIT_CODE.
"""
from __future__ import annotations

import ast
import atexit
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import inspect
import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoints as ckpt
from . import device
from .io import staged_dir
from .params import ParamsError, TrainParams
from .stopping import REQUEUE_EXIT_CODE, StopRequests  # noqa: F401  (REQUEUE_EXIT_CODE: re-exported)

GROUPS = ("decay", "no_decay", "constrained")
# train keys that do not change the weights a run produces; everything else is part of its fingerprint.
# batch_size and grad_accum only split the global batch (which the fingerprint holds): a run resumes with a
# smaller micro-batch after an out-of-memory error (same data per step; sums in another order).
OPERATIONAL_KEYS = ("batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval", "checkpoint_interval",
                    "keep_checkpoints", "max_steps_per_run", "wall_clock_limit_s", "min_update_norm", "gradient_checkpointing",
                    "beyond_one_epoch", "arm_overrides")
TIMING_COLUMNS = ("tokens_per_s", "elapsed_s")   # vary between identical runs: run records, never DVC outputs


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
    """accelerate's mixed_precision for train.precision on the policy's device (autocast only; weights stay fp32)."""
    return {"fp32": "no", "bf16": "bf16"}[device.resolve_precision(precision, device.model_device())]


def policy_accelerator(precision: str):
    """accelerate's Accelerator on the device policy's rank-local device; fails where accelerate picks another."""
    from accelerate import Accelerator

    want = device.model_device()
    accelerator = Accelerator(mixed_precision=precision, cpu=want.type == "cpu")
    got = accelerator.device
    if got.type == "cuda" and got.index is None:     # one process: accelerate says "cuda", the current GPU
        got = torch.device("cuda", torch.cuda.current_device())
    elif got.type == "cpu":                          # gloo processes: accelerate says "cpu:0", the one CPU device
        got = torch.device("cpu")
    if got != want:
        raise RuntimeError(f"accelerate put training on {got} but the device policy (pipeline/device.py) says {want}: "
                           "set LOCAL_RANK/CUDA_VISIBLE_DEVICES consistently (ACCELERATE_USE_CPU only without CUDA)")
    return accelerator


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


def trajectory_code() -> tuple:
    """The code that defines a run's trajectory (weights, data order, schedule, resume); nothing else is
    fingerprinted, so a fix to reporting code or a comment never orphans the checkpoints of a long run."""
    from . import data, models, monotonic

    return (seed_everything, lr_at, lm_loss, parameter_groups, group_settings, build_optimizer, train_step,
            load_checkpoint, data.PackedSequences, models.tiny_gpt_neox, monotonic.Softplus,
            monotonic.constrained_parameters, ckpt.load_model_state, ckpt.read_optimizer, ckpt.read_rng)


def code_hash(objects=None) -> str:
    """Hash of the syntax trees of the trajectory code, docstrings and comments left out."""
    h = hashlib.sha256()
    for obj in objects if objects is not None else trajectory_code():
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(f"{obj.__module__}.{obj.__qualname__}\0{ast.dump(tree)}\0".encode())
    return h.hexdigest()[:16]


def accumulation_per_process(grad_accum: int, processes: int) -> int:
    """The global batch is batch_size x grad_accum whatever the process count, so each process accumulates
    grad_accum / processes micro-batches; fails before any compute when that does not divide."""
    if grad_accum % processes:
        raise ParamsError("train.grad_accum", grad_accum,
                          f"a multiple of the {processes} training processes (the global batch batch_size x "
                          f"grad_accum is split across them), or fewer processes ($PIPELINE_TRAIN_PROCESSES, "
                          "slurm/resources.ini)")
    return grad_accum // processes


def run_fingerprint(identity: dict, tp: TrainParams, global_batch: int) -> str:
    """Everything that determines the weights a run produces; checkpoints live under it, so changed
    params or code can never resume another configuration's state."""
    trajectory = {k: v for k, v in dataclasses.asdict(tp).items() if k not in OPERATIONAL_KEYS}
    payload = {"identity": identity, "train": trajectory, "global_batch": global_batch, "code": code_hash()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def epochs(tp: TrainParams, train_data, desc: str) -> float:
    """How many passes over the train split the run's budget makes (max_steps x the global batch against the
    split's windows, counted from its tokens); above one, train.beyond_one_epoch fails the run before any
    compute, or warns that windows repeat (PackedSequences starts a fresh permutation each epoch)."""
    needed = tp.max_steps * tp.batch_size * tp.grad_accum
    passes = needed / train_data.num_sequences
    if passes > 1:
        tokens = train_data.num_sequences * train_data.seq_len
        what = (f"{desc}: train.max_steps {tp.max_steps} x {tp.batch_size * tp.grad_accum} sequences = {needed} "
                f"windows of {train_data.seq_len} tokens, but the train split holds {train_data.num_sequences} "
                f"({tokens:,} tokens): {passes:.2f} epochs")
        if tp.beyond_one_epoch == "fail":
            one_epoch = train_data.num_sequences // (tp.batch_size * tp.grad_accum)
            raise ParamsError("train.max_steps", tp.max_steps, f"at most {one_epoch} steps, one epoch ({what}); add "
                              "documents (data.max_documents, data.hf_train_files) or set train.beyond_one_epoch: warn")
        print(f"WARNING: {what}; windows repeat (train.beyond_one_epoch: warn)", file=sys.stderr, flush=True)
    return passes


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


@dataclass
class Run:
    """One call of train(): the accelerate setup, the model and optimizer, where it checkpoints, and the
    mutable TrainState, passed explicitly to the loop's functions."""
    tp: TrainParams
    accelerator: object
    model: nn.Module                # as prepared by accelerate (DDP-wrapped with several processes)
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    groups: dict[str, list[tuple[str, nn.Parameter]]]
    base_lrs: list[float]           # the schedule scales these; never read back from a checkpoint
    state: TrainState
    seed: int
    seq_len: int
    global_batch: int               # batch_size * grad_accum, whatever the process count
    accumulation: int               # micro-batches per process and step: grad_accum / processes
    fingerprint: str
    root: Path | None               # checkpoint directory; None: no checkpoints, no early stops
    precision: str
    desc: str
    owner: object = None            # the main process's claim on the run (claim_run), held until it exits
    started: float = field(default_factory=time.time)
    wall_at_start: float = 0.0
    steps_at_start: int = 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def columns(self) -> list[str]:
        return ["step", "loss", "lr", "grad_norm", *[f"update_norm_{g}" for g in norm_names(self.groups)],
                *TIMING_COLUMNS]

    def wall_seconds(self) -> float:
        return self.wall_at_start + time.time() - self.started


def build_optimizer(model, tp: TrainParams, constrained: Sequence[nn.Parameter]):
    """AdamW over the parameter groups (decay / no_decay / constrained); returns (optimizer, groups, base_lrs)."""
    groups = parameter_groups(model, constrained)
    settings = group_settings(tp)
    optimizer = torch.optim.AdamW(
        [{"params": [p for _, p in members], "name": g, **settings[g]} for g, members in groups.items()],
        lr=tp.lr, betas=(tp.adam_beta1, tp.adam_beta2))
    return optimizer, groups, [settings[g]["lr"] for g in groups]


def owner_record() -> str:
    return f"job {os.environ.get('SLURM_JOB_ID', 'none')} on {socket.gethostname()}, pid {os.getpid()}\n"


def claim_run(root: Path, desc: str):
    """One process trains a run (writes its checkpoint directory) at a time: an exclusive lock on
    <root>.owner, which names the holder (SLURM job, host, pid) and is released when the holder exits, however
    it ends. A second job training the same run (two variations sharing it) waits, then resumes from the
    first one's checkpoints. On a filesystem without flock (Lustre mounted without it: ENOSYS) an
    exclusive-create lock file takes its place (LockFile). Returns what holds the lock."""
    root.parent.mkdir(parents=True, exist_ok=True)
    handle = open(root.parent / f"{root.name}.owner", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        print(f"{desc}: the checkpoint directory {root} is in use by {handle.read().strip() or 'another process'}; "
              "waiting for it to finish, then resuming from its checkpoints", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            raise
        handle.close()
        return LockFile.acquire(root.parent / f"{root.name}.owner.lock", desc)
    handle.seek(0)
    handle.truncate()
    handle.write(owner_record())
    handle.flush()
    return handle


@dataclass
class LockFile:
    """An exclusive-create lock file holding the owner record, removed by close() or at exit. A holder that
    died without removing it is recognised and replaced: the same SLURM job (a requeue keeps the job id),
    a SLURM job squeue no longer lists, or a dead pid on this host."""
    path: Path
    poll_s: float = 5.0

    @classmethod
    def acquire(cls, path: Path, desc: str, poll_s: float = 5.0) -> "LockFile":
        told = False
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = path.read_text().strip() if path.exists() else ""
            if holder and cls.stale(holder):
                print(f"{desc}: removing the stale lock {path} of {holder}", flush=True)
                path.unlink(missing_ok=True)
                continue
            if not told:
                print(f"{desc}: {path} is held by {holder or 'another process'} (no flock on this filesystem); "
                      "waiting for it to finish, then resuming from its checkpoints", flush=True)
                told = True
            time.sleep(poll_s)
        with os.fdopen(fd, "w") as fh:
            fh.write(owner_record())
        lock = cls(path, poll_s)
        atexit.register(lock.close)
        return lock

    @staticmethod
    def stale(holder: str) -> bool:
        words = holder.split()     # job <id> on <host>, pid <pid>
        if len(words) < 6:
            return False
        job, host, pid = words[1], words[3].rstrip(","), int(words[5])
        if job != "none":
            if job == os.environ.get("SLURM_JOB_ID"):
                return True
            try:
                listed = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                        timeout=30)
            except (FileNotFoundError, subprocess.TimeoutExpired):
                listed = None
            if listed is not None and listed.returncode == 0:
                return not listed.stdout.strip()
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def close(self) -> None:
        if self.path.exists() and self.path.read_text() == owner_record():
            self.path.unlink()

    __del__ = close


def find_checkpoint(accelerator, root: Path | None, fingerprint: str, desc: str) -> Path | None:
    """The newest valid checkpoint of this run (the main process looks, every process gets the answer)."""
    from accelerate.utils import broadcast_object_list

    if root is None:
        return None
    found = [ckpt.latest_valid(root, fingerprint) if accelerator.is_main_process else None]
    broadcast_object_list(found)
    if found[0] is None and accelerator.is_main_process:
        others = sorted(p.name for p in root.parent.iterdir() if p.is_dir() and p != root) \
            if root.parent.exists() else []
        note = f" (checkpoints of other configurations left untouched: {', '.join(others)})" if others else ""
        print(f"{desc}: no checkpoint for run {fingerprint}, starting at step 0{note}", flush=True)
    return found[0]


def load_checkpoint(path: Path, model, optimizer) -> tuple[TrainState, dict]:
    """Model and optimizer state restored in place; returns the checkpoint's TrainState and data position."""
    ckpt.load_model_state(path, model)
    optimizer.load_state_dict(ckpt.read_optimizer(path))
    saved = ckpt.read_json(path / "trainer.json")
    return TrainState(**saved["state"]), saved["data"]


def start_run(model, tp: TrainParams, seq_len: int, *, seed: int, constrained: Sequence[nn.Parameter],
              checkpoint_base: Path | None, identity: dict | None, desc: str) -> Run:
    """Accelerator, optimizer and state (resumed from the newest valid checkpoint of this run if any)."""
    not_fp32 = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if not_fp32:
        raise ValueError(f"master weights must be fp32 (bf16 weights round small updates to zero); "
                         f"got {len(not_fp32)} non-fp32 parameters, e.g. {not_fp32[0]}")
    device.place(model)     # by the policy; accelerate must agree (policy_accelerator)
    precision = mixed_precision(tp.precision)
    accelerator = policy_accelerator(precision)
    accumulation = accumulation_per_process(tp.grad_accum, accelerator.num_processes)
    global_batch = tp.batch_size * tp.grad_accum
    fingerprint = run_fingerprint(identity or {}, tp, global_batch)
    root = checkpoint_base / fingerprint if checkpoint_base is not None else None
    if tp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    optimizer, groups, base_lrs = build_optimizer(model, tp, constrained)
    state = TrainState(update_norm_sum={g: 0.0 for g in norm_names(groups)})
    owner = claim_run(root, desc) if root is not None and accelerator.is_main_process else None
    resumed = find_checkpoint(accelerator, root, fingerprint, desc)
    if resumed is not None:
        state, position = load_checkpoint(resumed, model, optimizer)
        if position != data_position(seed, state.step, global_batch, seq_len):
            raise ckpt.CheckpointError(f"{resumed}: data position {position} does not match this run")
        if accelerator.is_main_process:
            print(f"{desc}: resuming from {resumed} (step {state.step}/{tp.max_steps})", flush=True)
    state.runs += 1
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None and not ckpt.read_rng(resumed, accelerator.process_index):
        print(f"WARNING: {resumed} has no RNG state for process {accelerator.process_index} (process count "
              "changed); its RNG streams continue from the seeding of this run", file=sys.stderr, flush=True)
    return Run(tp, accelerator, prepared, accelerator.unwrap_model(prepared), optimizer, groups, base_lrs, state,
               seed, seq_len, global_batch, accumulation, fingerprint, root, precision, desc,
               owner=owner, wall_at_start=state.wall_seconds, steps_at_start=state.step)


def train_step(run: Run, train_data) -> dict | None:
    """One optimizer step on the step's fixed slice of the data stream; the log row if this step is logged
    (mean loss over processes, grad norm, the per-group update norms measured from the weights)."""
    tp, acc, state = run.tp, run.accelerator, run.state
    step = state.step
    factor = lr_at(step, tp.max_steps, 1.0, tp.warmup_ratio, tp.min_lr_ratio)
    for group, base in zip(run.optimizer.param_groups, run.base_lrs):
        group["lr"] = base * factor
    run.model.train()
    loss_sum = torch.zeros((), device=acc.device)
    for micro in range(run.accumulation):
        start = step * run.global_batch + (micro * acc.num_processes + acc.process_index) * tp.batch_size
        batch = torch.from_numpy(train_data.batch(train_data.sequence_ids(run.seed, start, tp.batch_size)))
        with contextlib.nullcontext() if micro == run.accumulation - 1 else acc.no_sync(run.model):
            loss = lm_loss(run.model, batch.to(acc.device))
            acc.backward(loss / run.accumulation)
        loss_sum += loss.detach()
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), tp.grad_clip if tp.grad_clip > 0 else math.inf)
    logged = (step + 1) % tp.log_interval == 0 or step + 1 == tp.max_steps
    params = {g: [p for _, p in members] for g, members in run.groups.items()}
    before = {g: [p.detach().clone() for p in ps] for g, ps in params.items()} if logged else {}
    if "constrained" in before:
        before[W_SPACE] = materialized(params["constrained"])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if not logged:
        return None
    norms = update_norms(before, params)
    for g, n in norms.items():
        state.update_norm_sum[g] += n
    return {"step": state.step, "loss": float(acc.reduce(loss_sum / run.accumulation, reduction="mean")),
            "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
            **{f"update_norm_{g}": n for g, n in norms.items()}}


W_SPACE = "constrained_w"    # the constrained group's update measured on W = softplus(V), beside V's


def norm_names(groups) -> list[str]:
    """The update norms logged: one per parameter group, and W_SPACE beside a constrained group."""
    return [*groups, *([W_SPACE] if "constrained" in groups else [])]


def materialized(vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    from .monotonic import Softplus

    with torch.no_grad():
        return [Softplus()(v.detach()) for v in vs]


def update_norms(before: dict[str, list[torch.Tensor]], params: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Per group, the norm of the step's actual change of the weights (snapshot - weights, in place); for
    W_SPACE, of the materialized constrained weights."""
    norms = {}
    for g, snapshot in before.items():
        now = materialized(params["constrained"]) if g == W_SPACE else [p.detach() for p in params[g]]
        torch._foreach_sub_(snapshot, now)
        norms[g] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(snapshot))))
    return norms


def run_validation(run: Run, val_data, val_ids: np.ndarray) -> float:
    """Mean validation NLL per token over the fixed windows, split across processes and summed."""
    acc, tp = run.accelerator, run.tp
    run.raw_model.eval()
    batches = [val_ids[i:i + tp.batch_size] for i in range(0, len(val_ids), tp.batch_size)]
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    with torch.no_grad(), acc.autocast():
        for ids in batches[acc.process_index::acc.num_processes]:
            batch = torch.from_numpy(val_data.batch(ids)).to(acc.device)
            total[0] += lm_loss(run.raw_model, batch).double() * batch[:, 1:].numel()
            total[1] += batch[:, 1:].numel()
    total = acc.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def record_validation(run: Run, val_loss: float, export_best, bar) -> None:
    """Log the validation loss, fail a frozen run, keep the best model (exported by export_best)."""
    state = run.state
    state.val_log.append({"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    check_moving(state, run.tp.min_update_norm, run.desc)
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step = val_loss, state.step
        if export_best is not None and run.root is not None and run.main:
            with staged_dir(run.root / "best") as out:
                export_best(run.raw_model, out)
                ckpt.write_json(out / "best.json", {"step": state.step, "val_loss": val_loss})
    if run.main:
        bar.write(f"{run.desc}: step {state.step}/{run.tp.max_steps} val_loss {val_loss:.4f} "
                  f"(ppl {math.exp(val_loss):.2f})")


def check_moving(state: TrainState, min_update_norm: float, desc: str) -> None:
    frozen = {g: s for g, s in state.update_norm_sum.items() if s < min_update_norm}
    if frozen and state.log:
        raise FrozenParametersError(
            f"{desc}: parameter groups {sorted(frozen)} have moved a total of "
            f"{', '.join(f'{s:.3g}' for s in frozen.values())} (sum of per-step update norms) after "
            f"{state.step} steps, below train.min_update_norm={min_update_norm}: the weights are not "
            "training (updates rounding to zero?)")


def stop_reason(run: Run, stops) -> str | None:
    """Why to stop at this step boundary (a stop request, a per-run step or wall-clock limit), agreed by every
    process so all stop at the same step."""
    tp = run.tp
    reason = None
    if stops.received:
        reason = stops.received
    elif tp.max_steps_per_run and run.state.step - run.steps_at_start >= tp.max_steps_per_run:
        reason = f"max_steps_per_run={tp.max_steps_per_run} reached"
    elif tp.wall_clock_limit_s and time.time() - run.started >= tp.wall_clock_limit_s:
        reason = f"wall_clock_limit_s={tp.wall_clock_limit_s} reached"
    if run.accelerator.num_processes > 1:
        acc = run.accelerator
        stopping = acc.reduce(torch.tensor(float(reason is not None), device=acc.device), reduction="sum")
        if float(stopping) > 0 and reason is None:
            reason = "another process stopped"
    return reason


def save_checkpoint(run: Run) -> None:
    """Every process writes its RNG state, the main one the model, optimizer and trainer state; then the
    checkpoint is checksummed and renamed into place (pipeline/checkpoints.py)."""
    acc, state, tp = run.accelerator, run.state, run.tp
    state.wall_seconds = run.wall_seconds()
    acc.wait_for_everyone()
    if run.main:
        ckpt.begin(run.root, state.step)
    acc.wait_for_everyone()
    staging = ckpt.staging_path(run.root, state.step)
    ckpt.write_rng(staging, acc.process_index)
    if run.main:
        ckpt.write_model(staging / "model.safetensors", run.raw_model)
        ckpt.write_optimizer(staging, run.optimizer.state_dict())
        ckpt.write_json(staging / "trainer.json", {
            "state": dataclasses.asdict(state), "fingerprint": run.fingerprint,
            "data": data_position(run.seed, state.step, run.global_batch, run.seq_len),
            "schedule": {"kind": "linear warmup + cosine", "total_steps": tp.max_steps, "base_lrs": run.base_lrs,
                         "warmup_ratio": tp.warmup_ratio, "min_lr_ratio": tp.min_lr_ratio,
                         "next_lr_factor": lr_at(state.step, tp.max_steps, 1.0, tp.warmup_ratio,
                                                 tp.min_lr_ratio)}})
    acc.wait_for_everyone()
    if run.main:
        ckpt.finalize(run.root, state.step, run.fingerprint, tp.keep_checkpoints)


def train(model, tp: TrainParams, train_data, val_data, *, seed: int, constrained: Sequence[nn.Parameter] = (),
          checkpoint_base: Path | None = None, identity: dict | None = None, desc: str = "train",
          export_best: Callable[[nn.Module, Path], None] | None = None,
          after_step: Callable[[int, nn.Module, Path | None], None] | None = None) -> TrainResult:
    """Train `model` (fp32 parameters) in place for tp.max_steps optimizer steps, resuming from the newest
    valid checkpoint under checkpoint_base/<fingerprint> if there is one. Without checkpoint_base the run
    neither checkpoints nor stops early. `after_step(step, model, checkpoint root or None)` runs on the main
    process after each step (before that step's checkpoint, so a resumed run has redone what it wrote)."""
    run = start_run(model, tp, train_data.seq_len, seed=seed, constrained=constrained,
                    checkpoint_base=checkpoint_base, identity=identity, desc=desc)
    state = run.state
    val_ids = validation_windows(val_data, tp.eval_batches * run.global_batch)
    reason = None
    bar = tqdm(total=tp.max_steps, initial=state.step, desc=desc, dynamic_ncols=True, disable=not run.main)
    with StopRequests(enabled=run.root is not None, who="train") as stops:
        while state.step < tp.max_steps:
            t0 = time.perf_counter()
            row = train_step(run, train_data)
            seconds = time.perf_counter() - t0
            state.step_seconds += seconds
            if row is not None:
                tokens_per_s = run.global_batch * run.seq_len / seconds
                state.log.append({**row, "tokens_per_s": tokens_per_s, "elapsed_s": round(run.wall_seconds(), 3)})
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            bar.update(1)
            if after_step is not None and run.main:
                after_step(state.step, run.raw_model, run.root)
            if state.step % tp.eval_interval == 0 or state.step == tp.max_steps:
                record_validation(run, run_validation(run, val_data, val_ids), export_best, bar)
            if run.root is None:
                continue
            reason = stop_reason(run, stops)
            finished = state.step == tp.max_steps
            if state.step % tp.checkpoint_interval == 0 or finished or reason:
                save_checkpoint(run)
            if reason and not finished:
                break
    bar.close()
    state.wall_seconds = run.wall_seconds()
    completed = state.step == tp.max_steps
    if completed:
        check_moving(state, tp.min_update_norm, desc)
    run.accelerator.wait_for_everyone()
    run.raw_model.eval()
    return TrainResult(completed=completed, stop_reason=None if completed else reason, state=state,
                       model=run.raw_model, is_main_process=run.main, num_processes=run.accelerator.num_processes,
                       global_batch=run.global_batch, fingerprint=run.fingerprint, checkpoint_root=run.root,
                       groups={g: [n for n, _ in members] for g, members in run.groups.items()},
                       log_columns=run.columns, precision=run.precision, val_windows=len(val_ids))


def data_position(seed: int, step: int, global_batch: int, seq_len: int) -> dict:
    """Where in the seeded stream of training windows the next step starts."""
    return {"seed": seed, "next_sequence": step * global_batch, "global_batch": global_batch, "seq_len": seq_len}


def update_norms_from(model, reference, groups: dict[str, list[str]]) -> dict[str, float]:
    """Per group, the norm of (trained weights - reference weights): the total update of the run; W_SPACE:
    of the constrained modules' materialized weights."""
    ref, params = dict(reference.named_parameters()), dict(model.named_parameters())
    from .monotonic import PARAM_SUFFIX

    tensors = {g: [(params[n], ref[n]) for n in names] for g, names in groups.items()}
    if "constrained" in groups:
        tensors[W_SPACE] = [(model.get_submodule(n[: -len(PARAM_SUFFIX)]).weight,
                             reference.get_submodule(n[: -len(PARAM_SUFFIX)]).weight) for n in groups["constrained"]]
    out = {}
    with torch.no_grad():
        for g, pairs in tensors.items():
            sq = sum(float((a.detach().double() - b.detach().to(a.device).double()).pow(2).sum())
                     for a, b in pairs)    # on the trained weights' device: the reference may be elsewhere
            out[g] = math.sqrt(sq)
    return out


def split_log(columns: list[str], rows: list[dict]) -> tuple[list[str], list[dict], list[dict]]:
    """The trainer's log as (columns, rows) of what the computation determines, plus the timing rows
    (step and TIMING_COLUMNS) for the run record."""
    kept = [c for c in columns if c not in TIMING_COLUMNS]
    return (kept, [{c: r[c] for c in kept if c in r} for r in rows],
            [{"step": r["step"], **{c: r[c] for c in TIMING_COLUMNS if c in r}} for r in rows])
