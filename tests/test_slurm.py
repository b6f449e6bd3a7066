"""slurm/ on a real single-node SLURM (tests/slurm_harness.py starts munged, slurmctld and slurmd; skipped
with the reason when they are not installed). Host mode: the jobs run DVC and the stages with this Python.

A synthetic DVC project (real DVC, tiny Python stages) proves the mechanics fast: parallel stages and one
complete dvc.lock, a failing stage cancelling its dependents, USR1 -> checkpoint -> requeue -> identical
result. The smoke pipeline then runs end to end as SLURM jobs and must equal a direct `dvc repro`, and the
real trainer is interrupted by USR1 and must produce bit-identical weights. Those tests are marked slurm and
slow; the submitter's plan, its checks and records, and the wrapper's contract need no cluster (fast tier)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import git_commit_all, smoke_checkout
from slurm_harness import (REPO, jobs_of, job_env, pids_catching, slurm_cluster, submit,  # noqa: F401
                           wait_for_jobs)

DVC = [sys.executable, "-m", "dvc"]
LOCK_ERRORS = re.compile(r"Unable to acquire lock|is busy|lock .* failed", re.I)

STAGES_PY = '''
"""Tiny stages for the SLURM tests."""
import hashlib, json, os, sys, time
from pathlib import Path

def prep():
    Path("prep.txt").write_text("prepared\\n")

def arm(name):
    barrier = os.environ.get("SYN_BARRIER")
    if barrier:   # both arms must run at the same time, or this one fails: proof of concurrency
        Path(barrier, name).touch()
        other = {"a": "b", "b": "a"}[name]
        deadline = time.time() + 90
        while not Path(barrier, other).exists():
            if time.time() > deadline:
                sys.exit(f"arm {name}: arm {other} did not run concurrently")
            time.sleep(0.1)
    Path("arms").mkdir(exist_ok=True)
    Path(f"arms/{name}.txt").write_text(Path("prep.txt").read_text() + name + "\\n")

def merge():
    text = Path("arms/a.txt").read_text() + Path("arms/b.txt").read_text()
    Path("merged.txt").write_text(text)
    Path("metrics.json").write_text(json.dumps({"lines": len(text.splitlines())}))

def resumable():
    steps = int(Path("params.yaml").read_text().split("steps:")[1].split()[0])
    ckpt = Path("outputs/checkpoints/resumable.json")
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "digest": ""}
    if state["step"]:
        print(f"resumed from step {state['step']}", flush=True)
    stop_file = os.environ.get("PIPELINE_STOP_FILE")   # slurm/stage.sbatch writes it on USR1
    while state["step"] < steps:
        state["digest"] = hashlib.sha256((state["digest"] + str(state["step"])).encode()).hexdigest()
        state["step"] += 1
        time.sleep(0.05)
        if stop_file and os.path.exists(stop_file):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text(json.dumps(state))
            print(f"checkpointed at step {state['step']}", flush=True)
            sys.exit(75)
    Path("resumable.txt").write_text(state["digest"] + "\\n")

def claimed():   # writes a run's checkpoint directory under the trainer's claim (pipeline/training.py)
    from pipeline.training import claim_run

    root = Path("outputs/checkpoints/claimed/run")
    owner = claim_run(root, "claimed")   # the lock lives as long as this open file
    root.mkdir(parents=True, exist_ok=True)
    job = os.environ["SLURM_JOB_ID"]
    with open(root / "writers.log", "a") as log:
        log.write(f"start {job}\\n")
    deadline = time.time() + 120      # the test releases the holder once the other job waits
    while not Path(os.environ["SYN_BARRIER"], "release").exists() and time.time() < deadline:
        time.sleep(0.1)
    with open(root / "writers.log", "a") as log:
        log.write(f"end {job}\\n")
    Path("claimed.txt").write_text("trained\\n")
    owner.close()

def broken():
    sys.exit("broken: failing on purpose")

def after_broken():
    Path("after.txt").write_text(Path("broken.txt").read_text())

getattr(sys.modules[__name__], sys.argv[1])(*sys.argv[2:])
'''

DVC_YAML = '''
stages:
  prep:
    cmd: python stages.py prep
    deps: [stages.py]
    outs: [prep.txt]
  arm:
    matrix:
      name: [a, b]
    cmd: python stages.py arm ${item.name}
    deps: [stages.py, prep.txt]
    outs: ["arms/${item.name}.txt"]
  merge:
    cmd: python stages.py merge
    deps: [stages.py, arms]     # a directory holding two stages' outputs (and DVC's .gitignore)
    outs: [merged.txt]
    metrics:
      - metrics.json:
          cache: false
  resumable:
    cmd: python stages.py resumable
    deps: [stages.py, prep.txt]
    params: [steps]
    outs: [resumable.txt]
  claimed:
    cmd: python stages.py claimed
    deps: [stages.py]
    outs: [claimed.txt]
  broken:
    cmd: python stages.py broken
    deps: [stages.py, prep.txt]
    outs: [broken.txt]
  after_broken:
    cmd: python stages.py after_broken
    deps: [stages.py, broken.txt]
    outs: [after.txt]
'''

TEST_RESOURCES = """
[DEFAULT]
time = 01:00:00
cpus-per-task = 1
mem = 300M
"""


def dvc(ws: Path, env: dict, *args: str) -> str:
    result = subprocess.run([*DVC, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def new_dvc_project(ws: Path, files: dict[str, str]) -> Path:
    ws.mkdir(parents=True)
    for name, text in files.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    (ws / ".gitignore").write_text("/outputs/checkpoints/\n")
    (ws / ".dvc").mkdir(exist_ok=True)
    (ws / ".dvc" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    (ws / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    git_commit_all(ws)
    return ws


@pytest.fixture
def synthetic(tmp_path, slurm_cluster):
    """A fresh synthetic DVC project, its state dir, resources file and submission environment."""
    ws = new_dvc_project(tmp_path / "ws", {"stages.py": STAGES_PY, "dvc.yaml": DVC_YAML, "params.yaml": "steps: 60\n"})
    resources = tmp_path / "resources.ini"
    resources.write_text(TEST_RESOURCES)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = job_env(slurm_cluster, SYN_BARRIER=str(barrier))
    return ws, tmp_path / "state", resources, env


def logs_text(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.log")))


@pytest.mark.slurm
@pytest.mark.slow
def test_parallel_stages_share_a_cache_and_gather_into_one_complete_lock(synthetic):
    ws, state, resources, env = synthetic
    out, run_dir = submit(env, ws, state, resources, "--stage", "merge")
    ids = {job["stage"]: job["job_id"] for job in jobs_of(run_dir)}
    assert list(ids) == ["prep", "arm@a", "arm@b", "merge", "gather"]
    for stage, job_id in ids.items():          # the submitter prints every job id
        assert re.search(rf"^\s+{re.escape(stage)}\s+{job_id}\b", out, re.M), out

    states = wait_for_jobs(env, run_dir, timeout=240)
    assert {s: i["JobState"] for s, i in states.items()} == dict.fromkeys(ids, "COMPLETED"), logs_text(run_dir)
    # the two arms ran at the same time (each waited for the other at a barrier) in separate workspaces
    logs = logs_text(run_dir)
    assert not LOCK_ERRORS.search(logs), logs
    for arm in ("a", "b"):
        arm_log = (run_dir / "logs" / f"arm@{arm}.log").read_text()
        assert "Stage 'prep' is cached - skipping run" in arm_log, arm_log   # upstream restored, not rerun
        assert f"SUCCESS: stage 'arm@{arm}'" in arm_log
    gather_log = (run_dir / "logs" / "gather.log").read_text()
    assert "Running stage" not in gather_log and "SUCCESS: gather" in gather_log, gather_log

    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prep", "arm@a", "arm@b", "merge"}
    assert (ws / "merged.txt").read_text() == "prepared\na\nprepared\nb\n"
    assert (ws / "merged.txt").is_symlink()     # restored by link from the shared cache (link_outputs), not copied
    assert Path(os.readlink(ws / "merged.txt")).is_relative_to(ws / ".dvc" / "cache")
    assert "type = reflink,symlink" in (ws / ".dvc" / "config.local").read_text()
    assert json.loads((ws / "metrics.json").read_text()) == {"lines": 4}   # an uncached output came through too
    assert "up to date" in dvc(ws, env, "status", "merge")
    assert not (run_dir / "workspaces" / "arm@a").exists()      # finished workspaces are removed

    again = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "submit", "--mode", "host",
                            "--state-dir", str(state), "--resources", str(resources), "--stage", "merge"],
                           cwd=ws, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "every selected stage is up to date" in again.stdout, again.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_stage_cancels_its_dependents_with_a_clear_message(synthetic):
    ws, state, resources, env = synthetic
    _, run_dir = submit(env, ws, state, resources, "--stage", "after_broken")
    states = wait_for_jobs(env, run_dir, timeout=180)
    got = {stage: (info["JobState"], info.get("Reason")) for stage, info in states.items()}
    assert got["prep"][0] == "COMPLETED"
    assert got["broken"][0] == "FAILED"
    for dependent in ("after_broken", "gather"):    # cancelled by SLURM, never left pending
        assert got[dependent] == ("CANCELLED", "DependencyNeverSatisfied"), got
    broken_log = (run_dir / "logs" / "broken.log").read_text()
    assert "broken: failing on purpose" in broken_log
    assert "FAILED: stage 'broken': dvc repro exited with" in broken_log
    assert "Jobs that depend on this stage are cancelled" in broken_log
    assert "submit.py submit --stage 'broken'" in broken_log

    status = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "status", str(run_dir)],
                            env=env, capture_output=True, text=True)
    assert status.returncode == 1
    assert re.search(r"after_broken\s+\d+\s+CANCELLED\s+not run: upstream broken failed", status.stdout), status.stdout
    assert not (ws / "dvc.lock").exists()    # nothing half-recorded in the main workspace


@pytest.mark.slurm
@pytest.mark.slow
def test_two_jobs_training_the_same_run_take_turns_on_its_checkpoint_directory(synthetic):
    """Two submissions of one stage (same state dir, hence one checkpoint directory): the second job blocks on
    the first one's claim (a waiter in /proc/locks), its log names the owning job, and the directory is
    written by one job at a time."""
    ws, state, resources, env = synthetic
    env = {**env, "PYTHONPATH": str(REPO)}
    barrier = Path(env["SYN_BARRIER"])
    writers = state / "checkpoints" / "claimed" / "run" / "writers.log"
    _, first = submit(env, ws, state, resources, "--stage", "claimed")
    first_id = jobs_of(first)[0]["job_id"]
    wait_until(lambda: writers.exists() and f"start {first_id}" in writers.read_text(), 120, first)
    _, second = submit(env, ws, state, resources, "--stage", "claimed")
    second_id = jobs_of(second)[0]["job_id"]
    wait_until(lambda: any(map(waits_for_a_lock, pids_catching("stages.py claimed", None, second))), 120, second)
    assert writers.read_text() == f"start {first_id}\n"       # the second job waits, not writes
    (barrier / "release").touch()
    for run_dir in (first, second):
        states = wait_for_jobs(env, run_dir, timeout=240)
        assert {i["JobState"] for i in states.values()} == {"COMPLETED"}, logs_text(run_dir)
    assert writers.read_text().split("\n") == [f"start {first_id}", f"end {first_id}", f"start {second_id}",
                                                f"end {second_id}", ""]
    log = (second / "logs" / "claimed.log").read_text()
    assert f"is in use by job {first_id} on " in log and "waiting for it to finish" in log, log


def waits_for_a_lock(pid: int) -> bool:
    """/proc/locks lists a process blocked in flock(2) as a waiter: `N: -> FLOCK ADVISORY WRITE PID ...`."""
    return any(parts[1] == "->" and int(parts[5]) == pid
               for parts in (line.split() for line in Path("/proc/locks").read_text().splitlines()))


def wait_until(predicate, timeout: float, run_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, logs_text(run_dir)
        time.sleep(0.3)


def send_usr1_when_caught(env: dict, run_dir: Path, stage: str, pattern: str, signum=signal.SIGUSR1):
    """An on_poll callback: once the stage's process runs (with a handler for signum, unless None), signal
    the job's batch shell as `--signal=B:USR1@lead` does, exactly once."""
    sent = []

    def poll(states):
        info = states[stage]
        if not sent and info["JobState"] == "RUNNING" and pids_catching(pattern, signum, run_dir):
            subprocess.run(["scancel", "--batch", "--signal=USR1", info["JobId"]], env=env, check=True)
            sent.append(info["JobId"])
    return poll, sent


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(synthetic, tmp_path):
    ws, state, resources, env = synthetic
    _, run_dir = submit(env, ws, state, resources, "--stage", "resumable")
    poll, sent = send_usr1_when_caught(env, run_dir, "resumable", "stages.py resumable", signum=None)
    states = wait_for_jobs(env, run_dir, timeout=240, on_poll=poll)
    assert sent, "the stage never ran"
    assert states["resumable"]["JobState"] == "COMPLETED", logs_text(run_dir)
    assert states["resumable"]["Restarts"] == "1"
    log = (run_dir / "logs" / "resumable.log").read_text()
    assert "received SIGUSR1" in log and "wrote the stop file" in log
    assert re.search(r"checkpointed at step (\d+)", log) and re.search(r"resumed from step [1-9]", log), log
    assert "REQUEUE: stage 'resumable'" in log and "(restart 1)" in log and "was not requeued" not in log
    assert states["gather"]["JobState"] == "COMPLETED"

    direct = tmp_path / "direct"                 # the same stage, uninterrupted, outside SLURM
    shutil.copytree(ws, direct, ignore=shutil.ignore_patterns(".git", "outputs"))
    subprocess.run([sys.executable, "stages.py", "resumable"], cwd=direct, check=True)
    assert (ws / "resumable.txt").read_text() == (direct / "resumable.txt").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_variations_run_side_by_side_submit_only_what_they_change_and_become_experiments(synthetic):
    ws, state, resources, env = synthetic
    env = {**env, "SYN_BARRIER": "", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    _, run_dir = submit(env, ws, state, resources, "--stage", "merge", "--stage", "resumable")
    states = wait_for_jobs(env, run_dir, timeout=300)
    assert {i["JobState"] for i in states.values()} == {"COMPLETED"}, logs_text(run_dir)
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "base"], cwd=ws, check=True)

    stages = ["--stage", "merge", "--stage", "resumable"]
    runs = [submit(env, ws, state, resources, *stages, "-S", "steps=20", "--name", "short")[1],   # in flight at once
            submit(env, ws, state, resources, *stages, "-S", "steps=30")[1]]
    for run_dir in runs:
        assert [job["stage"] for job in jobs_of(run_dir)] == ["resumable", "gather"]   # prep, arms, merge: unchanged
    for run_dir in runs:
        states = wait_for_jobs(env, run_dir, timeout=300)
        assert {i["JobState"] for i in states.values()} == {"COMPLETED"}, logs_text(run_dir)
        assert "recorded the experiment" in (run_dir / "logs" / "gather.log").read_text()
    assert (ws / "params.yaml").read_text() == "steps: 60\n"    # the main workspace is untouched
    assert "up to date" in dvc(ws, env, "status", "merge", "resumable")
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(dvc(ws, env, "exp", "show", "--csv")))}
    assert rows["short"]["steps"] == "20" and rows["steps-30"]["steps"] == "30", rows
    assert rows["short"]["lines"] == rows["steps-30"]["lines"] == "4", rows   # the metrics, from the run-cache

    again = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "submit", "--mode", "host",
                            "--state-dir", str(state), "--resources", str(resources), "-S", "steps=40", "--name",
                            "short"], cwd=ws, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "a variation named 'short' was submitted before" in again.stderr


