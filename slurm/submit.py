#!/usr/bin/env python3
"""Submit the DVC pipeline to SLURM: one job per stage (slurm/stage.sbatch), `afterok` dependencies read
from dvc.yaml's DAG, so independent stages (the arms, the seeds) run in parallel, then one `gather` job
that records every finished stage in the main workspace's dvc.lock.

  python slurm/submit.py submit [--seed S]... [--stage NAME]... [--mode container|host] [--dry-run]
  python slurm/submit.py submit -S train.lr=3e-4 [--name lr3e-4]   a variation, recorded as a DVC experiment
  python slurm/submit.py status [RUN_DIR]       state of every job of a run (default: the latest run)
  python slurm/submit.py dag                    the DAG as JSON (stages, upstream, up to date)
  python slurm/submit.py check-snapshot RUN_DIR the gather job's check that the workspace did not change

Design (docs/cluster.md): each job runs `dvc repro STAGE` in a workspace of its own, a snapshot of the
submitted tree, and all jobs share one DVC cache; no two DVC processes ever share a workspace or its
.dvc/tmp locks, on one node or many. A job restores its upstream stages from the shared run-cache;
`gather` runs `dvc --wait-for-lock repro` in the main workspace, which restores every stage from the
run-cache and writes a complete dvc.lock. Trainer checkpoints live in one directory per workspace
(outputs/checkpoints, linked into every job workspace), so requeued and resubmitted jobs resume.

Standard library only (the login node needs no project environment); the DAG is read with DVC, in this
Python if it has DVC, else inside the container image."""
from __future__ import annotations

import argparse
import configparser
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))       # the standard-library-only modules of this checkout's package
from pipeline.cluster import in_kind, resource_section, slurm_seconds  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.stopping import REQUEUE_EXIT_CODE  # noqa: E402

WRAPPER = HERE / "stage.sbatch"
DEFAULT_RESOURCES = HERE / "resources.ini"
DEFAULT_IMAGE = "container/pipeline.sif"
CHECKPOINTS = "outputs/checkpoints"       # pipeline/paths.py: checkpoint_dir(arm, seed).parent
UNCHECKED = re.compile(r"(^|/)(dvc\.lock|\.gitignore)$")   # DVC rewrites these; they never change a stage
SEED_IN_CMD = re.compile(r"--seed[= ](\d+)\b")
JOB_PREFIX = "pl:"
VARIATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SIGNAL_LEAD_S = 600                       # slurm/stage.sbatch: #SBATCH --signal=B:USR1@600


def fail(message: str) -> None:
    sys.exit(f"submit.py: error: {message}")


