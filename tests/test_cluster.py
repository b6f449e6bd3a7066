"""The SLURM facts the submitter and preflight share (pipeline/cluster.py): both import the one module, and a
setting means what sbatch makes of it."""
from __future__ import annotations

import configparser
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline.__main__ import main
from pipeline.cluster import gpu_count, resource_section, slurm_gib, slurm_seconds


@pytest.mark.parametrize("value, seconds", [("30", 1800), ("30:15", 1815), ("01:30:00", 5400), ("2-12", 216000),
                                            ("2-12:30", 217800), ("1-02:03:04", 93784), ("90", 5400)])
def test_slurm_time_formats_as_sbatch_reads_them(value, seconds):
    assert slurm_seconds(value) == seconds


def test_memory_and_gpu_requests():
    assert slurm_gib("64G") == 64 and slurm_gib("2048") == 2 and slurm_gib("1T") == 1024
    assert gpu_count("gpu:a100:1") == 1 and gpu_count("gpu:2") == 2 and gpu_count("") == 0


@pytest.mark.parametrize("time", ["90", "90:00", "01:30:00"])
def test_preflight_reads_a_time_limit_in_minutes_as_the_submitter_does(capsys, tmp_path, time):
    """Every spelling of 90 minutes is too short for a cluster assess-ref job (~3.8 h); preflight read "90" and
    "90:00" as 90 hours before the rule had one owner."""
    ini = (REPO / "slurm/resources.ini").read_text() + f"\n[assess-ref]\ntime = {time}\ngres = gpu:a100:1\n"
    (tmp_path / "resources.ini").write_text(ini)
    rc = main(["preflight", "--params", str(REPO / "profiles/cluster.yaml"), "--resources",
               str(tmp_path / "resources.ini")])
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error: ")]
    assert rc == 2 and errors and all(f"[assess-ref] time = {time}: raise time" in e for e in errors)


def test_the_submitter_runs_on_the_standard_library_and_imports_the_shared_rules(tmp_path):
    """slurm/submit.py imports pipeline.cluster, pipeline.io and pipeline.stopping by import (no second copy, no
    loading by path), in a Python that has none of the project's packages."""
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; "
            f"sys.path.insert(0, {str(REPO / 'slurm')!r}); import submit; "
            "from pipeline import cluster; assert submit.resource_section is cluster.resource_section; "
            "assert 'torch' not in sys.modules and 'yaml' not in sys.modules")
    subprocess.run([sys.executable, "-S", "-c", code], check=True, cwd=tmp_path)


def test_a_stage_takes_the_longest_covering_section(tmp_path):
    (tmp_path / "r.ini").write_text("[DEFAULT]\ntime = 1\n[assess]\ntime = 2\n[assess-ref]\ntime = 3\n")
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(tmp_path / "r.ini")
    assert [resource_section(ini, s)["time"] for s in ("assess@baseline-0", "assess-ref@0-pretrained",
                                                       "assess-frontier@0", "data")] == ["2", "3", "2", "1"]


def test_resources_ini_has_a_section_for_every_stage_of_dvc_yaml_and_none_for_a_stage_that_is_gone():
    """dvc.yaml is the stage list: resources.ini, like preflight (tests/test_preflight.py) and the CLI
    (tests/test_pipeline_dvc.py), is checked against it."""
    import yaml

    resources = configparser.ConfigParser(interpolation=None)
    resources.read(REPO / "slurm" / "resources.ini")
    stages = [*yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"], "gather"]
    unsized = [s for s in stages if resource_section(resources, s).name == resources.default_section]
    assert not unsized, f"dvc.yaml stages without a resources.ini section: {unsized}"
    unused = [k for k in resources.sections() if not any(resource_section(resources, s).name == k for s in stages)]
    assert not unused, f"resources.ini sections no dvc.yaml stage uses: {unused}"