def test_a_variation_is_validated_before_anything_is_submitted(tmp_path):
    ws = smoke_checkout(tmp_path / "ws")
    result = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "submit", "--mode", "host",
                             "--dry-run", "-S", "train.lr=-1", "--state-dir", str(tmp_path / "state")],
                            cwd=ws, capture_output=True, text=True, env=job_env({"PATH": "/usr/bin:/bin"}))
    assert result.returncode != 0 and "train.lr" in result.stderr and "sbatch" not in result.stdout, result.stderr
    assert not any((tmp_path / "state" / "variations").iterdir())
    result = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "submit", "--mode", "host",
                             "--dry-run", "-S", "train.lr=3e-4", "--state-dir", str(tmp_path / "state")],
                            cwd=ws, capture_output=True, text=True, env=job_env({"PATH": "/usr/bin:/bin"}))
    assert result.returncode == 0, result.stderr
    assert "variation 'train.lr-3e-4'" in result.stdout and "valid (profile smoke" in result.stdout
    assert "records the experiment 'train.lr-3e-4'" in result.stdout


# --- the real smoke pipeline ----------------------------------------------------------------------------

def set_param(ws: Path, section: str, key: str, value) -> None:
    """Change one params.yaml value in place (keeps the file's comments and layout)."""
    text = (ws / "params.yaml").read_text()
    block = re.search(rf"^{section}:.*\n(?:[ #].*\n|\n)*", text, re.M)
    changed = re.sub(rf"^(\s+{key}:\s*)\S+", rf"\g<1>{value}", block.group(0), count=1, flags=re.M)
    assert changed != block.group(0), f"{section}.{key} not found"
    (ws / "params.yaml").write_text(text.replace(block.group(0), changed))


