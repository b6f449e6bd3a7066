"""The one table of arms: whether each arm is constrained (softplus W) and whether it is trained, and which arm
it starts from (where its model lives: pipeline/paths.py, model_dir). Paths, training, evaluation, attacks, the
CLI and the report read it; nothing else encodes what an arm is. Torch-free at import (the report and aggregate use it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    name: str
    constrained: bool          # the variant's linear maps are W = softplus(V)
    trained: bool              # recovery-trained per seed (else one model serves every seed)
    start: str | None          # the arm whose model this one is made from
    family: str                # the curve it belongs to: unconstrained (the reference), monotonic, or control
    description: str
    checkpoint_of: str | None = None    # a checkpoint of this arm's training (pretraining for pretrained) ...
    step: int | None = None             # ... at this step: a point of the matched-NLL frontier


ARM_TABLE = (
    Arm("pretrained", constrained=False, trained=False, start=None, family="unconstrained",
        description="the starting model, never trained"),
    Arm("baseline", constrained=False, trained=True, start="pretrained", family="unconstrained",
        description="the pretrained model, recovery-trained on the train split"),
    Arm("monotonic_init", constrained=True, trained=False, start="pretrained", family="monotonic",
        description="the pretrained model with the constraint applied, before any training"),
    Arm("monotonic", constrained=True, trained=True, start="monotonic_init", family="monotonic",
        description="monotonic_init, recovery-trained exactly like baseline"),
    Arm("flipped", constrained=False, trained=True, start="monotonic_init", family="control",
        description="monotonic_init's materialized weights (the same damage), recovery-trained exactly like "
                    "monotonic but without the constraint: the damage-matched control"),
)
ARMS = {arm.name: arm for arm in ARM_TABLE}
ARM_NAMES = tuple(ARMS)
TRAINED_ARMS = tuple(a.name for a in ARM_TABLE if a.trained)


def frontier_key(name: str) -> str | None:
    """The params key listing the steps of an arm's checkpoints along training: frontier.steps (pretraining, of
    pretrained), frontier.recovery_steps (a trained arm); None for an arm never trained."""
    if name == "pretrained":
        return "frontier.steps"
    return "frontier.recovery_steps" if ARMS[name].trained else None


def at_step(name: str, step: int) -> Arm:
    """A checkpoint from along an arm's training: pretraining (pretrained) or recovery (a trained arm)."""
    arm = ARMS[name]
    if frontier_key(name) is None:
        raise ValueError(f"arm {name!r} is never trained: it has no checkpoints along training")
    what = "pretraining" if name == "pretrained" else "recovery training"
    return Arm(f"{name}-step{step}", arm.constrained, arm.trained, arm.start, arm.family, checkpoint_of=name,
               step=step, description=f"{name} as it was at step {step} of {what}")


def checkpoints_of(name: str, frontier) -> list[str]:
    """The frontier's checkpoints of an arm (params.frontier, frontier_key): none of an untrained arm."""
    key = frontier_key(name)
    return [at_step(name, step).name for step in (getattr(frontier, key.split(".")[1]) if key else [])]


def frontier_checkpoints(frontier) -> list[str]:
    """Every arm's checkpoints along training (checkpoints_of), arm by arm."""
    return [label for arm in ARM_NAMES for label in checkpoints_of(arm, frontier)]


def get(name: str) -> Arm:
    base, _, step = name.rpartition("-step")
    if base in ARMS and step.isdigit():
        return at_step(base, int(step))
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; arms: {', '.join(ARMS)}, or <arm>-step<N> for a checkpoint in "
                         "frontier.steps (pretrained) or frontier.recovery_steps (trained arms)")
    return ARMS[name]
