"""Provenance stamped into every output: params hash, git commit, package versions, device, seed."""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "safetensors", "numpy", "dvc")


@functools.lru_cache(maxsize=1)    # fixed for the life of a process; `assess` stamps five files
def git_commit() -> str:
    """HEAD, with "-dirty" when the pipeline's code differs from it. Only pipeline/ counts: a running
    `dvc repro` rewrites the tracked dvc.lock and metrics, which says nothing about the code that ran
    (params are stamped separately, by hash)."""
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
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return f"cuda x{torch.cuda.device_count()} ({', '.join(names)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def provenance(params, stage: str, seed: int | None = None, **extra) -> dict:
    return {
        "stage": stage,
        "params_hash": params.hash(),
        "profile": params.profile,
        "git_commit": git_commit(),
        "packages": dict(package_versions()),
        "device": device_description(),
        "seed": seed,
        "host": platform.node(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file, fsync and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, payload: dict, prov: dict) -> None:
    atomic_write_text(path, json.dumps({**payload, "provenance": prov}, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


@contextlib.contextmanager
def staged_dir(final: str | Path):
    """Build a stage's output directory beside its final place and move it there only on success,
    so a crash or a failed check never leaves a partial output where DVC or a later stage looks."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