@pytest.fixture(scope="module")
def smoke_runs(slurm_cluster, smoke_dvc_repro, tmp_path_factory):
    """The smoke pipeline submitted to SLURM in host mode, beside the session's direct `dvc repro` of the
    same checkout. One torch thread in both, as the jobs get one CPU each: CPU float reductions, hence the
    last bits of every weight, depend on the thread count."""
    base = tmp_path_factory.mktemp("smoke-slurm")
    cluster = base / "cluster"     # the direct run's commit (its outputs and dvc.lock are not committed)
    subprocess.run(["git", "clone", "-q", str(smoke_dvc_repro), str(cluster)], check=True)
    resources = base / "resources.ini"
    resources.write_text(TEST_RESOURCES.replace("300M", "900M"))
    env = job_env(slurm_cluster, OMP_NUM_THREADS="1")
    out, run_dir = submit(env, cluster, base / "state", resources)
    states = wait_for_jobs(env, run_dir, timeout=1500)
    return {"direct": smoke_dvc_repro, "cluster": cluster, "run_dir": run_dir, "states": states, "env": env,
            "state": base / "state", "resources": resources, "submitted": out}


@pytest.mark.slurm
@pytest.mark.slow
def test_smoke_pipeline_as_slurm_jobs_equals_a_direct_dvc_repro(smoke_runs):
    direct, cluster, run_dir = smoke_runs["direct"], smoke_runs["cluster"], smoke_runs["run_dir"]
    states = smoke_runs["states"]
    assert {s: i["JobState"] for s, i in states.items()} == dict.fromkeys(states, "COMPLETED"), logs_text(run_dir)
    direct_lock = yaml.safe_load((direct / "dvc.lock").read_text())["stages"]
    cluster_lock = yaml.safe_load((cluster / "dvc.lock").read_text())["stages"]
    assert set(cluster_lock) == set(direct_lock) == set(states) - {"gather"}
    assert "train-baseline@0" in cluster_lock and "aggregate" in cluster_lock
    assert cluster_lock == direct_lock     # hash-stable outputs: every dep, param and out hash is the same
    assert "up to date" in dvc(cluster, smoke_runs["env"], "status")
    assert not LOCK_ERRORS.search(logs_text(run_dir))
    gather_log = (run_dir / "logs" / "gather.log").read_text()
    assert "Running stage" not in gather_log and "SUCCESS: gather" in gather_log, gather_log   # restored only

    produced = sorted(p.relative_to(direct) for p in (direct / "outputs").rglob("*")
                      if p.is_file() and not {"checkpoints", "runs"} & set(p.parts))   # runs: run records
    assert produced and (Path("outputs/report/results.json") in produced)
    for rel in produced:
        assert (cluster / rel).is_file(), f"{rel} missing from the SLURM run"
        assert (cluster / rel).read_bytes() == (direct / rel).read_bytes(), f"{rel} differs from the direct run"


