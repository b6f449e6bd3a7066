"""`python -m pipeline fetch`: the only step that uses the network, run once on a login node.

It stores exactly what the params need in the HF hub cache (pipeline/hub.py): the model at its pinned commit
(when model.hf_local_path does not name a baked checkpoint), the frontier's intermediate checkpoints at theirs
(frontier.hf_revisions), the named data files at theirs, and the dataset of
every lm-eval harness task in benchmarks.tasks at its pinned commit (into the default hub cache, where the
benchmarks stage reads it). Every file
is then verified: its content against the blob name, and (online) its size and hash against the hub's own
record of the pinned commit. It prints what is stored and where. With HF_HUB_OFFLINE=1 it downloads
nothing and only verifies what the cache holds.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from . import hub
from .params import frontier_revision_key

MODEL_PATTERNS = ("*.json", "*.txt", "*.safetensors")   # config, tokenizer, weights (no pickled .bin)


@dataclass(frozen=True)
class Need:
    repo: hub.Repo
    files: tuple[str, ...] = ()         # exact repository paths, or
    patterns: tuple[str, ...] = ()      # glob patterns (every matching file at the commit),
    required: tuple[str, ...] = ()      # of which these must be there


def needs(params) -> list[Need]:
    out = []
    m = params.model
    if m.source == "hf" and not m.hf_local_path:
        out.append(Need(hub.model_repo(m), patterns=MODEL_PATTERNS, required=hub.MODEL_REQUIRED))
    if m.source == "hf":           # the frontier's intermediate checkpoints (never baked into the image)
        out += [Need(hub.model_repo(replace(m, hf_revision=params.frontier.hf_revisions[frontier_revision_key(s)])),
                     patterns=MODEL_PATTERNS, required=hub.MODEL_REQUIRED) for s in params.frontier.steps]
    if params.data.source == "hf":
        out.append(Need(hub.dataset_repo(params.data), files=(*params.data.hf_train_files,
                                                                 *params.data.hf_heldout_files)))
    return out + benchmark_needs(params.benchmarks)


def benchmark_needs(b) -> list[Need]:
    """The harness tasks' datasets (the local task needs none), each whole at its pinned commit."""
    from . import benchmarks as B

    tasks = [t for t in b.tasks if t != B.LOCAL_TASK]
    if not tasks:
        return []
    from lm_eval.tasks import TaskManager

    manager, cache = TaskManager(), hub.cache_dir(None, "HF_HUB_CACHE")
    return [Need(hub.Repo("dataset", B.dataset_of(t, manager), b.dataset_revisions[t], cache), patterns=("*",))
            for t in tasks]


def stored(need: Need) -> dict[str, str]:
    """Repository path -> content hash of what the cache holds for a need, every file verified."""
    names = need.files or (*need.required, *(n for n in hub.snapshot_files(need.repo) if n not in need.required))
    if not names:
        raise hub.MissingFromCache(f"{need.repo}: nothing in the HF hub cache (looked in {need.repo.snapshot}); "
                                   f"{hub.FETCH_HINT}")
    return {name: hub.resolve_file(need.repo, name)[1] for name in names}


def download(need: Need, force: tuple[str, ...] = ()) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    r = need.repo
    if force:
        for name in force:
            hf_hub_download(r.repo_id, name, repo_type=r.repo_type, revision=r.revision, cache_dir=r.cache_dir,
                            force_download=True)
    else:
        snapshot_download(r.repo_id, repo_type=r.repo_type, revision=r.revision, cache_dir=r.cache_dir,
                          allow_patterns=list(need.files or need.patterns))


def check_against_hub(need: Need, hashes: dict[str, str]) -> None:
    """Sizes and hashes of the stored files against the hub's record of the pinned commit."""
    from huggingface_hub import HfApi

    r = need.repo
    infos = {f.path: f for f in HfApi().get_paths_info(r.repo_id, list(hashes), revision=r.revision,
                                                      repo_type=r.repo_type)}
    for name, digest in hashes.items():
        info = infos.get(name)
        expected = (info.lfs.sha256 if info.lfs else info.blob_id) if info else None
        size = (r.snapshot / name).resolve().stat().st_size
        if info is None or expected != digest or info.size != size:
            raise hub.CorruptInCache(f"{r}: {name} in the cache ({size} bytes, {digest}) differs from the hub's "
                                     f"record ({info and info.size} bytes, {expected})")


def fetch_one(need: Need, online: bool) -> dict[str, str]:
    if online:
        download(need)
        try:
            hashes = stored(need)
        except hub.CorruptInCache as exc:
            names = need.files or tuple(hub.snapshot_files(need.repo))
            print(f"fetch: {exc}\nfetch: downloading {need.repo} again", file=sys.stderr)
            download(need, force=names)
            hashes = stored(need)
        check_against_hub(need, hashes)
        return hashes
    return stored(need)


def run(params) -> int:
    from huggingface_hub import constants

    online = not constants.HF_HUB_OFFLINE
    try:
        todo = needs(params)
    except hub.HubCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not todo:
        print(f"fetch: profile '{params.profile}' reads nothing from the hub (data.source "
              f"{params.data.source}, model.source {params.model.source}); nothing to fetch")
        return 0
    if not online:
        print("fetch: HF_HUB_OFFLINE is set: checking the cache only, nothing is downloaded")
    for need in todo:
        try:
            hashes = fetch_one(need, online)
        except hub.HubCacheError as exc:
            hint = ("is every named file in the repository at that commit?" if online
                    else "HF_HUB_OFFLINE=1: run with HF_HUB_OFFLINE=0 on a machine with network")
            print(f"error: {exc}\n({hint})", file=sys.stderr)
            return 1
        print(f"{need.repo}: {len(hashes)} files verified in {need.repo.snapshot}")
        for name, digest in hashes.items():
            size = (need.repo.snapshot / name).resolve().stat().st_size
            print(f"  {name:40s} {size:>14,d} bytes  {digest}")
    if params.model.source == "hf" and params.model.hf_local_path:
        print(f"model: model.hf_local_path {params.model.hf_local_path} (baked into the image) is used; not fetched")
    return 0
