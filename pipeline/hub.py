"""The HF hub cache, read offline: where a pinned file lives and whether it is intact.

huggingface_hub's layout, for models and datasets alike:
  <cache>/{models|datasets}--ORG--NAME/blobs/<etag>            the content
  <cache>/{models|datasets}--ORG--NAME/refs/<branch>           a commit id (never read here)
  <cache>/{models|datasets}--ORG--NAME/snapshots/<commit>/<path> -> ../../blobs/<etag>
The etag is the sha256 of the content for LFS files (weights, .zst shards) and the git blob sha1
(sha1 of b"blob <size>\\0" + content) for small git files (config.json, tokenizer.json), so every file
is verified offline by hashing its blob and comparing with the blob's name. Files are looked up only under
the snapshot of the commit refs.lock.yaml names (pipeline/refs.py), never through refs/. `python -m pipeline fetch`
(pipeline/fetch.py) is the only code that downloads; everything else reads the cache with the network off.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .params import InputError

FETCH_COMMAND = "python -m pipeline fetch"
FETCH_HINT = f"run `{FETCH_COMMAND}` on a login node with network (it stores the pinned files in the cache)"
READ_CHUNK = 1 << 24


class HubCacheError(InputError):
    """A pinned file that is not in the HF hub cache, or not intact there."""


class MissingFromCache(HubCacheError, FileNotFoundError):
    pass


class CorruptInCache(HubCacheError):
    pass


@dataclass(frozen=True)
class Repo:
    repo_type: str        # "model" | "dataset"
    repo_id: str          # ORG/NAME
    revision: str         # the pinned commit
    cache_dir: Path

    @property
    def folder(self) -> Path:
        return self.cache_dir / f"{self.repo_type}s--{self.repo_id.replace('/', '--')}"

    @property
    def snapshot(self) -> Path:
        return self.folder / "snapshots" / self.revision

    def __str__(self) -> str:
        return f"{self.repo_type} {self.repo_id}@{self.revision}"


def cache_dir(value: str | None, key: str) -> Path:
    """A params hf_cache_dir: null means huggingface_hub's own (HF_HUB_CACHE, else HF_HOME/hub);
    environment variables ($SCRATCH) are expanded here, at use, so the params stay machine-independent."""
    if value is None:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise HubCacheError(f"{key} {value!r} names an environment variable that is not set ({expanded!r})")
    return Path(expanded)


def model_repo(m, commit: str) -> Repo:
    """The params' model (or one of its branches) at a commit from refs.lock.yaml."""
    return Repo("model", m.hf_name, commit, cache_dir(m.hf_cache_dir, "model.hf_cache_dir"))


def dataset_repo(d, commit: str) -> Repo:
    return Repo("dataset", d.hf_dataset, commit, cache_dir(d.hf_cache_dir, "data.hf_cache_dir"))


def content_hash(path: Path, kind: str) -> str:
    """sha256 of the content ("lfs"), or the git blob sha1 ("git")."""
    if kind == "lfs":
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def blob_kind(name: str) -> str | None:
    """How a blob's name was made: 64 hex digits = sha256 (LFS), 40 = git blob sha1; else unknown."""
    if all(c in "0123456789abcdef" for c in name):
        return {64: "lfs", 40: "git"}.get(len(name))
    return None


def verify(link: Path) -> str:
    """Check one snapshot entry against the name of the blob it links to; returns that name (the
    content's hash as the hub states it)."""
    if not link.is_symlink():
        raise CorruptInCache(f"{link} is not a link into the repository's blobs/ (not the HF hub cache layout), "
                             f"so it cannot be verified; remove it and {FETCH_HINT}")
    blob = link.resolve()
    if not blob.is_file():
        raise MissingFromCache(f"{link} links to {blob}, which is missing; {FETCH_HINT}")
    kind = blob_kind(blob.name)
    if kind is None:
        raise CorruptInCache(f"{link} links to {blob}, whose name is not a content hash; {FETCH_HINT}")
    digest = content_hash(blob, kind)
    if digest != blob.name:
        raise CorruptInCache(f"{blob} (behind {link}) hashes to {digest}, not to its name: the file is damaged "
                             f"or was replaced; refused. Delete it and {FETCH_HINT}")
    return blob.name


