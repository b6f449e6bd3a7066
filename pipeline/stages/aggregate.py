"""Stage `aggregate`: every arm x seed x metric into results.json, multi-seed estimates with bootstrap
CIs, paired per-example tests between arms, a Markdown report computed from the numbers, PNG plots."""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np

from .. import paths, report
from ..arms import ARM_NAMES as ARMS
from ..arms import TRAINED_ARMS
from ..io import atomic_write_text, read_json, staged_dir, write_json
from ..provenance import provenance, record_run
from ..stats import hierarchical_bootstrap, paired_comparison

ATTACKS = ("uat", "hotflip")
CONTROLS = ("random", "greedy")
COMPARISONS = (("monotonic", "baseline"), ("monotonic_init", "pretrained"), ("baseline", "pretrained"),
               ("monotonic", "pretrained"))


def _require(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"aggregate needs {path}: run its stage first (dvc repro)")
    return read_json(path)


def _read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def _examples(result: dict, field: str, ids: list[str] | None = None) -> np.ndarray:
    rows = result["examples"]
    if ids is not None and [r["id"] for r in rows] != ids:
        raise ValueError("attack examples are not aligned across arms/seeds (different example ids)")
    return np.array([float(r[field]) for r in rows])


def load_runs(params) -> dict:
    """runs[arm][seed] = {"eval", "per_doc", "uat", "hotflip", "controls", "train"?}; transfer[seed]."""
    runs = {arm: {} for arm in ARMS}
    for seed in params.seeds:
        for arm in ARMS:
            attack_dir = paths.attack_dir(arm, seed)
            run = {"eval": _require(paths.eval_dir(arm, seed) / "metrics.json"),
                   "per_doc": _require(paths.eval_dir(arm, seed) / "per_doc.json"),
                   **{name: _require(attack_dir / f"{name}.json") for name in (*ATTACKS, "controls")}}
            if arm in TRAINED_ARMS:
                tdir = paths.train_dir(arm, seed)
                run["train"] = _require(tdir / "metrics.json")
                run["train_log"] = _read_csv(tdir / "log.csv")
                run["val_log"] = _read_csv(tdir / "val_log.csv")
            runs[arm][seed] = run
    transfer = {seed: _require(paths.transfer_dir(seed) / "transfer.json") for seed in params.seeds}
    return {"runs": runs, "transfer": transfer}


