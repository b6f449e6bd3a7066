"""The device policy (pipeline/device.py): every stage that evaluates, attacks or benchmarks a model puts it
where the policy says, and evaluation under bf16 autocast ranks attack candidates as fp32 does."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_stage
from pipeline import attacks as A
from pipeline import device
from pipeline.assessment import load_setup


POLICY_MISMATCH = "device policy"     # the trainer's error when accelerate's device is not the policy's
SEED = ["--seed", "0"]
MODEL_STAGES = [
    pytest.param(["pretrain"], POLICY_MISMATCH, id="pretrain"),          # from scratch: the trainer places it
    pytest.param(["train", "--arm", "baseline", *SEED], POLICY_MISMATCH, id="train"),
    pytest.param(["select_lr"], POLICY_MISMATCH, id="select_lr"),
    pytest.param(["evaluate", "--arm", "monotonic_init", *SEED], None, id="evaluate"),
    *[pytest.param([step, "--arm", "pretrained", *SEED], None, id=step)
      for step in ("uat", "hotflip", "controls", "targeted", "assess", "benchmarks")],
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


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda answering for one GPU of the given model (none exists here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)


def test_a_gpu_below_the_minimum_compute_capability_fails_every_model_stage_before_compute(
        workspace_copy, monkeypatch, capsys):
    """A job that landed on a V100 (7.0; bf16 emulated) stops at start naming the GPU, the key and the fix; the
    model-free stages do not look; device.min_compute_capability 0 allows it; run records name the GPU model."""
    from pipeline import provenance

    fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    monkeypatch.setattr(device, "place", lambda model: pytest.fail("computed on a refused GPU"))
    assert run_stage(workspace_copy, "evaluate", "--arm", "pretrained", "--seed", "0") == 2
    err = capsys.readouterr().err
    assert "Tesla V100-SXM2-32GB (cuda:0) has compute capability 7.0, below device.min_compute_capability 8.0" in err
    assert "gres = gpu:<type>:1" in err
    device.require_capability(0.0)
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    device.require_capability(8.0)
    assert device.gpus() == [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}]
    assert provenance.device_description() == "cuda x1 (NVIDIA A100-SXM4-80GB, compute capability 8.0)"


def test_every_gpu_section_of_resources_ini_names_the_gpu_model():
    import configparser

    from conftest import REPO

    ini = configparser.ConfigParser()
    ini.read(REPO / "slurm" / "resources.ini")
    requests = {name: ini[name].get("gres", "") for name in ini.sections() if ini[name].get("gres")}
    assert requests and all(g == "gpu:a100:1" for g in requests.values()), requests


def test_frozen_models_score_in_bf16_weights_with_the_numbers_of_autocast(smoke_workspace, smoke_params,
                                                                          monkeypatch):
    """eval.precision bf16: the Linear weights are cast once, as autocast casts them per forward; losses and the
    gradients the attacks rank candidates by are bit-identical to autocast over the fp32 weights."""
    import copy

    from pipeline.models import load_causal_lm

    fp32 = load_causal_lm(smoke_workspace / "outputs/models/pretrained")
    cast = device.for_scoring(copy.deepcopy(fp32), "bf16")
    linear = [m for m in cast.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert cast.get_input_embeddings().weight.dtype == torch.float32
    assert device.for_scoring(copy.deepcopy(fp32), "fp32").lm_head.weight.dtype == torch.float32
    monkeypatch.chdir(smoke_workspace)
    setup = load_setup(smoke_params, "pretrained", 0)
    a = smoke_params.attack
    tokens = setup.eval.tokens[:8]
    scores = {}
    for name, model in (("fp32", fp32), ("cast", cast)):
        scorer = A.Scorer(model, a.continuation_tokens, a.batch_size, setup.candidates, "bf16")
        scores[name] = (scorer.nll(tokens, count=False), scorer.flip_scores(tokens, torch.arange(a.prompt_tokens))[0])
    assert torch.equal(scores["fp32"][0], scores["cast"][0]) and torch.equal(scores["fp32"][1], scores["cast"][1])


def test_every_scoring_stage_runs_with_bf16_weights(workspace_copy, monkeypatch):
    """eval.precision bf16 on the CPU, as auto resolves on an A100: each scoring stage loads its models with bf16
    Linear weights and every forward runs under autocast (one outside it fails on the dtypes)."""
    import yaml

    raw = yaml.safe_load((workspace_copy / "params.yaml").read_text())
    raw["eval"]["precision"] = "bf16"
    (workspace_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    loaded = []
    for_scoring = device.for_scoring
    monkeypatch.setattr(device, "for_scoring", lambda m, p: loaded.append(for_scoring(m, p)) or loaded[-1])
    for argv in (["evaluate", "--arm", "monotonic_init"], ["assess", "--arm", "pretrained"]):
        assert run_stage(workspace_copy, *argv, "--seed", "0") == 0, argv
    assert len(loaded) == 2 and all(m.lm_head.weight.dtype == torch.bfloat16 for m in loaded)


FAULTS_OF_REPEATED_ALLOCATION = """
import resource, sys, torch
from pipeline import device
if sys.argv[1] == "tuned":
    assert device.tune_host_allocator()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = torch.ones(16 << 20)        # 64 MiB written: the size of an attack forward's logits
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="the tuning is glibc's mallopt")
def test_the_tuned_allocator_reuses_freed_tensor_memory_instead_of_faulting_it_in_again():
    import subprocess
    import sys

    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_ALLOCATION, mode], check=True,
                             capture_output=True, text=True)
        faults[mode] = int(out.stdout)
    pages_per_block = (64 << 20) // 4096
    assert faults["default"] > 16 * pages_per_block      # every one of the 20 blocks mapped and faulted in afresh
    assert faults["tuned"] < 8 * pages_per_block         # a few blocks' pages, then reused
