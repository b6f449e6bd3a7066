"""Non-negative feed-forward weights through W = softplus(V) (torch.nn.utils.parametrize).

Monotone only per linear map: GELU and SiLU are not monotone functions, so a "monotonic" GPT-NeoX
or Llama is not a globally monotone function of its input. Outputs say so (MONOTONICITY_SCOPE).

Init modes, from a pretrained W:
  abs         V = softplus^-1(|W| + eps): every negative weight has its sign flipped (the reference).
  clamp       V = softplus^-1(max(W, eps)): positive weights kept, negative ones set to eps.
  equivalent  the same function with every constrained weight >= eps (GPT-NeoX only; equivalent_shift).

A parametrized model is stored as a normal HF directory whose model.safetensors holds the
materialized W (so AutoModelForCausalLM loads it with identical logits) plus
monotonic_state.safetensors holding V and monotonic.json naming the variant. load_parametrized
rebuilds the parametrization before loading V, so V can never be silently re-initialised.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .models import MONOTONIC_SPEC_FILE, load_causal_lm, save_causal_lm
from .params import INIT_MODES, MONOTONICITY_SCOPE, VARIANT_MODULES

STATE_FILE = "monotonic_state.safetensors"
PARAM_SUFFIX = ".parametrizations.weight.original"


class MonotonicityError(RuntimeError):
    pass


class Softplus(nn.Module):
    """W = softplus(V); right_inverse maps a strictly positive W back to V."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.softplus(v)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if not bool((w > 0).all()):
            raise MonotonicityError(f"softplus^-1 needs W > 0: apply an init mode ({' or '.join(INIT_MODES)}) first")
        w64 = w.double()
        return (w64 + torch.log(-torch.expm1(-w64))).to(w.dtype)


def initial_weight(w: torch.Tensor, init: str, eps: float) -> torch.Tensor:
    if init == "abs":
        return w.abs() + eps
    if init == "clamp":
        return w.clamp_min(eps)
    raise ValueError(f"unknown init mode {init!r}; allowed: {', '.join(INIT_MODES)}")


def _fold_norm(norm: nn.LayerNorm, linear: nn.Linear) -> None:
    """linear(norm(x)) unchanged with the norm's gain and bias moved into the linear map (gain 1, bias 0)."""
    if linear.bias is None or norm.bias is None:
        raise MonotonicityError("the equivalent init folds the LayerNorm bias into the linear bias: both needed")
    w = linear.weight.double()
    linear.bias.copy_(linear.bias.double() + w @ norm.bias.double())
    linear.weight.copy_(w * norm.weight.double())
    norm.weight.fill_(1.0)
    norm.bias.zero_()


def _shift(weight: torch.Tensor, eps: float, dim: int) -> None:
    """weight + the least constant along `dim` that lifts every entry to >= eps (a row or column offset)."""
    w = weight.double()
    weight.copy_(w + (eps - w).amax(dim=dim, keepdim=True).clamp_min(0.0))


def equivalent_shift(model, variant: str, eps: float) -> None:
    """Make every weight the variant constrains >= eps without changing the function (in place, GPT-NeoX).
    The MLP's input map reads LayerNorm(x), whose normalized part sums to zero over features: with the
    LN's gain and bias folded into it (gain 1, bias 0; the norm feeds only the MLP), adding a constant to a
    row adds that constant times sum(normalized x) = 0. The output maps (MLP out, attention out) write to
    the residual stream: a constant per column adds a multiple of the all-ones vector, which every reader
    of the stream (a LayerNorm) subtracts as part of the mean. No 1/gain anywhere, so a small or zero gain
    costs nothing; what rounding leaves is measured by equivalence_error. RMSNorm subtracts no mean: there
    no such conversion exists (the constraint binds), and this refuses."""
    if variant.startswith("gated") or getattr(model.config, "model_type", None) != "gpt_neox":
        raise MonotonicityError(f"init 'equivalent' needs a LayerNorm GPT-NeoX model and one of its variants "
                                f"(mlp_in, mlp_both, mlp_in_attn_out); got {type(model).__name__} with {variant!r}: "
                                "RMSNorm does not subtract the mean, so no function-preserving shift exists")
    suffixes = VARIANT_MODULES[variant]
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            _fold_norm(layer.post_attention_layernorm, layer.mlp.dense_h_to_4h)
            _shift(layer.mlp.dense_h_to_4h.weight, eps, dim=1)
            for name in ("mlp.dense_4h_to_h", "attention.dense"):
                if name in suffixes:
                    _shift(layer.get_submodule(name).weight, eps, dim=0)


