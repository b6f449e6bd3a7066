"""Several training processes from one command. The DVC stage command stays `python -m pipeline train ...`;
when the job asks for N > 1 processes per node ($PIPELINE_TRAIN_PROCESSES, which slurm/stage.sbatch sets
from the GPUs or tasks per node that slurm/resources.ini requests), the train stage re-runs its own command
line as N workers with torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), which accelerate reads: NCCL on GPUs, gloo on CPU (ACCELERATE_USE_CPU).

Why not torchrun itself: its agent turns a worker's exit status into 1, and the SLURM wrapper needs the
trainer's REQUEUE_EXIT_CODE to requeue. This launcher returns the workers' own status (75 when they
checkpointed on a stop request), forwards SIGTERM/SIGUSR1/SIGINT to them, and ends the others when one
fails (they would wait forever in a collective).

Several nodes (`nodes = K` in resources.ini): the launcher on the batch node starts one launcher per node
with `srun --ntasks-per-node=1`; node r's workers get ranks r*N..r*N+N-1 and the rendezvous is the first
host of $SLURM_JOB_NODELIST at a port derived from the job id. Host mode only: inside the container image
there is no srun, so a multi-node job there fails before any compute (and slurm/submit.py refuses it)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from .params import ParamsError

PROCESSES_ENV = "PIPELINE_TRAIN_PROCESSES"
NODE_LAUNCHER_ENV = "PIPELINE_NODE_LAUNCHER"   # set on the launchers that srun starts, one per node
FAILURE_GRACE_S = 120                          # how long the other workers get after one failed


def requested_processes() -> int:
    """Processes per node the job asks for (1 when unset)."""
    value = os.environ.get(PROCESSES_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ParamsError(f"${PROCESSES_ENV}", value, "a positive integer (training processes per node)")
    return int(value)


def nodes() -> int:
    return int(os.environ.get("SLURM_NNODES") or 1) if os.environ.get("SLURM_JOB_ID") else 1


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ


def rendezvous() -> tuple[str, int]:
    """(address, port) of rank 0: the first host of the job's node list with several nodes, else this host."""
    job = os.environ.get("SLURM_JOB_ID")
    if nodes() > 1:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        return hosts[0], 20000 + int(job) % 20000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1", s.getsockname()[1]


def worker_env(rank: int, local_rank: int, world: int, local_world: int, address: str, port: int) -> dict:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": address, "MASTER_PORT": str(port)}
    import torch

    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def combined_status(codes: list[int]) -> int:
    """A failure's status first, then the requeue status (some rank stopped early), else 0."""
    from .stopping import REQUEUE_EXIT_CODE

    failed = [c for c in codes if c not in (0, REQUEUE_EXIT_CODE)]
    return failed[0] if failed else (REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0)


def worker_envs(processes: int) -> list[dict]:
    """The environments of this node's `processes` workers: global rank node * processes + local rank, world
    size nodes * processes, one rendezvous for all."""
    count = nodes()
    node = int(os.environ.get("SLURM_NODEID") or 0) if count > 1 else 0
    address, port = rendezvous()
    world = count * processes
    print(f"launch: {processes} training processes on node {node} of {count} (world size {world}, "
          f"rendezvous {address}:{port})", flush=True)
    return [worker_env(node * processes + i, i, world, processes, address, port) for i in range(processes)]


def run_workers(argv: list[str], processes: int) -> int:
    """This node's `processes` workers running `python -m pipeline ARGV`; their combined exit status."""
    workers = [subprocess.Popen([sys.executable, "-m", "pipeline", *argv], env=env) for env in worker_envs(processes)]

    def forward(signum, _frame):
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        failed_at = None
        while any(w.poll() is None for w in workers):
            if failed_at is None and any(w.returncode not in (None, 0) for w in workers):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                for w in workers:
                    if w.poll() is None:
                        print(f"launch: worker {w.pid} still running {FAILURE_GRACE_S} s after another failed; "
                              "killing it", file=sys.stderr, flush=True)
                        w.kill()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return combined_status([w.wait() for w in workers])


def relaunch(argv: list[str], processes: int) -> int:
    """Run `python -m pipeline ARGV` as `processes` workers per node (one launcher per node via srun)."""
    if nodes() > 1 and NODE_LAUNCHER_ENV not in os.environ:
        if shutil.which("srun") is None:
            raise ParamsError("$SLURM_NNODES", nodes(), "1: srun, which starts one launcher per node, is not on "
                              "PATH (the container image has none); several nodes need `slurm/submit.py --mode "
                              "host`, else set nodes = 1 in slurm/resources.ini")
        cmd = ["srun", "--ntasks-per-node=1", f"--nodes={nodes()}", "--kill-on-bad-exit=0",
               f"--export=ALL,{NODE_LAUNCHER_ENV}=1", sys.executable, "-m", "pipeline", *argv]
        print(f"launch: {' '.join(cmd)}", flush=True)
        return subprocess.run(cmd).returncode
    return run_workers(argv, processes)
