"""`python -m pipeline fetch [--update]`: the only step that uses the network, run once on a login node.

For every hub ref the params name (pipeline/refs.py: the data files, the model, the frontier's branches
step<N>, each harness task's dataset) it resolves the commit, once: an entry already in refs.lock.yaml for the same
repository and ref is kept unless --update. It stores what the stages read in the HF hub cache at that commit
(pipeline/hub.py), verifies every file (its content against the blob name; online, its size and hash against
the hub's record), writes the commit and each file's size and sha256 to refs.lock.yaml, and refuses a frontier
checkpoint without weights or with the same weights as another (EleutherAI/pythia issue 205: step branches
bit-identical to main). A harness task's dataset goes to benchmarks.hf_cache_dir: its snapshot (hub/) and
the prepared tables (datasets/) of one load with the network off, which is what the stage reads; a dataset
that needs a loading script is refused. With HF_HUB_OFFLINE=1 it downloads and resolves nothing: it checks
the cache against refs.lock.yaml.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import hub, refs
from .params import InputError

MODEL_PATTERNS = ("*.json", "*.txt", "*.safetensors")   # config, tokenizer, weights (no pickled .bin)


@dataclass(frozen=True)
class Need:
    ref: refs.Ref
    repo_id: str
    cache_dir: Path
    files: tuple[str, ...] = ()         # exact repository paths, or
    patterns: tuple[str, ...] = ()      # glob patterns (every matching file at the commit); neither: resolve only
    weights: bool = False               # a checkpoint: its safetensors weights are required
    task: dict | None = None            # a harness task's dataset: {"name": config, "prepared": tables dir}

    def repo(self, commit: str) -> hub.Repo:
        return hub.Repo(self.ref.kind, self.repo_id, commit, self.cache_dir)


def needs(params) -> list[Need]:
    out, m, d = [], params.model, params.data
    for ref in refs.requested(params):
        if ref.section == "data":
            out.append(Need(ref, d.hf_dataset, hub.cache_dir(d.hf_cache_dir, "data.hf_cache_dir"),
                            files=(*d.hf_train_files, *d.hf_heldout_files)))
        elif ref.section in ("model", "frontier"):
            baked = ref.section == "model" and bool(m.hf_local_path)      # in the image: its commit only
            out.append(Need(ref, m.hf_name, hub.cache_dir(m.hf_cache_dir, "model.hf_cache_dir"),
                            patterns=() if baked else MODEL_PATTERNS, weights=not baked))
    return out + task_needs(params.benchmarks, [r for r in refs.requested(params) if r.section == "tasks"])


def task_needs(b, task_refs: list) -> list[Need]:
    """The harness tasks' datasets, as their lm-eval definitions name them (path and config)."""
    if not task_refs:
        return []
    from . import benchmarks

    hub_dir, prepared = benchmarks.task_caches(b)
    configs = {r.key: benchmarks.harness_task_config(r.key) for r in task_refs}
    return [Need(r, configs[r.key]["dataset_path"], hub_dir, patterns=("*",),
                 task={"name": configs[r.key].get("dataset_name"), "prepared": str(prepared)}) for r in task_refs]


class HubRemote:
    """The HF hub through huggingface_hub: the only code here that reaches the network."""

    def resolve(self, kind: str, repo_id: str, ref: str) -> str:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            return HfApi().repo_info(repo_id, repo_type=kind, revision=ref).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise hub.MissingFromCache(f"{kind} {repo_id}@{ref}: not on the hub ({type(exc).__name__})") from None

    def download(self, repo: hub.Repo, files: tuple = (), patterns: tuple = (), force: bool = False) -> None:
        from huggingface_hub import hf_hub_download, snapshot_download

        if force:
            for name in files:
                hf_hub_download(repo.repo_id, name, repo_type=repo.repo_type, revision=repo.revision,
                                cache_dir=repo.cache_dir, force_download=True)
            return
        snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision, cache_dir=repo.cache_dir,
                          allow_patterns=list(files or patterns))

    def check(self, repo: hub.Repo, hashes: dict[str, str]) -> None:
        """Sizes and hashes of the stored files against the hub's record of the commit."""
        from huggingface_hub import HfApi

        infos = {f.path: f for f in HfApi().get_paths_info(repo.repo_id, list(hashes), revision=repo.revision,
                                                          repo_type=repo.repo_type)}
        for name, digest in hashes.items():
            info = infos.get(name)
            expected = (info.lfs.sha256 if info.lfs else info.blob_id) if info else None
            size = (repo.snapshot / name).resolve().stat().st_size
            if info is None or expected != digest or info.size != size:
                raise hub.CorruptInCache(f"{repo}: {name} in the cache ({size} bytes, {digest}) differs from the "
                                         f"hub's record ({info and info.size} bytes, {expected})")


def verified(need: Need, repo: hub.Repo) -> dict[str, str]:
    """Repository path -> content hash of what the cache holds for a need at a commit, every file verified."""
    names = need.files or tuple(hub.snapshot_files(repo))
    if not names:
        raise hub.MissingFromCache(f"{repo}: nothing in the HF hub cache (looked in {repo.snapshot}); {hub.FETCH_HINT}")
    hashes = {name: hub.resolve_file(repo, name)[1] for name in names}
    if need.weights:
        hub.require_weights(repo)
    return hashes


def file_records(repo: hub.Repo, hashes: dict[str, str]) -> dict[str, dict]:
    """Size and sha256 of each stored file (an LFS blob is named by its sha256; a git blob is hashed here)."""
    out = {}
    for name, digest in hashes.items():
        blob = (repo.snapshot / name).resolve()
        sha = digest if hub.blob_kind(digest) == "lfs" else hashlib.sha256(blob.read_bytes()).hexdigest()
        out[name] = {"size": blob.stat().st_size, "sha256": sha}
    return out