def run(cmd: list[str], cwd: str | Path | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"`{shlex.join(cmd)}` exited with {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


# --- the DAG (needs DVC: this Python's, or the container's) -------------------------------------------

def restore_blocker(stage) -> str | None:
    """Why DVC's run-cache cannot hold this stage (mirrors dvc.stage.cache._can_hash), or None."""
    if stage.always_changed:
        return "always_changed"
    if not stage.deps or not stage.outs:
        return "a stage needs deps and outs to be restored from the run-cache"
    for out in stage.outs:
        if out.persist:
            return f"output {out.def_path} is persist: true"
        if out.protocol != "local" or not out.is_in_repo:
            return f"output {out.def_path} is outside the repository"
    return None


def uncached_out(stage) -> str | None:
    """An output with cache: false other than a metric or plot: DVC then saves no run-cache entry for the
    stage (dvc.stage.Stage.run: no_cache_outs), so the gather job has to run it again."""
    return next((out.def_path for out in stage.outs if not out.use_cache and not (out.is_metric or out.is_plot)),
                None)


def read_dag(workspace: Path) -> dict:
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(workspace), Repo(str(workspace)) as repo:   # stage names are relative to the cwd
        graph = repo.index.graph          # edges point from a stage to the stages it depends on
        position = {stage: i for i, stage in enumerate(repo.index.stages)}   # dvc.yaml order among equals
        order = [s for s in nx.lexicographical_topological_sort(graph.reverse(), key=position.get) if s.cmd]
        changed = set(repo.status())
        stages = []
        for stage in order:
            cmd = " ".join(stage.cmd) if isinstance(stage.cmd, list) else stage.cmd
            seed = SEED_IN_CMD.search(cmd)
            stages.append({"name": stage.addressing, "cmd": cmd, "seed": int(seed.group(1)) if seed else None,
                           "upstream": sorted(d.addressing for d in graph.successors(stage) if d.cmd),
                           "up_to_date": stage.addressing not in changed,
                           "restore_blocker": restore_blocker(stage), "uncached_out": uncached_out(stage)})
        outs = sorted({os.path.relpath(out.fs_path, repo.root_dir) for stage in order for out in stage.outs})
        return {"stages": stages, "outs": outs, "cache_dir": repo.cache.local_cache_dir}


def has_dvc() -> bool:
    try:
        import dvc  # noqa: F401
    except ImportError:
        return False
    return True


def load_dag(workspace: Path, mode: str, image: Path) -> dict:
    if not has_dvc():
        if mode != "container":
            fail("host mode needs DVC in this Python: run the submitter with the project's environment")
        apptainer = shutil.which("apptainer") or shutil.which("singularity")
        if apptainer is None:
            fail("no DVC in this Python and no apptainer to read the DAG inside the image")
        return json.loads(run([apptainer, "exec", "--cleanenv", "--bind", str(workspace), "--pwd", str(workspace),
                               str(image), "python", "slurm/submit.py", "dag"]))
    return read_dag(workspace)


def select(stages: list[dict], names: list[str], seeds: list[int], force: bool) -> list[dict]:
    """The requested stages (all by default; --stage takes a stage name or a kind, see in_kind; --seed matches
    the stage's `--seed S`), plus every upstream stage, minus those up to date with all their upstream."""
    by_name = {s["name"]: s for s in stages}
    for name in names:
        if not any(s["name"] == name or in_kind(s["name"], name) for s in stages):
            fail(f"no stage named '{name}' in dvc.yaml (stages: {', '.join(by_name)})")
    wanted = {s["name"] for s in stages
              if (not names or any(s["name"] == n or in_kind(s["name"], n) for n in names))
              and (not seeds or s["seed"] in seeds)}
    if not wanted:
        fail(f"no stage matches --stage {names or 'any'} and --seed {seeds or 'any'}")
    closure, todo = set(), list(wanted)
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(by_name[name]["upstream"])

    stale: dict[str, bool] = {}

    def needs_run(name: str) -> bool:
        if name not in stale:
            stage = by_name[name]
            stale[name] = force or not stage["up_to_date"] or any(needs_run(u) for u in stage["upstream"])
        return stale[name]

    return [s for s in stages if s["name"] in closure and needs_run(s["name"])]


# --- the run directory: a snapshot of the submitted tree that every job copies ------------------------

def snapshot_files(workspace: Path, outs: list[str]) -> list[str]:
    """Tracked and untracked-but-not-ignored files that exist, DVC outputs excepted (jobs restore those
    from the cache): what a job needs to run any stage."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=workspace)
    return sorted({p for p in listed.split("\0") if p and os.path.lexists(workspace / p)
                   and not any(p == out or p.startswith(out + "/") for out in outs)})


def file_digests(workspace: Path, outs: list[str]) -> dict[str, str]:
    digests = {}
    for rel in snapshot_files(workspace, outs):
        if UNCHECKED.search(rel):
            continue
        path = workspace / rel
        data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def copy_changes(workspace: Path, dest: Path, outs: list[str]) -> None:
    """Make the checkout `dest` hold the workspace's uncommitted changes too (DVC outputs excepted)."""
    for rel in run(["git", "ls-files", "-z", "--deleted"], cwd=workspace).split("\0"):
        if rel:
            (dest / rel).unlink(missing_ok=True)
    for rel in snapshot_files(workspace, outs):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if (dest / rel).is_symlink():
            (dest / rel).unlink()
        shutil.copy2(workspace / rel, dest / rel, follow_symlinks=False)


LINK_TYPES = "reflink,symlink"   # outputs restored from the cache never copied: symlinks cross filesystems


def link_outputs(workspace: Path) -> None:
    """Give the workspace DVC's link types (in .dvc/config.local) unless its config sets some: the gather job
    restores every finished stage's outputs into it, the models included (~135 GiB at Pythia-1.4B), and
    DVC's default copies them. Edited as text: the submitter may run without DVC (container mode)."""
    configs = [workspace / ".dvc" / name for name in ("config", "config.local")]
    for config in configs:
        if config.exists() and re.search(r"^\[cache\][^\[]*^\s*type\s*=", config.read_text(), re.M | re.S):
            return
    local = configs[1]
    text = local.read_text() if local.exists() else ""
    if re.search(r"^\[cache\]\s*$", text, re.M):
        text = re.sub(r"^\[cache\]\s*$", f"[cache]\n    type = {LINK_TYPES}", text, count=1, flags=re.M)
    else:
        text += ("" if not text or text.endswith("\n") else "\n") + f"[cache]\n    type = {LINK_TYPES}\n"
    local.write_text(text)
    print(f"note: {local}: cache.type = {LINK_TYPES} (outputs are linked from the DVC cache, not copied)")


def make_snapshot(workspace: Path, run_dir: Path, dag: dict, checkpoint_dir: Path) -> None:
    """run_dir/source: a git clone at the workspace's HEAD (so provenance records the commit) with the
    working tree's uncommitted changes copied over, DVC configured for the shared cache."""
    source = run_dir / "source"
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=workspace, capture_output=True,
                          text=True).stdout.strip()
    if head:
        run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(workspace), str(source)])
        run(["git", "checkout", "--quiet", "--detach", head], cwd=source)
    else:
        run(["git", "init", "--quiet", str(source)])
    copy_changes(workspace, source, dag["outs"])
    (source / ".dvc" / "config.local").write_text(
        f"[cache]\n    dir = {dag['cache_dir']}\n    type = reflink,hardlink,symlink\n")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    link = source / CHECKPOINTS
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        fail(f"{CHECKPOINTS} exists in the submitted tree; it must stay out of git and DVC")
    link.symlink_to(checkpoint_dir, target_is_directory=True)
    write_json(run_dir / "source.json", {
        "outs": dag["outs"], "files": file_digests(workspace, dag["outs"])})


