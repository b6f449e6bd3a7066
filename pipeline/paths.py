"""Where every stage writes, relative to the repository root; dvc.yaml declares the same paths.
Outputs are namespaced by what produced them (arm, seed) and carry the variant in their metadata,
which consumers check against params, so a changed variant can never reuse stale results.
An arm's model directory: model_dir."""
from __future__ import annotations

from pathlib import Path

from .arms import Arm, get

OUT = Path("outputs")
DATA_DIR = OUT / "data"
MODELS_DIR = OUT / "models"             # one directory per untrained arm: model_dir
PRETRAIN_STEPS_DIR = MODELS_DIR / "pretrain_steps"   # step<N>/: the frontier's unconstrained checkpoints
METRICS_DIR = OUT / "metrics"
LR_SELECTION = OUT / "lr_select" / "selection.json"   # each trained arm's learning-rate trials and choice
REPORT_DIR = OUT / "report"


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def train_dir(arm: str, seed: int) -> Path:
    """A trained arm's models: model/ and steps/step<N>/ (what the model stages read)."""
    return OUT / "train" / run_name(arm, seed)


def model_dir(arm: Arm | str, seed: int | None = None) -> Path:
    """The HF checkpoint of an arm for a seed (one directory for every seed if the arm is untrained)."""
    arm = get(arm) if isinstance(arm, str) else arm
    if arm.checkpoint_of == "pretrained":
        return PRETRAIN_STEPS_DIR / f"step{arm.step}"
    if not arm.trained:
        return MODELS_DIR / arm.name
    if seed is None:
        raise ValueError(f"arm {arm.name!r} is trained per seed: its model directory needs a seed")
    if arm.checkpoint_of is not None:
        return train_dir(arm.checkpoint_of, seed) / "steps" / f"step{arm.step}"
    return train_dir(arm.name, seed) / "model"


def train_log_dir(arm: str, seed: int) -> Path:
    """A trained arm's metrics.json, log.csv and val_log.csv: apart from its models, so that aggregate, which
    reads these, depends on kilobytes rather than on every model (a job workspace checks out what it depends on)."""
    return OUT / "train_logs" / run_name(arm, seed)


def checkpoint_dir(arm: str, seed: int) -> Path:
    return OUT / "checkpoints" / run_name(arm, seed)


FRONTIER_DIR = OUT / "frontier"
RECOVERY_DIR = OUT / "recovery"


def frontier_dir(seed: int) -> Path:
    """Everything measured on the pretraining checkpoints with one seed (one DVC output per seed)."""
    return FRONTIER_DIR / f"s{seed}"


def recovery_dir(arm: str, seed: int) -> Path:
    """Everything measured on a trained arm's recovery checkpoints (<arm>-step<N>) of one seed."""
    return RECOVERY_DIR / run_name(arm, seed)


def _measured(kind: str, label: str, seed: int) -> Path:
    arm = get(label)
    if arm.checkpoint_of is None:
        return OUT / kind / run_name(label, seed)
    # a checkpoint of a trained arm is along its recovery; of an untrained one, along pretraining
    return (recovery_dir(arm.checkpoint_of, seed) if arm.trained else frontier_dir(seed)) / label / kind


def eval_dir(arm: str, seed: int) -> Path:
    return _measured("eval", arm, seed)


def attack_dir(arm: str, seed: int) -> Path:
    return _measured("attacks", arm, seed)


def benchmark_dir(label: str) -> Path:
    """label: run_name(arm, seed) for a trained arm; the arm's name for an untrained one (its model and so its
    zero-shot scores are the same for every seed)."""
    return OUT / "benchmarks" / label


def transfer_dir(seed: int) -> Path:
    return OUT / "transfer" / f"s{seed}"
