"""Stage `evaluate`: held-out test perplexity of one arm (sliding window, nothing truncated) and the
per-document NLL that paired statistics across arms use."""
from __future__ import annotations

import time

import numpy as np

from .. import data as D
from ..loading import load_arm_model
from ..device import resolve_precision
from ..evaluation import document_nll, perplexity
from ..io import staged_dir, write_json
from ..paths import DATA_DIR, eval_dir, run_name
from ..provenance import provenance, record_run


def evaluate(params, arm: str, seed: int, model, meta: dict) -> dict:
    """Perplexity of an already loaded arm model; writes eval/<arm>-s<seed>/ and returns its metrics."""
    t0 = time.time()
    e = params.eval
    test = D.TokenSplit(DATA_DIR, "test")
    doc_ids = [d.id for d in D.read_docs(DATA_DIR / "docs" / "test.jsonl")]
    if len(doc_ids) != len(test):
        raise ValueError(f"{DATA_DIR}: docs/test.jsonl lists {len(doc_ids)} documents, tokens hold {len(test)}")
    count = len(test) if e.max_documents == 0 else min(e.max_documents, len(test))
    docs = [test.document(i) for i in range(count)]
    nll, tokens = document_nll(model, docs, test.eos_id, e.context_length, e.stride, e.batch_size,
                               desc=f"evaluate {arm}", precision=e.precision)
    device = next(model.parameters()).device
    prov = provenance(params, "evaluate", seed=seed, arm=arm, precision=resolve_precision(e.precision, device))
    metrics = {"arm": arm, "seed": seed, "perplexity": perplexity(nll, tokens),
               "nll_per_token": float(nll.sum() / tokens.sum()), "tokens": int(tokens.sum()),
               "documents": count, "context_length": e.context_length, "stride": e.stride,
               "model_meta": meta, "provenance": prov}
    per_doc = {"doc_ids": doc_ids[:count], "nll": nll.tolist(), "tokens": tokens.astype(np.int64).tolist(),
               "provenance": prov}
    with staged_dir(eval_dir(arm, seed)) as out:
        write_json(out / "metrics.json", metrics)
        write_json(out / "per_doc.json", per_doc)
    seconds = round(time.time() - t0, 1)
    record_run(f"evaluate-{run_name(arm, seed)}", prov, model, seconds=seconds)
    print(f"evaluate {arm} s{seed}: test perplexity {metrics['perplexity']:.2f} "
          f"({metrics['tokens']} tokens, {count} documents), {seconds} s")
    return metrics


def run(params, args) -> int:
    evaluate(params, args.arm, args.seed, *load_arm_model(params, args.arm, args.seed, scoring=True))
    return 0
