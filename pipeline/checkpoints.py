"""Step-level training checkpoints: built in a hidden temp dir (every file fsynced), checksummed,
renamed into place, the last K kept. A checkpoint that fails verification is reported loudly and set
aside; the newest valid one is used; if none is valid the run stops rather than restart from scratch.

Layout of <root>/step-0000050/:
  model.safetensors        the model's state (the softplus V tensors included for the monotonic arm)
  optimizer.safetensors    every optimizer state tensor, keyed "<param index>.<name>"
  optimizer.json           the optimizer's param groups and non-tensor state
  trainer.json             step, data position, schedule, running totals, the log rows so far
  rng-rank<R>.safetensors  torch RNG states of process R (CPU and every visible CUDA device)
  rng-rank<R>.json         python and numpy RNG states of process R
  manifest.json            sha256 of every file above; written last, so a directory whose manifest is
                           missing or does not match its files is incomplete or corrupted by construction
Everything loads without pickle (safetensors and JSON).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .io import fsync_path, read_json, write_json

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def staging_path(root: Path, step: int) -> Path:
    return root / f".{step_name(step)}.tmp"


# --- durable writes ---------------------------------------------------------------------------------

def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def write_model(path: Path, model) -> None:
    save_model(model, str(path))   # handles tied (shared) tensors
    fsync_path(path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def begin(root: Path, step: int) -> Path:
    """A clean staging directory for the checkpoint of `step` (main process only)."""
    staging = staging_path(root, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def finalize(root: Path, step: int, fingerprint: str, keep: int) -> Path:
    """Checksum the staged files, write the manifest last, rename into place, prune to `keep`."""
    staging = staging_path(root, step)
    files = {p.name: sha256(p) for p in sorted(staging.iterdir())}
    write_json(staging / MANIFEST, {"step": step, "fingerprint": fingerprint, "files": files})
    fsync_path(staging)
    final = root / step_name(step)
    if final.exists():   # re-saving a step (a run resumed from a quarantined later step): swap it out
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_path(root)
    for old in sorted(list_steps(root))[:-keep]:
        shutil.rmtree(root / step_name(old))
    return final


# --- reading ----------------------------------------------------------------------------------------

def list_steps(root: Path) -> list[int]:
    if not root.exists():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))


def verify(path: Path, fingerprint: str) -> dict:
    """The manifest of a complete, uncorrupted checkpoint of this run; raises CheckpointError."""
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise CheckpointError(f"{path}: no {MANIFEST} (the write never finished)")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}/{MANIFEST} is unreadable ({exc})") from None
    if manifest.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path} belongs to run {manifest.get('fingerprint')!r}, not {fingerprint!r}")
    for name, digest in files.items():
        if not (path / name).exists():
            raise CheckpointError(f"{path}/{name} is missing")
        if sha256(path / name) != digest:
            raise CheckpointError(f"{path}/{name} does not match its checksum (truncated or corrupted)")
    return manifest


def latest_valid(root: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint that verifies. Failing ones are renamed to <name>.corrupt with a warning.
    None only when the directory holds no checkpoint at all; all corrupt is an error."""
    steps = list_steps(root)
    for step in reversed(steps):
        path = root / step_name(step)
        try:
            verify(path, fingerprint)
            return path
        except CheckpointError as exc:
            quarantine = path.with_name(path.name + ".corrupt")
            shutil.rmtree(quarantine, ignore_errors=True)
            os.replace(path, quarantine)
            print(f"WARNING: checkpoint {path.name} is unusable: {exc}. Moved to {quarantine.name}; "
                  "falling back to the previous checkpoint.", file=sys.stderr, flush=True)
    if steps:
        raise CheckpointError(f"every checkpoint in {root} failed verification (set aside as *.corrupt); "
                              "refusing to restart from scratch silently: delete the directory to start over")
    return None


def load_model_state(path: Path, model) -> None:
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not fit the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


# --- optimizer state ----------------------------------------------------------------------------------

def write_optimizer(staging: Path, state_dict: dict) -> None:
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{index}.{name}"] = value
    write_tensors(staging / "optimizer.safetensors", tensors)
    write_json(staging / "optimizer.json", {"param_groups": state_dict["param_groups"], "scalars": scalars})


def read_optimizer(path: Path) -> dict:
    meta = read_json(path / "optimizer.json")
    state: dict[int, dict] = {}
    for key, value in [*load_file(str(path / "optimizer.safetensors")).items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- RNG states ----------------------------------------------------------------------------------------

def write_rng(staging: Path, rank: int) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    write_tensors(staging / f"rng-rank{rank}.safetensors", tensors)
    write_json(staging / f"rng-rank{rank}.json",
               {"python": [version, list(mt_state), gauss],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]})


def read_rng(path: Path, rank: int) -> bool:
    """Restore this process's RNG states; False (nothing restored) if the checkpoint has none for it."""
    tensor_file, json_file = path / f"rng-rank{rank}.safetensors", path / f"rng-rank{rank}.json"
    if not tensor_file.exists():
        return False
    tensors, states = load_file(str(tensor_file)), read_json(json_file)
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True
