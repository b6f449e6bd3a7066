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
    pretrain_step: int | None = None   # a point of the unconstrained reference curve (frontier.steps)

    def model_dir(self, seed: int | None = None) -> Path:
        """The HF checkpoint of this arm for a seed (one directory for every seed if the arm is untrained)."""
        if self.pretrain_step is not None:
            return paths.PRETRAIN_STEPS_DIR / f"step{self.pretrain_step}"
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


STEP_PREFIX = paths.STEP_PREFIX


def at_pretrain_step(step: int) -> Arm:
    """The unconstrained model at a pretraining step: measured like the arms, for the matched-NLL frontier."""
    return Arm(f"{STEP_PREFIX}{step}", constrained=False, trained=False, start=None, pretrain_step=step,
               description=f"the unconstrained model at pretraining step {step}, never recovery-trained")


def get(name: str) -> Arm:
    if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit():
        return at_pretrain_step(int(name[len(STEP_PREFIX):]))
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; arms: {', '.join(ARMS)}, or {STEP_PREFIX}<N> for N in "
                         "frontier.steps")
    return ARMS[name]
