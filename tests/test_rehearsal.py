"""The rehearsal profile end to end, offline: the cluster's code paths (hub cache at pinned commits, the
Pile layout, the model's own tokenizer, Pythia's padded vocabulary) from the fixture tests/rehearsal.py
builds, with every socket connection refused."""
from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

import rehearsal
from conftest import run_stage
from rehearsal import rehearsal_fetched, rehearsal_hub, scratch  # noqa: F401 (fixtures)
from pipeline import data as D, hub, params as P, refs
from pipeline.models import load_causal_lm
from pipeline.params import SPLITS


@pytest.mark.slow
def test_rehearsal_stages_run_offline_from_the_fixture(scratch, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise OSError("the network is off in the rehearsal")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    params = P.load(rehearsal.REHEARSAL_PARAMS)
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(rehearsal.REHEARSAL_PARAMS, ws / "params.yaml")
    shutil.copy(tmp_path / "refs.lock.yaml", ws / "refs.lock.yaml")       # what fetch wrote (the scratch fixture)
    lock = refs.read(ws / "refs.lock.yaml")
    for argv in (["data"], ["pretrain"], ["monotonic_init"], ["select_lr"], ["train", "--arm", "baseline", "--seed", "0"],
                 ["assess", "--arm", "baseline", "--frontier", "--seed", "0"], ["assess", "--frontier", "--seed", "0"],
                 ["benchmarks", "--arm", "pretrained", "--seed", "0"]):
        assert run_stage(ws, *argv) == 0, argv
    assert "documents/s on" in capsys.readouterr().out

    data_dir = ws / "outputs" / "data"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    files = hub.data_files(params.data, lock["data"]["commit"])
    assert manifest["source"] == f"{params.data.hf_dataset}@{rehearsal.COMMITS['data']}"
    assert manifest["files"] == {name: digest for name, (_, digest) in files.items()}
    run_record = json.loads((ws / "outputs" / "runs" / "data.json").read_text())
    assert run_record["tokenize_documents_per_s"] > 0 and "documents_per_s" not in json.dumps(manifest)
    docs = {s: D.read_docs(data_dir / "docs" / f"{s}.jsonl") for s in SPLITS}
    assert {d.id.split(":")[0] for d in docs["train"]} == set(params.data.hf_train_files)   # not train/03
    assert {d.id.split(":")[0] for s in SPLITS[1:] for d in docs[s]} == set(params.data.hf_heldout_files)

    # the model's own tokenizer, and the pinned checkpoint as the pretrained arm, rows padded as Pythia's
    checkpoint = hub.model_dir(params.model, lock["model"]["commit"])
    tokenizer = D.load_tokenizer(data_dir / "tokenizer")
    assert tokenizer.get_vocab() == D.load_tokenizer(checkpoint).get_vocab()
    assert manifest["vocab_size"] == len(tokenizer) == rehearsal.TOKENIZER_VOCAB
    pretrained = load_causal_lm(ws / "outputs" / "models" / "pretrained")
    assert pretrained.config.vocab_size == rehearsal.padded_rows(len(tokenizer)) == 1024
    reference = load_causal_lm(checkpoint).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in pretrained.state_dict().items())
    metrics = json.loads((ws / "outputs" / "metrics" / "pretrain.json").read_text())
    assert (metrics["source"], metrics["name"], metrics["ref"], metrics["revision"]) == (
        "hf", params.model.hf_name, "main", rehearsal.COMMITS["model"])
    assert (ws / "outputs" / "models" / "monotonic_init" / "monotonic_state.safetensors").exists()
    assert (ws / "outputs" / "train" / "baseline-s0" / "model" / "model.safetensors").exists()
    assert (ws / "outputs" / "eval" / "baseline-s0" / "metrics.json").exists()
    assert len(list((ws / "outputs" / "attacks" / "baseline-s0").iterdir())) >= 3   # uat, hotflip, controls

    # the frontier: Pythia's intermediate branch at its locked commit, and a recovery checkpoint, both attacked
    for step, entry in lock["frontier"].items():
        assert entry["commit"] == rehearsal.step_commit(int(step.removeprefix("step")))
        hub_step = load_causal_lm(hub.model_dir(params.model, entry["commit"])).state_dict()
        saved = load_causal_lm(ws / "outputs" / "models" / "pretrain_steps" / step).state_dict()
        assert all(torch.equal(v, hub_step[k]) for k, v in saved.items())
        assert not all(torch.equal(v, reference[k]) for k, v in saved.items())
        assert (ws / "outputs" / "frontier" / "s0" / f"pretrained-{step}" / "attacks" / "hotflip.json").exists()
    for step in params.frontier.recovery_steps:
        assert (ws / "outputs" / "recovery" / "baseline-s0" / f"baseline-step{step}" / "attacks" / "uat.json").exists()

    # the harness's own piqa over the fake hub's dataset, read offline from the task cache at its locked commit
    scores = json.loads((ws / "outputs" / "benchmarks" / "pretrained" / "metrics.json").read_text())
    assert len(scores["tasks"]["piqa"]["items"]) == rehearsal.PIQA_ROWS["validation"]
    assert scores["provenance"]["task_datasets"] == {"piqa": rehearsal.COMMITS["piqa"]}