def resolve_file(repo: Repo, path: str) -> tuple[Path, str]:
    """The verified snapshot entry of one repository file at the pinned commit, and its content hash."""
    link = repo.snapshot / path
    if not link.is_symlink() and not link.exists():
        raise MissingFromCache(f"{repo}: '{path}' is not in the HF hub cache (looked for {link}); {FETCH_HINT}")
    return link, verify(link)


def data_files(d, commit: str) -> dict[str, tuple[Path, str]]:
    """Every file the hf data source reads, verified at the commit: repository path -> (path, hash)."""
    repo = dataset_repo(d, commit)
    return {name: resolve_file(repo, name) for name in (*d.hf_train_files, *d.hf_heldout_files)}


def snapshot_files(repo: Repo) -> list[str]:
    """Repository paths present in the pinned commit's snapshot, sorted."""
    return sorted(p.relative_to(repo.snapshot).as_posix() for p in repo.snapshot.rglob("*")
                  if p.is_symlink() or p.is_file())


def resolve_snapshot(repo: Repo, required: tuple[str, ...], skip_suffixes: tuple[str, ...] = ()) -> Path:
    """The pinned commit's snapshot directory, holding `required`, every file verified except those
    ending in `skip_suffixes` (the data stage reads only a checkpoint's tokenizer, not its weights)."""
    for path in required:
        resolve_file(repo, path)
    for path in snapshot_files(repo):
        if path not in required and not path.endswith(skip_suffixes):
            verify(repo.snapshot / path)
    return repo.snapshot


def snapshot_of(directory: Path) -> tuple[Path, str] | None:
    """(repository folder, commit) when `directory` resolves to a snapshot in the hub cache layout."""
    real = directory.resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent, real.name
    return None


MODEL_REQUIRED = ("config.json",)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def require_weights(repo: Repo) -> None:
    """A checkpoint's snapshot must hold its safetensors weights (config.json alone is no checkpoint)."""
    if not any(name.endswith(".safetensors") for name in snapshot_files(repo)):
        raise MissingFromCache(f"{repo}: no *.safetensors weights in {repo.snapshot} (config.json alone is not a "
                               f"checkpoint); {FETCH_HINT}")


def model_dir(m, commit: str, weights: bool = True) -> Path:
    """The checkpoint directory of `model.source: hf` at `commit` (refs.lock.yaml's): model.hf_local_path when set (an
    image-baked model; when it is a hub snapshot, it must be that commit's), else the commit's snapshot in the
    cache. Snapshot files are verified against their blob names, the weights (required) only when `weights`."""
    skip = () if weights else WEIGHT_SUFFIXES
    if not m.hf_local_path:
        repo = model_repo(m, commit)
        resolve_snapshot(repo, MODEL_REQUIRED, skip)
        if weights:
            require_weights(repo)
        return repo.snapshot
    path = Path(m.hf_local_path)
    if not (path / "config.json").is_file():
        raise MissingFromCache(f"model.hf_local_path {path} holds no checkpoint (no config.json): it exists inside "
                               f"the image that bakes it; elsewhere set model.hf_local_path: null and {FETCH_HINT}")
    found = snapshot_of(path)
    if found is None:
        return path                 # a plain directory, used as it is
    folder, baked = found
    repo = Repo("model", m.hf_name, baked, folder.parent)
    if repo.folder != folder or baked != commit:
        raise HubCacheError(f"model.hf_local_path {path} is {folder.name} at commit {baked}, but refs.lock.yaml pins "
                            f"{m.hf_name}@{m.hf_revision} at {commit} (model.hf_name, model.hf_revision)")
    return resolve_snapshot(repo, MODEL_REQUIRED, skip)
