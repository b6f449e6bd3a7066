"""Checkpoint files: atomic layout, checksums, corrupted/incomplete detection, pruning, exact round trips."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import checkpoints as ckpt

FP = "run-fingerprint"


def write(root, step, model, keep=3):
    staging = ckpt.begin(root, step)
    ckpt.write_model(staging / "model.safetensors", model)
    ckpt.write_json(staging / "trainer.json", {"step": step})
    ckpt.write_rng(staging, rank=0)
    return ckpt.finalize(root, step, FP, keep)


def test_finalize_writes_manifest_last_and_prunes_to_keep(tmp_path):
    model = nn.Linear(4, 3)
    for step in (1, 2, 3, 4):
        write(tmp_path, step, model, keep=2)
    assert ckpt.list_steps(tmp_path) == [3, 4]
    assert not list(tmp_path.glob(".*tmp"))
    manifest = ckpt.verify(tmp_path / "step-0000004", FP)
    assert set(manifest["files"]) == {"model.safetensors", "trainer.json", "rng-rank0.json", "rng-rank0.safetensors"}


def test_truncated_latest_falls_back_to_previous_with_warning(tmp_path, capsys):
    model = nn.Linear(4, 3)
    write(tmp_path, 1, model)
    write(tmp_path, 2, model)
    weights = tmp_path / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    assert ckpt.latest_valid(tmp_path, FP) == tmp_path / "step-0000001"
    assert "step-0000002 is unusable" in capsys.readouterr().err
    assert (tmp_path / "step-0000002.corrupt").exists() and ckpt.list_steps(tmp_path) == [1]


def test_unfinished_write_and_foreign_run_are_not_used(tmp_path):
    model = nn.Linear(4, 3)
    write(tmp_path, 1, model)
    staging = ckpt.begin(tmp_path, 2)          # killed before finalize: never a candidate
    ckpt.write_model(staging / "model.safetensors", model)
    (tmp_path / "step-0000003").mkdir()        # renamed dir without manifest
    assert ckpt.latest_valid(tmp_path, FP) == tmp_path / "step-0000001"
    with pytest.raises(ckpt.CheckpointError, match="refusing to restart from scratch"):
        ckpt.latest_valid(tmp_path, "another-run")


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    model = nn.Linear(4, 3)
    write(tmp_path, 1, model)
    (tmp_path / "step-0000001" / "trainer.json").write_text('{"step": 999}')
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint"):
        ckpt.latest_valid(tmp_path, FP)
    assert ckpt.latest_valid(tmp_path / "empty", FP) is None


def test_model_optimizer_and_rng_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "weight_decay": 0.1, "name": "a"},
                             {"params": model[1].parameters(), "weight_decay": 0.0, "name": "b"}], lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    staging = ckpt.begin(tmp_path, 3)
    ckpt.write_model(staging / "model.safetensors", model)
    ckpt.write_optimizer(staging, opt.state_dict())
    ckpt.write_rng(staging, rank=0)
    path = ckpt.finalize(tmp_path, 3, FP, keep=1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    clone = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    ckpt.load_model_state(path, clone)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))
    opt2 = torch.optim.AdamW([{"params": clone[0].parameters(), "weight_decay": 0.1, "name": "a"},
                              {"params": clone[1].parameters(), "weight_decay": 0.0, "name": "b"}], lr=1e-2)
    opt2.load_state_dict(ckpt.read_optimizer(path))
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert ckpt.read_rng(path, rank=0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert not ckpt.read_rng(path, rank=1)
