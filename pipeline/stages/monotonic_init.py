"""Stage `monotonic_init`: the pretrained model with the softplus constraint applied, before any
training (how much the constraint itself destroys). Verified, saved with V and the materialized W.
Beside it, measured and not saved: the pretrained model's validation perplexity and the function-preserving
conversion (init `equivalent`, GPT-NeoX only): how far its logits and perplexity are from the pretrained
model's, which is what the constraint costs in what the model can represent (nothing, for LayerNorm)."""
from __future__ import annotations

import copy
import time

import torch

from .. import data
from ..device import resolve_precision
from ..evaluation import document_nll, perplexity
from ..io import staged_dir, write_json
from ..loading import load_arm_model
from ..monotonic import (MonotonicityError, apply_monotonic, equivalence_error, export_plain, load_parametrized,
                         save_parametrized)
from ..paths import DATA_DIR, METRICS_DIR, model_dir
from ..provenance import provenance, record_run

EQUIVALENCE_WINDOWS = 8     # validation windows of eval.context_length tokens for the logit comparison


def validation_perplexity(model, params, validation: data.TokenSplit) -> float:
    docs = [validation.document(i) for i in range(len(validation))]
    nll, count = document_nll(model, docs, validation.eos_id, params.eval.context_length, params.eval.stride,
                              params.eval.batch_size, desc="validation", precision=params.eval.precision)
    return perplexity(nll, count)


def equivalence(params, pretrained, validation: data.TokenSplit) -> dict:
    """The `equivalent` conversion of the pretrained model against the model itself (or why none exists)."""
    m = params.monotonic
    converted = copy.deepcopy(pretrained)
    try:
        report = apply_monotonic(converted, m.variant, "equivalent", m.eps)
    except MonotonicityError as exc:
        return {"exists": False, "reason": str(exc)}
    plain = export_plain(converted).eval()
    n = params.eval.context_length
    tokens = torch.from_numpy(validation.tokens[: EQUIVALENCE_WINDOWS * n].astype("int64"))
    ids = tokens[: len(tokens) // n * n].view(-1, n).to(next(plain.parameters()).device)
    return {"exists": True, "min_weight": report["min_weight"], **equivalence_error(pretrained, plain, ids),
            "validation_perplexity": validation_perplexity(plain, params, validation)}


def run(params, args) -> int:
    t0 = time.time()
    m = params.monotonic
    pretrained, _ = load_arm_model(params, "pretrained", None)
    model = copy.deepcopy(pretrained)
    report = apply_monotonic(model, m.variant, m.init, m.eps)
    tokenizer = data.load_tokenizer(DATA_DIR / "tokenizer")
    prov = provenance(params, "monotonic_init", seed=None,
                      precision=resolve_precision(params.eval.precision, next(model.parameters()).device))
    spec = {"variant": m.variant, "init": m.init, "eps": m.eps}
    with staged_dir(model_dir("monotonic_init")) as out:
        save_parametrized(model, tokenizer, out, m.variant,
                          {"arm": "monotonic_init", **spec, "provenance": prov})
        load_parametrized(out, expected_variant=m.variant)   # re-verify what was written

    validation = data.TokenSplit(DATA_DIR, "validation")
    metrics = {"validation_perplexity": validation_perplexity(model, params, validation),
               "pretrained_validation_perplexity": validation_perplexity(pretrained, params, validation), **spec,
               "equivalent": equivalence(params, pretrained, validation),
               "verify": {k: v for k, v in report.items() if k != "modules"}, "provenance": prov}
    write_json(METRICS_DIR / "monotonic_init.json", metrics)
    record_run("monotonic_init", prov, model, seconds=round(time.time() - t0, 1))
    eq = metrics["equivalent"]
    print(f"monotonic_init: {report['modules_constrained']} modules constrained ({m.variant}, init {m.init}), "
          f"min W {report['min_weight']:.2e}, validation perplexity {metrics['validation_perplexity']:.1f} "
          f"(pretrained {metrics['pretrained_validation_perplexity']:.2f}; the equivalent conversion "
          + (f"{eq['validation_perplexity']:.2f}, max |logit diff| {eq['max_abs_logit_diff_fp32']:.1e} in fp32)"
             if eq["exists"] else "does not exist)"))
    return 0
