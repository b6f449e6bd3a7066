"""SLURM facts shared by the submitter (slurm/submit.py, on a login node without the project's environment)
and preflight: how a stage finds its section of slurm/resources.ini, and how SLURM spells times, memory and
GPUs. Standard library only; both import this one module, so the two can never read a setting differently."""
from __future__ import annotations

import configparser
import re


def in_kind(stage_name: str, kind: str) -> bool:
    """`train` covers train-baseline@0 and train-monotonic@1; `assess` covers assess@... and assess-ref@0-pretrained."""
    base = stage_name.split("@")[0]
    return base == kind or base.startswith(kind + "-")


def resource_section(resources: configparser.ConfigParser, stage_name: str) -> configparser.SectionProxy:
    """The longest section whose kind covers the stage (see in_kind), else [DEFAULT]."""
    kinds = sorted((k for k in resources.sections() if in_kind(stage_name, k)), key=len)
    return resources[kinds[-1]] if kinds else resources[resources.default_section]


def slurm_seconds(slurm_time: str) -> int:
    """SLURM's time formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. A bare number is minutes."""
    days, _, clock = slurm_time.strip().rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) > 3:
        raise ValueError(f"not a SLURM time: {slurm_time!r}")
    minutes_first = [60, 1] if len(parts) < 3 else [3600, 60, 1]
    return sum(unit * value for unit, value in zip(minutes_first, parts))


def slurm_gib(value: str) -> float:
    """sbatch --mem: a number with an optional K/M/G/T unit (default M), in GiB."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", value.strip().upper()).groups()
    return float(number) * {"K": 2 ** -20, "M": 2 ** -10, "G": 1, "T": 1024, "": 2 ** -10}[unit]


def gpu_count(gres: str) -> int:
    """GPUs a --gres value asks for (gpu:2, gpu:a100:1), 0 for none."""
    match = re.search(r"gpu(?::[^:,]+)?:(\d+)", gres or "")
    return int(match.group(1)) if match else 0
