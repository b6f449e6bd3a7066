"""The recovery trainer on the smoke profile: outputs and equal budgets of both arms, exact resume after
early stops (with a corrupted checkpoint), SIGTERM/SIGKILL, frozen-weight detection, distributed parity."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, run_stage
from pipeline.training import REQUEUE_EXIT_CODE, lr_at

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def edit_params(ws: Path, **train) -> None:
    """Set train keys; a shortened run drops the recovery-step exports (frontier.recovery_steps) it ends before
    and shortens the lr trials and the validation interval to fit."""
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["train"].update(train)
    shortest = min([raw["train"]["max_steps"], *(o.get("max_steps", raw["train"]["max_steps"])
                                                 for o in raw["train"]["arm_overrides"].values())])
    raw["frontier"]["recovery_steps"] = [s for s in raw["frontier"]["recovery_steps"] if s < shortest]
    raw["lr_select"]["steps"] = min(raw["lr_select"]["steps"], shortest)   # select_lr's record stays valid
    raw["train"]["eval_interval"] = min(raw["train"]["eval_interval"], raw["train"]["max_steps"])
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))


def copy_workspace(src: Path, dst: Path, **train) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train", "checkpoints"))
    edit_params(dst, **train)
    return dst


def weights(ws: Path, arm: str) -> dict[str, torch.Tensor]:
    return load_file(str(ws / "outputs/train" / f"{arm}-s0" / "model" / "model.safetensors"))


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def train_subprocess(ws: Path, arm: str = "baseline") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--arm", arm, "--seed", "0"], cwd=ws,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer exited ({proc.returncode}) before {path.name}:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.005)


def fingerprint_dir(base: Path) -> Path:
    """The run's checkpoint directory under base (beside it: <fingerprint>.owner, the run's lock file)."""
    return next(p for p in base.iterdir() if p.is_dir())


def run_until(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Let the trainer run in 5 ms slices (SIGCONT/SIGSTOP) until `path` exists, and leave it stopped there:
    on a fast machine the whole run takes under a second, faster than polling can catch a given step."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer exited ({proc.returncode}) before {path.name}:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)


# Both arms trained once, uninterrupted, with a V weight decay that differs from W's (V's learning-rate multiplier:
# select_lr's choice).
TRAIN = {"constrained_weight_decay": 0.01}


@pytest.fixture(scope="module")
def trained(smoke_workspace, tmp_path_factory) -> Path:
    ws = copy_workspace(smoke_workspace, tmp_path_factory.mktemp("trained") / "ws", **TRAIN)
    for arm in ("baseline", "monotonic", "flipped"):
        assert run_stage(ws, "train", "--arm", arm, "--seed", "0") == 0
    return ws


def test_lr_schedule_warms_up_then_decays_to_floor():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1)


def test_both_arms_equal_budget_outputs_and_v_moves(trained, smoke_params):
    tp = smoke_params.train
    metrics = {arm: json.loads((trained / f"outputs/train_logs/{arm}-s0/metrics.json").read_text())
               for arm in ("baseline", "monotonic")}
    b, m = metrics["baseline"], metrics["monotonic"]
    for key in ("steps", "tokens_seen", "data_order_sha256", "validation_windows"):
        assert b[key] == m[key], key
    knobs = ("lr", "constrained_lr_multiplier")     # each arm's own, chosen by select_lr on the same grid size
    assert {k: v for k, v in b["train"].items() if k not in knobs} == {k: v for k, v in m["train"].items()
                                                                       if k not in knobs}
    assert b["train"]["lr"] == pytest.approx(tp.lr * b["lr_selection"]["selected"])
    assert (m["train"]["lr"], m["train"]["constrained_lr_multiplier"]) == (tp.lr, m["lr_selection"]["selected"])
    assert b["steps"] == tp.max_steps and b["tokens_seen"] == tp.max_steps * tp.batch_size * smoke_params.data.seq_len
    assert b["overrides"] == {} and b["budgets_equal"] and "provenance" in b
    assert set(m["update_norm_total"]) == {"decay", "no_decay", "constrained", "constrained_w"}
    assert m["update_norm_total"]["constrained"] > 1e-3 and b["update_norm_total"]["decay"] > 1e-3
    assert m["monotonic_verify"]["ok"] and m["monotonic_verify"]["min_weight"] >= 0

    log = read_csv(trained / "outputs/train_logs/monotonic-s0/log.csv")
    assert list(log[0]) == ["step", "loss", "lr", "grad_norm", "update_norm_decay", "update_norm_no_decay",
                            "update_norm_constrained", "update_norm_constrained_w"]   # timing: in the run record
    assert [int(r["step"]) for r in log] == list(range(1, tp.max_steps + 1))
    assert all(float(r["update_norm_constrained"]) > 0 for r in log)
    val = read_csv(trained / "outputs/train_logs/monotonic-s0/val_log.csv")
    assert [int(r["step"]) for r in val] == [tp.eval_interval, tp.max_steps]
    assert m["validation_loss"] == pytest.approx(float(val[-1]["val_loss"]))

    from pipeline.models import load_causal_lm
    from pipeline.monotonic import load_parametrized, verify
    verify(load_causal_lm(trained / "outputs/train/monotonic-s0/model"), "mlp_both")   # plain HF, W >= 0
    load_parametrized(trained / "outputs/train/monotonic-s0/model", expected_variant="mlp_both")
    load_causal_lm(trained / "outputs/train/baseline-s0/model")

    root = trained / "outputs/checkpoints/monotonic-s0" / m["fingerprint"]
    steps = sorted(p.name for p in root.glob("step-*"))
    assert steps == ["step-0000008", "step-0000012"]        # every 4 steps, last 2 kept
    assert json.loads((root / "best/best.json").read_text())["step"] == m["best_step"]
    groups = {g["name"]: g for g in json.loads((root / "step-0000012/optimizer.json").read_text())["param_groups"]}
    assert groups["constrained"]["weight_decay"] == 0.01 and groups["decay"]["weight_decay"] == tp.weight_decay
    assert groups["constrained"]["lr"] == pytest.approx(m["lr_selection"]["selected"] * groups["decay"]["lr"])


def variant_weights(model_dir: Path, variant: str = "mlp_both") -> dict:
    from pipeline.models import load_causal_lm
    from pipeline.monotonic import constrained_modules

    model = load_causal_lm(model_dir)
    return {name: m.weight.detach().double() for name, m in constrained_modules(model, variant)}


def test_w_space_update_norms_are_the_norm_of_the_materialized_weight_difference(trained):
    m = json.loads((trained / "outputs/train_logs/monotonic-s0/metrics.json").read_text())
    start, final = (variant_weights(d) for d in (trained / "outputs/models/monotonic_init",
                                                 trained / "outputs/train/monotonic-s0/model"))
    expected = math.sqrt(sum(float((final[n] - start[n]).pow(2).sum()) for n in start))
    assert m["update_norm_total"]["constrained_w"] == pytest.approx(expected, rel=1e-5)
    assert m["update_norm_total"]["constrained_w"] != pytest.approx(m["update_norm_total"]["constrained"], rel=0.01)
    assert m["update_norm_path"]["constrained_w"] >= expected * (1 - 1e-6)    # the path is at least the distance
    assert set(m["nonnegative_share"].values()) == {1.0} and {"start", "final"} < set(m["nonnegative_share"])


def test_the_damage_control_starts_from_monotonic_inits_weights_and_trains_them_unconstrained(trained, smoke_params):
    from pipeline.training import parameter_groups
    from pipeline.models import load_causal_lm

    f = json.loads((trained / "outputs/train_logs/flipped-s0/metrics.json").read_text())
    b = json.loads((trained / "outputs/train_logs/baseline-s0/metrics.json").read_text())
    for key in ("steps", "tokens_seen", "data_order_sha256", "train", "validation_windows"):
        assert f[key] == b[key], key
    assert f["trained_from"].endswith("outputs/models/monotonic_init")
    assert set(f["update_norm_total"]) == {"decay", "no_decay"}        # no constrained group: W itself trains
    assert f["nonnegative_share"]["start"] == 1.0 > f["nonnegative_share"]["final"] > 0.5
    assert b["nonnegative_share"]["start"] < 0.6
    model_dir = trained / "outputs/train/flipped-s0/model"
    assert not (model_dir / "monotonic_state.safetensors").exists()
    start, final = variant_weights(trained / "outputs/models/monotonic_init"), variant_weights(model_dir)
    expected = math.sqrt(sum(float((final[n] - start[n]).pow(2).sum()) for n in start))
    assert 0 < expected <= f["update_norm_total"]["decay"]       # the variant's W moved, as decayed weights
    model = load_causal_lm(model_dir)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert not parameter_groups(model, []).get("constrained")


def test_the_damage_control_is_exactly_monotonic_init_at_step_zero(smoke_workspace, smoke_params):
    from pipeline import arms
    from pipeline.loading import load_start_model

    cwd = os.getcwd()
    os.chdir(smoke_workspace)
    try:
        model, constrained, source = load_start_model(smoke_params, arms.get("flipped"), 0)
    finally:
        os.chdir(cwd)
    assert constrained == [] and not any(hasattr(m, "parametrizations") for m in model.modules())
    saved = {k.replace("embed_out.", "lm_head."): v        # transformers v5 renames the head on load
             for k, v in load_file(str(smoke_workspace / source / "model.safetensors")).items()}   # materialized W
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[k].cpu(), v) for k, v in saved.items())
    assert [n for n in saved if "dense_4h_to_h.weight" in n]


def test_early_stops_and_corrupt_checkpoint_resume_bit_identically(trained, smoke_workspace, tmp_path, capfd):
    ws = copy_workspace(smoke_workspace, tmp_path / "ws", max_steps_per_run=5, **TRAIN)
    assert run_stage(ws, "train", "--arm", "monotonic", "--seed", "0") == REQUEUE_EXIT_CODE
    assert "exiting with status 75" in capfd.readouterr().out
    assert not (ws / "outputs/train/monotonic-s0").exists()
    root = fingerprint_dir(ws / "outputs/checkpoints/monotonic-s0")
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000004", "step-0000005"]
    latest = root / "step-0000005/optimizer.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])     # truncated latest checkpoint

    assert run_stage(ws, "train", "--arm", "monotonic", "--seed", "0") == REQUEUE_EXIT_CODE
    assert "step-0000005 is unusable" in capfd.readouterr().err
    assert run_stage(ws, "train", "--arm", "monotonic", "--seed", "0") == 0    # steps 9..12

    resumed, reference = weights(ws, "monotonic"), weights(trained, "monotonic")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    v_resumed = load_file(str(ws / "outputs/train/monotonic-s0/model/monotonic_state.safetensors"))
    v_ref = load_file(str(trained / "outputs/train/monotonic-s0/model/monotonic_state.safetensors"))
    assert all(torch.equal(v_resumed[k], v_ref[k]) for k in v_ref)
    step = ws / "outputs/train/monotonic-s0/steps/step5"      # smoke frontier.recovery_steps: exported twice here
    for f in ("model.safetensors", "monotonic_state.safetensors"):
        assert (step / f).read_bytes() == (trained / "outputs/train/monotonic-s0/steps/step5" / f).read_bytes()
        assert (step / f).read_bytes() != (ws / "outputs/train/monotonic-s0/model" / f).read_bytes()
    assert json.loads((step / "pipeline_meta.json").read_text())["arm"] == "monotonic-step5"
    log = read_csv(ws / "outputs/train_logs/monotonic-s0/log.csv")
    ref_log = read_csv(trained / "outputs/train_logs/monotonic-s0/log.csv")
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    record = json.loads((ws / "outputs/runs/train-monotonic-s0.json").read_text())
    assert record["runs"] == 3 and [r["step"] for r in record["timing"]] == [int(r["step"]) for r in log]
    assert record["processes"] == 1
    assert not {"runs", "processes"} & set(json.loads((ws / "outputs/train_logs/monotonic-s0/metrics.json").read_text()))


def test_updates_rounding_to_zero_fail_the_run(smoke_workspace, tmp_path):
    # lr far below fp32 resolution of the weights: every update rounds away, as bf16 did at lr 1e-5
    ws = copy_workspace(smoke_workspace, tmp_path / "ws", lr=1e-30, weight_decay=0.0)
    from pipeline.training import FrozenParametersError
    with pytest.raises(FrozenParametersError, match="not training"):
        run_stage(ws, "train", "--arm", "baseline", "--seed", "0")
    assert not (ws / "outputs/train/baseline-s0").exists()


def test_arm_override_is_recorded_and_flagged(smoke_workspace, tmp_path, capfd):
    ws = copy_workspace(smoke_workspace, tmp_path / "ws", arm_overrides={"monotonic": {"max_steps": 3}})
    assert run_stage(ws, "train", "--arm", "monotonic", "--seed", "0") == 0
    assert "WARNING: train.arm_overrides is set" in capfd.readouterr().err
    metrics = json.loads((ws / "outputs/train_logs/monotonic-s0/metrics.json").read_text())
    assert metrics["overrides"] == {"max_steps": 3} and not metrics["budgets_equal"] and metrics["steps"] == 3


def test_variant_mismatch_fails_loudly(smoke_workspace, tmp_path):
    ws = copy_workspace(smoke_workspace, tmp_path / "ws")
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["monotonic"]["variant"] = "mlp_in"
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="rerun monotonic_init"):
        run_stage(ws, "train", "--arm", "monotonic", "--seed", "0")


@pytest.mark.slow
def test_sigterm_then_sigkill_resume_matches_uninterrupted(smoke_workspace, tmp_path):
    """The CLI as a subprocess: SIGTERM at a random step exits 75 after a checkpoint; SIGKILL at a later
    random step (possibly mid-checkpoint); the restarted run's final weights equal an uninterrupted run's.
    60 steps with a checkpoint at every step, so the signals land while the (fast) trainer still runs."""
    steps = {"max_steps": 60, "eval_interval": 30, "checkpoint_interval": 1, "keep_checkpoints": 80, **TRAIN}
    reference = copy_workspace(smoke_workspace, tmp_path / "reference", **steps)
    assert train_subprocess(reference).wait(timeout=600) == 0
    ws = copy_workspace(smoke_workspace, tmp_path / "ws", **steps)
    rng = random.Random()
    root = ws / "outputs/checkpoints/baseline-s0"
    term_at, kill_at = rng.randint(1, 15), rng.randint(25, 40)

    proc = train_subprocess(ws)
    run_until(root, proc)
    while not any(p.is_dir() for p in root.iterdir()):     # the run's lock file comes before its directory
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
    root = fingerprint_dir(root)
    run_until(root / f"step-{term_at:07d}", proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    assert "received SIGTERM" in out and "STOPPED EARLY" in out
    assert not (ws / "outputs/train/baseline-s0").exists()

    proc = train_subprocess(ws)
    wait_for(root / "step-0000001", proc)       # the resumed run's checkpoints reuse the directory
    proc.send_signal(signal.SIGSTOP)
    run_until(root / f"step-{kill_at:07d}", proc)
    proc.send_signal(signal.SIGCONT)
    time.sleep(rng.uniform(0, 0.01))             # possibly mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (ws / "outputs/train/baseline-s0").exists()

    proc = train_subprocess(ws)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming from" in out
    resumed, expected = weights(ws, "baseline"), weights(reference, "baseline")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def launched(ws: Path, processes: int) -> subprocess.CompletedProcess:
    """`python -m pipeline train` as the SLURM wrapper runs it, asking for `processes` processes."""
    return subprocess.run([sys.executable, "-m", "pipeline", "train", "--arm", "monotonic", "--seed", "0"], cwd=ws,
                          env={**ENV, "PIPELINE_TRAIN_PROCESSES": str(processes)}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_resume_under_one(smoke_workspace, tmp_path):
    """The stage re-launches itself as 2 gloo workers (pipeline/launch.py) with the params' global batch, hands
    the trainer's requeue status through, and the run resumes with 1 process where 2 stopped."""
    steps = {"max_steps": 4, "eval_interval": 4, "checkpoint_interval": 2, "batch_size": 4, "grad_accum": 2}
    single = copy_workspace(smoke_workspace, tmp_path / "one", **steps)
    double = copy_workspace(smoke_workspace, tmp_path / "two", **steps, max_steps_per_run=2)
    proc = launched(double, 2)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch: 2 training processes" in proc.stdout and "STOPPED EARLY" in proc.stdout
    edit_params(double, max_steps_per_run=0)
    proc = launched(double, 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step 2/4" in proc.stdout
    assert run_stage(single, "train", "--arm", "monotonic", "--seed", "0") == 0
    m2 = json.loads((double / "outputs/train_logs/monotonic-s0/metrics.json").read_text())
    m1 = json.loads((single / "outputs/train_logs/monotonic-s0/metrics.json").read_text())
    assert m2["global_batch_sequences"] == m1["global_batch_sequences"] == 8
    assert m2["fingerprint"] == m1["fingerprint"] and m2["data_order_sha256"] == m1["data_order_sha256"]
    assert m2["validation_loss"] == pytest.approx(m1["validation_loss"], abs=1e-4)
    w2, w1 = weights(double, "monotonic"), weights(single, "monotonic")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_grad_accum_not_divisible_by_the_processes_fails_before_compute(smoke_workspace, tmp_path):
    ws = copy_workspace(smoke_workspace, tmp_path / "ws", grad_accum=3)
    proc = launched(ws, 2)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.grad_accum" in proc.stderr and "a multiple of the 2 training processes" in proc.stderr
    assert "launch:" not in proc.stdout


@pytest.mark.slow
def test_a_second_trainer_of_the_same_run_waits_for_the_owner_then_resumes(smoke_workspace, tmp_path):
    """Two jobs that would train the same run (same fingerprint, one checkpoint directory): the second waits
    on the first's claim, names it, and resumes from its checkpoints once it is released."""
    import fcntl

    ws = copy_workspace(smoke_workspace, tmp_path / "ws", max_steps=4, eval_interval=4, checkpoint_interval=2)
    assert run_stage(ws, "train", "--arm", "baseline", "--seed", "0") == 0
    owner_file = next((ws / "outputs/checkpoints").glob("baseline-s0/*.owner"))
    assert "pid" in owner_file.read_text()
    shutil.rmtree(ws / "outputs/train")
    with open(owner_file, "a+") as held:      # another job holding the run
        fcntl.flock(held, fcntl.LOCK_EX)
        held.seek(0)
        held.truncate()
        held.write("job 4242 on node7, pid 1\n")
        held.flush()
        proc = train_subprocess(ws)
        waiting = next(line for line in proc.stdout if "is in use by" in line)
        assert "job 4242 on node7, pid 1" in waiting and "waiting for it to finish" in waiting
        assert proc.poll() is None
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming from" in out and "step 4/4" in out
    assert f"pid {proc.pid}" in owner_file.read_text()


def test_pretrain_saves_the_frontier_steps_without_changing_the_pretrained_model(workspace_copy):
    """The checkpoints of frontier.steps are the model as pretraining passed those steps; saving them leaves the
    final pretrained model bit-identical to a run that saves none."""
    import yaml

    ws = workspace_copy
    with_steps = (ws / "outputs/models/pretrained/model.safetensors").read_bytes()
    steps = yaml.safe_load((ws / "params.yaml").read_text())["frontier"]["steps"]
    assert steps and all((ws / f"outputs/models/pretrain_steps/step{s}/model.safetensors").is_file() for s in steps)
    early, late = (load_file(ws / f"outputs/models/pretrain_steps/step{s}/model.safetensors") for s in steps[:2])
    assert any(not torch.equal(early[k], late[k]) for k in early)
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["frontier"]["steps"] = []
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run_stage(ws, "pretrain") == 0
    assert (ws / "outputs/models/pretrained/model.safetensors").read_bytes() == with_steps
    assert list((ws / "outputs/models/pretrain_steps").iterdir()) == []


HOST_READ = r"item\(\) cannot be called on meta tensors"     # a step's first read of a value back to the host


def test_every_training_step_computes_on_the_models_device(smoke_workspace, smoke_params):
    """The meta device stands in for a GPU: its tensors hold no data, so an op mixing one with a CPU tensor fails
    (as CPU and CUDA tensors do) and so does reading a value back. Each step of a run (forward and loss,
    backward, the optimizer step, the per-step update norms, the total update norm against a reference on the
    device or on the CPU) must get as far as its first host read. On 407a7ab the total update norm, the last
    step of every training run, failed here (it took a CPU copy of the trained weights), as it did on a GPU."""
    from pipeline import training
    from pipeline.models import load_causal_lm

    path = smoke_workspace / "outputs/models/pretrained"
    model, reference = load_causal_lm(path).to("meta"), load_causal_lm(path)
    groups = training.parameter_groups(model, [])
    names = {g: [n for n, _ in members] for g, members in groups.items()}
    batch = torch.zeros(2, 9, dtype=torch.long, device="meta")
    loss = training.lm_loss(model, batch)
    loss.backward()
    optimizer, _, _ = training.build_optimizer(model, smoke_params.train, [])
    params = {g: [p for _, p in members] for g, members in groups.items()}
    before = {g: [p.detach().clone() for p in ps] for g, ps in params.items()}
    optimizer.step()
    for step in (lambda: float(loss.detach()), lambda: training.update_norms(before, params),
                 lambda: training.update_norms_from(model, reference.to("meta"), names),
                 lambda: training.update_norms_from(model, reference, names)):
        with pytest.raises(RuntimeError, match=HOST_READ):
            step()


def test_fingerprint_ignores_comments_docstrings_and_code_outside_the_trajectory(tmp_path):
    """Copies of the package with a comment, a changed docstring and a fix to the final update-norm report keep
    the fingerprint's code hash (a resubmitted run resumes its checkpoints); a change to the schedule or the data
    order changes it. One process imports each copy in turn."""
    edits = [("training.py", "", ""), ("training.py", "def lr_at(", "# a comment\ndef lr_at("),
             ("training.py", '"""Linear warmup, then', '"""Reworded: linear warmup, then'),
             ("training.py", "out[g] = math.sqrt(sq)", "out[g] = float(math.sqrt(sq))"),
             ("checkpoints.py", "def sha256(", "# a comment\ndef sha256("),
             ("training.py", "return peak * (step + 1) / warmup", "return peak * step / warmup"),
             ("data.py", "default_rng([seed, epoch])", "default_rng([seed, epoch + 1])")]
    copies = []
    for i, (name, old, new) in enumerate(edits):
        pkg = tmp_path / f"v{i}"
        shutil.copytree(REPO / "pipeline", pkg / "pipeline")
        text = (pkg / "pipeline" / name).read_text()
        assert old in text, old
        (pkg / "pipeline" / name).write_text(text.replace(old, new, 1))
        copies.append(str(pkg))
    script = ("import sys\nfor root in sys.argv[1:]:\n"
              "    for m in [m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.')]: del sys.modules[m]\n"
              "    sys.path.insert(0, root)\n    from pipeline.training import code_hash\n    print(code_hash())\n"
              "    sys.path.pop(0)\n")
    hashes = subprocess.run([sys.executable, "-c", script, *copies], capture_output=True, text=True, check=True,
                            env={k: v for k, v in ENV.items() if k != "PYTHONPATH"}).stdout.split()
    assert len(hashes) == len(edits) and len(set(hashes[:5])) == 1, hashes
    assert hashes[5] != hashes[0] and hashes[6] != hashes[0] and hashes[5] != hashes[6]


def test_without_flock_an_exclusive_lock_file_names_the_owner_and_stale_ones_are_replaced(tmp_path, monkeypatch):
    """A Lustre mount without flock answers ENOSYS: the claim falls back to an exclusive-create lock file with
    the same owner record, removed on release; a lock left by a dead process on this host is taken over, and a
    live holder is waited for."""
    import errno
    import socket

    from pipeline import training

    def no_flock(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(training.fcntl, "flock", no_flock)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    root = tmp_path / "run"
    lock = training.claim_run(root, "t")
    lock_file = tmp_path / "run.owner.lock"
    assert lock_file.read_text() == training.owner_record() and f"pid {os.getpid()}" in lock_file.read_text()
    lock.close()
    assert not lock_file.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(f"job none on {socket.gethostname()}, pid {int(dead.stdout)}\n")
    lock = training.claim_run(root, "t")
    assert f"pid {os.getpid()}" in lock_file.read_text()
    lock.close()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(f"job none on {socket.gethostname()}, pid {live.pid}\n")
        monkeypatch.setattr(training.time, "sleep", lambda s: (_ for _ in ()).throw(TimeoutError("waited")))
        with pytest.raises(TimeoutError, match="waited"):
            training.claim_run(root, "t")
    finally:
        live.kill()


def test_a_budget_beyond_one_epoch_fails_before_any_model_loads_or_warns(workspace_copy, monkeypatch, capsys):
    """train.max_steps x the global batch against the train split's windows (from its tokens): more fails with
    the key, the numbers and the fix before the start model is loaded; train.beyond_one_epoch: warn runs on,
    saying that windows repeat."""
    from pipeline import data as D, training
    from pipeline.stages import train as train_stage

    windows = D.PackedSequences(workspace_copy / "outputs/data", "train", 64).num_sequences
    edit_params(workspace_copy, max_steps=windows)        # batch 8: 8 epochs
    monkeypatch.setattr(train_stage, "load_start_model", lambda *a: pytest.fail("loaded a model"))
    assert run_stage(workspace_copy, "train", "--arm", "baseline", "--seed", "0") == 2
    err = capsys.readouterr().err
    assert f"'train.max_steps': {windows}; allowed: at most {windows // 8} steps, one epoch" in err
    assert f"train split holds {windows} (" in err and "8.00 epochs" in err and "beyond_one_epoch: warn" in err
    params = yaml.safe_load((workspace_copy / "params.yaml").read_text())
    from pipeline.params import validate

    tp = validate({**params, "train": {**params["train"], "beyond_one_epoch": "warn"}}).train
    data = D.PackedSequences(workspace_copy / "outputs/data", "train", 64)
    assert training.epochs(tp, data, "t") == 8.0
    assert "windows repeat" in capsys.readouterr().err
