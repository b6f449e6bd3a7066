"""Loading an arm's saved model by the arm table (pipeline/arms.py): checked against params, verified,
and placed on the device policy's device."""
from __future__ import annotations

from . import arms, device
from .paths import model_dir as model_dir_of
from .models import load_causal_lm, read_meta
from .monotonic import constrained_parameters, load_parametrized, verify


def load_arm_model(params, name: str, seed: int | None, parametrized: bool = False, scoring: bool = False):
    """An arm's saved model and its pipeline meta. Constrained arms: the checkpoint's variant must equal
    params.monotonic.variant and every constrained weight must be non-negative; parametrized=True rebuilds
    W = softplus(V) with V trainable (the trainer's start), else the plain materialized model (evaluation).
    scoring=True: a frozen model for evaluation and attacks, held in eval.precision (device.for_scoring).
    Returns (model, meta)."""
    arm = arms.get(name)
    model_dir = model_dir_of(arm, seed)
    if not model_dir.exists():
        raise FileNotFoundError(f"no model for arm {name!r} seed {seed} at {model_dir}: run its stage first")
    meta = read_meta(model_dir)
    if meta.get("arm", name) != name:
        raise ValueError(f"{model_dir} holds arm {meta['arm']!r}, expected {name!r}")
    variant = params.monotonic.variant
    if arm.constrained and meta.get("variant") != variant:
        raise ValueError(f"{model_dir} was constrained with variant {meta.get('variant')!r}; params ask for "
                         f"monotonic.variant {variant!r}: rerun monotonic_init/train")
    if arm.constrained and parametrized:
        model, _ = load_parametrized(model_dir, expected_variant=variant)
        return device.place(model), meta
    model = load_causal_lm(model_dir)
    if arm.constrained:
        verify(model, variant)
    model = device.place(model)
    return (device.for_scoring(model, params.eval.precision) if scoring else model), meta


def load_start_model(params, arm: arms.Arm, seed: int):
    """The arm's starting point: (model, its trainable V tensors if constrained, source dir). An unconstrained
    arm made from a constrained one starts from its materialized W as plain weights."""
    start = arms.get(arm.start)
    model, _ = load_arm_model(params, start.name, seed, parametrized=arm.constrained)
    constrained = constrained_parameters(model) if arm.constrained else []
    if arm.constrained and not constrained:
        raise RuntimeError(f"{model_dir_of(start, seed)}: no softplus-parametrized tensors to train")
    return model, constrained, model_dir_of(start, seed)
