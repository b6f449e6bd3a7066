"""The rehearsal profile's whole DAG through slurm/submit.py on the real single-node SLURM (host mode), as on
the cluster: every stage a job with `afterok`, `train` as 2 gloo processes (resources.ini: ntasks-per-node),
USR1 mid-training -> checkpoint -> requeue -> resume, the gather job writing one complete dvc.lock and
pushing every output to a DVC remote (a local directory standing in for project storage), the report
produced; then a variation (`submit.py -S train.lr=...`) reruns training and what depends on it only and
becomes a DVC experiment, and after scratch is purged a collaborator's fresh clone + `dvc pull` gets every
result back. Compared with a direct
single-process `dvc repro` of the same checkout: stages upstream of training byte-identical, training and
what depends on it equal within tolerances (2 processes sum the gradients in another order).

One run serves every test (module fixture; ~12 min in all on 2 cores). Select it with `pytest -m rehearsal`."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import rehearsal
from conftest import git_commit_all, smoke_checkout
from rehearsal import rehearsal_fetched, rehearsal_hub  # noqa: F401 (fixtures)
from slurm_harness import job_env, slurm_cluster, submit, wait_for_jobs  # noqa: F401
from test_slurm import DVC, LOCK_ERRORS, dvc, logs_text, send_usr1_when_caught, set_param

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.rehearsal]

RESOURCES = """
[DEFAULT]
time = 01:00:00
cpus-per-task = 1
mem = 900M

[train]
ntasks-per-node = 2
mem = 1800M
"""
# long enough (a few seconds per run) for USR1 to land mid-training; the same in both runs. The profile's
# global batch (4 x 2) as 2 x 4: each of 2 processes accumulates 2 micro-batches before the all-reduce, so the
# gradient is summed in another order than 1 process's 4 (with 4 x 2 the two sums agree to the last bit)
TRAIN = {"max_steps": 64, "eval_interval": 16, "checkpoint_interval": 16, "batch_size": 2, "grad_accum": 4}
INTERRUPTED = "train-baseline@0"
TRAINED = re.compile(r"^(train|assess|benchmarks|transfer|aggregate)(-|@|$)")   # training and its downstream
REL_TOLERANCE = {"train": 1e-4, "eval": 1e-3}    # 2 processes vs 1: float summation order only


def rehearsal_checkout(dest: Path, lock: Path) -> Path:
    """This checkout's code as a fresh git repo whose params.yaml is the rehearsal profile (TRAIN applied) and
    whose refs.lock.yaml is the one fetch wrote for it."""
    smoke_checkout(dest)
    shutil.copy(rehearsal.REHEARSAL_PARAMS, dest / "params.yaml")
    shutil.copy(lock, dest / "refs.lock.yaml")
    for key, value in TRAIN.items():
        set_param(dest, "train", key, value)
    git_commit_all(dest)
    return dest


@pytest.fixture(scope="module")
def rehearsal_runs(slurm_cluster, rehearsal_fetched, tmp_path_factory):
    base = tmp_path_factory.mktemp("rehearsal-slurm")
    caches = Path(slurm_cluster["SCRATCH"]) / "hf"          # the jobs' $SCRATCH/hf, as `fetch` fills it
    if not caches.exists():
        rehearsal.copy_cache(rehearsal_fetched / "hf", caches)
    direct = rehearsal_checkout(base / "direct", rehearsal_fetched / "refs.lock.yaml")
    cluster = base / "cluster"
    subprocess.run(["git", "clone", "-q", str(direct), str(cluster)], check=True)
    store = base / "store"                                 # project storage: survives the scratch purge
    env = job_env(slurm_cluster, OMP_NUM_THREADS="1")
    dvc(cluster, env, "remote", "add", "-d", "--local", "store", str(store))
    resources = base / "resources.ini"
    resources.write_text(RESOURCES)
    with open(base / "direct.log", "w") as log:
        direct_run = subprocess.Popen([*DVC, "repro"], cwd=direct, env=env, stdout=log, stderr=subprocess.STDOUT)
        out, run_dir = submit(env, cluster, base / "state", resources)
        poll, sent = send_usr1_when_caught(env, run_dir, INTERRUPTED, "pipeline train --arm baseline")
        states = wait_for_jobs(env, run_dir, timeout=3000, on_poll=poll)
        assert direct_run.wait(timeout=1800) == 0, (base / "direct.log").read_text()[-3000:]
    return {"direct": direct, "cluster": cluster, "run_dir": run_dir, "states": states, "env": env, "sent": sent,
            "store": store, "base": base}


def stage_seconds(run_dir: Path) -> dict[str, int]:
    """Each stage's wall time from its job log (the attempt that finished)."""
    found = {}
    for log in (run_dir / "logs").glob("*.log"):
        for match in re.finditer(r"SUCCESS: stage '([^']+)' finished in (\d+) s", log.read_text()):
            found[match.group(1)] = int(match.group(2))
    return found