def store(need: Need, repo: hub.Repo, remote) -> dict[str, str]:
    """Download what a need names at the commit (again, by force, if what the cache holds is damaged)."""
    remote.download(repo, need.files, need.patterns)
    try:
        hashes = verified(need, repo)
    except hub.CorruptInCache as exc:
        print(f"fetch: {exc}\nfetch: downloading {repo} again", file=sys.stderr)
        remote.download(repo, need.files or tuple(hub.snapshot_files(repo)), force=True)
        hashes = verified(need, repo)
    remote.check(repo, hashes)
    return hashes


def refuse_loading_script(repo: hub.Repo) -> None:
    script = repo.repo_id.split("/")[-1] + ".py"
    if (repo.snapshot / script).exists():
        raise hub.HubCacheError(f"{repo}: the dataset is defined by a loading script ({script}), which `datasets` no "
                                "longer runs and this pipeline never trusts (no trust_remote_code): drop the task "
                                "from benchmarks.tasks, or name a task over a script-free (parquet) dataset")


PREPARE = ("import sys, datasets\n"
           "d = datasets.load_dataset(sys.argv[1], sys.argv[2] or None, cache_dir=sys.argv[3])\n"
           "print(__import__('json').dumps({k: v.num_rows for k, v in d.items()}))\n")


def prepare_task(need: Need, repo: hub.Repo) -> dict[str, int]:
    """Load the snapshot once with the network off, as the stage will: its prepared tables land in the task
    cache (and the load proves the stage can read it offline). Returns rows per split."""
    refuse_loading_script(repo)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PREPARE, str(repo.snapshot), need.task["name"] or "",
                           need.task["prepared"]], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise hub.HubCacheError(f"{repo}: `datasets` cannot load it offline from {repo.snapshot} (config "
                                f"{need.task['name']}):\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fetch_one(need: Need, lock: dict, remote, update: bool) -> dict:
    """refs.lock.yaml's entry for a need: resolved (unless kept), stored, verified and recorded."""
    old = refs.stored(lock, need.ref)
    online = remote is not None
    if old is None and not online:
        refs.entry(lock, need.ref)           # raises, naming fetch
    keep = old is not None and not (update and online)
    commit = old["commit"] if keep else remote.resolve(need.ref.kind, need.repo_id, need.ref.ref)
    if old is not None and commit != old["commit"]:
        print(f"fetch: --update moves {need.ref} from {old['commit']} to {commit}")
    repo = need.repo(commit)
    files = {}
    if need.files or need.patterns:
        hashes = store(need, repo, remote) if online else verified(need, repo)
        files = file_records(repo, hashes)
        if keep and old.get("files") and old["files"] != files:
            raise hub.CorruptInCache(f"{repo}: what the cache holds differs from what refs.lock.yaml recorded at fetch "
                                     f"({sorted(set(old['files']).symmetric_difference(files)) or 'hashes'}); "
                                     f"delete {repo.snapshot} and {refs.FETCH} again")
    entry = {"repo": need.repo_id, "ref": need.ref.ref, "commit": commit, "files": files,
             "resolved": old["resolved"] if keep else datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds")}
    if need.task is not None:
        entry.update(name=need.task["name"], splits=prepare_task(need, repo))
    return entry


def refuse_identical_weights(lock: dict) -> None:
    """Two frontier checkpoints (or one and the model) with the same weights are one point twice, not two."""
    seen = {}
    entries = [("model", lock["model"]), *sorted(lock["frontier"].items())]
    for name, entry in entries:
        weights = tuple(sorted(f["sha256"] for path, f in ((entry or {}).get("files") or {}).items()
                               if path.endswith(".safetensors")))
        if weights and weights in seen:
            raise hub.HubCacheError(f"{name} ({entry['repo']}@{entry['ref']}, commit {entry['commit']}) has the same "
                                    f"weights as {seen[weights]}: two frontier points would be one model (cf. "
                                    "EleutherAI/pythia issue 205: step branches bit-identical to main); drop one from "
                                    "frontier.steps")
        seen[weights] = name


def run(params, update: bool = False, remote=None) -> int:
    """`remote`: the hub (HubRemote, unless HF_HUB_OFFLINE is set) or a stand-in with its methods."""
    from huggingface_hub import constants

    online = remote is not None or not constants.HF_HUB_OFFLINE
    remote = (remote or HubRemote()) if online else None
    try:
        todo = needs(params)
        if not todo:
            print(f"fetch: profile '{params.profile}' reads nothing from the hub (data.source {params.data.source}, "
                  f"model.source {params.model.source}); nothing to fetch")
            return 0
        if not online:
            print("fetch: HF_HUB_OFFLINE is set: checking the cache against refs.lock.yaml only, nothing is downloaded")
        lock = refs.read()
        for need in todo:
            entry = fetch_one(need, lock, remote, update)
            refs.put(lock, need.ref, entry)
            print(f"{need.ref}: commit {entry['commit']}, {len(entry['files'])} files verified in "
                  f"{need.repo(entry['commit']).snapshot if entry['files'] else '(the image)'}")
            for name, f in entry["files"].items():
                print(f"  {name:40s} {f['size']:>14,d} bytes  sha256 {f['sha256']}")
        refuse_identical_weights(lock)
    except InputError as exc:        # a ref not on the hub or not in refs.lock.yaml, a file missing or damaged
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if online:
        refs.write(lock)
        print(f"fetch: {refs.LOCK_FILE} holds {len(todo)} resolved refs: commit it with params.yaml")
    return 0
