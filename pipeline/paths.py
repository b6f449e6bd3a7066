"""Where every stage writes, relative to the repository root; dvc.yaml declares the same paths.
Outputs are namespaced by what produced them (arm, seed) and carry the variant in their metadata,
which consumers check against params, so a changed variant can never reuse stale results.
Which directory holds an arm's model is pipeline/arms.py's (Arm.model_dir)."""
from __future__ import annotations

from pathlib import Path

OUT = Path("outputs")
DATA_DIR = OUT / "data"
MODELS_DIR = OUT / "models"             # one directory per untrained arm: pipeline.arms.Arm.model_dir
METRICS_DIR = OUT / "metrics"
REPORT_DIR = OUT / "report"


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def train_dir(arm: str, seed: int) -> Path:
    return OUT / "train" / run_name(arm, seed)


def checkpoint_dir(arm: str, seed: int) -> Path:
    return OUT / "checkpoints" / run_name(arm, seed)


def eval_dir(arm: str, seed: int) -> Path:
    return OUT / "eval" / run_name(arm, seed)


def attack_dir(arm: str, seed: int) -> Path:
    return OUT / "attacks" / run_name(arm, seed)


def benchmark_dir(label: str) -> Path:
    """label: run_name(arm, seed) for a trained arm; the arm's name for an untrained one (its model and so its
    zero-shot scores are the same for every seed)."""
    return OUT / "benchmarks" / label


def transfer_dir(seed: int) -> Path:
    return OUT / "transfer" / f"s{seed}"
