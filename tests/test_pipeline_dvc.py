"""The DVC pipeline: structure checks, the committed lock's freshness, and the whole dvc.yaml run
end to end on the smoke profile in a temporary clone (real DVC, real stages)."""
from __future__ import annotations

import ast
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import pipeline_env, smoke_checkout
from pipeline import params as params_mod
from pipeline.arms import ARM_NAMES

REPO = Path(__file__).resolve().parent.parent
DVC = [sys.executable, "-m", "dvc"]


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*DVC, *args], cwd=cwd, env=pipeline_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _module_file(dotted: str) -> Path | None:
    path = REPO.joinpath(*dotted.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_files(path: Path) -> set[Path]:
    """The pipeline modules one file imports anywhere in it (module level or inside functions), resolved
    like Python does, with the __init__.py of every package on the way (importing a.b runs a/__init__)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "pipeline"]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "pipeline"):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            names = [".".join(module)] + [".".join(module + [a.name]) for a in node.names]
        else:
            continue
        for name in names:
            bits = name.split(".")
            found |= {f for i in range(1, len(bits) + 1) if (f := _module_file(".".join(bits[:i])))}
    return found


# In a fresh interpreter: what `python -m pipeline <stage>` loads before the stage runs (the package, __main__
# building its parser, the stage module by name). Third-party modules are imported once, then each stage module
# is loaded in a forked child with no pipeline module cached.
_LOADED_BY_STAGE = """
import importlib, json, os, sys
from pipeline.__main__ import STAGES
modules = sorted({module for module, _, _ in STAGES.values()})
for module in modules:
    importlib.import_module(f"pipeline.stages.{module}")
for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
    del sys.modules[name]
out = {}
for module in modules:
    read, write = os.pipe()
    if os.fork() == 0:
        importlib.import_module("pipeline.__main__").build_parser()
        importlib.import_module(f"pipeline.stages.{module}")
        files = [m.__file__ for name, m in sys.modules.items() if name == "pipeline" or name.startswith("pipeline.")]
        os.write(write, json.dumps(files).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        out[module] = json.loads(fh.read())
    os.wait()
print(json.dumps(out))
"""


@functools.cache
def _loaded_by_stage() -> dict[str, set[Path]]:
    """Stage module -> the pipeline files a run of it has loaded by the time the stage's run() starts."""
    proc = subprocess.run([sys.executable, "-c", _LOADED_BY_STAGE], cwd=REPO, env=pipeline_env(),
                          capture_output=True, text=True, check=True)
    return {module: {Path(f).resolve() for f in files} for module, files in json.loads(proc.stdout).items()}


def stage_code(command: str) -> list[str]:
    """Every pipeline file `python -m pipeline <stage> ...` runs: what it loads before the stage's run() (found by
    loading it, so imports by name count: _LOADED_BY_STAGE) and, closed over, the imports anywhere in those
    files (those inside functions run later, when the stage calls them)."""
    from pipeline.__main__ import STAGES

    todo = list(_loaded_by_stage()[STAGES[command.split()[3]][0]])
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imported_files(path))
    return sorted(p.relative_to(REPO).as_posix() for p in seen)


def test_every_stage_depends_on_exactly_the_code_it_imports():
    """A code change reruns exactly the stages that import it (none are missed, none rerun for nothing).
    After merging, regenerate the lists: python tests/test_pipeline_dvc.py (rewrite_code_deps)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        declared = sorted(d for d in stage.get("deps", []) if d.startswith("pipeline/"))
        assert declared == stage_code(stage["cmd"]), (
            f"dvc.yaml stage {name}: code deps should be exactly\n  - " + "\n  - ".join(stage_code(stage["cmd"])))


def test_a_stage_run_loads_no_tool():
    """The tools' modules (preflight, fetch) load only under their own subcommands: a stage never depends on them."""
    for module, files in _loaded_by_stage().items():
        assert not {REPO / "pipeline/preflight.py", REPO / "pipeline/fetch.py"} & files, module


def rewrite_code_deps(path: Path = REPO / "dvc.yaml") -> None:
    """Set every stage's pipeline/ deps to stage_code (other deps, their order and the comments kept)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes, rt.width = True, 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(path.read_text())
    for stage in doc["stages"].values():
        deps = stage["deps"]
        kept = [d for d in deps if not str(d).startswith("pipeline/")]
        deps.clear()
        deps.extend(kept + stage_code(stage["cmd"]))
    rt.dump(doc, path)


def test_pretrain_declares_the_train_keys_it_inherits():
    import dataclasses

    from pipeline.params import TrainParams
    from pipeline.stages.pretrain import pretrain_overrides

    overridden = set(pretrain_overrides(params_mod.load(REPO / "params.yaml")))
    inherited = {f"train.{f.name}" for f in dataclasses.fields(TrainParams)} - {f"train.{k}" for k in overridden}
    declared = {k for k in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["pretrain"]["params"]
                if isinstance(k, str)}
    assert inherited and inherited <= declared, sorted(inherited - declared)


def test_select_lr_declares_the_train_keys_its_trials_use():
    """A trial is the arm's training with its length, validation, checkpoints and stops set by lr_select: every other
    train key (logging and the epoch check aside) can change its result, so select-lr depends on each."""
    import dataclasses

    from pipeline import arms, lr_select
    from pipeline.params import TrainParams

    p = params_mod.load(REPO / "params.yaml")
    odd = dataclasses.replace(p.train, max_steps_per_run=5, wall_clock_limit_s=9, keep_checkpoints=7,
                              checkpoint_interval=3, eval_interval=11)
    p = dataclasses.replace(p, train=odd)
    base, trial = p.train_for_arm("baseline"), lr_select.trial(p, arms.get("baseline"), 1.0)
    set_by_trial = {f.name for f in dataclasses.fields(TrainParams) if getattr(trial, f.name) != getattr(base, f.name)}
    used = {f"train.{f.name}" for f in dataclasses.fields(TrainParams)
            if f.name not in set_by_trial | {"log_interval", "beyond_one_epoch"}}
    declared = {k for k in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["select-lr"]["params"]
                if isinstance(k, str)}
    assert set_by_trial == {"max_steps", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                            "max_steps_per_run", "wall_clock_limit_s"}
    assert used <= declared and "train.max_steps" not in declared, sorted(used - declared)


def _keys(tree: dict, prefix="") -> set[str]:
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_every_declared_param_exists_and_every_stage_is_a_pipeline_stage():
    from pipeline import refs
    from pipeline.__main__ import STAGES

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    known = _keys(params_mod.load(REPO / "params.yaml").to_dict())
    for name, stage in spec["stages"].items():
        for key in stage.get("params", []):
            if isinstance(key, dict):        # another params file: refs.lock.yaml's sections only
                assert list(key) == [str(refs.LOCK_FILE)] and set(*key.values()) <= set(refs.SECTIONS), (name, key)
                continue
            assert key in known, f"dvc.yaml stage {name} declares unknown param {key}"
        command = stage["cmd"].split()
        assert command[:3] == ["python", "-m", "pipeline"] and command[3] in STAGES, name
        deps = stage.get("deps", [])
        assert f"pipeline/stages/{command[3]}.py" in deps, f"{name} must depend on its own stage module"


def test_a_stage_naming_arms_depends_on_each_ones_model_and_declares_each_ones_output():
    """A stage run for a list of arms reads each arm's model and writes a directory per arm: an arm missing from
    deps lets SLURM start the stage before that arm's training ends, and one missing from outs is written
    undeclared (neither cached nor locked)."""
    from pipeline import arms, paths

    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        command = stage["cmd"].split()
        if "--arm" not in command:
            continue
        start = command.index("--arm") + 1
        named = [a for a in command[start:start + len(arms.ARM_NAMES)] if a in arms.ARM_NAMES]
        for arm in named:
            model = (f"outputs/train/{arm}-s${{item.seed}}/model" if arms.get(arm).trained
                     else str(paths.model_dir(arm)))
            if command[3] != "train":    # training writes the model it names
                assert model in stage["deps"], f"stage {name} runs arm {arm} but does not depend on {model}"
            assert any(f"/{arm}" in str(out) for out in stage.get("outs", [])), f"stage {name} declares no output of arm {arm}"


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
    assert "## Step-matched comparison: main table" in report and "monotonic" in report
    lines = report.split("\n")
    assert lines[2] == "## The answer" and lines[4].startswith("1. **The constraint restricts no function here.**")
    assert "**Robustness at matched clean NLL, against the unconstrained curve.**" in report
    results = json.loads((ws / "outputs/report/results.json").read_text())
    smoke = params_mod.load(ws / "params.yaml")
    steps = [f"pretrained-step{step}" for step in smoke.frontier.steps]
    recovery = {arm: [f"{arm}-step{step}" for step in smoke.frontier.recovery_steps]
                for arm in ("baseline", "monotonic", "flipped")}
    for arm in (*ARM_NAMES, *steps, *(label for labels in recovery.values() for label in labels)):
        assert set(map(str, results["runs"][arm])) == {str(s) for s in smoke.seeds}
    frontier = results["summary"]["frontier"]
    assert steps and recovery["monotonic"]
    assert frontier["curve"] == [*steps, "pretrained", *recovery["baseline"], "baseline"]
    assert [(c["arm_a"], c["metric"]) for c in frontier["matched"]] == [
        (target, f"{attack}.abs_increase") for target in (*recovery["monotonic"], "monotonic")
        for attack in ("uat", "hotflip", "uat_worst", "hotflip_worst")]
    seed = smoke.seeds[0]
    assert (ws / f"outputs/recovery/monotonic-s{seed}/{recovery['monotonic'][0]}/attacks/uat.json").is_file()
    for step in smoke.frontier.steps:     # saved by pretrain as it passed the step, measured per seed
        assert json.loads((ws / f"outputs/models/pretrain_steps/step{step}/pipeline_meta.json").read_text())["arm"] \
            == f"pretrained-step{step}"
        attacks = ws / f"outputs/frontier/s{smoke.seeds[0]}/pretrained-step{step}/attacks"
        assert (attacks / "hotflip.json").is_file() and (attacks / "controls.json").is_file()   # as an arm's
        worst = json.loads((ws / f"outputs/transfer/s{seed}/transfer.json").read_text())["worst_case"]["hotflip"]
        faced = worst[f"pretrained-step{step}"]["methods"]      # its own attacks and every arm's transferred one
        assert set(faced) == {"gradient", "random", "greedy", *(f"transfer_from_{arm}" for arm in ARM_NAMES)}
    for plot in ("training_curves.png", "perplexity_vs_success.png", "nll_increase_distributions.png", "frontier.png"):
        assert (ws / "outputs/report/plots" / plot).stat().st_size > 1000

    again = dvc(ws, "repro")
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert dvc(ws, "status").stdout.strip().endswith("Data and pipelines are up to date.")
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    assert "outputs/report/metrics/hotflip-vs-curve.json" in json.dumps(shown)
    table = dvc(ws, "metrics", "show").stdout.splitlines()     # the report's rows only, no provenance
    assert len(table) == 1 + len(list((ws / "outputs/report/metrics").iterdir())) and "provenance" not in table[0]

    exp_ws = tmp_path / "exp"      # experiments change the workspace: run them in a copy
    shutil.copytree(ws, exp_ws, symlinks=True)
    dvc(exp_ws, "exp", "run", "-S", "aggregate.confidence=0.9")
    experiments = json.loads(dvc(exp_ws, "exp", "show", "--json").stdout)
    runs = [exp["revs"][0]["data"] for base in experiments for exp in (base.get("experiments") or [])]
    assert any(run["params"]["params.yaml"]["data"]["aggregate"]["confidence"] == 0.9
               and '"ppl"' in json.dumps(run["metrics"]) for run in runs), experiments


@pytest.mark.slow
def test_a_second_fresh_clone_reproduces_every_hash_of_the_first(smoke_dvc_repro, tmp_path):
    """Hash-stable outputs: the same code, params and packages on this platform give byte-identical outputs,
    so two clones' dvc.lock files (every dep, param and out hash) are equal, and the first clone's lock
    reports nothing to do in the second."""
    second = smoke_checkout(tmp_path / "second")
    dvc(second, "repro")
    first_lock, second_lock = (ws / "dvc.lock" for ws in (smoke_dvc_repro, second))
    assert second_lock.read_text() == first_lock.read_text()
    records = sorted(p.name for p in (second / "outputs" / "runs").glob("*.json"))
    assert "data.json" in records and "aggregate.json" in records   # timings and hosts live here instead
    assert "outputs/runs" not in json.dumps(yaml.safe_load(second_lock.read_text()))



if __name__ == "__main__":
    rewrite_code_deps()


def test_aggregate_depends_on_what_it_reads_and_on_no_model():
    """A job workspace checks out its stage's deps: aggregate's are metrics, logs and attack outputs (kilobytes),
    never a model directory (the trained arms' models are outputs/train/, their logs outputs/train_logs/)."""
    from pipeline import arms, paths

    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["aggregate"]["deps"]
    outputs = [d for d in deps if d.startswith("outputs/")]
    models = {str(paths.MODELS_DIR), str(paths.train_dir("baseline", 0).parent)}
    assert outputs and not set(outputs) & models, outputs
    assert str(paths.train_log_dir("baseline", 0).parent) in outputs
    assert all(not str(paths.model_dir(a, 0)).startswith(tuple(outputs)) for a in arms.ARM_NAMES)
