"""Corpus, document-level splits, tokenizer and packed token storage.

Sources: the embedded corpus (CPython's own English text), cut into five splits by a seeded permutation; or
files of a hub dataset in the Pile-uncopyrighted layout (hub.data_files: verified in the HF hub cache at a
pinned commit), where train comes from the named train shards and every held-out split from the held-out
files (the Pile's val/test), see hf_splits.

Layout under a data directory:
  docs/{split}.jsonl            one document per line: {"id", "source", "text"}
  tokenizer/                    a transformers tokenizer (embedded BPE, or the model's own)
  tokens/{split}.bin            flat token ids (uint16 or uint32), each document followed by EOS
  tokens/{split}.offsets.npy    int64 document boundaries into the flat stream (n_docs + 1)
  manifest.json                 split sizes, per-split hashes, dtype, vocabulary, provenance
"""
from __future__ import annotations

import ast
import collections
import hashlib
import inspect
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .params import HELD_OUT, SPLITS, DataParams, split_counts

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
EXCLUDED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "turtledemo"}


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


# --- sources ------------------------------------------------------------------------------------

def _clean(text: str) -> str:
    text = inspect.cleandoc(text).replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def embedded_documents(min_chars: int, limit: int = 0) -> list[Document]:
    """English text that ships with every CPython: pydoc topics (one document each) and the
    standard library's docstrings (one document per module file, tests excluded).
    Docstrings repeated across the library are kept once. The first `limit` documents of at least
    `min_chars` (0: all); the standard library is parsed only as far as that needs."""
    docs = []
    for doc in _embedded_document_stream():
        if len(doc.text) >= min_chars:
            docs.append(doc)
            if len(docs) == limit:
                break
    return docs


def _embedded_document_stream():
    from pydoc_data import topics

    seen = set()
    for name, text in sorted(topics.topics.items()):
        text = _clean(text)
        key = hashlib.sha1(text.encode()).digest()
        if key not in seen:   # some topics share one text (e.g. 'if' and 'else')
            seen.add(key)
            yield Document(f"topic:{name}", "pydoc_topics", text)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_modules(stdlib):
        rel = path.relative_to(stdlib)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue   # a few stdlib files are deliberately invalid (lib2to3 fixtures, encodings)
        parts = []
        for node in _docstring_holders(tree):
            doc = ast.get_docstring(node, clean=False)
            if not doc:
                continue
            doc = _clean(doc)
            key = hashlib.sha1(doc.encode()).digest()
            if len(doc) >= 40 and key not in seen:
                seen.add(key)
                parts.append(doc)
        if parts:
            yield Document(f"stdlib:{rel.as_posix()}", "stdlib_docstrings", "\n\n".join(parts))


_DOCSTRING_HOLDERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENT_FIELDS = {"body", "orelse", "finalbody", "handlers", "cases"}


def _docstring_holders(tree: ast.AST):
    """Modules, classes and functions in ast.walk's breadth-first order, descending only into statement
    lists (no definition lives inside an expression), which skips ~90% of the nodes ast.walk visits."""
    queue = collections.deque([tree])
    while queue:
        node = queue.popleft()
        if isinstance(node, _DOCSTRING_HOLDERS):
            yield node
        for field in node._fields:
            if field in _STATEMENT_FIELDS:
                queue.extend(getattr(node, field))


