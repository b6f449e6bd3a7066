"""The rehearsal profile's hub, made here (nothing downloads): a fake of the HF hub that `fetch` reads as it reads
the real one (FakeHub: resolve a ref, download a commit's files, the hub's record of their hashes).

    python tests/rehearsal.py DIR      # writes the fake hub's repositories under DIR

The fake hub holds, in the HF hub cache layout (blobs named as the hub names them, snapshots linking to them,
refs/<branch> naming each branch's commit), at made-up commits:
- datasets--ORG--NAME (branch main): the embedded corpus in the Pile-uncopyrighted layout, one JSON object per
  line ({"text", "meta": {"pile_set_name"}}), zstd-compressed: train/00..03.jsonl.zst (the profile names only
  00..02: shard 03 must never be read), val.jsonl.zst and test.jsonl.zst;
- models--ORG--NAME (branch main): a GPT-NeoX of Pythia's architecture (partial rotary, parallel residual,
  untied embeddings) at the profile's toy sizes, randomly initialised, with a byte-level BPE tokenizer trained
  on the train shards, its embedding rows padded to a multiple of 128 as Pythia's are (50277 -> 50304); and on
  each branch step<N> of frontier.steps another initialisation of the same model (Pythia's intermediate
  checkpoints);
- datasets--baber--piqa (branch main): a toy PIQA (goal, sol1, sol2, label) in parquet, from embedded text, for
  the harness's own piqa task.
The `rehearsal_fetched` fixture runs the real `pipeline fetch` against it: refs.lock.yaml and $SCRATCH's caches.
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
LFS_SUFFIXES = (".safetensors", ".zst", ".parquet")
COMMITS = {"data": "f00dfeed" * 5, "model": "a1b2c3d4" * 5, "piqa": "9a9a9a9a" * 5}
PIQA = "baber/piqa"
PIQA_ROWS = {"train": 16, "validation": 24}


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


def step_commit(step: int) -> str:
    return f"{step:08x}" * 5


def piqa_rows(texts: list[str], count: int, seed: int) -> list[dict]:
    """PIQA-shaped rows from running text: the goal, its true next words and another passage's words."""
    import random

    words = [t.split() for t in texts if len(t.split()) >= 40]
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        own, other = words[i % len(words)], words[(i * 7 + 3) % len(words)]
        right, wrong = " ".join(own[12:20]), " ".join(other[24:32])
        label = rng.randrange(2)
        rows.append({"goal": " ".join(own[:12]), "sol1": [right, wrong][label], "sol2": [wrong, right][label],
                     "label": label})
    return rows


def build_piqa(repo: hub.Repo, texts: list[str]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, (split, count) in enumerate(PIQA_ROWS.items()):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(piqa_rows(texts[i::2], count, seed=i)), buffer)
        add_file(repo, f"data/{split}-00000-of-00001.parquet", buffer.getvalue())
    add_file(repo, "README.md", b"# piqa (toy, made by tests/rehearsal.py)\n")


def build(root: Path, params: P.Params | None = None) -> P.Params:
    """Write the rehearsal profile's hub repositories under root (the fake hub's storage)."""
    params = params or P.load(REHEARSAL_PARAMS)
    files = build_dataset(hub.Repo("dataset", params.data.hf_dataset, COMMITS["data"], root))
    train_texts = [d.text for name in params.data.hf_train_files for d in files[name]]
    tokenizer = D.train_bpe_tokenizer(train_texts, TOKENIZER_VOCAB)
    build_model(hub.Repo("model", params.model.hf_name, COMMITS["model"], root), params.model, tokenizer)
    for step in params.frontier.steps:
        build_model(hub.Repo("model", params.model.hf_name, step_commit(step), root), params.model, tokenizer,
                    seed=step, branch=f"step{step}")
    build_piqa(hub.Repo("dataset", PIQA, COMMITS["piqa"], root), [d.text for d in files["test.jsonl.zst"]])
    return params


