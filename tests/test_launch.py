"""pipeline/launch.py without training: ranks, world size and rendezvous from a fake SLURM environment
(scontrol and srun are test doubles on PATH, run for real as subprocesses), the srun command line of a
multi-node job, the per-node workers (quick `check-params` processes), and the refusal without srun."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMOKE_PARAMS
from pipeline import launch
from pipeline.params import ParamsError
from pipeline.stopping import REQUEUE_EXIT_CODE

SCONTROL = """#!/bin/sh
# test double: records its arguments, expands the node list as `scontrol show hostnames` would
echo "$*" >> "$FAKE_CALLS"
[ "$1 $2" = "show hostnames" ] && printf 'gpu07\\ngpu08\\n'
"""
SRUN = """#!/bin/sh
# test double: records its arguments and exits with the requeue status, as the node launchers would
echo "$*" >> "$FAKE_CALLS"
exit %d
""" % REQUEUE_EXIT_CODE


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Node `node` of a 2-node job 123456 on gpu[07-08], with scontrol and srun doubles first on PATH;
    yields a setter for the node id and the file recording the doubles' calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    for var in [v for v in os.environ if v.startswith("SLURM_") or v == launch.NODE_LAUNCHER_ENV]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_NODEID", "0")
    return calls


def check_params_argv(params: Path = SMOKE_PARAMS) -> list[str]:
    return ["check-params", "--params", str(params)]


def test_single_node_workers_take_ranks_0_to_n_and_one_local_rendezvous(monkeypatch):
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_JOB_ID", "7")      # a one-node job: no scontrol, no srun
    monkeypatch.setenv("SLURM_NNODES", "1")
    envs = launch.worker_envs(3)
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("0", "0"), ("1", "1"), ("2", "2")]
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == \
        {("3", "3", "127.0.0.1", envs[0]["MASTER_PORT"])}
    assert int(envs[0]["MASTER_PORT"]) > 0


@pytest.mark.parametrize("node", [0, 1])
def test_node_workers_take_global_ranks_and_the_first_host_as_rendezvous(fake_slurm, monkeypatch, capsys, node):
    monkeypatch.setenv("SLURM_NODEID", str(node))
    envs = launch.worker_envs(4)
    assert [int(e["RANK"]) for e in envs] == [node * 4 + i for i in range(4)]
    assert [int(e["LOCAL_RANK"]) for e in envs] == [0, 1, 2, 3]
    port = str(20000 + 123456 % 20000)
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == \
        {("8", "4", "gpu07", port)}
    assert fake_slurm.read_text() == "show hostnames gpu[07-08]\n"
    assert f"launch: 4 training processes on node {node} of 2 (world size 8, rendezvous gpu07:{port})" in \
        capsys.readouterr().out


def test_the_batch_node_starts_one_launcher_per_node_with_srun(fake_slurm):
    assert launch.relaunch(["train", "--arm", "baseline", "--seed", "0"], 4) == REQUEUE_EXIT_CODE
    assert fake_slurm.read_text().split() == [
        "--ntasks-per-node=1", "--nodes=2", "--kill-on-bad-exit=0", f"--export=ALL,{launch.NODE_LAUNCHER_ENV}=1",
        sys.executable, "-m", "pipeline", "train", "--arm", "baseline", "--seed", "0"]


def test_a_node_launcher_runs_its_workers_and_combines_their_status(fake_slurm, monkeypatch, tmp_path):
    monkeypatch.setenv(launch.NODE_LAUNCHER_ENV, "1")     # as srun starts it on node 1
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert launch.relaunch(check_params_argv(), 2) == 0
    assert launch.relaunch(check_params_argv(tmp_path / "missing.yaml"), 2) == 2
    assert fake_slurm.read_text() == "show hostnames gpu[07-08]\n" * 2   # rendezvous looked up, no srun again


def test_combined_status_puts_a_failure_before_the_requeue_status():
    assert launch.combined_status([0, 0]) == 0
    assert launch.combined_status([0, REQUEUE_EXIT_CODE]) == REQUEUE_EXIT_CODE
    assert launch.combined_status([REQUEUE_EXIT_CODE, 1, -9]) == 1


def test_several_nodes_without_srun_fail_before_any_compute(fake_slurm, tmp_path, monkeypatch):
    (tmp_path / "bin" / "srun").unlink()
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}")   # no srun at all
    assert shutil.which("srun") is None
    with pytest.raises(ParamsError, match=r"'\$SLURM_NNODES': 2.*srun.*--mode host.*nodes = 1"):
        launch.relaunch(["train", "--arm", "baseline", "--seed", "0"], 1)

    ws = tmp_path / "ws"               # the CLI, as inside the container image: exit 2, nothing written
    ws.mkdir()
    raw = yaml.safe_load(SMOKE_PARAMS.read_text())
    raw["train"]["grad_accum"] = 2     # divisible by the 2 processes, so only srun is missing
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "--arm", "baseline", "--seed", "0"],
                            cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SLURM_NNODES" in result.stderr and "srun" in result.stderr and "launch:" not in result.stdout
    assert [p.name for p in ws.iterdir()] == ["params.yaml"]
