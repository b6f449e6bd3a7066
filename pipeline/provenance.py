"""What produced an output, split by whether it can vary between identical runs.

`provenance()` goes inside DVC-hashed outputs: only what the computation determines (stage, seed, params
hash, profile, package versions, and what a stage adds), so a rerun of the same code, params and packages
on the same platform reproduces every hash in dvc.lock. `record_run()` writes what varies from run to run
(git commit, host, device, timestamps, wall times, throughput) to a run record under `runs_dir()`, which is
neither tracked by git nor a DVC output; the code that ran is pinned in dvc.lock by its file hashes."""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .io import atomic_write_text

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "safetensors", "numpy", "dvc", "lm_eval")
RUNS_DIR_ENV = "PIPELINE_RUNS_DIR"     # SLURM jobs point it at the run directory (job workspaces are deleted)
DEFAULT_RUNS_DIR = Path("outputs") / "runs"


@functools.lru_cache(maxsize=1)    # fixed for the life of a process
def git_commit() -> str:
    """HEAD, with "-dirty" when the pipeline's code differs from it. Only pipeline/ counts: a running
    `dvc repro` rewrites the tracked dvc.lock and metrics, which says nothing about the code that ran."""
    code = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=code)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10, cwd=code).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description() -> str:
    """The compute device; a stage that never imported torch (data, aggregate) ran on the CPU alone and
    is not made to pay torch's import time just to say so."""
    torch = sys.modules.get("torch")
    if torch is None:
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores; no torch)"
    if torch.cuda.is_available():
        names = sorted({f"{torch.cuda.get_device_name(i)}, compute capability "
                        + "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return f"cuda x{torch.cuda.device_count()} ({'; '.join(names)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def provenance(params, stage: str, seed: int | None = None, **extra) -> dict:
    """The hash-stable provenance stamped into DVC outputs."""
    return {"stage": stage, "params_hash": params.hash(), "profile": params.profile,
            "packages": dict(package_versions()), "seed": seed, **extra}


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR)


def run_facts() -> dict:
    """What identifies one execution and may differ between identical runs."""
    return {"git_commit": git_commit(), "host": platform.node(), "device": device_description(),
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv}


def record_run(name: str, prov: dict, model=None, **measured) -> Path:
    """Write runs_dir()/<name>.json: the output's stable provenance, the run's facts, the device the step's
    model was on (bench/gpu_check.py checks it) and what it measured (seconds, tokens/s, ...). Overwrites the
    record of an earlier run of the same step."""
    if model is not None:
        measured["model_device"] = str(next(model.parameters()).device)
    path = runs_dir() / f"{name}.json"   # informational: anything not JSON-native is written as its str()
    atomic_write_text(path, json.dumps({"provenance": prov, **run_facts(), **measured}, indent=2, default=str) + "\n")
    return path
