"""Where every stage writes, relative to the repository root; dvc.yaml declares the same paths.
Outputs are namespaced by what produced them (arm, seed) and carry the variant in their metadata,
which consumers check against params, so a changed variant can never reuse stale results."""
from __future__ import annotations

from pathlib import Path

OUT = Path("outputs")
DATA_DIR = OUT / "data"
PRETRAINED_DIR = OUT / "models" / "pretrained"
MONOTONIC_INIT_DIR = OUT / "models" / "monotonic_init"
METRICS_DIR = OUT / "metrics"
REPORT_DIR = OUT / "report"


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def train_dir(arm: str, seed: int) -> Path:
    return OUT / "train" / run_name(arm, seed)


def checkpoint_dir(arm: str, seed: int) -> Path:
    return OUT / "checkpoints" / run_name(arm, seed)


def model_dir(arm: str, seed: int) -> Path:
    """The plain HF checkpoint of an arm (seed-independent for the untrained arms)."""
    if arm == "pretrained":
        return PRETRAINED_DIR
    if arm == "monotonic_init":
        return MONOTONIC_INIT_DIR
    return train_dir(arm, seed) / "model"


def eval_dir(arm: str, seed: int) -> Path:
    return OUT / "eval" / run_name(arm, seed)


def attack_dir(arm: str, seed: int) -> Path:
    return OUT / "attacks" / run_name(arm, seed)


def transfer_dir(seed: int) -> Path:
    return OUT / "transfer" / f"s{seed}"
