"""Zero-shot benchmarks through lm-evaluation-harness: the harness's per-item log-likelihoods equal the
pipeline's own scorer on the same items, the stage's outputs are complete and hash-stable, and a harness task
whose dataset is not in the HF cache fails before any compute with the fetch command."""
from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import run_stage
from pipeline import benchmarks as B
from pipeline.data import load_tokenizer, read_docs
from pipeline.params import ParamsError, validate

PIQA_REVISION = "0" * 40     # any well-formed commit: the point is that it is absent from the cache


def test_local_items_are_passages_ending_in_their_target_and_fit_the_context(smoke_workspace, smoke_params):
    items = [json.loads(line) for line in
             (smoke_workspace / "outputs/data/benchmarks" / B.ITEMS_FILE).read_text().splitlines()]
    test_texts = [d.text for d in read_docs(smoke_workspace / "outputs/data/docs/test.jsonl")]
    tokenizer = load_tokenizer(smoke_workspace / "outputs/data/tokenizer")
    assert 0 < len(items) <= smoke_params.benchmarks.local_items
    for item in items:
        assert item["target"].isalpha() and len(item["context"].split()) >= 11
        passage = item["context"] + " " + item["target"]
        assert any(passage in text for text in test_texts)                  # from the test split
        assert len(tokenizer(item["context"] + " " + item["target"])["input_ids"]) <= smoke_params.eval.context_length


@pytest.mark.slow
def test_harness_log_likelihoods_equal_the_pipelines_own_scorer(workspace_copy, smoke_params):
    assert run_stage(workspace_copy, "benchmarks", "--arm", "pretrained", "--seed", "0") == 0
    out = workspace_copy / "outputs/benchmarks/pretrained"
    metrics = json.loads((out / "metrics.json").read_text())
    task = metrics["tasks"][B.LOCAL_TASK]
    items = [json.loads(line) for line in
             (workspace_copy / "outputs/data/benchmarks" / B.ITEMS_FILE).read_text().splitlines()]
    assert len(task["items"]) == len(items) and 0 <= task["acc,none"] <= 1
    assert metrics["provenance"]["packages"]["lm_eval"] and metrics["provenance"]["task_versions"]
    assert metrics["provenance"]["precision"] == "fp32"          # the harness runs the fp32 model, no autocast

    from pipeline.models import load_causal_lm

    model = load_causal_lm(workspace_copy / "outputs/models/pretrained").eval()
    tokenizer = load_tokenizer(workspace_copy / "outputs/data/tokenizer")
    for row in task["items"]:
        item = items[row["doc_id"]]
        logprob, greedy = B.continuation_logprob(model, tokenizer, item["context"], " " + item["target"])
        assert row["loglikelihood"] == pytest.approx(logprob, abs=1e-4)
        assert row["acc"] == float(greedy)
    assert task["acc,none"] == pytest.approx(sum(r["acc"] for r in task["items"]) / len(items))

    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_stage(workspace_copy, "benchmarks", "--arm", "pretrained", "--seed", "0") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first          # hash-stable outputs
    record = json.loads((workspace_copy / "outputs/runs/benchmarks-pretrained.json").read_text())
    assert "date" in record["harness"] and "seconds" in record


@pytest.mark.slow
def test_missing_task_dataset_fails_before_compute_with_the_fetch_command(workspace_copy, monkeypatch, capsys):
    params_file = workspace_copy / "params.yaml"
    params_file.write_text(params_file.read_text().replace(
        "tasks: [pipeline_lastword]", "tasks: [pipeline_lastword, piqa]").replace(
        "dataset_revisions: {}", f"dataset_revisions: {{piqa: '{PIQA_REVISION}'}}"))
    monkeypatch.setenv("HF_HUB_CACHE", str(workspace_copy / "empty-hub-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(workspace_copy / "empty-hub-cache"))
    assert run_stage(workspace_copy, "benchmarks", "--arm", "pretrained", "--seed", "0") == 1
    err = capsys.readouterr().err
    assert "piqa" in err and PIQA_REVISION in err and "python -m pipeline fetch" in err
    assert "empty-hub-cache/datasets--baber--piqa/snapshots" in err
    assert not (workspace_copy / "outputs/benchmarks").exists()


def test_every_harness_task_needs_a_pinned_dataset_revision(smoke_params):
    raw = smoke_params.to_dict()
    raw["benchmarks"]["tasks"] = ["pipeline_lastword", "piqa"]
    with pytest.raises(ParamsError, match="benchmarks.dataset_revisions.piqa"):
        validate(raw)
    raw["benchmarks"]["dataset_revisions"] = {"piqa": "main"}
    with pytest.raises(ParamsError, match="40-hex"):
        validate(raw)
    raw["benchmarks"]["dataset_revisions"] = {"piqa": PIQA_REVISION}
    assert validate(raw).benchmarks.tasks == ["pipeline_lastword", "piqa"]
