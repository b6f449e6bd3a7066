"""Provenance: the commit stamp's dirty flag follows the pipeline code only, and the CPU-only stages
(data, aggregate) never import torch just to describe the device."""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_copies = itertools.count()


def _fresh_git_commit(package_dir: Path):
    """provenance.git_commit as loaded from the package copy in package_dir (it inspects the git checkout
    around its own file), under a new package name each time, so with a fresh lru_cache."""
    name = f"pipeline_copy_{next(_copies)}"
    spec = importlib.util.spec_from_file_location(name, package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.provenance").git_commit()


def test_dirty_flag_follows_the_pipeline_code_not_the_lock(tmp_path):
    package = tmp_path / "pipeline"
    package.mkdir()
    for module in ("__init__.py", "provenance.py", "io.py"):
        shutil.copy(REPO / "pipeline" / module, package / module)
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