@pytest.mark.slurm
@pytest.mark.slow
def test_trainer_interrupted_by_usr1_is_requeued_and_bit_identical(smoke_runs, tmp_path):
    """The real trainer (longer run: 60 steps) gets USR1 mid-run as a SLURM job, checkpoints, exits 75, is
    requeued and resumes; its weights equal an uninterrupted direct run byte for byte."""
    direct, cluster, env = smoke_runs["direct"], smoke_runs["cluster"], smoke_runs["env"]
    for ws in (direct, cluster):
        set_param(ws, "train", "max_steps", 60)
        set_param(ws, "train", "eval_interval", 60)     # one validation, at the end
    with open(tmp_path / "direct.log", "w") as log:
        direct_run = subprocess.Popen([*DVC, "repro", "train-baseline@0"], cwd=direct, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        _, run_dir = submit(env, cluster, smoke_runs["state"], smoke_runs["resources"], "--stage", "train-baseline@0")
        assert [job["stage"] for job in jobs_of(run_dir)] == ["train-baseline@0", "gather"]
        poll, sent = send_usr1_when_caught(env, run_dir, "train-baseline@0", "pipeline train --arm baseline")
        # (the direct run's trainer matches too, but only processes working under run_dir count)
        states = wait_for_jobs(env, run_dir, timeout=600, on_poll=poll)
        assert direct_run.wait(timeout=600) == 0, (tmp_path / "direct.log").read_text()[-3000:]
    log = (run_dir / "logs" / "train-baseline@0.log").read_text()
    assert sent, log
    assert states["train-baseline@0"]["JobState"] == "COMPLETED" and states["gather"]["JobState"] == "COMPLETED", log
    assert states["train-baseline@0"]["Restarts"] == "1", log
    assert "wrote the stop file" in log and "REQUEUE: stage 'train-baseline@0'" in log and "(restart 1)" in log
    assert "was not requeued" not in log and re.search(r"resum\w+ from", log), log

    model = Path("outputs/train/baseline-s0/model")
    weights = sorted(p.name for p in (direct / model).glob("*.safetensors"))
    assert weights
    for name in weights:
        assert (cluster / model / name).read_bytes() == (direct / model / name).read_bytes(), name


# --- without a cluster: the submitter's plan and the wrapper's constants ------------------------------

def dry_run(ws: Path, tmp_path: Path, *args: str, mode: str = "host") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "submit", "--mode", mode, "--dry-run",
                           "--state-dir", str(tmp_path / "state"), *args],
                          cwd=ws, capture_output=True, text=True, env=job_env({"PATH": "/usr/bin:/bin"}))