def check_snapshot(run_dir: Path) -> int:
    """Exit 1, naming the files, when the workspace no longer matches the submitted snapshot."""
    meta = json.loads((run_dir / "jobs.json").read_text())
    snapshot = json.loads((run_dir / "source.json").read_text())
    submitted, now = snapshot["files"], file_digests(Path(meta["workspace"]), snapshot["outs"])
    problems = [f"  modified: {p}" for p in sorted(submitted.keys() & now.keys()) if submitted[p] != now[p]]
    problems += [f"  deleted:  {p}" for p in sorted(submitted.keys() - now.keys())]
    problems += [f"  added:    {p}" for p in sorted(now.keys() - submitted.keys())]
    if problems:
        print(f"the workspace {meta['workspace']} changed since submission, so restoring from the run-cache "
              f"would rerun stages:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print(f"workspace {meta['workspace']} matches the submitted snapshot")
    return 0


# --- submission ---------------------------------------------------------------------------------------

def sbatch_options(resources: configparser.ConfigParser, stage_name: str) -> list[str]:
    section = resource_section(resources, stage_name)
    options = {key: value for key, value in section.items() if value != ""}
    lead = int(options.get("signal", f"B:USR1@{SIGNAL_LEAD_S}").rpartition("@")[2])
    if "time" in options and slurm_seconds(options["time"]) <= lead:
        fail(f"{stage_name}: time {options['time']} is not longer than the USR1 lead of {lead} s "
             "(the job would be told to checkpoint as it starts); raise time or set signal = B:USR1@<less>")
    return [f"--{key}={value}" for key, value in options.items()]


def check_one_node(resources: configparser.ConfigParser, path: str, stage_names: list[str], extra: list[str]) -> None:
    """Container mode runs every job on one node: pipeline/launch.py starts a launcher per node with srun, and
    the image has no srun."""
    def several(nodes: str) -> bool:   # sbatch's --nodes: N or MIN-MAX
        return any(int(n) > 1 for n in re.findall(r"\d+", nodes))

    why = "allowed: 1 (or empty) in container mode, whose image has no srun to start a launcher per node; " \
          "several nodes need --mode host"
    for name in stage_names:
        section = resource_section(resources, name)
        if several(section.get("nodes", "")):
            fail(f"{name}: nodes = {section['nodes']} in [{section.name}] of {path}; {why}")
    for option in extra:
        if option.startswith("--nodes=") and several(option.partition("=")[2]):
            fail(f"--sbatch={option}; {why}")


def state_dir_for(workspace: Path) -> Path:
    scratch = Path(os.environ.get("SCRATCH") or Path.home() / "scratch")
    key = hashlib.sha256(str(workspace).encode()).hexdigest()[:8]
    return scratch / "pipeline-runs" / f"{workspace.name}-{key}"


def variation_name(overrides: list[str], name: str | None) -> str:
    name = name or "-".join(re.sub(r"[^A-Za-z0-9._-]+", "-", o) for o in overrides)
    if not VARIATION_NAME.fullmatch(name):
        fail(f"--name {name!r}: letters, digits, '.', '_' and '-' only (it names a git ref and a directory)")
    return name


def make_variation(workspace: Path, state: Path, dag: dict, overrides: list[str], name: str) -> Path:
    """A workspace of its own for one variation (state/variations/NAME): a clone of the workspace at HEAD
    with its uncommitted changes, sharing its DVC cache and config, outputs checked out from the cache, then
    params.yaml changed as `dvc exp run -S` changes it and validated. The main workspace is not touched."""
    from dvc.utils.hydra import apply_overrides

    variation = state / "variations" / name
    if variation.exists():
        fail(f"a variation named '{name}' was submitted before ({variation}); choose another --name "
             "(or remove that directory when its jobs are gone)")
    variation.parent.mkdir(parents=True, exist_ok=True)
    run(["git", "clone", "--quiet", "--shared", str(workspace), str(variation)])
    copy_changes(workspace, variation, dag["outs"])
    local = workspace / ".dvc" / "config.local"
    if local.exists():
        shutil.copy2(local, variation / ".dvc" / "config.local")   # remotes
    run([sys.executable, "-m", "dvc", "cache", "dir", "--local", dag["cache_dir"]], cwd=variation)
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet"], cwd=variation, capture_output=True)   # missing: those rerun
    try:
        apply_overrides(str(variation / "params.yaml"), overrides)
    except Exception as exc:   # dvc's parser: not key=value, a list index out of range, ...
        shutil.rmtree(variation)
        fail(f"-S {' '.join(overrides)}: {exc}")
    checked = ""
    if (variation / "pipeline" / "__main__.py").exists():   # this project: its own params validation
        check = subprocess.run([sys.executable, "-m", "pipeline", "check-params"], cwd=variation,
                               capture_output=True, text=True)
        if check.returncode != 0:
            shutil.rmtree(variation)
            fail(f"-S {' '.join(overrides)}: {check.stderr.strip() or check.stdout.strip()}")
        checked = f" ({check.stdout.strip()})"
    print(f"variation '{name}': {' '.join(overrides)} in {variation}{checked}")
    return variation


def submit(args) -> int:
    workspace = Path(run(["git", "rev-parse", "--show-toplevel"], cwd=args.workspace).strip()).resolve()
    if not (workspace / "dvc.yaml").exists():
        fail(f"{workspace} has no dvc.yaml")
    image = Path(args.image or os.environ.get("PIPELINE_IMAGE") or workspace / DEFAULT_IMAGE).resolve()
    if args.mode == "container" and not image.exists():
        fail(f"container mode needs the image {image} (build it: bash container/build.sh), or use --mode host")
    resources = configparser.ConfigParser(interpolation=None)
    if not resources.read(args.resources):
        fail(f"cannot read the resources file {args.resources}")
    state = Path(args.state_dir).resolve() if args.state_dir else state_dir_for(workspace)
    origin = workspace
    workspace, dag, experiment = prepare_workspace(args, workspace, image, state)
    chosen = select(dag["stages"], args.stage, args.seed, args.force)
    if not chosen:
        print(f"every selected stage is up to date in {workspace} (use --force to run them again)")
        return 0
    check_chosen(args, chosen, resources)
    run_dir = make_run_dir(args, state, workspace, dag)
    env = {"PIPELINE_RUN_DIR": run_dir, "PIPELINE_WORKSPACE": workspace, "PIPELINE_CACHE_DIR": dag["cache_dir"],
           "PIPELINE_CHECKPOINT_DIR": state / "checkpoints",
           "PIPELINE_MODE": args.mode, "PIPELINE_IMAGE": image if args.mode == "container" else "",
           "PIPELINE_REQUEUE_EXIT_CODE": REQUEUE_EXIT_CODE,
           "PIPELINE_DVC_REMOTE": args.remote or "",
           "PIPELINE_EXPERIMENT": experiment}
    if any("," in str(v) for v in env.values()):
        fail(f"paths passed to the jobs must not contain commas (sbatch --export): {env}")
    jobs = Jobs(args, resources, run_dir, env, {"workspace": str(workspace), "run_dir": str(run_dir),
                                                "mode": args.mode, "jobs": []})
    for stage in chosen:
        jobs.submit(stage["name"], [stage["name"]], [jobs.ids[u] for u in stage["upstream"] if u in jobs.ids],
                    stage["seed"])
    names = [s["name"] for s in chosen]
    gather = jobs.submit("gather", ["--gather", *names], list(jobs.ids.values()), None)
    print_submitted(args, dag, jobs.ids, names, gather, workspace, run_dir)
    if experiment:
        print(f"  then records the experiment '{experiment}' in {origin}: dvc exp show")
    if not args.dry_run:
        print(f"status: python slurm/submit.py status {run_dir}")
    elif experiment:
        shutil.rmtree(workspace)   # a dry run leaves no variation behind
    return 0


def prepare_workspace(args, workspace: Path, image: Path, state: Path) -> tuple[Path, dict, str]:
    """The workspace the jobs run in (a variation's copy under `state` with -S), its DAG and the experiment name."""
    dag = load_dag(workspace, args.mode, image)
    if not args.dry_run:
        link_outputs(workspace)      # before a variation copies the workspace's config.local
    experiment = ""
    if args.set:
        if args.mode == "container" and not has_dvc():
            fail("-S needs DVC in this Python (the project's environment) to change and validate params.yaml")
        experiment = variation_name(args.set, args.name)
        workspace = make_variation(workspace, state, dag, args.set, experiment)
        dag = read_dag(workspace)
    elif args.name:
        fail("--name names a variation: use it with -S KEY=VALUE")
    if os.environ.get("SCRATCH") and Path(dag["cache_dir"]).is_relative_to(workspace):
        print(f"note: the DVC cache {dag['cache_dir']} is inside the workspace; to put it on scratch:\n"
              f"  dvc cache dir --local \"$SCRATCH/dvc-cache\"")
    return workspace, dag, experiment


def check_chosen(args, chosen: list[dict], resources) -> None:
    blocked = [f"{s['name']}: {s['restore_blocker']}" for s in chosen if s["restore_blocker"]]
    if blocked:
        fail("these stages cannot be restored from DVC's run-cache, so their results could not reach dvc.lock:\n  "
             + "\n  ".join(blocked))
    if args.mode == "container":
        check_one_node(resources, args.resources, [s["name"] for s in chosen] + ["gather"], args.sbatch)
    for stage in chosen:
        if stage["uncached_out"]:
            print(f"warning: {stage['name']}: output {stage['uncached_out']} has cache: false, so DVC's run-cache "
                  "skips this stage and the gather job runs it again (make the output cached to avoid that)")


def make_run_dir(args, state: Path, workspace: Path, dag: dict) -> Path:
    """A new run directory with the workspace snapshot and copies of the tools the jobs use (dry run: a name)."""
    runs = state / "runs"
    if args.dry_run:
        return runs / "NEW-RUN"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%S-"), dir=runs))
    (run_dir / "logs").mkdir()
    make_snapshot(workspace, run_dir, dag, state / "checkpoints")
    for tool in (WRAPPER, Path(__file__).resolve()):   # the jobs use these copies, whatever happens to slurm/
        shutil.copy2(tool, run_dir / tool.name)
    return run_dir


class Jobs:
    """sbatch of the generic wrapper, one job per stage; job ids recorded in <run_dir>/jobs.json as they come."""

    def __init__(self, args, resources, run_dir: Path, env: dict, meta: dict):
        self.args, self.resources, self.run_dir, self.env, self.meta = args, resources, run_dir, env, meta
        self.ids: dict[str, str] = {}

    def submit(self, name: str, argv: list[str], after: list[str], seed) -> str:
        log = self.run_dir / "logs" / (re.sub(r"[^A-Za-z0-9._@-]", "_", name) + ".log")
        env = {**self.env, "PIPELINE_SEED": "none" if seed is None else seed}
        exports = ",".join(f"{k}={v}" for k, v in env.items())
        cmd = ["sbatch", "--parsable", f"--job-name={JOB_PREFIX}{name}", f"--output={log}", "--open-mode=append",
               f"--chdir={self.run_dir}", f"--export=ALL,{exports}", *sbatch_options(self.resources, name),
               *self.args.sbatch]
        if after:
            cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        cmd += [str(self.run_dir / WRAPPER.name), *argv]
        if self.args.dry_run:
            print(shlex.join(cmd))
            job_id = f"<{name}>"
        else:
            job_id = run(cmd).strip().split(";")[0]
            self.meta["jobs"].append({"stage": name, "job_id": job_id, "log": str(log), "after": after})
            write_json(self.run_dir / "jobs.json", self.meta)
        if name != "gather":
            self.ids[name] = job_id
        return job_id


def print_submitted(args, dag: dict, job_ids: dict, names: list[str], gather: str, workspace: Path,
                    run_dir: Path) -> None:
    width = max(len(n) for n in names)
    print(f"{'(dry run) ' if args.dry_run else ''}submitted {len(names)} stages + gather from {workspace} "
          f"({args.mode} mode); run directory {run_dir}")
    for name in names:
        after = [u for u in dag_upstream(dag, name) if u in job_ids]
        print(f"  {name:<{width}}  {job_ids[name]:>8}" + (f"  after {', '.join(after)}" if after else ""))
    print(f"  {'gather':<{width}}  {gather:>8}  after all, writes dvc.lock in {workspace}")


def dag_upstream(dag: dict, name: str) -> list[str]:
    return next(s["upstream"] for s in dag["stages"] if s["name"] == name)


# --- status -------------------------------------------------------------------------------------------

def job_state(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def last_verdict(log: str) -> str:
    path = Path(log)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return next((l for l in reversed(lines) if l.startswith(("SUCCESS:", "FAILED:", "REQUEUE:"))), "")


def status(args) -> int:
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        workspace = Path(run(["git", "rev-parse", "--show-toplevel"]).strip()).resolve()
        runs = sorted((state_dir_for(workspace) / "runs").glob("*/jobs.json"))
        if not runs:
            fail(f"no submitted run for {workspace}")
        run_dir = runs[-1].parent
    meta = json.loads((run_dir / "jobs.json").read_text())
    by_id = {j["job_id"]: j["stage"] for j in meta["jobs"]}
    states = {j["job_id"]: job_state(j["job_id"]) for j in meta["jobs"]}
    failed = {i for i, s in states.items() if s.get("JobState") in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")}
    width = max(len(j["stage"]) for j in meta["jobs"])
    print(f"run {run_dir} ({meta['mode']} mode, workspace {meta['workspace']})")
    worst = 0
    for job in meta["jobs"]:
        info = states[job["job_id"]]
        state = info.get("JobState", "UNKNOWN (no longer known to slurmctld)")
        detail = last_verdict(job["log"])
        if state == "CANCELLED" and info.get("Reason") == "DependencyNeverSatisfied":
            culprits = [by_id[i] for i in job["after"] if i in failed] or ["an upstream job"]
            detail = f"not run: upstream {', '.join(culprits)} failed"
        elif state == "PENDING":
            detail = f"waiting ({info.get('Reason', '?')})"
        if state not in ("COMPLETED", "PENDING", "RUNNING", "REQUEUED"):
            worst = 1
        print(f"  {job['stage']:<{width}}  {job['job_id']:>8}  {state:<10} {detail}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="slurm/submit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="submit stages as SLURM jobs with afterok dependencies")
    p.add_argument("--stage", action="append", default=[], help="a stage (train@baseline-0) or a stage kind "
                   "(train); repeatable; its upstream stages are submitted too when not up to date")
    p.add_argument("--seed", action="append", default=[], type=int, help="only the stages of this seed (repeatable)")
    p.add_argument("--mode", choices=("container", "host"), default=os.environ.get("PIPELINE_MODE", "container"))
    p.add_argument("--image", help=f"the Apptainer image (default: $PIPELINE_IMAGE or {DEFAULT_IMAGE})")
    p.add_argument("--resources", default=str(DEFAULT_RESOURCES), help="sbatch options per stage kind (INI)")
    p.add_argument("--state-dir", help="runs and checkpoints (default: $SCRATCH/pipeline-runs/<workspace>-<hash>)")
    p.add_argument("--workspace", default=".", help="the DVC workspace (default: the current git repository)")
    p.add_argument("--force", action="store_true", help="submit stages even when up to date")
    p.add_argument("-S", "--set-param", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="a variation (repeatable): params.yaml with KEY=VALUE, as `dvc exp run -S`, in a workspace of "
                   "its own; only the stages it invalidates are submitted, and the gather job records it as a DVC "
                   "experiment of the workspace (`dvc exp show`)")
    p.add_argument("--name", help="the variation's experiment name (default: from the -S values)")
    p.add_argument("--remote", help="the DVC remote the gather job pushes every output to (default: the "
                   "workspace's default remote, `dvc remote add -d`; none: no push)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p.add_argument("--sbatch", action="append", default=[], help="an extra sbatch option for every job "
                   "(e.g. --sbatch=--account=abc); repeatable")
    p = sub.add_parser("status", help="the state of every job of a run")
    p.add_argument("run_dir", nargs="?")
    sub.add_parser("dag", help="print the DAG as JSON")
    p = sub.add_parser("check-snapshot", help="fail if the workspace changed since the run was submitted")
    p.add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.command == "submit":
        return submit(args)
    if args.command == "status":
        return status(args)
    if args.command == "dag":
        print(json.dumps(read_dag(Path.cwd())))
        return 0
    return check_snapshot(Path(args.run_dir))


if __name__ == "__main__":
    sys.exit(main())