class FakeHub:
    """What pipeline.fetch asks of the hub (HubRemote's methods), answered from a directory in the hub cache layout:
    a ref resolves through refs/<branch> (a commit with a snapshot resolves to itself), a download links a
    commit's files into the target cache, and the hub's record of a file is its blob's name and size here."""

    def __init__(self, root: Path):
        self.root = root

    def stored(self, repo: hub.Repo) -> hub.Repo:
        return hub.Repo(repo.repo_type, repo.repo_id, repo.revision, self.root)

    def resolve(self, kind: str, repo_id: str, ref: str) -> str:
        folder = hub.Repo(kind, repo_id, ref, self.root).folder
        if (folder / "snapshots" / ref).is_dir():
            return ref
        if not (folder / "refs" / ref).is_file():
            raise hub.MissingFromCache(f"{kind} {repo_id}@{ref}: not on the hub (the fake hub in {self.root})")
        return (folder / "refs" / ref).read_text().strip()

    def download(self, repo: hub.Repo, files: tuple = (), patterns: tuple = (), force: bool = False) -> None:
        import fnmatch
        import shutil

        source = self.stored(repo)
        for name in hub.snapshot_files(source):
            if (files and name not in files) or (patterns and not any(fnmatch.fnmatch(name, p) for p in patterns)):
                continue
            blob = (source.snapshot / name).resolve()
            target = repo.folder / "blobs" / blob.name
            if force or not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(blob, target)
            link = repo.snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(target, link.parent))

    def check(self, repo: hub.Repo, hashes: dict[str, str]) -> None:
        source = self.stored(repo)
        for name, digest in hashes.items():
            blob = (source.snapshot / name).resolve()
            if blob.name != digest or blob.stat().st_size != (repo.snapshot / name).resolve().stat().st_size:
                raise hub.CorruptInCache(f"{repo}: {name} differs from the hub's record")


def fetch(ws: Path, root: Path, params: P.Params | None = None, update: bool = False) -> int:
    """The real `pipeline fetch` of ws/params.yaml against the fake hub at root, run in ws (writes ws/refs.lock.yaml)."""
    from pipeline import fetch as F

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        return F.run(params or P.load(ws / "params.yaml"), update=update, remote=FakeHub(root))
    finally:
        os.chdir(cwd)


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
    def rehearsal_hub(tmp_path_factory) -> Path:
        """The fake hub's storage for profiles/rehearsal.yaml. Read-only."""
        root = tmp_path_factory.mktemp("fake-hub")
        build(root)
        return root

    @pytest.fixture(scope="session")
    def rehearsal_fetched(rehearsal_hub, tmp_path_factory) -> Path:
        """A $SCRATCH that `pipeline fetch` of the rehearsal profile filled from the fake hub, and beside its
        hf/ the refs.lock.yaml it wrote. Read-only: copy before changing it (the `scratch` fixture does)."""
        base = tmp_path_factory.mktemp("fetched")
        ws = base / "ws"
        ws.mkdir()
        (ws / "params.yaml").write_text(REHEARSAL_PARAMS.read_text())
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SCRATCH", str(base / "scratch"))
            assert fetch(ws, rehearsal_hub) == 0
        (base / "scratch" / "refs.lock.yaml").write_bytes((ws / "refs.lock.yaml").read_bytes())
        return base / "scratch"

    @pytest.fixture
    def scratch(rehearsal_fetched, tmp_path, monkeypatch) -> Path:
        """$SCRATCH for the rehearsal profile: a private copy of the fetched caches (and refs.lock.yaml beside hf/);
        the test's working directory holds that refs.lock.yaml.yaml."""
        copy_cache(rehearsal_fetched, tmp_path / "scratch")
        monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
        monkeypatch.chdir(tmp_path)
        (tmp_path / "refs.lock.yaml").write_bytes((rehearsal_fetched / "refs.lock.yaml").read_bytes())
        return tmp_path / "scratch"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
    print(f"the rehearsal's fake hub written under {sys.argv[1]}")
