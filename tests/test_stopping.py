"""pipeline/stopping.py: a stop request arrives as a signal to this process or as the stop file named by
$PIPELINE_STOP_FILE (what slurm/stage.sbatch writes, since no signal crosses apptainer + dvc)."""
from __future__ import annotations

import os
import runpy
import signal
from pathlib import Path

import pytest

from conftest import REPO, run_stage
from pipeline import stopping
from pipeline.stopping import REQUEUE_EXIT_CODE, STOP_FILE_ENV, StopRequests, stop_requested


def test_stop_file_is_polled_only_when_named_and_present(tmp_path, monkeypatch):
    stop = tmp_path / "stop-requests" / "job-1"
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    assert stop_requested() is None
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    assert stop_requested() is None
    stop.parent.mkdir()
    stop.write_text("SIGUSR1\n")
    assert stop_requested() == f"stop file {stop}"


def test_stop_requests_sees_the_file_and_signals_and_restores_handlers(tmp_path, monkeypatch, capsys):
    stop = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    before = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    with StopRequests(enabled=True, who="train") as stops:
        assert stops.received is None
        stop.touch()
        assert stops.received == f"stop file {stop}"
        stop.unlink()
        assert stops.received == f"stop file {stop}"      # a request, once seen, stays
    assert "train: found stop file" in capsys.readouterr().err
    with StopRequests(enabled=True, who="attack") as stops:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.received == "signal SIGUSR1"
    assert "attack: received SIGUSR1" in capsys.readouterr().err     # the stage that stops, not always "train"
    assert {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS} == before
    stop.touch()
    with StopRequests(enabled=False, who="train") as stops:
        assert stops.received is None                      # disabled: no handlers, no polling


def test_submitter_reads_the_exit_code_from_the_module_without_the_project():
    """slurm/submit.py imports stopping.py on a login node: standard library only."""
    assert runpy.run_path(str(REPO / "pipeline" / "stopping.py"))["REQUEUE_EXIT_CODE"] == REQUEUE_EXIT_CODE == 75
    imports = [line for line in (REPO / "pipeline" / "stopping.py").read_text().splitlines()
               if line.startswith(("import ", "from "))]
    assert all(line.split()[1] in {"__future__", "os", "signal", "sys", "threading", "pathlib"} for line in imports)


@pytest.mark.slow
def test_trainer_checkpoints_and_exits_75_when_the_stop_file_exists(workspace_copy, tmp_path, monkeypatch, capfd):
    stop = tmp_path / "stop"
    stop.write_text("SIGUSR1\n")
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    assert run_stage(workspace_copy, "train", "--arm", "baseline", "--seed", "0") == REQUEUE_EXIT_CODE
    out = capfd.readouterr()
    assert f"found stop file {stop}" in out.err and "STOPPED EARLY" in out.out
    root = next(p for p in Path(workspace_copy, "outputs/checkpoints/baseline-s0").iterdir() if p.is_dir())
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000001"]     # stopped after the first step
