"""Shared fixtures: a smoke-profile workspace with real data, a real tiny pretrained GPT-NeoX and its
monotonic_init copy, built once per test session by running the real stages."""
from __future__ import annotations

import os
import shutil
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
    """A directory holding params.yaml (smoke profile) and outputs/ from data, pretrain, monotonic_init.
    Read-only for tests: copy it (see `workspace_copy`) before running stages that write."""
    ws = tmp_path_factory.mktemp("smoke")
    shutil.copy(SMOKE_PARAMS, ws / "params.yaml")
    for stage in ("data", "pretrain", "monotonic_init"):
        assert run_stage(ws, stage) == 0, stage
    return ws


@pytest.fixture
def workspace_copy(smoke_workspace, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(smoke_workspace, ws)
    return ws
