"""`python -m pipeline preflight`: the model built on the meta device (Pythia-1.4B's exact parameter count),
a memory estimate that matches a measured training peak, every dvc.yaml stage kind in the table (assess with the
frontier's checkpoints, one reference arm per assess-ref job), times at eval.precision, slurm/resources.ini read
as slurm/submit.py reads it, and exit 2 naming the stage and the setting when something does not fit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from pipeline import arms
from pipeline.cluster import resource_section
from pipeline import params as P
from pipeline import preflight
from pipeline.__main__ import main

PROFILES = REPO / "profiles"


def preflight_run(capsys, *argv) -> tuple[int, str]:
    rc = main(["preflight", *argv])
    return rc, capsys.readouterr().out


def edited_profile(tmp_path, name: str, section: str = "train", **values) -> str:
    raw = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    raw[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def rows_of(params_path, device: str = "a100-80gb") -> dict:
    params = P.load(params_path)
    c = preflight.Context(params, preflight.model_shape(params), preflight.DEVICES[device], device,
                          preflight.MFU_DEFAULT)
    return {e.stage: e for e in preflight.estimates(c)}


def test_pythia_1_4b_layout_from_the_profile_keys_has_the_exact_parameter_count():
    params = P.load(PROFILES / "cluster.yaml")
    assert not os.path.exists(params.model.hf_local_path)        # offline here: built from model.* keys
    shape = preflight.model_shape(params)
    assert shape.params == 1_414_647_808
    assert shape.constrained == 24 * 2 * 2048 * 8192              # mlp_both: both MLP matrices of every layer
    assert "built from model.*" in shape.source


def test_config_builds_the_model_the_pipeline_trains(smoke_workspace, smoke_params):
    from pipeline.data import load_tokenizer
    from pipeline.models import count_parameters, tiny_gpt_neox

    tokenizer = load_tokenizer(smoke_workspace / "outputs/data/tokenizer")
    assert len(tokenizer) == smoke_params.tokenizer.vocab_size
    assert preflight.model_shape(smoke_params).params == count_parameters(tiny_gpt_neox(smoke_params.model, tokenizer))


@pytest.mark.slow
def test_embedded_train_estimate_within_25_percent_of_the_measured_cpu_peak(smoke_workspace):
    """The embedded model and micro-batch (16 x 128), three logged steps of the real trainer on real packed
    data (the smoke split, packed at 128 tokens), live-memory peak from ru_maxrss (bench/bench_preflight.py)."""
    proc = subprocess.run([sys.executable, str(REPO / "bench/bench_preflight.py"), "--params",
                           str(PROFILES / "embedded.yaml"), "--data", str(smoke_workspace / "outputs/data")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["micro_batch"] == [16, 128] and result["parameters"] == 1_317_632
    assert 0.75 <= result["ratio"] <= 1.25, {k: result[k] for k in ("ratio", "estimate_mib", "measured_mib",
                                                                   "rss_before_mib", "thp_enabled")}


@pytest.mark.parametrize("profile", ["embedded", "smoke", "cluster"])
def test_every_stage_kind_of_dvc_yaml_is_estimated_for_every_profile(capsys, profile):
    rc, out = preflight_run(capsys, "--params", str(PROFILES / f"{profile}.yaml"))
    table = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    kinds = {name.split("-")[0] for name in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]}
    assert kinds <= {row.split(" ")[0].split("-")[0] for row in table}
    ref = [a.name for a in arms.ARM_TABLE if not a.trained]
    assert {*(f"{kind} ({arm})" for kind in ("train", "assess") for arm in arms.TRAINED_ARMS),
            *(f"assess-ref ({arm})" for arm in ref), "assess-frontier"} <= set(table)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert rc == (2 if errors else 0) and (profile == "cluster" or not errors)   # the small profiles fit
    assert all(" set " in line or " raise " in line for line in errors)
    assert "config: built from model.*" in out


def test_train_that_does_not_fit_exits_2_naming_stage_and_setting(capsys, tmp_path):
    params = edited_profile(tmp_path, "cluster", gradient_checkpointing=False)
    rc, out = preflight_run(capsys, "--params", params, "--gpu", "a100-40gb")
    assert rc == 2
    line = next(x for x in out.splitlines() if x.startswith("error: train (baseline): needs"))
    assert "on a100-40gb (40 GiB, 39 usable): set train.gradient_checkpointing: true (" in line
    assert "| train (baseline) |" in out and "| no |" in out

    rc, out = preflight_run(capsys, "--params", params, "--gpu", "h200")
    assert not [x for x in out.splitlines() if x.startswith("error: train")]   # 141 GB holds it


def test_checkpointing_already_on_halves_the_micro_batch_keeping_the_global_batch(capsys, tmp_path):
    params = edited_profile(tmp_path, "cluster", batch_size=32, grad_accum=1)
    rc, out = preflight_run(capsys, "--params", params, "--gpu", "a100-40gb")
    line = next(x for x in out.splitlines() if x.startswith("error: train (baseline)"))
    assert rc == 2 and "set train.batch_size 32 -> " in line and "train.grad_accum 1 -> " in line
    b, g = (int(line.split(f"{key} ")[1].split(" -> ")[1].split()[0])
            for key in ("train.batch_size", "train.grad_accum"))
    assert b * g == 32


def test_slurm_request_is_checked(capsys, tmp_path):
    ini = (REPO / "slurm/resources.ini").read_text().replace("[train]\ntime = 24:00:00\ncpus-per-task = 8\nmem = 64G\n"
                                                             "gres = gpu:a100:1", "[train]\nmem = 8G\ngres =")
    (tmp_path / "resources.ini").write_text(ini)
    rc, out = preflight_run(capsys, "--params", str(PROFILES / "cluster.yaml"), "--resources",
                            str(tmp_path / "resources.ini"))
    assert rc == 2
    assert "error: train (monotonic): needs a GPU, slurm/resources.ini [train] requests none: set gres = gpu:<type>:1" in out
    assert ("error: train (baseline): needs 18.8 GiB of host memory, slurm/resources.ini [train] mem = 8G: "
            "raise mem to") in out


def test_assess_counts_every_frontier_checkpoint_like_an_arm(tmp_path):
    """assess --arm A --frontier: the arm plus each recovery checkpoint, each with the attacks and their greedy and
    random controls; assess-ref: one reference arm; assess-frontier: each pretraining checkpoint, the same work."""
    pinned = edited_profile(tmp_path, "cluster", "frontier", steps=[1000, 2000])
    params = P.load(pinned)
    rows = rows_of(pinned)
    arm, ref = rows["assess (baseline)"], rows["assess-ref (pretrained)"]
    checkpoint = rows["assess-frontier"].hours / len(params.frontier.steps)
    assert checkpoint == pytest.approx(ref.hours)               # controls on every checkpoint too
    assert arm.hours == pytest.approx(ref.hours + len(params.frontier.recovery_steps) * checkpoint)
    assert rows["assess (monotonic)"].hours == arm.hours and arm.jobs == ref.jobs == len(params.seeds)

    bare = rows_of(edited_profile(tmp_path, "cluster", "frontier", steps=[], recovery_steps=[]))
    assert bare["assess (baseline)"].hours == pytest.approx(ref.hours)
    assert bare["assess-frontier"].hours == 0 and bare["assess-frontier"].device_gib == 0
    model = 4 * preflight.model_shape(params).params / preflight.GIB      # recovery exports: checkpoint dir + steps/
    extra = rows["train (baseline)"].scratch_gib - bare["train (baseline)"].scratch_gib
    assert extra == pytest.approx(2 * len(params.frontier.recovery_steps) * model)


def test_evaluation_attacks_and_transfer_are_timed_at_eval_precision(capsys, tmp_path):
    bf16 = rows_of(PROFILES / "cluster.yaml")
    fp32_path = edited_profile(tmp_path, "cluster", "eval", precision="fp32")
    fp32 = rows_of(fp32_path)
    device = preflight.DEVICES["a100-80gb"]
    load = preflight.load_hours(preflight.model_shape(P.load(fp32_path)))       # not a matter of precision
    params = P.load(fp32_path)
    targets = len(arms.ARM_NAMES) + len(arms.frontier_checkpoints(params.frontier))   # transfer's
    for stage, loads in (("assess-ref (pretrained)", 1), ("transfer", targets), ("monotonic_init", 0)):
        compute = bf16[stage].hours - loads * load
        assert fp32[stage].hours - loads * load == pytest.approx(compute * device.bf16_tflops / device.fp32_tflops)
    assert fp32["train (baseline)"].hours == bf16["train (baseline)"].hours             # train.precision's
    _, out = preflight_run(capsys, "--params", str(PROFILES / "cluster.yaml"), "--gpu", "a100-40gb")
    assert "evaluation, attacks and transfer in bf16 autocast (eval.precision auto)" in out
    _, out = preflight_run(capsys, "--params", fp32_path, "--gpu", "a100-40gb")
    assert "evaluation, attacks and transfer in fp32 (eval.precision fp32)" in out


def test_resources_section_is_the_longest_covering_one_as_the_submitter_reads_it(capsys, tmp_path):
    sys.path.insert(0, str(REPO / "slurm"))
    try:
        import submit as submitter
    finally:
        sys.path.pop(0)
    ini = (REPO / "slurm/resources.ini").read_text() + "\n[assess-ref]\ntime = 01:00:00\ngres = gpu:1\n"
    (tmp_path / "resources.ini").write_text(ini)
    resources = preflight.read_resources(tmp_path / "resources.ini")
    for stage in ("assess@baseline-0", "assess-ref@0-pretrained", "assess-frontier@0", "train-monotonic@1", "data"):
        section = resource_section(resources, stage)
        assert f"--time={section['time']}" in submitter.sbatch_options(resources, stage), stage
    rc, out = preflight_run(capsys, "--params", str(PROFILES / "cluster.yaml"), "--resources",
                            str(tmp_path / "resources.ini"))
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert rc == 2 and [e.split(":")[1] for e in errors] == [" assess-ref (pretrained)", " assess-ref (monotonic_init)"]
    assert "of compute, slurm/resources.ini [assess-ref] time = 01:00:00: raise time to" in errors[0]


@pytest.mark.parametrize("profile", ["cluster", "cluster-410m", "cluster-160m"])
def test_the_cluster_attack_batches_are_the_largest_that_fit_an_a100_40gb(capsys, profile):
    """Sized from the memory model, with the frozen model's Linear weights in bf16 (device.for_scoring), for each
    rung of the model-size ladder; a change of either that moves the fit fails here until the profile follows."""
    cluster = P.load(PROFILES / f"{profile}.yaml")
    c = preflight.Context(cluster, preflight.model_shape(cluster), preflight.DEVICES["a100-40gb"], "a100-40gb", 0.4)
    fit = preflight.attack_batch_fit(c)
    assert fit == {"attack.batch_size": cluster.attack.batch_size, "attack.uat.batch_size": cluster.attack.uat.batch_size}
    assert fit["attack.batch_size"] >= 4 * 16          # 407a7ab scored 16 sequences (~1.6 k tokens) per forward
    ini = preflight.read_resources()
    assert not [p for e in preflight.estimates(c) for p in preflight.problems(c, e, ini)], profile   # every job fits
    s = c.shape
    assert preflight.scoring_weight_bytes(c) == 2 * (s.params - s.embedding) + 4 * s.embedding < 4 * s.params
    rc, out = preflight_run(capsys, "--params", str(PROFILES / f"{profile}.yaml"), "--gpu", "a100-80gb")
    assert f"attack.batch_size {2 * fit['attack.batch_size']} (now {cluster.attack.batch_size})" in out