def sbatch_lines(stdout: str) -> dict[str, str]:
    return {re.search(r"--job-name=pl:(\S+)", line).group(1): line
            for line in stdout.splitlines() if line.startswith("sbatch ")}


def test_dry_run_maps_the_dag_to_afterok_jobs_with_per_kind_resources(tmp_path):
    from pipeline.stopping import REQUEUE_EXIT_CODE

    ws = smoke_checkout(tmp_path / "ws")
    result = dry_run(ws, tmp_path, "--seed", "0")
    assert result.returncode == 0, result.stderr
    commands = sbatch_lines(result.stdout)
    assert "train-baseline@0" in commands and "transfer@0" in commands and "gather" in commands
    assert not any(name.endswith(("-1", "@1")) for name in commands)       # only seed 0's stages
    assert "--dependency" not in commands["data"]
    train = commands["train-baseline@0"]
    assert "--dependency=afterok:<data>:<pretrain>" in train and "--kill-on-invalid-dep=yes" in train
    assert "--gres=gpu:a100:1" in train and "--time=24:00:00" in train            # [train] covers train-baseline
    assert "--gres" not in commands["data"] and "PIPELINE_SEED=none" in commands["data"]
    assert "--gres=gpu:a100:1" in commands["assess-ref@0-pretrained"]                           # [assess] covers assess-ref
    assert "PIPELINE_SEED=0" in train and "PIPELINE_MODE=host" in train
    assert all(f"PIPELINE_REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}," in line for line in commands.values())
    stages = [name for name in commands if name != "gather"]
    assert commands["gather"].endswith("stage.sbatch --gather " + " ".join(stages))
    assert "--dependency=afterok:" + ":".join(f"<{name}>" for name in stages) in commands["gather"]
    assert not (tmp_path / "state").exists()                                 # a dry run creates nothing


