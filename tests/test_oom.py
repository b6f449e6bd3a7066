"""Out-of-memory recovery: a real allocation failure ends the stage with the params change that keeps the
global batch, and the smaller micro-batch resumes the same run from its checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_stage
from pipeline import oom
from test_training import ENV, copy_workspace, edit_params, read_csv, weights

# Runs the stage on CPU with an address-space limit of what the imports took plus 1 GiB: a 4096-sequence
# micro-batch of 64 tokens needs more (activations and logits ~1.8 GB), so an allocation fails for real.
LIMITED_STAGE = """
import resource, runpy, sys
import accelerate, torch, transformers.models.gpt_neox.modeling_gpt_neox
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__")
"""


def test_cpu_allocation_failure_names_train_keys_keeping_global_batch(smoke_workspace, tmp_path):
    ws = copy_workspace(smoke_workspace, tmp_path / "ws", batch_size=4096, grad_accum=2, max_steps=2,
                        beyond_one_epoch="warn")
    proc = subprocess.run([sys.executable, "-c", LIMITED_STAGE, "train", "--arm", "baseline", "--seed", "0"], cwd=ws,
                          env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == oom.OOM_EXIT_CODE, proc.stderr[-3000:]
    assert ("out of memory in stage train: micro-batch train.batch_size=4096 x train.grad_accum=2: set "
            "train.batch_size 4096 -> 2048 with train.grad_accum 2 -> 4 (global batch unchanged") in proc.stderr
    assert "Traceback" not in proc.stderr


def _allocate_too_much():
    torch.empty(1 << 50, dtype=torch.uint8)     # a real allocator failure (1 PiB)


def document_nll():      # named like the functions whose batch size the advice names
    _allocate_too_much()


def uat_search():
    _allocate_too_much()


@pytest.mark.parametrize("fn, key", [(document_nll, "eval.batch_size"), (uat_search, "attack.uat.batch_size"),
                                     (_allocate_too_much, "attack.batch_size")])
def test_attack_and_eval_advice_names_the_key_of_the_failing_call(smoke_params, fn, key):
    with pytest.raises(RuntimeError) as info:
        fn()
    size = {"eval.batch_size": smoke_params.eval.batch_size, "attack.batch_size": smoke_params.attack.batch_size,
            "attack.uat.batch_size": smoke_params.attack.uat.batch_size}[key]
    assert f"(micro-batch {key}={size} sequences): set {key} {size} -> {size // 2}" in \
        oom.advice(info.value, "assess", smoke_params)


def test_benchmarks_advice_names_the_harness_batch_size(smoke_params):
    with pytest.raises(RuntimeError) as info:
        _allocate_too_much()
    size = smoke_params.benchmarks.batch_size
    assert f"(micro-batch benchmarks.batch_size={size} sequences): set benchmarks.batch_size {size} -> {size // 2}" \
        in oom.advice(info.value, "benchmarks", smoke_params)


def test_only_out_of_memory_errors_get_advice(smoke_params):
    assert oom.advice(RuntimeError("shape mismatch"), "assess", smoke_params) is None
    assert oom.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


def test_fingerprint_holds_the_global_batch_not_its_split(smoke_params):
    from dataclasses import replace

    from pipeline.training import run_fingerprint

    tp = smoke_params.train
    assert run_fingerprint({}, replace(tp, batch_size=16, grad_accum=1), 16) == \
        run_fingerprint({}, replace(tp, batch_size=8, grad_accum=2), 16)
    assert run_fingerprint({}, tp, 16) != run_fingerprint({}, tp, 32)
    assert run_fingerprint({}, tp, 16) != run_fingerprint({}, replace(tp, lr=tp.lr * 2), 16)


@pytest.mark.slow
def test_resume_with_half_the_micro_batch_continues_the_run(smoke_workspace, tmp_path):
    steps = {"max_steps": 12, "eval_interval": 6, "checkpoint_interval": 4}
    whole = copy_workspace(smoke_workspace, tmp_path / "whole", batch_size=16, grad_accum=1, **steps)
    assert run_stage(whole, "train", "--arm", "monotonic", "--seed", "0") == 0
    split = copy_workspace(smoke_workspace, tmp_path / "split", batch_size=16, grad_accum=1, max_steps_per_run=4,
                           **steps)
    assert run_stage(split, "train", "--arm", "monotonic", "--seed", "0") != 0      # stopped at step 4
    edit_params(split, batch_size=8, grad_accum=2, max_steps_per_run=0)
    assert run_stage(split, "train", "--arm", "monotonic", "--seed", "0") == 0

    m_split = json.loads((split / "outputs/train_logs/monotonic-s0/metrics.json").read_text())
    m_whole = json.loads((whole / "outputs/train_logs/monotonic-s0/metrics.json").read_text())
    runs = json.loads((split / "outputs/runs/train-monotonic-s0.json").read_text())["runs"]
    assert runs == 2 and m_split["fingerprint"] == m_whole["fingerprint"]
    assert m_split["data_order_sha256"] == m_whole["data_order_sha256"]
    loss_split = [float(r["loss"]) for r in read_csv(split / "outputs/train_logs/monotonic-s0/log.csv")]
    loss_whole = [float(r["loss"]) for r in read_csv(whole / "outputs/train_logs/monotonic-s0/log.csv")]
    assert loss_split[:4] == loss_whole[:4]                                      # the same 16x1 steps
    assert loss_split[4:] == pytest.approx(loss_whole[4:], abs=1e-4)             # 8x2: summation order only
    # tolerance: two half-batch means vs one full mean differ by fp32 rounding, amplified over 8 Adam steps
    w_split, w_whole = weights(split, "monotonic"), weights(whole, "monotonic")
    for key in w_whole:
        torch.testing.assert_close(w_split[key], w_whole[key], rtol=1e-4, atol=1e-5)
    v = "outputs/train/monotonic-s0/model/monotonic_state.safetensors"
    v_split, v_whole = load_file(str(split / v)), load_file(str(whole / v))
    for key in v_whole:
        torch.testing.assert_close(v_split[key], v_whole[key], rtol=1e-4, atol=1e-5)
