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
