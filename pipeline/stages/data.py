"""Stage `data`: documents -> disjoint splits -> tokenizer -> packed token ids, in outputs/data.
Every hub file it reads (the model's tokenizer, the hf source's shards) is resolved and verified in the HF
hub cache before any document is read."""
from __future__ import annotations

import time

import numpy as np

from .. import benchmarks
from .. import data
from .. import hub, refs
from ..params import SPLITS
from ..io import staged_dir, write_json
from ..paths import DATA_DIR
from ..provenance import provenance, record_run


def resolve_inputs(params) -> tuple:
    """The model's tokenizer directory (None: trained here) and the hf source's files, verified."""
    lock = refs.read()
    tokenizer_dir = (hub.model_dir(params.model, refs.find(params, "model", lock=lock)["commit"], weights=False)
                     if params.tokenizer.source == "model" else None)
    files = hub.data_files(params.data, refs.find(params, "data", lock=lock)["commit"]) if params.data.source == "hf" else {}
    return tokenizer_dir, files


def build(params, out_dir, inputs: tuple) -> tuple[dict, dict]:
    """Write outputs/data into out_dir from resolve_inputs(params); returns the manifest and what was
    measured (for the run record)."""
    p = params.data
    tokenizer_dir, files = inputs
    splits = data.load_splits(p, {name: path for name, (path, _) in files.items()})
    for split, split_docs in splits.items():
        data.write_docs(out_dir / "docs" / f"{split}.jsonl", split_docs)

    if tokenizer_dir is None:
        tokenizer = data.train_bpe_tokenizer([d.text for d in splits["train"]], params.tokenizer.vocab_size)
    else:
        tokenizer = data.load_tokenizer(tokenizer_dir)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    # the local benchmark task's items (LAMBADA-style) from the test split, fitting the evaluation context
    items = benchmarks.lastword_items([d.text for d in splits["test"]], tokenizer, params.eval.context_length,
                             params.benchmarks.local_items)
    benchmarks.write_items(out_dir / "benchmarks" / benchmarks.ITEMS_FILE, items)

    dtype = data.token_dtype(len(tokenizer))
    processes, t0 = data.available_cpus(), time.time()
    summary = {}
    for split in SPLITS:
        flat, offsets = data.tokenize_split(tokenizer, splits[split], dtype, processes)
        data.write_tokens(out_dir, split, flat, offsets)
        summary[split] = {"documents": len(splits[split]), "characters": sum(len(d.text) for d in splits[split]),
                          "tokens": int(len(flat)), "sha256": data.split_hash(splits[split])}
    seconds = time.time() - t0
    documents = sum(len(v) for v in splits.values())
    manifest = {
        "source": "embedded" if p.source == "embedded" else f"{p.hf_dataset}@{refs.find(params, 'data')['commit']}",
        **({"files": {name: digest for name, (_, digest) in files.items()}} if files else {}),
        "documents": documents, "splits": summary, "split_seed": p.split_seed,
        "token_dtype": np.dtype(dtype).name, "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "special_token_ids": sorted(set(tokenizer.all_special_ids)),
        "benchmark_items": {benchmarks.LOCAL_TASK: len(items)},
        "provenance": provenance(params, "data"),
    }
    write_json(out_dir / "manifest.json", manifest)
    measured = {"tokenize_processes": processes, "tokenize_seconds": round(seconds, 2),
                "tokenize_documents_per_s": round(documents / max(seconds, 1e-9), 1)}
    return manifest, measured


def run(params, args) -> int:
    t0 = time.time()
    inputs = resolve_inputs(params)
    with staged_dir(DATA_DIR) as out_dir:
        manifest, measured = build(params, out_dir, inputs)
    record_run("data", manifest["provenance"], seconds=round(time.time() - t0, 2), **measured)
    rows = ", ".join(f"{s} {v['documents']} docs / {v['tokens']} tok" for s, v in manifest["splits"].items())
    print(f"data: {manifest['documents']} documents -> {rows}; vocab {manifest['vocab_size']}; tokenized "
          f"{measured['tokenize_documents_per_s']} documents/s on {measured['tokenize_processes']} processes")
    return 0
