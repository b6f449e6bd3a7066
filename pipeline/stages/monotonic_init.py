"""Stage `monotonic_init`: the pretrained model with the softplus constraint applied, before any
training (how much the constraint itself destroys). Verified, saved with V and the materialized W."""
from __future__ import annotations

import time

from .. import data as D
from ..evaluation import document_nll, perplexity
from .. import arms
from ..device import resolve_precision
from ..io import staged_dir, write_json
from ..loading import load_arm_model
from ..monotonic import apply_monotonic, load_parametrized, save_parametrized
from ..paths import DATA_DIR, METRICS_DIR
from ..provenance import provenance, record_run


def run(params, args) -> int:
    t0 = time.time()
    m = params.monotonic
    model, _ = load_arm_model(params, "pretrained", None)
    report = apply_monotonic(model, m.variant, m.init, m.eps)
    tokenizer = D.load_tokenizer(DATA_DIR / "tokenizer")
    prov = provenance(params, "monotonic_init", seed=None,
                      precision=resolve_precision(params.eval.precision, next(model.parameters()).device))
    spec = {"variant": m.variant, "init": m.init, "eps": m.eps}
    with staged_dir(arms.get("monotonic_init").model_dir()) as out:
        save_parametrized(model, tokenizer, out, m.variant,
                          {"arm": "monotonic_init", **spec, "provenance": prov})
        load_parametrized(out, expected_variant=m.variant)   # re-verify what was written

    validation = D.TokenSplit(DATA_DIR, "validation")
    docs = [validation.document(i) for i in range(len(validation))]
    nll, count = document_nll(model, docs, validation.eos_id, params.eval.context_length, params.eval.stride,
                              params.eval.batch_size, desc="validation", precision=params.eval.precision)
    metrics = {"validation_perplexity": perplexity(nll, count), **spec,
               "verify": {k: v for k, v in report.items() if k != "modules"}, "provenance": prov}
    write_json(METRICS_DIR / "monotonic_init.json", metrics)
    record_run("monotonic_init", prov, model, seconds=round(time.time() - t0, 1))
    print(f"monotonic_init: {report['modules_constrained']} modules constrained ({m.variant}, init {m.init}), "
          f"min W {report['min_weight']:.2e}, validation perplexity {metrics['validation_perplexity']:.1f}")
    return 0
