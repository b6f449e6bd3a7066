"""Held-out perplexity: sliding windows score every token once, batching does not change the numbers,
and the evaluate stage writes per-document NLL lined up with the test split."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_stage
from pipeline import data as D
from pipeline.loading import load_arm_model
from pipeline.evaluation import document_nll, sliding_windows
from pipeline.models import tiny_gpt_neox


@pytest.mark.parametrize("length,context,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 3), (50, 8, 8)])
def test_sliding_windows_score_every_target_once(length, context, stride):
    scored = []
    for begin, end, first in sliding_windows(length, context, stride):
        assert end - begin <= context and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, length))


def test_document_nll_matches_full_context_and_ignores_batching(smoke_workspace, smoke_params):
    tokenizer = D.load_tokenizer(smoke_workspace / "outputs" / "data" / "tokenizer")
    torch.manual_seed(0)
    model = tiny_gpt_neox(smoke_params.model, tokenizer).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, len(tokenizer), n) for n in (5, 30, 61)]
    eos = tokenizer.eos_token_id
    full_nll, full_count = document_nll(model, docs, eos, context_length=64, stride=64, batch_size=1, progress=False)
    for d, doc in enumerate(docs):   # every document fits in one window: compare with a direct computation
        seq = torch.tensor(np.concatenate([[eos], doc, [eos]]))[None]
        with torch.no_grad():
            expected = F.cross_entropy(model(input_ids=seq).logits[0, :-1], seq[0, 1:], reduction="sum")
        assert full_nll[d] == pytest.approx(expected.item(), rel=1e-5)
        assert full_count[d] == len(doc) + 1
    windowed, count = document_nll(model, docs, eos, context_length=16, stride=8, batch_size=3, progress=False)
    assert np.array_equal(count, full_count)          # no token dropped by the shorter context
    assert np.all(windowed >= 0) and not np.allclose(windowed, full_nll)   # less context, other numbers
    batched, _ = document_nll(model, docs, eos, context_length=16, stride=8, batch_size=64, progress=False)
    assert np.allclose(batched, windowed, rtol=1e-5)


def test_evaluate_stage_writes_metrics_and_per_document_nll(workspace_copy, smoke_params):
    assert run_stage(workspace_copy, "evaluate", "--arm", "monotonic_init", "--seed", "0") == 0
    out = workspace_copy / "outputs" / "eval" / "monotonic_init-s0"
    metrics = json.loads((out / "metrics.json").read_text())
    per_doc = json.loads((out / "per_doc.json").read_text())
    test_docs = D.read_docs(workspace_copy / "outputs" / "data" / "docs" / "test.jsonl")
    split = D.TokenSplit(workspace_copy / "outputs" / "data", "test")
    n = smoke_params.eval.max_documents or len(test_docs)
    assert per_doc["doc_ids"] == [d.id for d in test_docs[:n]]
    assert per_doc["tokens"] == [len(split.document(i)) + 1 for i in range(n)]
    assert metrics["tokens"] == sum(per_doc["tokens"]) and metrics["documents"] == n
    assert metrics["nll_per_token"] == pytest.approx(sum(per_doc["nll"]) / metrics["tokens"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll_per_token"]))
    assert (metrics["arm"], metrics["seed"]) == ("monotonic_init", 0)
    assert (metrics["context_length"], metrics["stride"]) == (smoke_params.eval.context_length,
                                                              smoke_params.eval.stride)
    assert metrics["model_meta"]["variant"] == smoke_params.monotonic.variant
    for payload in (metrics, per_doc):
        assert payload["provenance"]["params_hash"] == smoke_params.hash() and payload["provenance"]["seed"] == 0


def test_missing_arm_model_is_a_clear_error(smoke_workspace, smoke_params, monkeypatch):
    monkeypatch.chdir(smoke_workspace)
    with pytest.raises(FileNotFoundError, match="baseline"):
        load_arm_model(smoke_params, "baseline", 0)