def equivalence_error(original, converted, ids: torch.Tensor) -> dict:
    """Max |logit difference| between two models on `ids`: in fp32, and under bf16 autocast against the
    original under the same autocast (on the ids' device; with bf16's own error on the original beside it, the floor)."""
    def logits(model, bf16: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=ids).logits.float()

    fp32, bf16 = logits(original, False), logits(original, True)
    return {"max_abs_logit_diff_fp32": float((logits(converted, False) - fp32).abs().max()),
            "max_abs_logit_diff_bf16": float((logits(converted, True) - bf16).abs().max()),
            "bf16_floor_max_abs_logit_diff": float((bf16 - fp32).abs().max()),
            "logit_scale_max_abs": float(fp32.abs().max()), "tokens": int(ids.numel())}


def nonnegative_share(model, variant: str) -> float:
    """The share of the variant's weights that are >= 0 (1.0 for a constrained model)."""
    with torch.no_grad():
        weights = [m.weight for _, m in constrained_modules(model, variant)]
        return sum(int((w >= 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _layer_count(model) -> int:
    return model.config.num_hidden_layers


def constrained_modules(model, variant: str) -> list[tuple[str, nn.Linear]]:
    """The linear modules a variant constrains; fails if the count differs from layers x suffixes."""
    if variant not in VARIANT_MODULES:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANT_MODULES)}")
    suffixes = VARIANT_MODULES[variant]
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.endswith(suffixes)]
    expected = _layer_count(model) * len(suffixes)
    if len(found) != expected:
        raise MonotonicityError(f"variant {variant!r} matched {len(found)} modules, expected {expected} "
                                f"({_layer_count(model)} layers x {suffixes}) in {type(model).__name__}")
    return found


def apply_monotonic(model, variant: str, init: str, eps: float) -> dict:
    """Constrain a model in place; returns the verification report."""
    if is_parametrized(model):
        raise MonotonicityError("model is already parametrized: a second softplus would stack on the first")
    if init == "equivalent":
        equivalent_shift(model, variant, eps)
    for _, module in constrained_modules(model, variant):
        if init != "equivalent":
            with torch.no_grad():
                module.weight.copy_(initial_weight(module.weight.detach(), init, eps))
        parametrize.register_parametrization(module, "weight", Softplus())
    return verify(model, variant)


def is_parametrized(model) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def verify(model, variant: str) -> dict:
    """Every constrained module's materialized weight >= 0 and the expected module count.
    Works on parametrized models and on exported plain ones. Raises MonotonicityError."""
    modules = constrained_modules(model, variant)
    rows = []
    with torch.no_grad():
        for name, module in modules:
            w = module.weight
            rows.append({"module": name, "shape": list(w.shape), "min_weight": float(w.min()),
                         "parametrized": parametrize.is_parametrized(module, "weight"),
                         "finite": bool(torch.isfinite(w).all())})
    bad = [r["module"] for r in rows if r["min_weight"] < 0 or not r["finite"]]
    expected = _layer_count(model) * len(VARIANT_MODULES[variant])   # constrained_modules enforced it
    report = {"variant": variant, "modules_constrained": len(rows), "modules_expected": expected,
              "min_weight": min(r["min_weight"] for r in rows), "scope": MONOTONICITY_SCOPE,
              "ok": not bad, "modules": rows}
    if bad:
        raise MonotonicityError(f"negative or non-finite weights in {len(bad)} constrained modules: {bad[:4]}")
    return report


def constrained_parameters(model) -> list[nn.Parameter]:
    """The V tensors (parametrization originals) of a parametrized model."""
    return [p for name, p in model.named_parameters() if name.endswith(PARAM_SUFFIX)]


