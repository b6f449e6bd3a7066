"""Out-of-memory errors of any model stage, turned into the params change that avoids them.

`python -m pipeline <stage>` exits with OOM_EXIT_CODE and one message naming the stage, the micro-batch
that did not fit and the smaller setting. Training keeps its global batch (train.batch_size halves,
train.grad_accum doubles): both are operational keys of the run fingerprint, so the run resumes from its
checkpoint. Evaluation and attack batch sizes only chunk the work; halving them changes no result."""
from __future__ import annotations

import sys
import traceback

OOM_EXIT_CODE = 3   # 2 is bad params, 75 is "stopped early, requeue"; an OOM needs a params change, not a requeue
CPU_OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory")
# the function on the failing call stack that tells which batch-size key chunked the work (innermost wins)
FRAME_KEYS = {"document_nll": "eval.batch_size", "uat_search": "attack.uat.batch_size",
              "uat_random_search": "attack.uat.batch_size", "hotflip_search": "attack.batch_size",
              "hotflip_random_search": "attack.batch_size"}
STAGE_KEYS = {"pretrain": "eval.batch_size", "monotonic_init": "eval.batch_size", "evaluate": "eval.batch_size",
              "uat": "attack.uat.batch_size", "hotflip": "attack.batch_size", "controls": "attack.batch_size",
              "assess": "attack.batch_size", "transfer": "attack.batch_size", "benchmarks": "benchmarks.batch_size"}


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), MemoryError, or a RuntimeError from an allocator that failed (CPU),
    anywhere in the exception's cause/context chain."""
    while exc is not None:
        torch = sys.modules.get("torch")
        if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in CPU_OOM_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _frames(exc: BaseException) -> list[str]:
    """Function names on the failing stack, outermost first."""
    return [frame.f_code.co_name for frame, _ in traceback.walk_tb(exc.__traceback__)]


def _get(params, key: str):
    value = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def advice(exc: BaseException, stage: str, params) -> str | None:
    """The message for an out-of-memory error in `stage`, or None if `exc` is not one."""
    if not is_oom(exc):
        return None
    frames = _frames(exc)
    head = f"out of memory in stage {stage}"
    if stage == "train" or (stage == "pretrain" and "train" in frames):   # in pipeline.training.train
        return f"{head}: {_train_advice(params, stage)}"
    key = next((FRAME_KEYS[f] for f in reversed(frames) if f in FRAME_KEYS), STAGE_KEYS.get(stage, "eval.batch_size"))
    size = _get(params, key)
    if size == 1:
        return f"{head} at {key}=1: nothing left to split; use a GPU with more memory (python -m pipeline preflight)"
    return (f"{head} (micro-batch {key}={size} sequences): set {key} {size} -> {size // 2} "
            "(it only chunks the work: results unchanged). Check with: python -m pipeline preflight")


def _train_advice(params, stage: str) -> str:
    if stage == "pretrain":
        b = params.pretrain.batch_size
        return (f"micro-batch pretrain.batch_size={b}: set pretrain.batch_size {b} -> {max(1, b // 2)} "
                "(pretraining has no gradient accumulation, so this changes the pretrained model)")
    t = params.train
    where = f"micro-batch train.batch_size={t.batch_size} x train.grad_accum={t.grad_accum}"
    if t.batch_size > 1:
        return (f"{where}: set train.batch_size {t.batch_size} -> {t.batch_size // 2} with train.grad_accum "
                f"{t.grad_accum} -> {t.grad_accum * 2} (global batch unchanged; the run resumes from its checkpoint)"
                + ("" if t.gradient_checkpointing else ", or train.gradient_checkpointing: true"))
    if not t.gradient_checkpointing:
        return f"{where}: set train.gradient_checkpointing: true (the run resumes from its checkpoint)"
    return f"{where} with gradient checkpointing: use a GPU with more memory (python -m pipeline preflight)"
