"""The arm table is the one place that says what an arm is; paths, loading and the CLI follow it."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import arms, paths
from pipeline.__main__ import build_parser


def test_table_is_consistent_with_the_protocol():
    table = arms.ARMS
    assert list(table) == ["pretrained", "baseline", "monotonic_init", "monotonic", "flipped"]
    for arm in table.values():
        if arm.start is not None:
            start = table[arm.start]
            assert not start.trained                       # every arm starts from a seed-independent model
            # the constraint is never removed, except by the control, which exists to remove it
            assert start.constrained <= arm.constrained or (arm.family == "control" and not arm.constrained)
        assert arm.trained == (arm.name in arms.TRAINED_ARMS)
    assert table["monotonic"].start == "monotonic_init" and table["baseline"].start == "pretrained"
    assert table["flipped"].start == table["monotonic"].start and table["flipped"].trained


def test_model_directories_follow_trained_or_not():
    assert paths.model_dir("pretrained") == paths.model_dir("pretrained", 7) == Path("outputs/models/pretrained")
    assert paths.model_dir("monotonic", 3) == Path("outputs/train/monotonic-s3/model")
    with pytest.raises(ValueError, match="needs a seed"):
        paths.model_dir("baseline")
    with pytest.raises(ValueError, match="unknown arm"):
        arms.get("ensemble")


def test_cli_takes_its_arm_choices_from_the_table(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--arm", "monotonic_init", "--seed", "0"])    # untrained arms are never trained
    assert "invalid choice: 'monotonic_init'" in capsys.readouterr().err
    assert parser.parse_args(["evaluate", "--arm", "monotonic_init", "--seed", "0"]).arm == "monotonic_init"


def test_checkpoints_along_training_inherit_their_arm_and_live_beside_it():
    from pipeline import paths

    step = arms.get("pretrained-step150")
    assert (step.constrained, step.trained, step.checkpoint_of, step.step) == (False, False, "pretrained", 150)
    assert paths.model_dir(step) == paths.model_dir(step, 2) == Path("outputs/models/pretrain_steps/step150")
    assert paths.attack_dir("pretrained-step150", 2) == Path("outputs/frontier/s2/pretrained-step150/attacks")
    mid = arms.get("monotonic-step40")
    assert (mid.constrained, mid.trained, mid.start) == (True, True, "monotonic_init")
    assert paths.model_dir(mid, 1) == Path("outputs/train/monotonic-s1/steps/step40")
    assert paths.eval_dir("monotonic-step40", 1) == Path("outputs/recovery/monotonic-s1/monotonic-step40/eval")
    assert paths.eval_dir("pretrained", 2) == Path("outputs/eval/pretrained-s2")
    for bad in ("pretrained-stepX", "monotonic_init-step3"):
        with pytest.raises(ValueError, match="unknown arm|never trained"):
            arms.get(bad)


def test_cli_accepts_only_the_frontier_steps_in_params(tmp_path, capsys):
    from pipeline.__main__ import main

    assert main(["assess", "--arm", "pretrained-step7", "--seed", "0"]) == 2     # params.yaml: frontier.steps
    assert "'frontier.steps'" in capsys.readouterr().err
    assert main(["evaluate", "--arm", "ensemble", "--seed", "0"]) == 2
    assert "'--arm'" in capsys.readouterr().err
    assert main(["assess", "--seed", "0"]) == 2                                # neither --arm nor --frontier
    assert main(["assess", "--arm", "baseline-step41", "--seed", "0"]) == 2
    assert "'frontier.recovery_steps'" in capsys.readouterr().err


def test_a_new_arm_joins_its_family_its_checkpoints_and_its_paths_from_the_table_alone(monkeypatch):
    from pipeline import paths
    from pipeline.params import FrontierParams
    from pipeline.stages.aggregate import families

    monkeypatch.setitem(arms.ARMS, "monotonic_long", arms.Arm(
        "monotonic_long", constrained=True, trained=True, start="monotonic_init", family="monotonic",
        description="trained longer"))
    frontier = FrontierParams(steps=[10], recovery_steps=[20])
    assert families(frontier) == {
        "unconstrained": ["pretrained-step10", "pretrained", "baseline-step20", "baseline"],
        "monotonic": ["monotonic_init", "monotonic-step20", "monotonic", "monotonic_long-step20", "monotonic_long"],
        "control": ["monotonic_init", "flipped-step20", "flipped"]}
    assert arms.frontier_key("monotonic_long") == "frontier.recovery_steps"
    assert arms.frontier_key("monotonic_init") is None
    assert paths.eval_dir("monotonic_long-step20", 1) == Path(
        "outputs/recovery/monotonic_long-s1/monotonic_long-step20/eval")
    with pytest.raises(ValueError, match="unknown arm"):
        paths.attack_dir("ensemble-step3", 1)     # a label the table does not know has no place
