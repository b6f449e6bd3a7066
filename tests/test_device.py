"""The device policy (pipeline/device.py): every stage that evaluates, attacks or benchmarks a model puts it
where the policy says, and evaluation under bf16 autocast ranks attack candidates as fp32 does."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_stage
from pipeline import attacks as A
from pipeline import device
from pipeline.stages.attack import load_setup


POLICY_MISMATCH = "device policy"     # the trainer's error when accelerate's device is not the policy's
SEED = ["--seed", "0"]
MODEL_STAGES = [
    pytest.param(["pretrain"], POLICY_MISMATCH, id="pretrain"),          # from scratch: the trainer places it
    pytest.param(["train", "--arm", "baseline", *SEED], POLICY_MISMATCH, id="train"),
    pytest.param(["evaluate", "--arm", "monotonic_init", *SEED], None, id="evaluate"),
    *[pytest.param([step, "--arm", "pretrained", *SEED], None, id=step)
      for step in ("uat", "hotflip", "controls", "assess", "benchmarks")],
    pytest.param(["assess", "--frontier", *SEED], None, id="assess-frontier"),   # pretraining's checkpoints
    pytest.param(["transfer", *SEED], None, id="transfer"),
    pytest.param(["monotonic_init"], None, id="monotonic_init")]


@pytest.mark.parametrize("argv, error", MODEL_STAGES)
def test_every_model_stage_places_its_model_with_the_device_policy(workspace_copy, monkeypatch, argv, error):
    """Under a policy that answers the meta device (no data: any computation on it fails), each stage fails,
    and every model it loaded went there: none was left on the default device to compute. The trainer fails
    first of all because accelerate does not train where the policy says."""
    placed = []
    place = device.place

    def spy(model):
        placed.append(model)
        return place(model)

    monkeypatch.setattr(device, "model_device", lambda: torch.device("meta"))
    monkeypatch.setattr(device, "place", spy)
    with pytest.raises(Exception, match=error):
        run_stage(workspace_copy, *argv)
    assert placed and all(p.device.type == "meta" for model in placed for p in model.parameters())


def test_bf16_autocast_ranks_attack_candidates_as_fp32(smoke_workspace, smoke_params, monkeypatch):
    """The first-order scores of HotFlip/UAT under bf16 autocast (CPU here, as on CUDA) give the same top-k
    pools as fp32 on the tiny model, and true losses agree to bf16 precision."""
    monkeypatch.chdir(smoke_workspace)
    setup = load_setup(smoke_params, "pretrained", 0)
    a = smoke_params.attack
    tokens = setup.eval.tokens[:8]
    positions = torch.arange(a.prompt_tokens)
    pools, losses = {}, {}
    for precision in ("fp32", "bf16"):
        scorer = A.Scorer(setup.model, a.continuation_tokens, a.batch_size, setup.candidates, precision)
        scores, _ = scorer.flip_scores(tokens, positions)
        pools[precision] = scores.topk(a.hotflip.topk, dim=2).indices
        losses[precision] = scorer.nll(tokens, count=False)
    same = (pools["bf16"].unsqueeze(-1) == pools["fp32"].unsqueeze(-2)).any(-1).float().mean().item()
    assert same >= 0.9, f"only {same:.0%} of the bf16 top-{a.hotflip.topk} pools are in the fp32 pools"
    assert torch.allclose(losses["bf16"], losses["fp32"], rtol=2e-2)


@pytest.mark.parametrize("output", ["pretrain.json", "monotonic_init.json"])
def test_validation_metrics_record_the_precision_they_ran_in(smoke_workspace, output):
    """eval.precision auto, as the policy resolves it for the model's device (the CPU here: fp32)."""
    metrics = json.loads((smoke_workspace / "outputs/metrics" / output).read_text())
    assert metrics["provenance"]["precision"] == device.resolve_precision("auto", torch.device("cpu")) == "fp32"
