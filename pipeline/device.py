"""The one device policy of every stage that touches a model: CUDA when present (the GPU of this process's
LOCAL_RANK under a multi-process launch), else the CPU; evaluation and attacks under bf16 autocast on CUDA
(eval.precision auto), with their losses and candidate comparisons in fp32 and TF32 matmuls allowed.
The trainer places its model here too, and fails if accelerate picks another device."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform

import torch

from .params import HardwareError


# glibc mallopt parameters. By default every block over a threshold (adaptive, at most 32 MiB) is a fresh mmap
# whose pages all fault in again, and freed heap is trimmed back early, so a forward pass's activations and
# logits keep faulting (a third of the attack stages' time on 2 cores). Served from the heap and kept there,
# freed blocks are reused: the numbers are unchanged, only where memory comes from (bench/RESULTS.md).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 1 << 30       # free heap above this is returned to the system


def tune_host_allocator() -> bool:
    """Set glibc's allocator for tensor work; False where the C library is not glibc. Called once per process
    by the CLI, before any stage allocates. glibc still maps a block with mmap where the heap cannot grow."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def model_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def gpus() -> list[dict]:
    """Every visible CUDA device: name and compute capability (run records carry it)."""
    if not torch.cuda.is_available():
        return []
    return [{"index": i, "name": torch.cuda.get_device_name(i),
             "compute_capability": "%d.%d" % torch.cuda.get_device_capability(i)}
            for i in range(torch.cuda.device_count())]


def require_capability(minimum: float) -> None:
    """Fail before any compute on a GPU below `minimum` (device.min_compute_capability): the job landed on
    another GPU model than the one resources.ini asks for. The CPU is always allowed."""
    below = [g for g in gpus() if float(g["compute_capability"]) < minimum]
    if below:
        raise HardwareError(f"{below[0]['name']} (cuda:{below[0]['index']}) has compute capability "
                             f"{below[0]['compute_capability']}, below device.min_compute_capability {minimum}: "
                             "request the GPU model in slurm/resources.ini (gres = gpu:<type>:1), or set "
                             "device.min_compute_capability: 0 to allow it (results then differ by hardware)")


def place(model):
    """A loaded model on the policy's device."""
    return model.to(model_device())


def for_scoring(model, precision: str):
    """A frozen model for evaluation and attacks: when eval.precision resolves to bf16 on its device, every Linear
    weight and bias is cast to bf16 once, which is what bf16 autocast does to them on every forward (so the
    numbers, gradients to the input embeddings included, are the same), without re-casting 1.4 B weights per
    forward and in half their memory. Embeddings and norms stay fp32, as autocast keeps them."""
    if resolve_precision(precision, next(model.parameters()).device) == "bf16":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(torch.bfloat16)
    return model


def resolve_precision(precision: str, device: torch.device) -> str:
    """eval.precision -> "bf16" or "fp32" (auto: bf16 on a CUDA device that supports it)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


@contextlib.contextmanager
def eval_autocast(precision: str, device: torch.device):
    """Forward passes in bf16 autocast when the resolved precision is bf16 (callers compute losses in fp32);
    yields the resolved precision, which outputs record in their provenance."""
    resolved = resolve_precision(precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bf16"):
        yield resolved
