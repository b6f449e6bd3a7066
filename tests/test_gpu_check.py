"""bench/gpu_check.py run for real with --cpu, so the GPU acceptance check cannot rot where no GPU is lent:
the smoke DAG of HEAD (committed code only: it clones HEAD) with every model step's device and precision."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, pipeline_env

# the steps whose run records name their model's device (assess records evaluate, uat, hotflip, controls and
# diagnostics; with --frontier, for each checkpoint too)
MODEL_STAGES = {"pretrain", "monotonic_init", "select_lr", "train", "evaluate", "uat", "hotflip", "controls", "diagnostics",
                "targeted", "transfer", "benchmarks"}


@pytest.mark.slow
def test_gpu_check_on_cpu_finds_every_model_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = [sys.executable, str(REPO / "bench/gpu_check.py"), "--cpu", "--steps", "4", "--out", str(out)]
    proc = subprocess.run(argv, env=pipeline_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    smoke = json.loads(out.read_text())["smoke"]
    assert {name.split("-")[0] for name in smoke["model_devices"]} == MODEL_STAGES
    assert set(smoke["model_devices"].values()) == {"cpu"} and smoke["all_on_expected_device"]
    # every output but the trainer's (train.precision: in train's metrics, select_lr's params) records the
    # precision; on the CPU, fp32
    assert {name.split("-")[0] for name in smoke["precisions"]} == MODEL_STAGES - {"train", "select_lr"}
    assert set(smoke["precisions"].values()) == {"fp32"} and smoke["precisions_as_expected"]
    assert smoke["trained_to_the_end"] and smoke["run_records_name_the_gpu"]
    scoring = json.loads(out.read_text())["scoring"]
    assert scoring["prompt_cached_max_abs_loss_difference"] < 1e-2   # bf16: the cached prompt scores as whole rows
