"""The DVC pipeline: structure checks, the committed lock's freshness, and the whole dvc.yaml run
end to end on the smoke profile in a temporary clone (real DVC, real stages)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import pipeline_env
from pipeline import params as params_mod
from pipeline.arms import ARM_NAMES

REPO = Path(__file__).resolve().parent.parent
DVC = [sys.executable, "-m", "dvc"]


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*DVC, *args], cwd=cwd, env=pipeline_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _keys(tree: dict, prefix="") -> set[str]:
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_every_declared_param_exists_and_every_stage_is_a_pipeline_stage():
    from pipeline.__main__ import STAGES

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    known = _keys(params_mod.load(REPO / "params.yaml").to_dict())
    for name, stage in spec["stages"].items():
        for key in stage.get("params", []):
            assert key in known, f"dvc.yaml stage {name} declares unknown param {key}"
        command = stage["cmd"].split()
        assert command[:3] == ["python", "-m", "pipeline"] and command[3] in STAGES, name
        deps = stage.get("deps", [])
        assert f"pipeline/stages/{command[3]}.py" in deps, f"{name} must depend on its own stage module"


def test_committed_lock_is_current_for_code_and_params():
    """A cheap staleness check that needs no outputs: DVC compares the lock's hashes of every code and
    params dependency with the working tree. Outputs are absent in a fresh clone and ignored here."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    names = dvc(REPO, "stage", "list", "--name-only").stdout.split()
    assert sorted(names) == sorted(lock), "dvc.lock lacks stages of dvc.yaml (or has stale ones): run dvc repro"
    status = json.loads(dvc(REPO, "status", "--json").stdout or "{}")
    stale = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for dep, what in change.get("changed deps", {}).items():
                if not dep.startswith("outputs/") and what != "deleted":
                    stale.setdefault(stage, []).append(f"{dep}: {what}")
    assert not stale, f"dvc.lock is stale against code or params (rerun `dvc repro` and commit dvc.lock): {stale}"


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_in_a_fresh_clone(smoke_dvc_repro, tmp_path):
    ws = smoke_dvc_repro
    report = (ws / "outputs/report/report.md").read_text()
    assert "## Main table" in report and "monotonic" in report
    results = json.loads((ws / "outputs/report/results.json").read_text())
    smoke = params_mod.load(ws / "params.yaml")
    for arm in ARM_NAMES:
        assert set(map(str, results["runs"][arm])) == {str(s) for s in smoke.seeds}
    for plot in ("training_curves.png", "perplexity_vs_success.png", "nll_increase_distributions.png"):
        assert (ws / "outputs/report/plots" / plot).stat().st_size > 1000

    again = dvc(ws, "repro")
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert dvc(ws, "status").stdout.strip().endswith("Data and pipelines are up to date.")
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    assert "outputs/report/metrics.json" in json.dumps(shown)

    exp_ws = tmp_path / "exp"      # experiments change the workspace: run them in a copy
    shutil.copytree(ws, exp_ws, symlinks=True)
    dvc(exp_ws, "exp", "run", "-S", "aggregate.confidence=0.9")
    experiments = json.loads(dvc(exp_ws, "exp", "show", "--json").stdout)
    runs = [exp["revs"][0]["data"] for base in experiments for exp in (base.get("experiments") or [])]
    assert any(run["params"]["params.yaml"]["data"]["aggregate"]["confidence"] == 0.9
               and "perplexity" in json.dumps(run["metrics"]) for run in runs), experiments
