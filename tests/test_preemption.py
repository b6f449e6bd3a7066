"""Preemption and the environment in container mode, on the real single-node SLURM (tests/slurm_harness.py),
with tests/apptainer_standin.py as `apptainer`: like Apptainer it runs the command as its direct child,
forwards signals only to that child (dvc) and passes only APPTAINERENV_* through --cleanenv.

The stop request must reach the trainer through every layer (batch shell -> apptainer -> dvc repro ->
python -m pipeline train): slurm/stage.sbatch turns SLURM's USR1 into the stop file that
pipeline/stopping.py polls each step."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import git_commit_all, pipeline_env, smoke_checkout
from slurm_harness import REPO, job_env, pids_catching, slurm_cluster, submit, wait_for_jobs  # noqa: F401
from test_slurm import DVC_YAML, STAGES_PY, TEST_RESOURCES, logs_text, new_dvc_project, set_param

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STANDIN = REPO / "tests" / "apptainer_standin.py"


def container_env(env: dict, tmp_path: Path, **extra) -> tuple[dict, Path]:
    """The submission environment with the stand-in first on PATH, and the "image": its environment is
    this interpreter's bin directory and the system's on PATH (the image's python, pip and dvc), the hub
    cache, and an HF_HOME that the job's forwarded one must override."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").symlink_to(STANDIN)
    image = tmp_path / "pipeline.sif"
    image.write_text(f"PATH={Path(sys.executable).parent}:/usr/bin:/bin\nHF_HUB_CACHE=/opt/hf/hub\nHF_HOME=/image/hf\n")
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", **extra}, image


def test_cleanenv_passes_gpus_slurm_and_pipeline_variables(slurm_cluster, tmp_path):
    """What reaches a stage job's container process: the GPUs SLURM assigned, the SLURM, NCCL_* and
    MASTER_ADDR/MASTER_PORT variables a multi-node launch reads, the pipeline's own variables (the stop
    file's name among them), over the image's %environment; nothing else of the host."""
    ws = new_dvc_project(tmp_path / "ws", {"stages.py": STAGES_PY, "dvc.yaml": DVC_YAML, "params.yaml": "steps: 5\n"})
    resources = tmp_path / "resources.ini"
    resources.write_text(TEST_RESOURCES)
    dumps = tmp_path / "env"
    dumps.mkdir()
    launch = {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    env, image = container_env(job_env(slurm_cluster), tmp_path, CUDA_VISIBLE_DEVICES="0",
                               APPTAINER_ENV_DUMP=str(dumps), HOST_ONLY_SETTING="must not cross", **launch)
    _, run_dir = submit(env, ws, tmp_path / "state", resources, "--stage", "prep", "--image", str(image),
                        mode="container")
    states = wait_for_jobs(env, run_dir, timeout=180)
    assert {s: i["JobState"] for s, i in states.items()} == {"prep": "COMPLETED", "gather": "COMPLETED"}, \
        logs_text(run_dir)
    inside = json.loads((dumps / f"{states['prep']['JobId']}.json").read_text())     # the stage job's call
    print("reaches the container:", sorted(inside))
    assert inside["CUDA_VISIBLE_DEVICES"] == "0"
    assert inside["SLURM_JOB_ID"] == states["prep"]["JobId"]
    assert {k: inside.get(k) for k in launch} == launch
    for var in ("SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_TASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_NODEID",
                "SLURM_PROCID", "SLURM_LOCALID", "SLURM_SUBMIT_DIR"):
        assert var in inside, var
    assert inside["PIPELINE_STOP_FILE"] == f"{tmp_path / 'state' / 'checkpoints'}/stop-requests/job-{inside['SLURM_JOB_ID']}"
    for var in ("PIPELINE_RUN_DIR", "PIPELINE_CHECKPOINT_DIR", "PIPELINE_CACHE_DIR", "PIPELINE_SEED", "HF_HOME",
                "HF_HUB_OFFLINE", "PYTHONHASHSEED", "OMP_NUM_THREADS", "DVC_SITE_CACHE_DIR", "SCRATCH"):
        assert var in inside, var
    assert "HOST_ONLY_SETTING" not in inside and "APPTAINER_ENV_DUMP" not in inside
    assert inside["PATH"] == f"{Path(sys.executable).parent}:/usr/bin:/bin"     # the image's, not the host's
    assert inside["HF_HUB_CACHE"] == "/opt/hf/hub"                               # %environment: not forwarded
    assert inside["HF_HOME"] == f"{inside['SCRATCH']}/hf"     # the job's, over the image's HF_HOME=/image/hf


def test_usr1_through_apptainer_and_dvc_checkpoints_requeues_and_is_bit_identical(slurm_cluster, tmp_path):
    """The real trainer under apptainer (stand-in) and dvc repro: SLURM's USR1 to the batch shell becomes the
    stop file, the trainer checkpoints and exits 75, the job requeues and resumes, and the weights equal an
    uninterrupted host run byte for byte."""
    runs = {}
    for name in ("direct", "cluster"):
        ws = smoke_checkout(tmp_path / name)
        set_param(ws, "train", "max_steps", 60)
        set_param(ws, "train", "eval_interval", 60)     # one validation, at the end
        git_commit_all(ws)
        runs[name] = ws
    resources = tmp_path / "resources.ini"
    resources.write_text(TEST_RESOURCES.replace("300M", "900M"))
    env, image = container_env(job_env(slurm_cluster, OMP_NUM_THREADS="1"), tmp_path)
    _, run_dir = submit(env, runs["cluster"], tmp_path / "state", resources, "--stage", "train-baseline@0",
                        "--image", str(image), mode="container")
    sent = []

    def poll(states):   # once the trainer runs its loop (handlers installed), signal the batch shell only
        info = states["train-baseline@0"]
        if not sent and info["JobState"] == "RUNNING" and pids_catching("pipeline train --arm baseline",
                                                                        signal.SIGUSR1, run_dir):
            subprocess.run(["scancel", "--batch", "--signal=USR1", info["JobId"]], env=env, check=True)
            sent.append(info["JobId"])
    states = wait_for_jobs(env, run_dir, timeout=900, on_poll=poll)
    log = (run_dir / "logs" / "train-baseline@0.log").read_text()
    assert sent, log
    assert {s: i["JobState"] for s, i in states.items()} == dict.fromkeys(states, "COMPLETED"), logs_text(run_dir)
    assert states["train-baseline@0"]["Restarts"] == "1", log
    assert "wrote the stop file" in log and "train: found stop file" in log, log
    assert "REQUEUE: stage 'train-baseline@0'" in log and re.search(r"resum\w+ from", log), log
    assert not Path(log.split("wrote the stop file ")[1].split(";")[0]).exists()   # cleared by the new attempt

    direct = subprocess.run([sys.executable, "-m", "dvc", "repro", "train-baseline@0"], cwd=runs["direct"],
                            env=pipeline_env(), capture_output=True, text=True)
    assert direct.returncode == 0, direct.stdout[-3000:] + direct.stderr[-3000:]
    model = Path("outputs/train/baseline-s0/model")
    weights = sorted(p.name for p in (runs["direct"] / model).glob("*.safetensors"))
    assert weights
    for name in weights:
        assert (runs["cluster"] / model / name).read_bytes() == (runs["direct"] / model / name).read_bytes(), name