def _stdlib_modules(stdlib: Path) -> list[Path]:
    """The standard library's .py files, sorted, skipping tests and installed packages (pruned
    while walking: site-packages alone can hold tens of thousands of files)."""
    found = []
    for root, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS]
        found += [Path(root, f) for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(found)


def read_jsonl(path: Path, name: str):
    """(line number, parsed object) of a .jsonl or .jsonl.zst file, streamed: a shard is never held in
    memory. `name` (the repository path) says whether it is compressed; `path` may be a hub blob."""
    import io

    with open(path, "rb") as raw:
        if name.endswith(".zst"):
            import zstandard

            stream = io.TextIOWrapper(zstandard.ZstdDecompressor(max_window_size=2 ** 31).stream_reader(raw),
                                      encoding="utf-8")
        else:
            stream = io.TextIOWrapper(raw, encoding="utf-8")
        for i, line in enumerate(stream):
            if line.strip():
                yield i, json.loads(line)


def file_documents(p: DataParams, name: str, path: Path, seen: set):
    """Documents of one repository file in file order: cleaned, at least min_chars, texts not in `seen`
    (updated). Id "<file>:<line>"; source: the Pile's subset name when the row has one."""
    for i, row in read_jsonl(path, name):
        text = row.get(p.hf_text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{name} line {i + 1}: data.hf_text_field '{p.hf_text_field}' is "
                             f"{'missing' if text is None else 'a ' + type(text).__name__}, not text")
        text = _clean(text)
        key = hashlib.sha1(text.encode()).digest()
        if len(text) >= p.min_chars and key not in seen:
            seen.add(key)
            meta = row.get("meta")
            source = meta.get("pile_set_name") if isinstance(meta, dict) else None
            yield Document(f"{name}:{i}", source or p.hf_dataset, text)


def _take(p: DataParams, files: dict[str, Path], count: int, seen: set, key: str) -> list[Document]:
    """The first `count` documents of the files, in order."""
    docs = []
    for name, path in files.items():
        for doc in file_documents(p, name, path, seen):
            docs.append(doc)
            if len(docs) == count:
                return docs
    raise ValueError(f"{key} ({', '.join(files)}) hold only {len(docs)} usable documents (at least "
                     f"{p.min_chars} characters, not repeated); {count} needed: name more files there or lower "
                     "data.max_documents")


def hf_splits(p: DataParams, paths: dict[str, Path]) -> dict[str, list[Document]]:
    """Train: the first documents of the named train shards, in order. Held-out: an equal share of the
    first documents of each held-out file (the Pile's val/test: text Pythia never trained on), pooled and
    cut into validation, test, attack_opt and attack_eval by a permutation seeded with split_seed.
    Counts: split_counts(max_documents, fractions). A text seen in a train shard is never held out."""
    counts = split_counts(p.max_documents, p.fractions)
    seen: set = set()
    train = _take(p, {f: paths[f] for f in p.hf_train_files}, counts["train"], seen, "data.hf_train_files")
    need, n_files = sum(counts[s] for s in HELD_OUT), len(p.hf_heldout_files)
    pool = []
    for j, name in enumerate(p.hf_heldout_files):
        share = need // n_files + (j < need % n_files)
        pool += _take(p, {name: paths[name]}, share, seen, "data.hf_heldout_files") if share else []
    return {"train": train, **_cut(pool, {s: counts[s] for s in HELD_OUT}, p.split_seed)}


def load_splits(p: DataParams, paths: dict[str, Path] | None = None) -> dict[str, list[Document]]:
    """The five document splits: the embedded corpus cut by fractions, or the hf files (`paths`: repository
    path -> local file, from hub.data_files)."""
    if p.source == "embedded":
        return split_documents(embedded_documents(p.min_chars, p.max_documents), p.fractions, p.split_seed)
    return hf_splits(p, paths)


# --- splitting ----------------------------------------------------------------------------------

def _cut(docs: list[Document], counts: dict[str, int], seed: int) -> dict[str, list[Document]]:
    order = np.random.default_rng(seed).permutation(len(docs))
    out, start = {}, 0
    for split, n in counts.items():
        out[split] = [docs[i] for i in order[start: start + n]]
        start += n
    return out


def split_documents(docs: list[Document], fractions: dict, seed: int) -> dict[str, list[Document]]:
    """Disjoint by document, seeded: a permutation of documents cut by the fractions.
    Every held-out split gets at least one document; train takes the remainder."""
    if len(docs) < len(SPLITS):
        raise ValueError(f"only {len(docs)} documents: too few to make {len(SPLITS)} disjoint splits")
    return _cut(docs, split_counts(len(docs), fractions), seed)


def split_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def write_docs(path: Path, docs: list[Document]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"id": d.id, "source": d.source, "text": d.text}) + "\n")


def read_docs(path: Path) -> list[Document]:
    with open(path) as fh:
        return [Document(**json.loads(line)) for line in fh]


# --- tokenizer ----------------------------------------------------------------------------------

def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the given (train-split) texts, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --- token storage ------------------------------------------------------------------------------

def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


TOKENIZE_CHUNK = 256   # documents per task: the unit of work handed to a tokenizing process


