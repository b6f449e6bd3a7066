"""The one table of arms: where each arm's model lives, whether it is constrained (softplus W) and whether
it is trained, and which arm it starts from. Paths, training, evaluation, attacks, the CLI and the report
read it; nothing else encodes what an arm is. Torch-free at import (the report and aggregate use it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import paths


@dataclass(frozen=True)
class Arm:
    name: str
    constrained: bool          # the variant's linear maps are W = softplus(V)
    trained: bool              # recovery-trained per seed (else one model serves every seed)
    start: str | None          # the arm whose model this one is made from
    description: str

    def model_dir(self, seed: int | None = None) -> Path:
        """The HF checkpoint of this arm for a seed (one directory for every seed if the arm is untrained)."""
        if not self.trained:
            return paths.MODELS_DIR / self.name
        if seed is None:
            raise ValueError(f"arm {self.name!r} is trained per seed: its model directory needs a seed")
        return paths.train_dir(self.name, seed) / "model"


ARM_TABLE = (
    Arm("pretrained", constrained=False, trained=False, start=None,
        description="the starting model, never trained"),
    Arm("baseline", constrained=False, trained=True, start="pretrained",
        description="the pretrained model, recovery-trained on the train split"),
    Arm("monotonic_init", constrained=True, trained=False, start="pretrained",
        description="the pretrained model with the constraint applied, before any training"),
    Arm("monotonic", constrained=True, trained=True, start="monotonic_init",
        description="monotonic_init, recovery-trained exactly like baseline"),
)
ARMS = {arm.name: arm for arm in ARM_TABLE}
ARM_NAMES = tuple(ARMS)
TRAINED_ARMS = tuple(a.name for a in ARM_TABLE if a.trained)


def get(name: str) -> Arm:
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; arms: {', '.join(ARMS)}")
    return ARMS[name]
