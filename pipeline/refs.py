"""refs.lock.yaml: every hub ref the params name (a branch, tag or commit), resolved to its commit.

Researchers name what they read by ref: the model's revision (`main`, or a commit), Pythia's intermediate
checkpoints by branch (`step1000` for frontier.steps 1000), each lm-eval task's dataset by the task (its
`main`). `python -m pipeline fetch`, the one networked step, resolves each ref once and writes the commit
here, with what it stored (every file's size and sha256, and when); every stage reads commits from this
file only, offline, and fails naming `fetch` where a ref has no entry. fetch never moves an entry whose
repository and ref are unchanged (`fetch --update` does), so a branch that moves on the hub cannot change
a result. The file sits beside params.yaml and is committed with it; dvc.yaml reads its sections as
params (data, model, frontier, tasks), so re-pinning one reruns exactly the stages that read it.

    data:     {repo, ref, commit, resolved, files: {path: {size, sha256}}} | null
    model:    the same | null
    frontier: {step<N>: the same}
    tasks:    {<lm-eval task>: the same}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .hub import FETCH_COMMAND
from .io import atomic_write_text
from .params import LOCAL_TASK, InputError

LOCK_FILE = Path("refs.lock.yaml")
SECTIONS = ("data", "model", "frontier", "tasks")
FETCH = FETCH_COMMAND
HEADER = (f"# Hub refs of params.yaml resolved to commits by `{FETCH}` (the one networked step); stages read\n"
          f"# commits only from here. Commit it with params.yaml; `{FETCH} --update` moves an entry.\n")


class UnresolvedRef(InputError):
    """A ref the params name with no commit in refs.lock.yaml."""


@dataclass(frozen=True)
class Ref:
    section: str            # data | model | frontier | tasks
    key: str | None         # frontier: step<N>; tasks: the task name; else None
    kind: str               # model | dataset
    repo: str | None        # None for a task: its dataset is named by the task's own definition
    ref: str
    reason: str             # the params key that names it

    def __str__(self) -> str:
        what = f"{self.kind} {self.repo}" if self.repo else f"the dataset of lm-eval task {self.key}"
        return f"{what}@{self.ref} ({self.reason})"


def frontier_ref(step: int) -> str:
    """Pythia's name for the intermediate checkpoint after `step` steps: the branch step<N>."""
    return f"step{step}"


def requested(params) -> list[Ref]:
    """Every hub ref the params name, in a fixed order."""
    out = []
    if params.data.source == "hf":
        out.append(Ref("data", None, "dataset", params.data.hf_dataset, params.data.hf_revision, "data.hf_revision"))
    m = params.model
    if m.source == "hf":
        out.append(Ref("model", None, "model", m.hf_name, m.hf_revision, "model.hf_revision"))
        out += [Ref("frontier", frontier_ref(s), "model", m.hf_name, frontier_ref(s), f"frontier.steps {s}")
                for s in params.frontier.steps]
    out += [Ref("tasks", t, "dataset", None, "main", f"benchmarks.tasks {t}")
            for t in params.benchmarks.tasks if t != LOCAL_TASK]
    return out


def read(path: Path = LOCK_FILE) -> dict:
    """The lock's sections (empty where the file or a section is absent)."""
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    raw = raw or {}
    return {s: raw.get(s) or ({} if s in ("frontier", "tasks") else None) for s in SECTIONS}


def write(lock: dict, path: Path = LOCK_FILE) -> None:
    body = yaml.safe_dump({s: lock.get(s) or ({} if s in ("frontier", "tasks") else None) for s in SECTIONS},
                          sort_keys=True, default_flow_style=False)
    atomic_write_text(path, HEADER + body)


def stored(lock: dict, ref: Ref) -> dict | None:
    """The lock's entry for `ref`, or None when it has none for this repository and ref."""
    entry = lock[ref.section] if ref.key is None else lock[ref.section].get(ref.key)
    if not entry or entry.get("ref") != ref.ref or (ref.repo is not None and entry.get("repo") != ref.repo):
        return None
    return entry


def entry(lock: dict, ref: Ref) -> dict:
    found = stored(lock, ref)
    if found is None:
        raise UnresolvedRef(f"{LOCK_FILE} has no commit for {ref}: run `{FETCH}` on a login node with network "
                            f"(it resolves every ref of the params and writes {LOCK_FILE}), then commit {LOCK_FILE}")
    return found


def put(lock: dict, ref: Ref, value: dict) -> None:
    if ref.key is None:
        lock[ref.section] = value
    else:
        lock[ref.section][ref.key] = value


def find(params, section: str, key: str | None = None, lock: dict | None = None) -> dict:
    """The entry of the params' ref in `section` (and `key`), from refs.lock.yaml in the working directory."""
    lock = read() if lock is None else lock
    ref = next((r for r in requested(params) if r.section == section and r.key == key), None)
    if ref is None:
        raise ValueError(f"the params name no hub ref in {section} {key or ''}")
    return entry(lock, ref)


def unresolved(params, lock: dict | None = None) -> list[Ref]:
    lock = read() if lock is None else lock
    return [r for r in requested(params) if stored(lock, r) is None]
