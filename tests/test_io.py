"""pipeline/io.py: a file or a directory appears whole at its final path or not at all, and a failed write
leaves neither a half-written file nor a temporary one behind."""
from __future__ import annotations

import json

import pytest

from pipeline.io import atomic_write_text, read_json, staged_dir, write_csv, write_json


def test_json_round_trips_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "metrics.json"
    write_json(path, {"loss": 2.5, "steps": [1, 2]})
    assert read_json(path) == {"loss": 2.5, "steps": [1, 2]} and path.read_text().endswith("}\n")
    write_json(path, {"loss": 1.0})
    assert read_json(path) == {"loss": 1.0}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"loss": 2.5})
    with pytest.raises(TypeError):
        write_json(path, {"model": object()})            # not JSON: fails before any byte is written
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "x" * 100_000 + "\ud800")   # fails part way through writing
    assert read_json(path) == {"loss": 2.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_csv_has_exactly_the_columns_and_refuses_unknown_keys(tmp_path):
    path = tmp_path / "log.csv"
    write_csv(path, ["step", "loss"], [{"step": 1, "loss": 2.5}, {"step": 2}])
    assert path.read_text() == "step,loss\n1,2.5\n2,\n"
    with pytest.raises(ValueError, match="lr"):
        write_csv(path, ["step", "loss"], [{"step": 3, "loss": 1.0, "lr": 0.1}])
    assert path.read_text() == "step,loss\n1,2.5\n2,\n"
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_staged_directory_replaces_the_old_one_only_when_its_body_succeeds(tmp_path):
    final = tmp_path / "eval"
    with staged_dir(final) as out:
        (out / "old.json").write_text("{}")
    with pytest.raises(RuntimeError, match="crashed"):
        with staged_dir(final) as out:
            (out / "metrics.json").write_text(json.dumps({"half": True}))
            raise RuntimeError("crashed")
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]          # the partial directory is gone
    assert [p.name for p in final.iterdir()] == ["old.json"]         # the earlier output untouched
    (tmp_path / ".eval.partial").mkdir()                              # left by a killed process
    (tmp_path / ".eval.partial" / "stale.json").write_text("{}")
    with staged_dir(final) as out:
        (out / "metrics.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]
    assert [p.name for p in final.iterdir()] == ["metrics.json"]    # whole: nothing of the old or the stale one
