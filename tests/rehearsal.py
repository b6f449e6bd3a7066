"""The rehearsal profile's hub files, made here (nothing downloads), in the real HF hub cache layout.

    python tests/rehearsal.py CACHE_DIR      # e.g. $SCRATCH/hf/hub, the profile's hf_cache_dir

writes, at the made-up pinned commits of profiles/rehearsal.yaml:
- datasets--ORG--NAME: the embedded corpus in the Pile-uncopyrighted layout, one JSON object per line
  ({"text", "meta": {"pile_set_name"}}), zstd-compressed: train/00..03.jsonl.zst (the profile names only
  00..02: shard 03 must never be read), val.jsonl.zst and test.jsonl.zst;
- models--ORG--NAME: a GPT-NeoX of Pythia's architecture (partial rotary, parallel residual, untied
  embeddings) at the profile's toy sizes, randomly initialised, with a byte-level BPE tokenizer trained on
  the train shards, its embedding rows padded to a multiple of 128 as Pythia's are (50277 -> 50304); and at
  each commit of frontier.hf_revisions, another initialisation of the same model (Pythia's intermediate
  branches step<N>).
Blobs are named as the hub names them (sha256 for LFS files, git blob sha1 for small files); snapshots link
to them; refs/<branch> names each commit.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import data as D, hub, params as P  # noqa: E402

REHEARSAL_PARAMS = REPO / "profiles" / "rehearsal.yaml"
TRAIN_SHARD_DOCS = (125, 125, 125, None)   # None: the rest of the train documents
HELD_OUT_DOCS = {"val.jsonl.zst": 50, "test.jsonl.zst": 50}
TOKENIZER_VOCAB = 1000
PYTHIA_ROW_MULTIPLE = 128
LFS_SUFFIXES = (".safetensors", ".zst")


def padded_rows(n: int) -> int:
    """Pythia's rule: embedding rows rounded up to a multiple of 128."""
    return -(-n // PYTHIA_ROW_MULTIPLE) * PYTHIA_ROW_MULTIPLE


def add_file(repo: hub.Repo, path: str, content: bytes, branch: str = "main") -> Path:
    """Store one file as huggingface_hub does: the blob named by its hash, a relative link in the snapshot."""
    lfs = path.endswith(LFS_SUFFIXES)
    digest = (hashlib.sha256(content) if lfs else hashlib.sha1(b"blob %d\0" % len(content) + content)).hexdigest()
    blob = repo.folder / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = repo.snapshot / path
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo.folder / "refs").mkdir(exist_ok=True)
    (repo.folder / "refs" / branch).write_text(repo.revision)
    return link


def jsonl_zst(docs: list[D.Document]) -> bytes:
    import zstandard

    lines = "".join(json.dumps({"text": d.text, "meta": {"pile_set_name": d.source}}) + "\n" for d in docs)
    return zstandard.ZstdCompressor(level=3).compress(lines.encode())


def corpus_files() -> dict[str, list[D.Document]]:
    """Repository path -> documents: the embedded corpus cut in order into train shards, val and test."""
    docs = D.embedded_documents(min_chars=200)
    held = sum(HELD_OUT_DOCS.values())
    train, rest = docs[:-held], docs[-held:]
    files, start = {}, 0
    for i, n in enumerate(TRAIN_SHARD_DOCS):
        files[f"train/{i:02d}.jsonl.zst"] = train[start: None if n is None else start + n]
        start += n or 0
    for name, n in HELD_OUT_DOCS.items():
        files[name], rest = rest[:n], rest[n:]
    return files


def build_dataset(repo: hub.Repo) -> dict[str, list[D.Document]]:
    files = corpus_files()
    for name, docs in files.items():
        add_file(repo, name, jsonl_zst(docs))
    return files


def build_model(repo: hub.Repo, m: P.ModelParams, tokenizer, seed: int = 0, branch: str = "main") -> None:
    import torch

    from pipeline.models import tiny_gpt_neox

    torch.manual_seed(seed)
    model = tiny_gpt_neox(m, tokenizer, vocab_rows=padded_rows(len(tokenizer)))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                add_file(repo, path.relative_to(tmp).as_posix(), path.read_bytes(), branch)


def build(cache_dir: Path, params: P.Params | None = None) -> P.Params:
    """Write the rehearsal profile's model and dataset repositories into cache_dir."""
    params = params or P.load(REHEARSAL_PARAMS)
    files = build_dataset(hub.Repo("dataset", params.data.hf_dataset, params.data.hf_revision, cache_dir))
    train_texts = [d.text for name in params.data.hf_train_files for d in files[name]]
    tokenizer = D.train_bpe_tokenizer(train_texts, TOKENIZER_VOCAB)
    build_model(hub.Repo("model", params.model.hf_name, params.model.hf_revision, cache_dir), params.model, tokenizer)
    for branch, commit in params.frontier.hf_revisions.items():
        build_model(hub.Repo("model", params.model.hf_name, commit, cache_dir), params.model, tokenizer,
                    seed=int(branch.removeprefix("step")), branch=branch)
    return params


def copy_cache(cache_dir: Path, dest: Path) -> Path:
    """A private copy of a cache (snapshot links are relative, so they point into the copy)."""
    import shutil

    shutil.copytree(cache_dir, dest, symlinks=True)
    return dest


try:
    import pytest
except ImportError:      # the script runs without the test dependencies
    pytest = None
else:
    @pytest.fixture(scope="session")
    def rehearsal_cache(tmp_path_factory) -> Path:
        """profiles/rehearsal.yaml's model and dataset in a hub cache. Read-only: copy before changing it."""
        cache = tmp_path_factory.mktemp("scratch") / "hf" / "hub"
        build(cache)
        return cache

    @pytest.fixture
    def scratch(rehearsal_cache, tmp_path, monkeypatch) -> Path:
        """$SCRATCH for the rehearsal profile, holding a private copy of its hub cache at $SCRATCH/hf/hub."""
        copy_cache(rehearsal_cache, tmp_path / "scratch" / "hf" / "hub")
        monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
        return tmp_path / "scratch"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
    print(f"rehearsal hub files written under {sys.argv[1]}")
