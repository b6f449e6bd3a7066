"""Stage `data`: documents -> disjoint splits -> tokenizer -> packed token ids, in outputs/data."""
from __future__ import annotations

import time

import numpy as np

from .. import benchmarks as B
from .. import data as D
from ..params import SPLITS
from ..io import staged_dir, write_json
from ..paths import DATA_DIR
from ..provenance import provenance, record_run


def build(params, out_dir) -> dict:
    p = params.data
    docs = D.load_documents(p)
    splits = D.split_documents(docs, p.fractions, p.split_seed)
    for split, split_docs in splits.items():
        D.write_docs(out_dir / "docs" / f"{split}.jsonl", split_docs)

    if params.tokenizer.source == "train_bpe":
        tokenizer = D.train_bpe_tokenizer([d.text for d in splits["train"]], params.tokenizer.vocab_size)
    else:
        tokenizer = D.load_tokenizer(params.model.hf_local_path)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    # the local benchmark task's items (LAMBADA-style) from the test split, fitting the evaluation context
    items = B.lastword_items([d.text for d in splits["test"]], tokenizer, params.eval.context_length,
                             params.benchmarks.local_items)
    B.write_items(out_dir / "benchmarks" / B.ITEMS_FILE, items)

    dtype = D.token_dtype(len(tokenizer))
    summary = {}
    for split in SPLITS:
        flat, offsets = D.tokenize_split(tokenizer, splits[split], dtype)
        D.write_tokens(out_dir, split, flat, offsets)
        summary[split] = {"documents": len(splits[split]), "characters": sum(len(d.text) for d in splits[split]),
                          "tokens": int(len(flat)), "sha256": D.split_hash(splits[split])}
    manifest = {
        "source": ("embedded" if p.source == "embedded"
                   else f"{p.hf_dataset}:{p.hf_data_files}" if p.hf_data_files else f"{p.hf_dataset}@{p.hf_revision}"),
        "documents": len(docs), "splits": summary, "split_seed": p.split_seed,
        "token_dtype": np.dtype(dtype).name, "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "special_token_ids": sorted(set(tokenizer.all_special_ids)),
        "benchmark_items": {B.LOCAL_TASK: len(items)},
        "provenance": provenance(params, "data"),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def run(params, args) -> int:
    t0 = time.time()
    with staged_dir(DATA_DIR) as out_dir:
        manifest = build(params, out_dir)
    record_run("data", manifest["provenance"], seconds=round(time.time() - t0, 2))
    rows = ", ".join(f"{s} {v['documents']} docs / {v['tokens']} tok" for s, v in manifest["splits"].items())
    print(f"data: {manifest['documents']} documents -> {rows}; vocab {manifest['vocab_size']}")
    return 0
