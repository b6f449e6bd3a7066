"""Equal tuning effort (pipeline/lr_select.py, stages/select_lr.py): every trained arm tries the same number of
learning rates for the same budget, keeps the lowest validation loss, and trains at it."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from conftest import run_stage
from pipeline import arms, lr_select
from pipeline import params as P


def test_selection_is_the_lowest_validation_loss_first_on_ties_never_a_diverged_trial():
    assert lr_select.select([4.2, 3.9, 4.0]) == 1
    assert lr_select.select([3.9, 4.0, 3.9]) == 0
    assert lr_select.select([math.nan, 5.0, math.inf]) == 1
    assert lr_select.select([math.nan, math.nan]) == 0
    with pytest.raises(ValueError):
        lr_select.select([])


def test_every_arm_gets_as_many_trials_of_the_same_length(smoke_params):
    """The constrained arm moves the lr of V (its multiplier), an unconstrained arm its own lr; the trial is the
    arm's training shortened to lr_select.steps with one validation at its end."""
    grids = {name: lr_select.grid(smoke_params, arms.get(name)) for name in arms.TRAINED_ARMS}
    assert len({len(g) for g in grids.values()}) == 1
    for name in arms.TRAINED_ARMS:
        arm, base = arms.get(name), smoke_params.train_for_arm(name)
        for m in grids[name]:
            t = lr_select.trial(smoke_params, arm, m)
            assert (t.max_steps, t.eval_interval) == (smoke_params.lr_select.steps,) * 2
            moved = {"constrained_lr_multiplier": m} if arm.constrained else {"lr": base.lr * m}
            assert dataclasses.replace(t, max_steps=base.max_steps, eval_interval=base.eval_interval,
                                       checkpoint_interval=base.checkpoint_interval,
                                       keep_checkpoints=base.keep_checkpoints) == dataclasses.replace(base, **moved)


@pytest.mark.parametrize("key, value, allowed", [
    ("lr_select.multipliers", [], "a non-empty list of distinct numbers > 0"),
    ("lr_select.multipliers", [1, -2], "a non-empty list of distinct numbers > 0"),
    ("lr_select.constrained_multipliers", [10], "as many values as lr_select.multipliers"),
    ("lr_select.steps", 500, "at most train.max_steps (12)"),
])
def test_an_unequal_or_empty_grid_fails_validation_naming_the_key(smoke_params, key, value, allowed):
    raw = yaml.safe_load(open(P.profile_path("smoke")))
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(P.ParamsError) as exc:
        P.validate(raw)
    assert exc.value.key == key and allowed in exc.value.allowed


def test_the_stage_selects_deterministically_and_train_uses_the_selection(smoke_workspace, workspace_copy,
                                                                           smoke_params):
    """smoke_workspace ran select_lr once; a second run gives the same losses and choices; the recorded choice
    is the argmin of the recorded losses, and the trained arm's metrics carry the selected lr."""
    first = json.loads((smoke_workspace / "outputs/lr_select/selection.json").read_text())["arms"]
    assert run_stage(workspace_copy, "select_lr") == 0
    second = json.loads((workspace_copy / "outputs/lr_select/selection.json").read_text())["arms"]
    assert first == second and set(first) == set(arms.TRAINED_ARMS)
    for name, c in first.items():
        assert c["multipliers"] == lr_select.grid(smoke_params, arms.get(name))
        assert c["selected"] == c["multipliers"][c["validation_loss"].index(min(c["validation_loss"]))]
        assert c["steps"] == smoke_params.lr_select.steps
    assert run_stage(workspace_copy, "train", "--arm", "monotonic", "--seed", "0") == 0
    metrics = json.loads((workspace_copy / "outputs/train_logs/monotonic-s0/metrics.json").read_text())
    assert metrics["train"]["constrained_lr_multiplier"] == first["monotonic"]["selected"]
    assert metrics["lr_selection"] == first["monotonic"]


def test_train_refuses_a_selection_made_on_another_grid(workspace_copy, capsys):
    raw = yaml.safe_load((workspace_copy / "params.yaml").read_text())
    raw["lr_select"]["multipliers"] = [0.25, 4]
    (workspace_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="rerun select_lr"):
        run_stage(workspace_copy, "train", "--arm", "baseline", "--seed", "0")
