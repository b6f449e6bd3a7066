"""`python -m pipeline`: every stage listed with its one-line help; check-params; argument errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline import params as P
from pipeline.__main__ import STAGES, build_parser, main

HELPERS = ("check-params", "preflight", "profile", "verify")


def cli(*argv: str, cwd=REPO, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_every_stage_on_one_line():
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, (_, help_text, _) in STAGES.items():
        matching = [line for line in lines if line.split()[:1] == [name]]
        assert len(matching) == 1, name
        assert matching[0].split(None, 1)[1] == help_text, name   # the whole help, not wrapped
    for name in HELPERS:
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "python -m pipeline profile cluster" in result.stdout


def test_stage_order_and_arguments():
    assert list(STAGES) == ["data", "pretrain", "monotonic_init", "select_lr", "train", "evaluate", "uat", "hotflip",
                            "controls", "targeted", "assess", "benchmarks", "transfer", "aggregate"]
    parser = build_parser()
    args = parser.parse_args(["train", "--arm", "monotonic", "--seed", "3"])
    assert (args.command, args.arm, args.seed, args.params) == ("train", "monotonic", 3, "params.yaml")
    assert parser.parse_args(["transfer", "--seed", "1"]).seed == 1
    assert parser.parse_args(["assess", "--arm", "pretrained", "monotonic_init", "--seed", "0"]).arm == [
        "pretrained", "monotonic_init"]
    assert parser.parse_args(["verify", "d", "--variant", "gated_all"]).variant == "gated_all"
    with pytest.raises(SystemExit):     # only the trained arms are trained
        parser.parse_args(["train", "--arm", "pretrained", "--seed", "0"])


@pytest.mark.parametrize("argv", [[], ["fly"], ["train", "--arm", "baseline"], ["train", "--seed", "0"],
                                  ["train", "--arm", "ensemble", "--seed", "0"], ["transfer"],
                                  ["verify", "d", "--variant", "mlp_out"]],
                         ids=["none", "unknown-stage", "no-seed", "no-arm", "unknown-arm", "transfer-no-seed",
                              "unknown-variant"])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_check_params(tmp_path, capsys):
    from pipeline import refs

    for path in [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]:
        if refs.requested(P.load(path)):      # hub refs, with no commits in this checkout's refs.lock.yaml
            assert main(["check-params", "--params", str(path)]) == 2
            assert f"{path} is valid, but refs.lock.yaml has no commit for" in capsys.readouterr().err
            continue
        assert main(["check-params", "--params", str(path)]) == 0
        out = capsys.readouterr().out
        assert "valid" in out and P.load(path).hash() in out

    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("  trigger_length: 4", "  trigger_length: 0"))
    assert main(["check-params", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'attack.uat.trigger_length'" in err and ": 0;" in err and "a number >= 1" in err


def test_check_params_subprocess_reads_params_from_cwd(tmp_path):
    (tmp_path / "params.yaml").write_bytes((REPO / "profiles" / "smoke.yaml").read_bytes())
    result = cli("check-params", cwd=tmp_path)
    assert result.returncode == 0 and "profile smoke" in result.stdout
    (tmp_path / "params.yaml").unlink()
    result = cli("check-params", cwd=tmp_path)
    assert result.returncode == 2 and "params.yaml" in result.stderr and "Traceback" not in result.stderr
