"""Equal tuning effort instead of equal learning rate. Under W = softplus(V) an Adam step on V moves W by about
lr x sigmoid(V) ~ lr x W, far slower than the same lr moves an unconstrained W, so one shared lr is not one
budget. Every trained arm therefore tries the same number of learning rates for the same short budget and
keeps the one with the lowest validation loss: an unconstrained arm multiplies its train.lr, the constrained
arm sets its train.constrained_lr_multiplier (the lr of V relative to train.lr). Torch-free: the stage runs
the trials."""
from __future__ import annotations

import dataclasses
import math

from .arms import Arm
from .params import Params, TrainParams


def knob(arm: Arm) -> str:
    """The train key an arm's grid moves."""
    return "constrained_lr_multiplier" if arm.constrained else "lr"


def grid(params: Params, arm: Arm) -> list[float]:
    """The multipliers an arm tries: the same count for every arm (checked by params)."""
    ls = params.lr_select
    return [float(m) for m in (ls.constrained_multipliers if arm.constrained else ls.multipliers)]


def with_multiplier(tp: TrainParams, arm: Arm, multiplier: float) -> TrainParams:
    """The arm's training at one grid point: train.lr x multiplier, or constrained_lr_multiplier = multiplier."""
    if arm.constrained:
        return dataclasses.replace(tp, constrained_lr_multiplier=multiplier)
    return dataclasses.replace(tp, lr=tp.lr * multiplier)


def trial(params: Params, arm: Arm, multiplier: float) -> TrainParams:
    """One trial: the arm's training, `lr_select.steps` long (the schedule compressed to it), validated once at
    its end, without checkpoints or stops."""
    steps = params.lr_select.steps
    return dataclasses.replace(with_multiplier(params.train_for_arm(arm.name), arm, multiplier), max_steps=steps,
                               eval_interval=steps, checkpoint_interval=steps, keep_checkpoints=1,
                               max_steps_per_run=0, wall_clock_limit_s=0)


def select(losses: list[float]) -> int:
    """The index of the lowest validation loss; a tie goes to the earlier grid point and a non-finite loss
    (a diverged trial) never wins, unless every trial diverged (then the first)."""
    if not losses:
        raise ValueError("no trials to select from")
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    return min(finite, key=lambda i: (losses[i], i)) if finite else 0


def selected(params: Params, arm: Arm, selection: dict) -> TrainParams:
    """The arm's full training at its selected multiplier (selection: select_lr's record for this arm)."""
    if selection["knob"] != knob(arm) or selection["multipliers"] != grid(params, arm):
        raise ValueError(f"lr selection for {arm.name} tried {selection['knob']} x {selection['multipliers']}, "
                         f"params ask for {knob(arm)} x {grid(params, arm)}: rerun select_lr")
    return with_multiplier(params.train_for_arm(arm.name), arm, selection["selected"])