def test_rehearsal_dag_as_slurm_jobs_with_two_training_processes_and_a_requeue(rehearsal_runs):
    run_dir, states, cluster = rehearsal_runs["run_dir"], rehearsal_runs["states"], rehearsal_runs["cluster"]
    assert {s: i["JobState"] for s, i in states.items()} == dict.fromkeys(states, "COMPLETED"), logs_text(run_dir)
    lock = yaml.safe_load((cluster / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(states) - {"gather"}
    assert {"data", "pretrain", "monotonic_init", "train-monotonic@1", "aggregate"} <= set(lock)
    assert "up to date" in dvc(cluster, rehearsal_runs["env"], "status")
    assert not LOCK_ERRORS.search(logs_text(run_dir))

    log = (run_dir / "logs" / f"{INTERRUPTED}.log").read_text()
    assert rehearsal_runs["sent"], log
    assert states[INTERRUPTED]["Restarts"] == "1", log
    assert log.count("launch: 2 training processes") == 2, log      # both attempts: 2 gloo processes
    assert "wrote the stop file" in log and f"REQUEUE: stage '{INTERRUPTED}'" in log and "STOPPED EARLY" in log
    assert re.search(r"resuming from \S+ \(step [1-9]\d*/64\)", log), log
    for stage in [s for s in lock if s.startswith("train-")]:
        arm, seed = re.match(r"train-(\w+)@(\d+)", stage).groups()
        metrics = json.loads((cluster / f"outputs/train_logs/{arm}-s{seed}/metrics.json").read_text())
        record = json.loads((run_dir / "records" / f"train-{arm}-s{seed}.json").read_text())   # stage.sbatch
        assert record["processes"] == 2 and metrics["global_batch_sequences"] == 8, stage
    report = cluster / "outputs" / "report"
    assert (report / "report.md").stat().st_size > 0 and (report / "results.json").exists()
    gather_log = (run_dir / "logs" / "gather.log").read_text()
    assert "Running stage" not in gather_log and "SUCCESS: gather" in gather_log, gather_log
    seconds = stage_seconds(run_dir)
    print("\nstage wall times through SLURM (s): " + ", ".join(f"{s} {t}" for s, t in sorted(seconds.items())))


def numbers(value, prefix=""):
    """Every numeric leaf of a JSON value: path -> number."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{prefix}[{i}]").items()}
    return {prefix: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def test_two_processes_equal_one_within_tolerance_and_untrained_stages_identical(rehearsal_runs):
    direct, cluster = rehearsal_runs["direct"], rehearsal_runs["cluster"]
    direct_lock = yaml.safe_load((direct / "dvc.lock").read_text())["stages"]
    cluster_lock = yaml.safe_load((cluster / "dvc.lock").read_text())["stages"]
    assert set(cluster_lock) == set(direct_lock)
    untouched = [s for s in direct_lock if not TRAINED.match(s) or s.startswith(("assess-ref", "benchmarks-ref"))]
    assert "data" in untouched and "assess-ref@0-pretrained" in untouched
    for stage in untouched:                 # nothing downstream of training: hash-identical
        assert cluster_lock[stage] == direct_lock[stage], stage

    worst = {}
    for kind, pattern in (("train", "outputs/train_logs/*/metrics.json"), ("eval", "outputs/eval/*/metrics.json")):
        for path in sorted(direct.glob(pattern)):
            one = numbers(json.loads(path.read_text()))
            two = numbers(json.loads((cluster / path.relative_to(direct)).read_text()))
            for key in ("validation_loss", "perplexity") if kind == "train" else ("perplexity",):
                for leaf in [k for k in one if k.endswith(f"/{key}") or k.endswith(f"_{key}")]:
                    rel = abs(two[leaf] - one[leaf]) / abs(one[leaf])
                    worst[kind] = max(worst.get(kind, 0.0), rel)
                    assert rel <= REL_TOLERANCE[kind], (path, leaf, one[leaf], two[leaf])
    assert set(worst) == {"train", "eval"}
    print(f"\n2 vs 1 processes, largest relative difference: {worst}")


def commit_results(ws: Path) -> None:
    """What the user commits after a run: dvc.lock and what git keeps (outputs/report, outputs/metrics)."""
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m",
                    "results"], cwd=ws, check=True)


def test_a_variation_reruns_training_and_downstream_only_and_becomes_an_experiment(rehearsal_runs):
    cluster, env = rehearsal_runs["cluster"], rehearsal_runs["env"]
    commit_results(cluster)
    out, run_dir = submit(env, cluster, rehearsal_runs["base"] / "state", rehearsal_runs["base"] / "resources.ini",
                          "-S", "train.lr=2e-5", "--name", "lr2e-5")
    submitted = {job["stage"] for job in json.loads((run_dir / "jobs.json").read_text())["jobs"]}
    assert {"train-baseline@0", "train-monotonic@1", "assess@baseline-0", "aggregate", "gather"} <= submitted, out
    assert not submitted & {"data", "pretrain", "monotonic_init", "assess-ref@0-pretrained", "benchmarks-ref"}, out
    states = wait_for_jobs(env, run_dir, timeout=2400)
    assert {i["JobState"] for i in states.values()} == {"COMPLETED"}, logs_text(run_dir)
    assert "recorded the experiment 'lr2e-5'" in (run_dir / "logs" / "gather.log").read_text()
    rows = list(csv.DictReader(io.StringIO(dvc(cluster, env, "exp", "show", "--csv"))))
    base = next(r for r in rows if r["rev"] == "workspace")      # (workspace and commit rows have no name)
    variation = next(r for r in rows if r["Experiment"] == "lr2e-5")
    lr = next(k for k in ("train.lr", "params.yaml:train.lr") if k in base)   # qualified when a metric has the name
    assert variation[lr] == "2e-05" and base[lr] == "1e-05", rows
    ppl = next(k for k in base if k.endswith("arm-baseline.json:ppl") and base[k])    # the report's metric rows
    assert variation[ppl] and variation[ppl] != base[ppl], (ppl, variation)
    assert yaml.safe_load((cluster / "params.yaml").read_text())["train"]["lr"] == 1e-5   # untouched


def test_collaborator_pulls_every_result_from_the_remote_after_scratch_is_purged(rehearsal_runs, tmp_path):
    cluster, env, store = rehearsal_runs["cluster"], rehearsal_runs["env"], rehearsal_runs["store"]
    gather_log = (rehearsal_runs["run_dir"] / "logs" / "gather.log").read_text()
    assert "pushed every cached output of the run to the DVC remote 'store'" in gather_log, gather_log
    commit_results(cluster)
    produced = {p.relative_to(cluster): p.read_bytes() for p in (cluster / "outputs").rglob("*")
                if p.is_file() and p.name != ".gitignore"}  # the workspace links its outputs from the cache
    assert Path("outputs/train_logs/baseline-s1/metrics.json") in produced
    assert Path("outputs/report/results.json") in produced
    shutil.rmtree(cluster / ".dvc" / "cache")                 # scratch purged: the shared cache, runs, checkpoints
    shutil.rmtree(rehearsal_runs["base"] / "state")
    clone = tmp_path / "collaborator"
    subprocess.run(["git", "clone", "-q", str(cluster), str(clone)], check=True)
    dvc(clone, env, "remote", "add", "-d", "--local", "store", str(store))   # a fresh cache: nothing shared
    dvc(clone, env, "pull")
    assert "up to date" in dvc(clone, env, "status")
    for rel, content in produced.items():
        assert (clone / rel).read_bytes() == content, rel
