"""Shared fixtures: a smoke-profile workspace with real data, a real tiny pretrained GPT-NeoX and its
monotonic_init copy, built once per test session by running the real stages."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent
SMOKE_PARAMS = REPO / "profiles" / "smoke.yaml"


def run_stage(workspace: Path, *argv: str) -> int:
    """Run `python -m pipeline ...` in-process with the workspace as working directory."""
    from pipeline.__main__ import main

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        return main(list(argv))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def smoke_params():
    from pipeline import params

    return params.load(SMOKE_PARAMS)


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> Path:
    """A directory holding params.yaml (smoke profile) and outputs/ from data, pretrain, monotonic_init and
    select_lr. Read-only for tests: copy it (see `workspace_copy`) before running stages that write."""
    ws = tmp_path_factory.mktemp("smoke")
    shutil.copy(SMOKE_PARAMS, ws / "params.yaml")
    for stage in ("data", "pretrain", "monotonic_init", "select_lr"):
        assert run_stage(ws, stage) == 0, stage
    return ws


@pytest.fixture
def workspace_copy(smoke_workspace, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(smoke_workspace, ws)
    return ws


# --- whole-pipeline fixtures (real DVC in temporary git repos) ---------------------------------------

def git_commit_all(ws: Path) -> None:
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run([*git, "add", "-A"], cwd=ws, check=True)
    subprocess.run([*git, "commit", "-qm", "workspace"], cwd=ws, check=True)


def smoke_checkout(dest: Path) -> Path:
    """This checkout's code (tracked and untracked-but-not-ignored files; no outputs, no dvc.lock) as a
    fresh git repo whose params.yaml is the smoke profile."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (REPO / rel).is_file() and not rel.startswith("outputs/") and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    shutil.copy(SMOKE_PARAMS, dest / "params.yaml")
    git_commit_all(dest)
    return dest


def pipeline_env(**extra) -> dict:
    """DVC runs `python -m pipeline ...` through the shell: this interpreter's bin comes first on PATH.
    One torch thread, as SLURM jobs get one CPU each (the last bits of CPU reductions depend on it)."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="session")
def smoke_dvc_repro(tmp_path_factory) -> Path:
    """The whole dvc.yaml run once by `dvc repro` on the smoke profile in a fresh clone. Read-only."""
    ws = smoke_checkout(tmp_path_factory.mktemp("smoke-dvc") / "direct")
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=pipeline_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return ws