def test_container_mode_refuses_several_nodes_naming_the_section_and_key(tmp_path):
    ws = smoke_checkout(tmp_path / "ws")
    resources = tmp_path / "resources.ini"
    resources.write_text((REPO / "slurm" / "resources.ini").read_text().replace("[train]\n", "[train]\nnodes = 2\n"))
    image = tmp_path / "pipeline.sif"
    image.write_bytes(b"")
    container = ("--resources", str(resources), "--image", str(image), "--stage", "train-baseline@0")
    result = dry_run(ws, tmp_path, *container, mode="container")
    assert result.returncode != 0 and "sbatch" not in result.stdout
    assert f"train-baseline@0: nodes = 2 in [train] of {resources}" in result.stderr, result.stderr
    assert "no srun" in result.stderr and "--mode host" in result.stderr
    result = dry_run(ws, tmp_path, "--image", str(image), "--stage", "data", "--sbatch=--nodes=1-2", mode="container")
    assert result.returncode != 0 and "--sbatch=--nodes=1-2" in result.stderr, result.stderr
    result = dry_run(ws, tmp_path, "--resources", str(resources), "--stage", "train-baseline@0")   # host: srun exists
    assert result.returncode == 0, result.stderr
    assert "--nodes=2" in sbatch_lines(result.stdout)["train-baseline@0"]


