"""Stage `benchmarks`: zero-shot tasks through lm-evaluation-harness (pipeline/benchmarks.py) on the saved
models of the given arms of one seed, each loaded once where the device policy puts it. Writes per arm
benchmarks/<arm>-s<seed>/results.json (the harness's results minus what varies between runs: timings,
environment, the paths of its YAML files) and metrics.json (per task: the harness's metrics and per-item
scores for the report's bootstrap), both with provenance; the harness's volatile part goes to the run record.
dvc.yaml runs it once for the untrained arms (their models serve every seed: benchmarks/<arm>/, with the
first seed's harness seeds) and per seed for the trained ones (benchmarks/<arm>-s<seed>/)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .. import benchmarks
from .. import refs
from ..arms import ARMS
from ..data import load_tokenizer
from ..io import staged_dir, write_json
from ..loading import load_arm_model
from ..params import InputError
from ..paths import DATA_DIR, benchmark_dir, run_name
from ..provenance import provenance, record_run

PRECISION = "fp32"   # the harness runs the fp32 model as loaded, without autocast


def prepare_tasks(params, task_dir: Path):
    """(task manager, task specs, {task: dataset commit}): the local task's YAML over the data stage's items;
    each harness task's dataset at refs.lock.yaml's commit, verified in benchmarks.hf_cache_dir before any compute."""
    b = params.benchmarks
    if benchmarks.LOCAL_TASK in b.tasks:
        items = DATA_DIR / "benchmarks" / benchmarks.ITEMS_FILE
        if not items.is_file():
            raise InputError(f"{items} is missing: run the data stage first (dvc repro data)")
        (task_dir / f"{benchmarks.LOCAL_TASK}.yaml").write_text(benchmarks.local_task_yaml(items))
    manager = benchmarks.task_manager(b.tasks, task_dir)
    lock = refs.read()
    entries = {t: refs.find(params, "tasks", t, lock) for t in b.tasks if t != benchmarks.LOCAL_TASK}
    snapshots = {t: benchmarks.task_snapshot(e, b) for t, e in entries.items()}
    prepared = benchmarks.task_caches(b)[1] if entries else None
    return manager, benchmarks.task_specs(b.tasks, snapshots, prepared, manager), {t: e["commit"] for t, e in entries.items()}


def benchmark_arm(params, arm: str, seed: int, manager, specs: list, commits: dict) -> dict:
    b = params.benchmarks
    t0 = time.time()
    model, meta = load_arm_model(params, arm, seed)
    results = benchmarks.run_harness(model, load_tokenizer(DATA_DIR / "tokenizer"), specs, manager,
                            num_fewshot=b.num_fewshot, limit=b.limit, batch_size=b.batch_size,
                            bootstrap_iters=b.bootstrap_iters, seed=seed)
    stable, volatile = benchmarks.stable_results(results)
    prov = provenance(params, "benchmarks", seed=seed, arm=arm, precision=PRECISION,
                      task_versions=stable.get("versions", {}), task_datasets=commits)
    metrics = {"arm": arm, "seed": seed, "tasks": benchmarks.flat_metrics(stable), "model_meta": meta, "provenance": prov}
    label = run_name(arm, seed) if ARMS[arm].trained else arm
    with staged_dir(benchmark_dir(label)) as out:
        write_json(out / "results.json", {**stable, "provenance": prov})
        write_json(out / "metrics.json", metrics)
    record_run(f"benchmarks-{label}", prov, model, seconds=round(time.time() - t0, 1), harness=volatile)
    return metrics


def run(params, args) -> int:
    with tempfile.TemporaryDirectory(prefix="pipeline-tasks-") as task_dir:
        manager, specs, commits = prepare_tasks(params, Path(task_dir))     # InputError: exit 2, nothing computed
        for arm in args.arm:
            metrics = benchmark_arm(params, arm, args.seed, manager, specs, commits)
            rows = ", ".join(f"{task} acc {m.get('acc,none', float('nan')):.3f}" for task, m in metrics["tasks"].items())
            print(f"benchmarks {arm} s{args.seed}: {rows}")
    return 0