def summarize(params, loaded: dict) -> dict:
    agg = params.aggregate
    rng = np.random.default_rng(agg.seed)
    runs, seeds = loaded["runs"], params.seeds
    boot = dict(n_boot=agg.bootstrap_samples, confidence=agg.confidence, rng=rng)

    doc_ids = {seed: runs["pretrained"][seed]["per_doc"]["doc_ids"] for seed in seeds}
    example_ids = {(a, seed): [r["id"] for r in runs["pretrained"][seed][a]["examples"]] for a in ATTACKS
                   for seed in seeds}

    def doc_nll(arm):   # per-document (nll sum, tokens), aligned on the test split's documents
        out = []
        for seed in seeds:
            pd = runs[arm][seed]["per_doc"]
            if pd["doc_ids"] != doc_ids[seed]:
                raise ValueError(f"per-document NLL of {arm} seed {seed} is not aligned with the test split")
            out.append((np.asarray(pd["nll"], float), np.asarray(pd["tokens"], float)))
        return out

    def attack_field(arm, attack, field, control=None):
        res = []
        for seed in seeds:
            r = runs[arm][seed][attack] if control is None else runs[arm][seed]["controls"][control][attack]
            res.append(_examples(r, field, example_ids[(attack, seed)]))
        return res

    arms = {}
    for arm in ARMS:
        nll = doc_nll(arm)
        nll_est = hierarchical_bootstrap([n for n, _ in nll], weights=[t for _, t in nll], **boot)
        entry = {
            "perplexity": {"mean": math.exp(nll_est.mean), "low": math.exp(nll_est.low),
                           "high": math.exp(nll_est.high), "n_seeds": nll_est.n_seeds,
                           "n_documents": nll_est.n_examples},
            "perplexity_per_seed": {s: runs[arm][s]["eval"]["perplexity"] for s in seeds},
        }
        for attack in ATTACKS:
            entry[attack] = {field: hierarchical_bootstrap(attack_field(arm, attack, field), **boot).to_dict()
                             for field in ("clean_nll", "abs_increase", "rel_increase", "success_abs", "success_rel")}
            entry[attack]["per_seed"] = {s: runs[arm][s][attack]["summary"] for s in seeds}
            for control in CONTROLS:
                entry[f"{attack}_{control}"] = {
                    field: hierarchical_bootstrap(attack_field(arm, attack, field, control), **boot).to_dict()
                    for field in ("abs_increase", "success_abs")}
        if arm in TRAINED_ARMS:
            entry["train"] = {s: {k: v for k, v in runs[arm][s]["train"].items() if k != "provenance"} for s in seeds}
        arms[arm] = entry

    comparisons = {}
    for a, b in COMPARISONS:
        na, nb = doc_nll(a), doc_nll(b)
        per_tok_a = [n / t for n, t in na]
        per_tok_b = [n / t for n, t in nb]
        comparisons[f"{a}_vs_{b}"] = {
            "test_nll_per_token": paired_comparison(per_tok_a, per_tok_b, **boot).to_dict(),
            **{f"{attack}_abs_increase": paired_comparison(attack_field(a, attack, "abs_increase"),
                                                           attack_field(b, attack, "abs_increase"), **boot).to_dict()
               for attack in ATTACKS},
            **{f"{attack}_clean_nll": paired_comparison(attack_field(a, attack, "clean_nll"),
                                                        attack_field(b, attack, "clean_nll"), **boot).to_dict()
               for attack in ATTACKS},
        }
    gradient_vs_random = {
        arm: {attack: paired_comparison(attack_field(arm, attack, "abs_increase"),
                                        attack_field(arm, attack, "abs_increase", "random"), **boot).to_dict()
              for attack in ATTACKS}
        for arm in ARMS}

    transfer = {}
    for attack in ATTACKS:
        matrix = {}
        for src in ARMS:
            matrix[src] = {}
            for dst in ARMS:
                vals = [loaded["transfer"][s][attack]["abs_increase"][src][dst] for s in seeds]
                matrix[src][dst] = float(np.mean(vals))
        transfer[attack] = matrix

    overrides = {arm: {s: runs[arm][s]["train"].get("overrides") or {} for s in seeds} for arm in TRAINED_ARMS}
    return {"arms": arms, "comparisons": comparisons, "gradient_vs_random": gradient_vs_random,
            "transfer_abs_increase": transfer, "arm_overrides": overrides,
            "seeds": list(seeds), "confidence": agg.confidence, "bootstrap_samples": agg.bootstrap_samples,
            "thresholds": {"abs_nats": params.attack.success_threshold_nats,
                           "relative": params.attack.success_threshold_relative},
            "variant": params.monotonic.variant, "init": params.monotonic.init,
            "input_params_hashes": sorted({runs[a][s][k]["provenance"]["params_hash"] for a in ARMS for s in seeds
                                           for k in ("eval", "uat", "hotflip", "controls")})}


def flat_metrics(summary: dict) -> dict:
    """A small, flat view for `dvc metrics show` / `dvc exp show`."""
    out = {}
    for arm, e in summary["arms"].items():
        out[arm] = {"perplexity": round(e["perplexity"]["mean"], 4)}
        for attack in ATTACKS:
            out[arm][f"{attack}_abs_increase"] = round(e[attack]["abs_increase"]["mean"], 4)
            out[arm][f"{attack}_success_abs"] = round(e[attack]["success_abs"]["mean"], 4)
    return out


def run(params, args) -> int:
    loaded = load_runs(params)
    summary = summarize(params, loaded)
    t0 = time.time()
    prov = provenance(params, "aggregate", seed=params.aggregate.seed)
    per_run = {arm: {seed: {k: v for k, v in run.items() if k not in ("train_log", "val_log")}
                     for seed, run in seeds.items()} for arm, seeds in loaded["runs"].items()}
    with staged_dir(paths.REPORT_DIR) as out:
        write_json(out / "results.json", {"summary": summary, "runs": per_run,
                                          "transfer": loaded["transfer"], "provenance": prov})
        write_json(out / "metrics.json", {**flat_metrics(summary), "provenance": prov})
        plot_files = report.plots(loaded, summary, out / "plots", params)
        text = report.markdown(summary, params, prov, [p.relative_to(out).as_posix() for p in plot_files])
        atomic_write_text(out / "report.md", text)
    record_run("aggregate", prov, seconds=round(time.time() - t0, 1))
    print(f"aggregate: report at {paths.REPORT_DIR / 'report.md'}")
    print(report.main_table(summary))
    return 0