# --- save / load / export -------------------------------------------------------------------------

def materialized_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict with every parametrization replaced by its materialized weight W = softplus(V)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith(PARAM_SUFFIX):
            module = model.get_submodule(key[: -len(PARAM_SUFFIX)])
            out[key[: -len(PARAM_SUFFIX)] + ".weight"] = module.weight.detach().clone()
        else:
            out[key] = value
    return out


def export_plain(model):
    """A plain (unparametrized) copy of a parametrized model with identical forward output,
    rebuilt from the config and the materialized state dict (deepcopy + remove_parametrizations
    would corrupt the original's shared parametrized class)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(materialized_state_dict(model), strict=True)
    return plain.eval() if not model.training else plain


def save_parametrized(model, tokenizer, path: str | Path, variant: str, meta: dict) -> None:
    """Plain HF export (materialized W) + V in monotonic_state.safetensors + monotonic.json."""
    from safetensors.torch import save_file

    path = Path(path)
    save_causal_lm(export_plain(model), tokenizer, path, meta)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.endswith(PARAM_SUFFIX)}
    save_file(state, str(path / STATE_FILE))
    (path / MONOTONIC_SPEC_FILE).write_text(json.dumps({"variant": variant, "scope": MONOTONICITY_SCOPE}, indent=2))


def load_parametrized(path: str | Path, expected_variant: str | None = None, dtype=torch.float32):
    """Rebuild the parametrization, then load V exactly. Refuses a directory without V, a variant
    other than the one expected, or any missing/unexpected key."""
    from safetensors.torch import load_file

    path = Path(path)
    spec_file = path / MONOTONIC_SPEC_FILE
    if not spec_file.exists() or not (path / STATE_FILE).exists():
        raise MonotonicityError(f"{path} is not a parametrized monotonic checkpoint "
                                f"(needs {MONOTONIC_SPEC_FILE} and {STATE_FILE})")
    variant = json.loads(spec_file.read_text())["variant"]
    if expected_variant is not None and variant != expected_variant:
        raise MonotonicityError(f"{path} was constrained with variant {variant!r}, params ask for "
                                f"{expected_variant!r}: rerun monotonic_init")
    model = load_causal_lm(path, dtype=dtype)
    saved_w = {}
    for name, module in constrained_modules(model, variant):
        saved_w[name] = module.weight.detach().clone()
        with torch.no_grad():
            module.weight.fill_(1.0)   # any positive W: right_inverse runs on registration
        parametrize.register_parametrization(module, "weight", Softplus())
    v_state = load_file(str(path / STATE_FILE))
    expected = {k for k in model.state_dict() if k.endswith(PARAM_SUFFIX)}
    if set(v_state) != expected:
        raise MonotonicityError(f"{path}/{STATE_FILE}: keys differ from the variant's parametrizations "
                                f"(missing {sorted(expected - set(v_state))[:3]}, "
                                f"unexpected {sorted(set(v_state) - expected)[:3]})")
    with torch.no_grad():
        for key, value in v_state.items():
            model.get_parameter(key).copy_(value.to(dtype))
        # both copies must agree, or the plain and parametrized loads would be different models
        stale = [name for name, w in saved_w.items()
                 if not torch.allclose(model.get_submodule(name).weight, w, rtol=1e-5, atol=1e-7)]
    if stale:
        raise MonotonicityError(f"{path}: model.safetensors W differs from softplus(V) of {STATE_FILE} in "
                                f"{len(stale)} modules ({stale[:3]}): the two files come from different models")
    verify(model, variant)
    return model, variant


def verify_dir(model_dir: str, variant: str) -> int:
    """Verify the materialized weights (model.safetensors) of any saved model and, for a parametrized
    checkpoint, also its V (load_parametrized checks the recorded variant and that W = softplus(V))."""
    try:
        report = verify(load_causal_lm(model_dir), variant)
        if (Path(model_dir) / STATE_FILE).exists():
            load_parametrized(model_dir, expected_variant=variant)
            report["parametrized_state_checked"] = True
    except (MonotonicityError, ValueError, OSError) as exc:
        print(f"FAILED: {model_dir}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0
