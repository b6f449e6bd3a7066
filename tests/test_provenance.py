"""Provenance: the commit stamp's dirty flag follows the pipeline code only, and the CPU-only stages
(data, aggregate) never import torch just to describe the device."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _fresh_git_commit(package_dir: Path):
    """provenance.git_commit as loaded from a copy of provenance.py inside package_dir (it inspects the
    git checkout around its own file), with a fresh lru_cache."""
    spec = importlib.util.spec_from_file_location("provenance_copy", package_dir / "provenance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.git_commit()


def test_dirty_flag_follows_the_pipeline_code_not_the_lock(tmp_path):
    package = tmp_path / "pipeline"
    package.mkdir()
    shutil.copy(REPO / "pipeline" / "provenance.py", package / "provenance.py")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    assert _fresh_git_commit(package) == head
    (tmp_path / "dvc.lock").write_text("stages: {a: 1}\n")           # what a running `dvc repro` does
    assert _fresh_git_commit(package) == head
    (package / "provenance.py").write_text((package / "provenance.py").read_text() + "\n# edited\n")
    assert _fresh_git_commit(package) == head + "-dirty"


def test_cpu_only_stages_do_not_import_torch():
    code = ("import sys, pipeline.stages.data, pipeline.stages.aggregate\n"
            "from pipeline.provenance import device_description\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert device_description().endswith('no torch)'), device_description()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
