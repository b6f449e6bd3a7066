"""The arm table is the one place that says what an arm is; paths, loading and the CLI follow it."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import arms
from pipeline.__main__ import build_parser


def test_table_is_consistent_with_the_protocol():
    table = arms.ARMS
    assert list(table) == ["pretrained", "baseline", "monotonic_init", "monotonic"]
    for arm in table.values():
        if arm.start is not None:
            start = table[arm.start]
            assert not start.trained                       # every arm starts from a seed-independent model
            assert start.constrained <= arm.constrained    # the constraint is never removed
        assert arm.trained == (arm.name in arms.TRAINED_ARMS)
    assert table["monotonic"].start == "monotonic_init" and table["baseline"].start == "pretrained"


def test_model_directories_follow_trained_or_not():
    assert arms.get("pretrained").model_dir() == arms.get("pretrained").model_dir(7) == Path("outputs/models/pretrained")
    assert arms.get("monotonic").model_dir(3) == Path("outputs/train/monotonic-s3/model")
    with pytest.raises(ValueError, match="needs a seed"):
        arms.get("baseline").model_dir()
    with pytest.raises(ValueError, match="unknown arm"):
        arms.get("ensemble")


def test_cli_takes_its_arm_choices_from_the_table(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--arm", "monotonic_init", "--seed", "0"])    # untrained arms are never trained
    assert "invalid choice: 'monotonic_init'" in capsys.readouterr().err
    assert parser.parse_args(["evaluate", "--arm", "monotonic_init", "--seed", "0"]).arm == "monotonic_init"


def test_frontier_checkpoints_are_unconstrained_untrained_and_measured_under_their_seed():
    step = arms.get("pretrained-step150")
    assert (step.constrained, step.trained, step.pretrain_step) == (False, False, 150)
    assert step.model_dir() == step.model_dir(2) == Path("outputs/models/pretrain_steps/step150")
    from pipeline import paths

    assert paths.attack_dir("pretrained-step150", 2) == Path("outputs/frontier/s2/pretrained-step150/attacks")
    assert paths.eval_dir("pretrained", 2) == Path("outputs/eval/pretrained-s2")
    with pytest.raises(ValueError, match="unknown arm"):
        arms.get("pretrained-stepX")


def test_cli_accepts_only_the_frontier_steps_in_params(tmp_path, capsys):
    from pipeline.__main__ import main

    assert main(["assess", "--arm", "pretrained-step7", "--seed", "0"]) == 2     # params.yaml: frontier.steps
    assert "'frontier.steps'" in capsys.readouterr().err
    assert main(["evaluate", "--arm", "ensemble", "--seed", "0"]) == 2
    assert "'--arm'" in capsys.readouterr().err
    assert main(["assess", "--seed", "0"]) == 2                                # neither --arm nor --frontier
