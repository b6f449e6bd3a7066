"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd started from the Debian
slurm-wlm and munge packages with every file in one temp dir, torn down at the end of the session.
Tests import the `slurm_cluster` fixture (it yields the cluster's environment: SLURM_CONF, PATH, and a
SCRATCH for the jobs);
it skips with the reason when the daemons are not installed (CI installs them: .ci/install-slurm.sh)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/bin")
NODE_CPUS = 4           # declared (config_overrides), so a few tiny jobs overlap on a 2-core machine
MEM_PER_CPU_MB = 1000   # DefMemPerCPU: without it every job claims the whole node and jobs run one at a time


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if find_binary(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, munge_socket: Path) -> str:
    return "\n".join([
        "ClusterName=pytest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        f"DefMemPerCPU={MEM_PER_CPU_MB}",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerParameters=kill_invalid_depend",
        "SlurmdParameters=config_overrides",
        "MinJobAge=3600",          # finished jobs stay visible to scontrol for the whole session
        "KillWait=5",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_CPUS * MEM_PER_CPU_MB} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"SLURM harness: {what} not ready after {timeout} s\n{tail}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start a one-node SLURM (munged, slurmctld, slurmd) for the session; yield its client environment."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): install Debian slurm-wlm and munge "
                    "with `bash .ci/install-slurm.sh`")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    os.chmod(root / "munge", 0o755)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.sock"
    subprocess.run([find_binary("mungekey"), "-c", "-k", str(key)], check=True)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, sock))
    (root / "scratch").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf), "SCRATCH": str(root / "scratch"),
           "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
           "PATH": os.pathsep.join([os.environ.get("PATH", ""), *SBIN])}
    for var in [v for v in env if v.startswith("SLURM_") and v != "SLURM_CONF"]:
        del env[var]   # a harness started inside a job must not leak that job's variables
    started = []
    try:
        subprocess.run([find_binary("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid",
                        f"--seed-file={root}/munge/munged.seed"], check=True)
        started.append(root / "munged.pid")
        subprocess.run([find_binary("slurmctld"), "-f", str(conf)], check=True, env=env)
        started.append(root / "slurmctld.pid")
        subprocess.run([find_binary("slurmd"), "-f", str(conf), "-N", "localhost"], check=True, env=env)
        started.append(root / "slurmd.pid")

        def node_idle() -> bool:
            out = subprocess.run([find_binary("sinfo"), "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                 env=env)
            return out.stdout.strip() == "idle"

        wait_for(node_idle, 30, "node 'localhost' idle", root / "slurmctld.log")
        yield env
    finally:
        subprocess.run([find_binary("scancel"), "--user=root"], env=env, capture_output=True)
        for pid_file in reversed(started):
            stop_daemon(pid_file)


def stop_daemon(pid_file: Path) -> None:
    """SIGTERM the daemon whose pid file we wrote, and wait for it to exit."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


# --- driving the submitter and waiting for jobs --------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "slurm" / "submit.py"
REQUEUE_GRACE_S = 3
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}


def job_env(cluster_env: dict, **extra) -> dict:
    """The environment of a submission: the cluster, this interpreter's bin first on PATH (host mode runs
    `dvc` and `python -m pipeline` from the job's PATH), quiet progress bars, offline HF."""
    bin_dir = str(Path(sys.executable).parent)
    return {**cluster_env, "PATH": os.pathsep.join([bin_dir, cluster_env["PATH"]]), "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", **extra}


def submit(env: dict, workspace: Path, state_dir: Path, resources: Path, *args: str,
           mode: str = "host") -> tuple[str, Path]:
    """`slurm/submit.py submit --mode MODE ...` in the workspace; returns its stdout and the run directory."""
    result = subprocess.run([sys.executable, str(SUBMIT), "submit", "--mode", mode, "--state-dir", str(state_dir),
                             "--resources", str(resources), *args], cwd=workspace, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = Path(next(line for line in result.stdout.splitlines() if "run directory" in line).rsplit(" ", 1)[1])
    return result.stdout, run_dir


def jobs_of(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "jobs.json").read_text())["jobs"]


def show_job(env: dict, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for_jobs(env: dict, run_dir: Path, timeout: float, on_poll=None) -> dict[str, dict]:
    """Poll until every job of the run has left the queue; stage -> scontrol fields. A self-requeued job
    waits out SLURM's requeue delay (BeginTime, ~2 min); to keep tests short it is released after
    REQUEUE_GRACE_S instead (released in the second it was requeued, slurmd refuses it: "Job credential
    revoked", as credential times have one-second resolution)."""
    deadline = time.monotonic() + timeout
    held_since: dict[str, float] = {}
    while True:
        states = {job["stage"]: show_job(env, job["job_id"]) for job in jobs_of(run_dir)}
        for info in states.values():
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                since = held_since.setdefault(info["JobId"] + info.get("Restarts", ""), time.monotonic())
                if time.monotonic() - since >= REQUEUE_GRACE_S:
                    subprocess.run(["scontrol", "update", f"JobId={info['JobId']}", "StartTime=now"], env=env,
                                   check=True)
        if on_poll is not None:
            on_poll(states)
        if not any(info["JobState"] in ACTIVE for info in states.values()):
            return states
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((run_dir / "logs").glob("*.log")))
            raise AssertionError(f"jobs still active after {timeout} s: "
                                 f"{ {s: i['JobState'] for s, i in states.items()} }\n{logs}")
        time.sleep(0.5)


def pids_catching(pattern: str, signum: int | None, under: Path) -> list[int]:
    """Processes working below `under` whose command line contains `pattern` and that have a handler
    installed for `signum` (any process when None)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            caught = next(l for l in status.read_text().splitlines() if l.startswith("SigCgt:")).split()[1]
            cwd = Path(os.readlink(status.parent / "cwd"))
        except (OSError, StopIteration):
            continue
        handles = signum is None or (int(caught, 16) >> (signum - 1)) & 1
        if pattern in cmdline and handles and cwd.is_relative_to(under):
            found.append(int(status.parent.name))
    return found
