"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd started from the Debian
slurm-wlm and munge packages with every file in one temp dir, torn down at the end of the session.
Tests import the `slurm_cluster` fixture (it yields the cluster's environment: SLURM_CONF and PATH);
it skips with the reason when the daemons are not installed (CI installs them: .ci/install-slurm.sh)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
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
    env = {**os.environ, "SLURM_CONF": str(conf),
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
