"""Corpus, document-level splits, tokenizer and packed token storage, on real text and real files."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

import rehearsal
from conftest import REPO
from pipeline import data as D, hub, params as P
from pipeline.params import SPLITS

FRACTIONS = {"train": 0.8, "validation": 0.05, "test": 0.05, "attack_opt": 0.05, "attack_eval": 0.05}
TEST_DIRS = {"test", "tests", "idle_test"}


@pytest.fixture(scope="module")
def embedded_docs():
    return D.embedded_documents(min_chars=200)


def data_dir(ws: Path) -> Path:
    return ws / "outputs" / "data"


def split_docs_on_disk(ws: Path) -> dict[str, list[D.Document]]:
    return {s: D.read_docs(data_dir(ws) / "docs" / f"{s}.jsonl") for s in SPLITS}


# --- embedded corpus ------------------------------------------------------------------------------

def test_embedded_corpus_is_substantial_clean_and_deduplicated(embedded_docs):
    assert len(embedded_docs) >= 300
    assert sum(len(d.text) for d in embedded_docs) > 1_000_000
    assert {d.source for d in embedded_docs} == {"pydoc_topics", "stdlib_docstrings"}
    assert all(len(d.text) >= 200 for d in embedded_docs)
    assert len({d.id for d in embedded_docs}) == len(embedded_docs)
    assert len({d.text for d in embedded_docs}) == len(embedded_docs)   # pydoc's 'if'/'else' share a text
    for d in embedded_docs:
        assert d.text == d.text.strip() and "\r" not in d.text and "\n\n\n" not in d.text, d.id
        assert not any(line != line.rstrip() for line in d.text.splitlines()), d.id
    assert D.embedded_documents(min_chars=2000, limit=5) == [d for d in embedded_docs if len(d.text) >= 2000][:5]


def test_docstring_scan_finds_what_ast_walk_finds_in_the_same_order():
    source = '''"""module"""
import x
class A:
    """a"""
    def f(self):
        """f"""
        g = lambda: 1
        def inner():
            """inner"""
try:
    def t(): """t"""
except ValueError:
    def e(): """e"""
else:
    class E: """else"""
finally:
    async def z(): """z"""
if x:
    with x:
        for i in x:
            def loop(): """loop"""
        else:
            def loop_else(): """loop_else"""
match x:
    case 1:
        def m(): """m"""
'''
    trees = [ast.parse(source)] + [ast.parse(Path(m.__file__).read_text()) for m in (ast, dataclasses, json)]
    for tree in trees:
        expected = [n for n in ast.walk(tree) if isinstance(n, D._DOCSTRING_HOLDERS)]
        assert list(D._docstring_holders(tree)) == expected
    assert len(list(D._docstring_holders(trees[0]))) == 11     # module, 2 classes, 8 functions


def test_embedded_corpus_excludes_tests_and_installed_packages(embedded_docs):
    stdlib_paths = [Path(d.id.removeprefix("stdlib:")) for d in embedded_docs if d.source == "stdlib_docstrings"]
    assert len(stdlib_paths) > 100
    for path in stdlib_paths:
        assert not TEST_DIRS.intersection(path.parts[:-1]) and not path.name.startswith("test_"), path
        assert "site-packages" not in path.parts and "dist-packages" not in path.parts, path
    assert Path("json/decoder.py") in stdlib_paths          # an ordinary module is in


# --- splits --------------------------------------------------------------------------------------

def test_splits_disjoint_complete_seeded(embedded_docs):
    splits = D.split_documents(embedded_docs, FRACTIONS, seed=1234)
    assert list(splits) == list(SPLITS)
    ids = [d.id for s in SPLITS for d in splits[s]]
    texts = [d.text for s in SPLITS for d in splits[s]]
    assert len(set(ids)) == len(ids) == len(embedded_docs)        # disjoint by document and complete
    assert len(set(texts)) == len(texts)                           # disjoint by text
    held_out = [s for s in SPLITS if s != "train"]
    for split in held_out:
        assert abs(len(splits[split]) - FRACTIONS[split] * len(embedded_docs)) <= 1, split
    assert len(splits["train"]) == len(embedded_docs) - sum(len(splits[s]) for s in held_out)

    again = D.split_documents(embedded_docs, FRACTIONS, seed=1234)
    assert {s: [d.id for d in again[s]] for s in SPLITS} == {s: [d.id for d in splits[s]] for s in SPLITS}
    other = D.split_documents(embedded_docs, FRACTIONS, seed=1235)
    assert {d.id for d in other["test"]} != {d.id for d in splits["test"]}
    assert {D.split_hash(other[s]) for s in SPLITS}.isdisjoint({D.split_hash(splits[s]) for s in SPLITS})


def test_small_corpus_keeps_every_split_non_empty(embedded_docs):
    splits = D.split_documents(embedded_docs[:7], FRACTIONS, seed=0)
    assert all(len(splits[s]) >= 1 for s in SPLITS)
    assert sum(map(len, splits.values())) == 7
    with pytest.raises(ValueError, match="too few"):
        D.split_documents(embedded_docs[:4], FRACTIONS, seed=0)


def test_stage_outputs_match_manifest(smoke_workspace, smoke_params):
    manifest = json.loads((data_dir(smoke_workspace) / "manifest.json").read_text())
    assert manifest["provenance"]["params_hash"] == smoke_params.hash()
    on_disk = split_docs_on_disk(smoke_workspace)
    ids = [d.id for docs in on_disk.values() for d in docs]
    assert len(set(ids)) == len(ids) == manifest["documents"]
    texts = [d.text for docs in on_disk.values() for d in docs]
    assert len(set(texts)) == len(texts)
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["documents"] == len(on_disk[split]) >= 1, split
        assert entry["sha256"] == D.split_hash(on_disk[split]), split
        assert entry["tokens"] == len(D.TokenSplit(data_dir(smoke_workspace), split).tokens), split
    # the stage's split is exactly the library's split of the same documents
    expected = D.load_splits(smoke_params.data)
    assert {s: D.split_hash(expected[s]) for s in SPLITS} == {s: manifest["splits"][s]["sha256"] for s in SPLITS}


# --- tokenizer -----------------------------------------------------------------------------------

def test_stage_tokenizer_is_trained_on_the_train_split_only(smoke_workspace, smoke_params):
    """BPE training is deterministic: the saved tokenizer equals one trained on docs/train.jsonl
    and differs from one that also saw a held-out split."""
    on_disk = split_docs_on_disk(smoke_workspace)
    saved = D.load_tokenizer(data_dir(smoke_workspace) / "tokenizer")
    vocab_size = smoke_params.tokenizer.vocab_size
    train_texts = [d.text for d in on_disk["train"]]
    assert saved.get_vocab() == D.train_bpe_tokenizer(train_texts, vocab_size).get_vocab()
    for held_out in ("validation", "test", "attack_eval"):
        leaked = D.train_bpe_tokenizer(train_texts + [d.text for d in on_disk[held_out]], vocab_size)
        assert saved.get_vocab() != leaked.get_vocab(), held_out


def test_bpe_learns_only_what_it_was_given():
    word = "zyxwvutsrqponmlk"
    train = ["the quick brown fox jumps over the lazy dog. " * 20] * 5
    tok = D.train_bpe_tokenizer(train, vocab_size=400)
    leaked = D.train_bpe_tokenizer(train + [f"{word} " * 50], vocab_size=400)
    assert len(tok(word, add_special_tokens=False)["input_ids"]) >= 8
    assert len(leaked(word, add_special_tokens=False)["input_ids"]) <= 2


def test_tokenizer_saves_loads_offline_and_round_trips(smoke_workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved_dir = data_dir(smoke_workspace) / "tokenizer"
    manifest = json.loads((data_dir(smoke_workspace) / "manifest.json").read_text())
    tok = D.load_tokenizer(saved_dir)
    assert len(tok) == manifest["vocab_size"]
    assert (tok.eos_token_id, tok.pad_token_id) == (manifest["eos_token_id"], manifest["pad_token_id"])
    assert tok.eos_token == D.EOS_TOKEN and tok.pad_token == D.PAD_TOKEN and tok.eos_token_id != tok.pad_token_id

    tok.save_pretrained(str(tmp_path / "copy"))
    copy = D.load_tokenizer(tmp_path / "copy")
    samples = [d.text for d in split_docs_on_disk(smoke_workspace)["test"]]
    samples.append("Tabs\tand  double  spaces , before . punctuation ; ünïcödé 日本語 🙂\n\n  indented\n")
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert copy(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == text


# --- token storage -------------------------------------------------------------------------------

def test_token_split_offsets_and_documents(smoke_workspace):
    tok = D.load_tokenizer(data_dir(smoke_workspace) / "tokenizer")
    on_disk = split_docs_on_disk(smoke_workspace)
    for split in SPLITS:
        ts = D.TokenSplit(data_dir(smoke_workspace), split)
        assert ts.tokens.dtype == np.uint16 and ts.dtype == np.uint16
        assert len(ts) == len(on_disk[split])
        assert ts.offsets[0] == 0 and ts.offsets[-1] == len(ts.tokens)
        assert np.all(np.diff(ts.offsets) >= 2)                     # at least one token + EOS each
        assert np.all(ts.tokens[ts.offsets[1:] - 1] == ts.eos_id)   # every document ends with EOS
        assert int((ts.tokens == ts.eos_id).sum()) == len(ts)       # and EOS appears nowhere else
        for i in (0, len(ts) - 1):
            doc = ts.document(i)
            assert doc.dtype == np.int64
            assert tok.decode(doc.tolist()) == on_disk[split][i].text


def test_token_dtype_by_vocabulary():
    assert D.token_dtype(512) == np.uint16 and D.token_dtype(65536) == np.uint16
    assert D.token_dtype(65537) == np.uint32 and D.token_dtype(151_936) == np.uint32


def test_wide_vocabulary_round_trips_through_uint32_storage(tmp_path):
    """A 150k vocabulary (Qwen-style) needs uint32; ids above 65535 must come back intact."""
    docs = [np.array([70_000, 5, 151_000], dtype=np.uint32), np.array([65_536, 1, 2, 3, 100_000], dtype=np.uint32)]
    eos = 151_643
    flat = np.concatenate([np.append(d, eos) for d in docs]).astype(D.token_dtype(151_936))
    offsets = np.array([0, 4, 10], dtype=np.int64)
    D.write_tokens(tmp_path, "train", flat, offsets)
    (tmp_path / "manifest.json").write_text(json.dumps({"token_dtype": "uint32", "eos_token_id": eos}))
    ts = D.TokenSplit(tmp_path, "train")
    assert ts.tokens.dtype == np.uint32 and (tmp_path / "tokens" / "train.bin").stat().st_size == 4 * 10
    assert [ts.document(i).tolist() for i in range(len(ts))] == [d.tolist() for d in docs]
    assert D.PackedSequences(tmp_path, "train", seq_len=4).batch(np.array([1]))[0].tolist() == [65_536, 1, 2, 3, 100_000]


def test_token_split_detects_truncated_stream(workspace_copy):
    bin_path = data_dir(workspace_copy) / "tokens" / "validation.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="offsets end at"):
        D.TokenSplit(data_dir(workspace_copy), "validation")


def test_packed_sequences_order_and_batches(smoke_workspace, smoke_params):
    seq_len = smoke_params.data.seq_len
    packed = D.PackedSequences(data_dir(smoke_workspace), "train", seq_len)
    n = packed.num_sequences
    assert n == (len(packed.split.tokens) - 1) // seq_len >= 4

    first = packed.sequence_ids(seed=0, start=0, count=2 * n)
    assert np.array_equal(first, packed.sequence_ids(seed=0, start=0, count=2 * n))       # deterministic
    assert sorted(first[:n]) == list(range(n)) == sorted(first[n:])                         # epochs are permutations
    assert not np.array_equal(first[:n], first[n:])                                         # epoch reshuffles
    assert not np.array_equal(first[:n], packed.sequence_ids(seed=1, start=0, count=n))     # seed matters
    assert np.array_equal(packed.sequence_ids(seed=0, start=n - 3, count=7), first[n - 3: n + 4])  # resumable

    ids = first[:4]
    batch = packed.batch(ids)
    assert batch.shape == (4, seq_len + 1) and batch.dtype == np.int64
    for row, i in zip(batch, ids):
        assert np.array_equal(row, packed.split.tokens[i * seq_len: (i + 1) * seq_len + 1])
    consecutive = packed.batch(np.array([0, 1]))
    assert consecutive[0, -1] == consecutive[1, 0]   # targets of one window are the next window's inputs


# --- hf source: the Pile-uncopyrighted layout in a hub cache, offline -----------------------------

CLUSTER = REPO / "profiles" / "cluster.yaml"


@pytest.fixture(scope="module")
def pile_cache(tmp_path_factory):
    """The cluster profile's dataset repository at its pinned commit, made of embedded documents in the
    Pile layout (train/00..03, val, test), and the cluster params shrunk to read 120 documents from it."""
    cluster = P.load(CLUSTER)
    cache = tmp_path_factory.mktemp("hub")
    repo = hub.Repo("dataset", cluster.data.hf_dataset, cluster.data.hf_revision, cache)   # a commit: itself
    files = rehearsal.build_dataset(repo)
    data = dataclasses.replace(cluster.data, hf_cache_dir=str(cache), max_documents=120)
    return data, files


def read_pile(data) -> dict[str, list[D.Document]]:
    return D.load_splits(data, {name: path for name, (path, _) in hub.data_files(data, data.hf_revision).items()})


def test_held_out_splits_never_come_from_a_train_shard(pile_cache):
    data, files = pile_cache
    splits = read_pile(data)
    counts = D.split_counts(120, data.fractions)
    assert {s: len(splits[s]) for s in SPLITS} == counts == {"train": 108, "validation": 3, "test": 3,
                                                              "attack_opt": 3, "attack_eval": 3}
    # train: the first documents of the named shard, in file order
    assert data.hf_train_files == ["train/00.jsonl.zst"]
    assert [d.id for d in splits["train"]] == [f"train/00.jsonl.zst:{i}" for i in range(108)]
    assert [d.text for d in splits["train"]] == [d.text for d in files["train/00.jsonl.zst"][:108]]
    # held out: only from the Pile's val/test files, an equal share of each, never a train shard's text
    train_texts = {d.text for name, docs in files.items() if name.startswith("train/") for d in docs}
    held = [d for s in SPLITS[1:] for d in splits[s]]
    assert sorted(d.id.split(":")[0] for d in held) == ["test.jsonl.zst"] * 6 + ["val.jsonl.zst"] * 6
    assert not train_texts & {d.text for d in held}
    assert len({d.id for d in held}) == len(held) == 12
    assert {d.source for d in held} == {"stdlib_docstrings"}          # meta.pile_set_name


def test_held_out_split_follows_the_split_seed(pile_cache):
    data, _ = pile_cache
    splits = read_pile(data)
    again = read_pile(data)
    assert {s: D.split_hash(splits[s]) for s in SPLITS} == {s: D.split_hash(again[s]) for s in SPLITS}
    other = read_pile(dataclasses.replace(data, split_seed=data.split_seed + 1))
    held = lambda sp: sorted(d.id for s in SPLITS[1:] for d in sp[s])   # noqa: E731
    assert held(other) == held(splits)                                 # the same pool of held-out documents
    assert [d.id for d in other["test"]] != [d.id for d in splits["test"]]   # cut differently
    assert other["train"] == splits["train"]


def test_too_few_documents_in_the_named_files_is_an_error(pile_cache):
    data, _ = pile_cache
    with pytest.raises(ValueError, match=r"data.hf_train_files \(train/00.jsonl.zst\) hold only 125 usable"):
        read_pile(dataclasses.replace(data, max_documents=1000))
    with pytest.raises(ValueError, match=r"data.hf_heldout_files \(val.jsonl.zst\) hold only 50 usable"):
        read_pile(dataclasses.replace(data, max_documents=130, fractions={
            "train": 0.2, "validation": 0.2, "test": 0.2, "attack_opt": 0.2, "attack_eval": 0.2}))


def test_jsonl_rows_without_text_are_an_error(tmp_path, pile_cache):
    data, _ = pile_cache
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "x" * 300}) + "\n\n" + json.dumps({"body": "y"}) + "\n")
    with pytest.raises(ValueError, match="rows.jsonl line 3: data.hf_text_field 'text' is missing"):
        list(D.file_documents(data, "rows.jsonl", path, set()))
    path.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match="line 1: .* is a int, not text"):
        list(D.file_documents(data, "rows.jsonl", path, set()))


def test_zst_shards_stream_and_plain_jsonl_read_alike(tmp_path, embedded_docs):
    docs = embedded_docs[:40]
    (tmp_path / "a.jsonl.zst").write_bytes(rehearsal.jsonl_zst(docs))
    (tmp_path / "a.jsonl").write_bytes(__import__("zstandard").ZstdDecompressor().decompress(
        (tmp_path / "a.jsonl.zst").read_bytes()))
    rows = list(D.read_jsonl(tmp_path / "a.jsonl.zst", "a.jsonl.zst"))
    assert rows == list(D.read_jsonl(tmp_path / "a.jsonl", "a.jsonl"))
    assert [r["text"] for _, r in rows] == [d.text for d in docs]


# --- tokenization on several processes -----------------------------------------------------------

def test_tokenization_is_identical_on_one_and_two_processes(embedded_docs, monkeypatch):
    docs = embedded_docs[:60]
    tok = D.train_bpe_tokenizer([d.text for d in docs], vocab_size=400)
    monkeypatch.setattr(D, "TOKENIZE_CHUNK", 7)           # several chunks per process
    one = D.tokenize_split(tok, docs, np.uint16, processes=1)
    two = D.tokenize_split(tok, docs, np.uint16, processes=2)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    expected = [tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]
    assert one[0].tolist() == [t for ids in expected for t in ids]
    assert np.array_equal(np.diff(one[1]), [len(ids) for ids in expected])
    empty = D.tokenize_split(tok, [], np.uint16, processes=2)
    assert len(empty[0]) == 0 and empty[1].tolist() == [0]
    assert D.available_cpus() == len(os.sched_getaffinity(0)) >= 1
