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
def test_a_task_dataset_missing_from_the_lock_or_the_cache_fails_before_compute_naming_fetch(workspace_copy,
                                                                                           capsys):
    """A harness task with no refs.lock.yaml entry, then with an entry whose files are not in benchmarks.hf_cache_dir:
    each stops the stage (exit 2) before any model loads, with what is missing and the fetch command."""
    from pipeline import refs

    params_file = workspace_copy / "params.yaml"
    params_file.write_text(params_file.read_text().replace(
        "tasks: [pipeline_lastword]", "tasks: [pipeline_lastword, piqa]").replace(
        "hf_cache_dir: null           # harness", f"hf_cache_dir: {workspace_copy / 'tasks'}   # harness"))
    assert run_stage(workspace_copy, "benchmarks", "--arm", "pretrained", "--seed", "0") == 2
    assert "refs.lock.yaml has no commit for the dataset of lm-eval task piqa@main" in capsys.readouterr().err
    lock = refs.read(workspace_copy / "refs.lock.yaml")
    lock["tasks"]["piqa"] = {"repo": "baber/piqa", "ref": "main", "commit": PIQA_REVISION, "name": None,
                             "files": {"data/validation-00000-of-00001.parquet": {"size": 1, "sha256": "0" * 64}}}
    refs.write(lock, workspace_copy / "refs.lock.yaml")
    assert run_stage(workspace_copy, "benchmarks", "--arm", "pretrained", "--seed", "0") == 2
    err = capsys.readouterr().err
    assert f"dataset baber/piqa@{PIQA_REVISION}" in err and "python -m pipeline fetch" in err
    assert f"tasks/hub/datasets--baber--piqa/snapshots/{PIQA_REVISION}" in err
    assert not (workspace_copy / "outputs/benchmarks").exists()