def test_wrapper_and_submitter_agree_with_the_pipeline():
    sys.path.insert(0, str(REPO / "slurm"))
    try:
        import submit as submitter
    finally:
        sys.path.pop(0)
    from pipeline import paths, stopping

    wrapper = (REPO / "slurm" / "stage.sbatch").read_text()
    assert f"#SBATCH --signal=B:USR1@{submitter.SIGNAL_LEAD_S}" in wrapper
    assert "#SBATCH --requeue" in wrapper and "#SBATCH --open-mode=append" in wrapper
    assert "REQUEUE_EXIT_CODE=$PIPELINE_REQUEUE_EXIT_CODE\n" in wrapper   # the submitter's value, no default
    assert f'export {stopping.STOP_FILE_ENV}="$PIPELINE_CHECKPOINT_DIR/' in wrapper
    assert Path(submitter.CHECKPOINTS) == paths.checkpoint_dir("baseline", 0).parent
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "stage.sbatch")]).returncode == 0


def test_wrapper_started_without_the_submitter_stops_before_doing_anything(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **{f"PIPELINE_{key}": str(tmp_path / key.lower()) for key in
                                                              ("RUN_DIR", "WORKSPACE", "CACHE_DIR", "CHECKPOINT_DIR")}}
    result = subprocess.run(["bash", str(REPO / "slurm" / "stage.sbatch"), "prep"], env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "PIPELINE_REQUEUE_EXIT_CODE" in result.stderr and "submit via slurm/submit.py" in result.stderr
    assert list(tmp_path.iterdir()) == []                                    # no scratch, logs or stop file


FAKE_SBATCH = """#!/bin/sh
# test double for `sbatch --parsable`: prints a job id; notes the inode of the run's jobs.json as it stands
for arg in "$@"; do case $arg in --chdir=*) run=${arg#--chdir=} ;; esac; done
[ -f "$run/jobs.json" ] && stat -c %i "$run/jobs.json" >> "$FAKE_INODES"
echo $$
"""


def test_submission_records_are_replaced_whole_never_rewritten_in_place(tmp_path):
    """jobs.json and source.json go through pipeline/io.py's atomic writer: each write is a new file renamed
    over the old one, so `status` or the gather job never read a half-written record."""
    ws = new_dvc_project(tmp_path / "ws", {"stages.py": STAGES_PY, "dvc.yaml": DVC_YAML, "params.yaml": "steps: 60\n"})
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text(FAKE_SBATCH)
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    resources = tmp_path / "resources.ini"
    resources.write_text(TEST_RESOURCES)
    env = job_env({"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}, FAKE_INODES=str(tmp_path / "inodes"))
    _, run_dir = submit(env, ws, tmp_path / "state", resources, "--stage", "merge")
    assert [job["stage"] for job in jobs_of(run_dir)] == ["prep", "arm@a", "arm@b", "merge", "gather"]
    inodes = (tmp_path / "inodes").read_text().split()
    assert len(inodes) == 4 and all(a != b for a, b in zip(inodes, inodes[1:])), inodes
    assert "stages.py" in json.loads((run_dir / "source.json").read_text())["files"]
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]


APPTAINER_DOUBLE = r'''#!/bin/bash
# Test double for apptainer (it cannot be installed here): records the call, then runs the command on
# the host in the --pwd directory with the APPTAINERENV_ variables applied, as `apptainer exec` would.
printf '%s\n' "$*" >> "$APPTAINER_CALLS"
[[ $1 == exec ]] && shift
while [[ $1 == --* ]]; do case $1 in --pwd) cd "$2"; shift 2 ;; --bind) shift 2 ;; *) shift ;; esac; done
shift
for var in $(env | sed -n 's/^APPTAINERENV_\([A-Z_]*\)=.*/\1/p'); do name="APPTAINERENV_$var"; export "$var=${!name}"; done
exec "$@"
'''


@pytest.mark.slurm
@pytest.mark.slow
def test_container_mode_runs_each_stage_through_apptainer_exec(synthetic, tmp_path):
    ws, state, resources, env = synthetic
    (tmp_path / "bin").mkdir()
    double = tmp_path / "bin" / "apptainer"
    double.write_text(APPTAINER_DOUBLE)
    double.chmod(0o755)
    image = tmp_path / "pipeline.sif"
    image.write_bytes(b"")
    calls = tmp_path / "calls.log"
    env = {**env, "PATH": f"{tmp_path / 'bin'}:{env['PATH']}", "APPTAINER_CALLS": str(calls)}
    _, run_dir = submit(env, ws, state, resources, "--stage", "prep", "--image", str(image), mode="container")
    states = wait_for_jobs(env, run_dir, timeout=180)
    assert {s: i["JobState"] for s, i in states.items()} == {"prep": "COMPLETED", "gather": "COMPLETED"}, \
        logs_text(run_dir)
    stage_call, gather_call, remote_call = calls.read_text().splitlines()   # remote: no DVC remote, no push
    scratch = env["SCRATCH"]
    binds = f"--bind {scratch},{ws},{run_dir},{ws}/.dvc/cache,{state}/checkpoints,"
    for call in (stage_call, gather_call, remote_call):
        assert call.startswith(f"exec --nv --cleanenv {binds}"), call
    assert stage_call.endswith(f"--pwd {run_dir}/workspaces/prep {image} dvc repro prep")
    assert gather_call.endswith(f"--pwd {ws} {image} dvc --wait-for-lock repro prep")
    assert remote_call.endswith(f"--pwd {ws} {image} dvc remote default")
    assert (ws / "prep.txt").read_text() == "prepared\n"
    assert "mode container" in (run_dir / "logs" / "prep.log").read_text()