def available_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's allocation), not the machine's count."""
    return len(os.sched_getaffinity(0))


def _encode(tokenizer, dtype, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the texts, each followed by EOS, as one flat array; and the per-text lengths."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    for x, end in zip(ids, ends):
        flat[end - len(x) - 1: end - 1] = x
        flat[end - 1] = tokenizer.eos_token_id
    return flat, lengths


_WORKER: tuple = ()


def _init_worker(tokenizer, dtype) -> None:
    global _WORKER
    _WORKER = (tokenizer, dtype)


def _encode_in_worker(texts: list[str]):
    return _encode(*_WORKER, texts)


def tokenize_split(tokenizer, docs: list[Document], dtype, processes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Flat token ids (each document followed by EOS) and the document offsets into them. Chunks of
    documents are encoded by `processes` forked workers, in order: the result does not depend on it."""
    texts = [d.text for d in docs]
    chunks = [texts[i: i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK)]
    if processes > 1 and len(chunks) > 1:
        import multiprocessing

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # the workers are the parallelism
        with multiprocessing.get_context("fork").Pool(min(processes, len(chunks)), _init_worker,
                                                      (tokenizer, dtype)) as pool:
            parts = pool.map(_encode_in_worker, chunks, chunksize=1)
    else:
        parts = [_encode(tokenizer, dtype, chunk) for chunk in chunks]
    flat = np.concatenate([f for f, _ in parts]) if parts else np.empty(0, dtype=dtype)
    lengths = np.concatenate([n for _, n in parts]) if parts else np.empty(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return flat.astype(dtype, copy=False), offsets


def write_tokens(data_dir: Path, split: str, flat: np.ndarray, offsets: np.ndarray) -> None:
    tokens_dir = data_dir / "tokens"
    tokens_dir.mkdir(parents=True, exist_ok=True)
    flat.tofile(tokens_dir / f"{split}.bin")
    np.save(tokens_dir / f"{split}.offsets.npy", offsets)


class TokenSplit:
    """A read-only memory map of one split's tokens and its document boundaries."""

    def __init__(self, data_dir: str | Path, split: str):
        data_dir = Path(data_dir)
        manifest = json.loads((data_dir / "manifest.json").read_text())
        self.dtype = np.dtype(manifest["token_dtype"])
        self.eos_id = manifest["eos_token_id"]
        self.tokens = np.memmap(data_dir / "tokens" / f"{split}.bin", dtype=self.dtype, mode="r")
        self.offsets = np.load(data_dir / "tokens" / f"{split}.offsets.npy")
        if int(self.offsets[-1]) != len(self.tokens):
            raise ValueError(f"{data_dir}/tokens/{split}: offsets end at {self.offsets[-1]} "
                             f"but the stream holds {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i, without its trailing EOS."""
        return np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1] - 1], dtype=np.int64)


class PackedSequences:
    """The flat training stream cut into non-overlapping windows of seq_len + 1 tokens (inputs and
    shifted targets). The order of windows is a function of (seed, epoch) only, so the batch of any
    global step can be recomputed exactly on resume without replaying earlier steps."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        self.split = TokenSplit(data_dir, split)
        self.seq_len = seq_len
        self.num_sequences = (len(self.split.tokens) - 1) // seq_len
        if self.num_sequences < 1:
            raise ValueError(f"split '{split}' holds {len(self.split.tokens)} tokens: fewer than one "
                             f"sequence of {seq_len + 1}")

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.num_sequences)

    def sequence_ids(self, seed: int, start: int, count: int) -> np.ndarray:
        """Window ids for positions start .. start+count-1 of the seeded stream of epochs."""
        ids = np.empty(count, dtype=np.int64)
        for j, pos in enumerate(range(start, start + count)):
            epoch, idx = divmod(pos, self.num_sequences)
            if j == 0 or idx == 0:
                order = self.order(seed, epoch)
            ids[j] = order[idx]
        return ids

    def batch(self, window_ids: np.ndarray) -> np.ndarray:
        """int64 array [len(window_ids), seq_len + 1]."""
        n = self.seq_len
        return np.stack([np.asarray(self.split.tokens[i * n: i * n + n + 1], dtype=np.int64) for i in window_ids])
