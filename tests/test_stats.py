"""pipeline/stats.py and the aggregate/report layers above it, on synthetic data with known truth."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import params as params_mod
from pipeline import report
from pipeline.arms import ARM_NAMES, TRAINED_ARMS
from pipeline.io import write_json
from pipeline.stages import aggregate
from pipeline.stats import (Clusters, Estimate, crossed_estimate, document_of, equivalence_p, holm,
                            paired_comparison, sign_flip_p_value, t_cdf, t_quantile, two_sided_p, verdict)

# The simulated design mirrors the embedded run: 32 attack examples drawn from 20 documents (every document
# at least once), 3 seeds; document and example effects are shared by every seed (and by both arms of a
# paired comparison), seeds add a main effect (recovery training) and example x seed noise (attack randomness).
N_EXAMPLES, N_DOCS, N_SEEDS, TRUTH = 32, 20, 3, 1.0
SETTINGS = {   # sd of: document, example, seed main effect, example x seed noise
    "documents dominate (trained arm)": (0.3, 0.5, 0.1, 0.3),
    "seeds dominate": (0.1, 0.1, 0.3, 0.2),
    "one model, attack noise only (untrained arm)": (0.3, 0.5, 0.0, 0.3),
}


def _design(rng):
    docs = np.concatenate([np.arange(N_DOCS), rng.integers(0, N_DOCS, N_EXAMPLES - N_DOCS)])
    return [f"attack_eval:{d}:{i}" for i, d in enumerate(docs)], docs


def _draw(rng, sds, docs):
    sd_doc, sd_ex, sd_seed, sd_noise = sds
    return (TRUTH + rng.normal(0, sd_doc, N_DOCS)[docs] + rng.normal(0, sd_ex, N_EXAMPLES)
            + rng.normal(0, sd_seed, (N_SEEDS, 1)) + rng.normal(0, sd_noise, (N_SEEDS, N_EXAMPLES)))


def _nested_bootstrap_ci(per_seed, n_boot, rng):
    """The old estimator: resample seeds, then examples independently inside each seed (percentile CI)."""
    chosen = rng.integers(0, len(per_seed), (n_boot, len(per_seed)))
    stats = np.mean([np.stack(per_seed)[chosen[:, k, None], rng.integers(0, N_EXAMPLES, (n_boot, N_EXAMPLES))]
                     .mean(axis=1) for k in range(len(per_seed))], axis=0)
    return np.quantile(stats, [0.025, 0.975])


@pytest.mark.parametrize("setting", SETTINGS)
def test_crossed_intervals_cover_the_truth_and_the_nested_bootstrap_does_not(setting):
    rng = np.random.default_rng(11)
    covered = old_covered = 0
    reps, old_reps = 1000, 300
    for rep in range(reps):
        ids, docs = _design(rng)
        y = _draw(rng, SETTINGS[setting], docs)
        est = crossed_estimate(y, Clusters.draw(ids, docs.astype(str), 1000, rng), 0.95)
        covered += est.low <= TRUTH <= est.high
        if rep < old_reps:
            low, high = _nested_bootstrap_ci(list(y), 500, rng)
            old_covered += low <= TRUTH <= high
    assert 0.93 <= covered / reps <= 0.97, covered / reps
    assert old_covered / old_reps < 0.85, old_covered / old_reps


def test_paired_difference_interval_covers_the_true_difference():
    """Two arms on the same examples: shared document/example effects cancel in the difference, each arm
    has its own seed effects and noise; the interval of a - b covers the true 0.2 at the nominal rate."""
    rng = np.random.default_rng(12)
    covered, reps = 0, 600
    for _ in range(reps):
        ids, docs = _design(rng)
        clusters = Clusters.draw(ids, docs.astype(str), 1000, rng)
        shared = _draw(rng, (0.3, 0.5, 0.0, 0.0), docs)
        a = shared + 0.2 + rng.normal(0, 0.15, N_EXAMPLES) + _draw(rng, (0.0, 0.0, 0.1, 0.2), docs) - TRUTH
        b = shared + _draw(rng, (0.0, 0.0, 0.1, 0.2), docs) - TRUTH
        c = paired_comparison("a", "b", "m", a, b, clusters, 0.95, 0.05, 0.8, rng)
        covered += c.difference.low <= 0.2 <= c.difference.high
    assert 0.93 <= covered / reps <= 0.97, covered / reps


def test_t_distribution_matches_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert t_quantile(0.975, 19) == pytest.approx(2.093024, abs=1e-5)
    assert t_quantile(0.8, 5) == pytest.approx(0.919544, abs=1e-5)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-5)
    assert t_cdf(-2.0, 3) == pytest.approx(0.069663, abs=1e-5)


def test_clusters_group_examples_by_document_and_share_draws():
    ids = ["attack_eval:2:40", "attack_eval:2:980", "attack_eval:3:60"]
    assert document_of(ids[1]) == "attack_eval:2"
    clusters = Clusters.draw(ids, [document_of(i) for i in ids], 50, np.random.default_rng(0))
    assert clusters.n_documents == 2 and list(clusters.index) == [0, 0, 1]
    assert np.all(clusters.counts.sum(axis=1) == 2)
    with pytest.raises(ValueError, match="need >= 2"):
        Clusters.draw(ids[:2], ["d", "d"], 10, np.random.default_rng(0))


def test_seed_variance_counts_only_where_seeds_differ():
    rng = np.random.default_rng(1)
    ids = [f"s:{i}:0" for i in range(30)]
    clusters = Clusters.draw(ids, [document_of(i) for i in ids], 1000, rng)
    same = np.tile(rng.normal(0, 1, 30), (3, 1))            # one model: every seed identical
    shifted = same + np.array([[-1.0], [0.0], [1.0]])
    narrow, wide = crossed_estimate(same, clusters, 0.95), crossed_estimate(shifted, clusters, 0.95)
    assert narrow.se_seeds == 0 and narrow.df == pytest.approx(29, rel=0.01)
    assert wide.se_seeds == pytest.approx(math.sqrt(1 / 3)) and wide.df < 3
    assert (wide.high - wide.low) > 5 * (narrow.high - narrow.low)


def test_token_weighted_estimate_is_the_ratio_of_sums():
    ids = ["s:0:0", "s:1:0"]
    clusters = Clusters.draw(ids, ids, 100, np.random.default_rng(0))
    est = crossed_estimate(np.array([[2.0, 1.0]]), clusters, 0.95, weights=np.array([10.0, 1.0]))
    assert est.mean == pytest.approx(21 / 11)


def test_p_value_rejects_exactly_when_the_interval_excludes_zero():
    rng = np.random.default_rng(2)
    ids = [f"s:{i}:0" for i in range(12)]
    clusters = Clusters.draw(ids, ids, 500, rng)
    for shift in np.linspace(0, 0.8, 30):
        d = crossed_estimate(rng.normal(shift, 1, (3, 12)) + rng.normal(0, 0.3, (3, 1)), clusters, 0.95)
        assert (two_sided_p(d) < 0.05) == (d.low > 0 or d.high < 0)


def _estimate(mean, se, df=20.0):
    return Estimate(mean, mean - 2 * se, mean + 2 * se, se, df, se, 0.0, 3, 32, 20)


def test_tost_rejects_exactly_when_the_90_interval_is_inside_the_margin():
    for mean, se in [(0.0, 0.01), (0.03, 0.01), (0.045, 0.01), (0.0, 0.04), (-0.06, 0.005)]:
        est = _estimate(mean, se)
        half = t_quantile(0.95, est.df) * se
        inside = -0.05 < mean - half and mean + half < 0.05
        assert (equivalence_p(est, 0.05) < 0.05) == inside


def test_holm_step_down():
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.2]), [0.04, 0.09, 0.09, 0.2])
    assert np.allclose(holm([0.5, 0.5]), [1.0, 1.0])


def test_document_sign_flip_is_exact_and_sees_documents_not_rows():
    ids = [f"s:{d}:{k}" for d in range(3) for k in range(10)]
    clusters = Clusters.draw(ids, [document_of(i) for i in ids], 10, np.random.default_rng(0))
    diff = np.ones((3, 30))     # 90 positive rows, but only 3 documents: p = 2 / 2^3
    assert sign_flip_p_value(diff, clusters, 100, np.random.default_rng(0)) == pytest.approx(0.25)


def test_paired_comparison_refuses_misaligned_examples():
    clusters = Clusters.draw(["s:0:0", "s:1:0", "s:2:0"], ["0", "1", "2"], 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not aligned"):
        paired_comparison("a", "b", "m", np.zeros((1, 3)), np.zeros((1, 4)), clusters, 0.95, 0.05, 0.8,
                          np.random.default_rng(0))


def _comparison(mean, se, margin=0.05):
    """A comparison record as the report reads it, with the Holm p-values equal to the raw ones."""
    est = _estimate(mean, se)
    p, q = two_sided_p(est), equivalence_p(est, margin)
    return {"difference": est.to_dict(), "margin": margin, "p_value": p, "p_holm": p,
            "p_equivalence": q, "p_equivalence_holm": q}


@pytest.mark.parametrize("mean, se, word, expected", [
    (0.002, 0.01, "equivalent", "equivalent within +/-0.05 nats/token"),
    (-0.3, 0.02, "different", "different: A is less vulnerable"),
    (0.03, 0.005, "different, within the margin",
     "different: A is more vulnerable, but by less than the +/-0.05 margin"),
    (0.04, 0.04, "not resolved", "not resolved (neither different nor equivalent within +/-0.05)"),
])
def test_report_equivalence_wording_follows_tost(mean, se, word, expected):
    c = _comparison(mean, se)
    assert verdict(c["p_holm"], c["p_equivalence_holm"], 0.05) == word
    assert report.judgement(c, 0.05, "A is less vulnerable", "A is more vulnerable") == expected


def test_report_wording_uses_the_holm_adjusted_p_values():
    c = _comparison(0.002, 0.01) | {"p_equivalence_holm": 0.2}    # TOST passes raw, fails after Holm
    assert report.judgement(c, 0.05, "less", "more").startswith("not resolved")


def test_the_answer_says_plainly_when_the_control_changes_a_verdict():
    """Matched against the unconstrained curve, HotFlip says more vulnerable; less the damage-matched control's
    excess over that curve, less: the answer names the reversal. UAT agrees under both and draws no sentence."""
    curve = [_comparison(0.01, 0.1) | {"metric": "uat.abs_increase"},
             _comparison(0.1, 0.02) | {"metric": "hotflip.abs_increase"}]
    control = [_comparison(0.02, 0.1) | {"metric": "uat.abs_increase"},
               _comparison(-0.2, 0.04) | {"metric": "hotflip.abs_increase"}]
    said = report.control_changes(curve, control, 0.05)
    assert said.count("The control changes the") == 1 and "the HotFlip verdict" in said
    assert "line 2 says more vulnerable, the damage-matched difference in differences says less vulnerable" in said
    assert report.control_changes(curve, curve, 0.05) == ""


# --- aggregate over synthetic per-example records of the crossed design ---------------------------

def _loaded(seeds, rng, steps=(15, 30)):
    ids = [f"attack_eval:{d}:{k}" for d in range(6) for k in range(2)]
    docs = [f"test:{d}" for d in range(5)]
    example = rng.normal(1.0, 0.3, len(ids))                 # shared by every arm and seed

    def attack(shift, clean_shift=0.0, starved=False):
        inc = example * 0.1 + shift + rng.normal(0, 0.02, len(ids))
        rows = [{"id": i, "clean_nll": 3 + e + clean_shift, "abs_increase": float(x), "rel_increase": float(x) / 3,
                 "success_abs": float(x > 0.5), "success_rel": float(x > 0.45)} for i, e, x in zip(ids, example, inc)]
        final = float(inc.mean())
        curve = [[50, final / 4], [100, final / 2], [200, final]] if starved else [[50, final], [100, final]]
        return {"examples": rows, "summary": {"success_rate_abs": 0.0}, "budget_curve": curve,
                "provenance": {"params_hash": "h"}}

    def targeted(rate):
        """The targeted attack: every example's target NLL falls by 1.0; greedy decoding emits the target on the
        first `rate` share of the examples (none before the attack)."""
        rows = [{"id": i, "clean_target_nll": 4.0, "nll_decrease": 1.0, "exact_match": k < rate * len(ids),
                 "clean_exact_match": False} for k, i in enumerate(ids)]
        return {"examples": rows, "budget_curve": [[50, 1.0], [100, 1.0]],
                "summary": {"target_tokens": 8, "match_tokens": 4, "clean_target_nll": 4.0, "clean_exact_match": 0.0}}

    # clean NLL on the attack examples above pretrained's: the frontier's checkpoints lie on either side of monotonic
    clean_shift = {"pretrained": 0.0, "baseline": -0.02, "monotonic_init": 2.0, "monotonic": 0.5,
                   **{f"pretrained-step{step}": 1.0 - 0.02 * step for step in steps},
                   "baseline-step5": -0.01, "monotonic-step5": 0.8,     # smoke's frontier.recovery_steps: [5]
                   "flipped": 0.3, "flipped-step5": 1.5}                # the control's curve from monotonic_init
    runs = {arm: {} for arm in clean_shift}
    for s in seeds:
        for k, arm in enumerate(clean_shift):
            runs[arm][s] = {
                "eval": {"perplexity": 50.0 + k, "provenance": {"params_hash": "h"}},
                "per_doc": {"doc_ids": docs, "nll": list(400.0 + 10 * np.arange(5) + k), "tokens": [100.0] * 5},
                "uat": attack(0.01 * k, clean_shift[arm]),
                "hotflip": attack(0.05 * k, clean_shift[arm], starved=arm == "monotonic"),   # only it unsaturated
                "controls": {c: {a: attack(0.0) for a in ("uat", "hotflip")} for c in ("random", "greedy")}
                | {"provenance": {"params_hash": "h"}},
                "targeted": {"gradient": targeted(0.25 if arm == "monotonic" else 0.5), "random": targeted(0.0)}}
            if arm in TRAINED_ARMS:
                losses = (3.9, 3.87, 3.85) if arm == "monotonic" else (3.905, 3.9, 3.899)   # only baseline plateaus
                runs[arm][s]["val_log"] = [{"step": 5.0 * (i + 1), "val_loss": v} for i, v in enumerate(losses)]
                runs[arm][s]["train"] = {"overrides": {}, "validation_perplexity": 50.0, "steps": 10,
                                         "tokens_seen": 1000, "update_norm_total": {"W": 1.0},
                                         "nonnegative_share": {"start": 1.0, "final": 0.9 if arm == "flipped" else 0.5},
                                         "train": {"lr": 1e-3, "weight_decay": 0.1, "constrained_weight_decay": 0.0,
                                                   "constrained_lr_multiplier": 1.0, "arm_overrides": {}},
                                         "lr_selection": {"knob": "constrained_lr_multiplier" if arm == "monotonic"
                                                          else "lr", "multipliers": [0.5, 1.0], "lr": [5e-4, 1e-3],
                                                          "validation_loss": [4.0, 3.9], "selected": 1.0,
                                                          "selected_lr": 1e-3, "steps": 4}}
    # worst case: each model's own attack rows raised by 0.2 (as if a transferred attack were stronger everywhere)
    worst = {s: {a: {label: {"examples": [r | {"abs_increase": r["abs_increase"] + 0.2}
                                          for r in runs[label][s][a]["examples"]]} for label in runs}
                 for a in ("uat", "hotflip")} for s in seeds}
    for s in seeds:
        for label in runs:      # as load_runs places transfer's worst case beside each model's own attacks
            runs[label][s]["worst_case"] = {a: worst[s][a][label] for a in ("uat", "hotflip")}
    transfer = {s: {a: {"abs_increase": {x: {y: 0.1 for y in ARM_NAMES} for x in ARM_NAMES}}
                    for a in ("uat", "hotflip")} | {"worst_case": worst[s]} for s in seeds}
    right = rng.random(40) < 0.4                             # benchmark items: monotonic gets 10 of them wrong
    benchmarks = {arm: {s: {"pipeline_lastword": {"items": [
        {"doc_id": i, "acc": float(r and not (arm == "monotonic" and i < 10))} for i, r in enumerate(right)]}}
        for s in seeds} for arm in ARM_NAMES}
    conversion = {"init": "abs", "eps": 1e-4, "validation_perplexity": 900.0, "pretrained_validation_perplexity": 80.0,
                  "equivalent": {"exists": True, "min_weight": 1e-4, "validation_perplexity": 80.00001,
                                 "max_abs_logit_diff_fp32": 1e-4, "max_abs_logit_diff_bf16": 0.2,
                                 "bf16_floor_max_abs_logit_diff": 0.07}}
    return {"runs": runs, "transfer": transfer, "benchmarks": benchmarks, "conversion": conversion}


def _params(seeds):
    p = params_mod.load(params_mod.profile_path("smoke"))
    return dataclasses.replace(p, seeds=seeds)


def test_aggregate_summary_and_report_on_a_crossed_design():
    seeds = [0, 1, 2]
    params = _params(seeds)
    summary = aggregate.build_summary(params, _loaded(seeds, np.random.default_rng(0)))
    matched, along = summary["frontier"]["matched"], summary["frontier"]["excess_vs_control"]
    family = summary["comparisons"] + matched + along + summary["controls"]
    # 6 arm pairs x (test NLL, 2 attacks, clean NLL once per example set); 2 targets x 2 attacks and their 2 worst
    # cases against the curve and against the control; 5 arms x 2 attacks against their random control
    assert summary["family_size"] == len(family) == 6 * (1 + 2 + 1) + 2 * 4 + 2 * 4 + 5 * 2
    assert all(c["p_holm"] >= c["p_value"] for c in family)
    nll = summary["arms"]["baseline"]["test_nll_per_token"]
    assert nll["mean"] == pytest.approx(4.21) and nll["n_documents"] == 5 and nll["se_seeds"] == 0
    hotflip = next(c for c in summary["comparisons"] if (c["arm_a"], c["arm_b"], c["metric"])
                   == ("monotonic", "baseline", "hotflip.abs_increase"))
    assert hotflip["difference"]["mean"] == pytest.approx(0.1, abs=0.02)
    assert hotflip["difference"]["n_documents"] == 6 and hotflip["p_holm"] < 0.05
    text = report.markdown(summary, params, {"params_hash": "h", "packages": {"torch": "t", "transformers": "t"}},
                           [])
    assert "different: monotonic is more vulnerable" in text and "What a seed varies" in text and "## Power" in text
    answer = text.split("## Details")[0]     # every arm's learning rate and the trials behind it
    assert "Learning rates by equal tuning effort (each arm's best of as many trials of 4 steps): baseline 0.001, " \
           "monotonic 0.001 for V, flipped 0.001. **At the edge of its grid: baseline, monotonic, flipped**" in answer
    assert "| monotonic | the lr of V (train.constrained_lr_multiplier) x 0.5, 1 | 0.0005, 0.001 | 54.60, 49.40 | " \
           "0.001 (grid edge) |" in text
    assert f"Family: all {len(family)} paired tests" in text
    assert "Optimizer differences between the trained arms" in text and "weight decay 0 on the constrained V" in text
    assert "learning rate" not in text.split("Optimizer differences")[1].split("\n")[0]      # same lr for V and W
    bench = summary["benchmarks"]["pipeline_lastword"]
    lost = -sum(bool(r) for r in _loaded(seeds, np.random.default_rng(0))["benchmarks"]["baseline"][0][
        "pipeline_lastword"]["items"][:10] if r["acc"]) / 40
    assert bench["items"] == 40 and bench["monotonic_vs_baseline"]["difference"]["mean"] == pytest.approx(lost)
    assert bench["acc"]["monotonic"]["low"] >= 0 and "## Zero-shot benchmarks" in text
    # the headline: monotonic (clean +0.5) between step30 (+0.4) and step15 (+0.7) on the unconstrained curve
    assert summary["frontier"]["curve"] == ["pretrained-step15", "pretrained-step30", "pretrained", "baseline-step5",
                                            "baseline"]
    where = {c["arm_a"]: (c["match"]["lower"], c["match"]["upper"], c["match"]["extrapolated"]) for c in matched}
    assert where == {"monotonic": ("pretrained-step30", "pretrained-step15", False),          # clean +0.5
                     "monotonic-step5": ("pretrained-step30", "pretrained-step15", True)}     # +0.8: beyond +0.7
    assert "monotonic-step5 (recovery step 5): difference" in text and "extrapolated" in text
    assert summary["frontier"]["control_curve"] == ["monotonic_init", "flipped-step5", "flipped"]
    # the control's excess: each arm matched on the unconstrained curve at its own clean NLL, then differenced
    where = {(c["arm_a"], c["arm_b"]): (c["match"]["control"]["lower"], c["match"]["control"]["upper"],
                                        c["match"]["control"]["extrapolated"]) for c in along}
    assert where == {("monotonic", "flipped"): ("pretrained", "pretrained-step30", False),           # clean +0.3
                     ("monotonic-step5", "flipped-step5"): ("pretrained-step30", "pretrained-step15", True)}  # +1.5
    for c in along:
        assert c["difference"]["mean"] == pytest.approx(c["match"]["target_excess"] - c["match"]["control_excess"])
        mono = next(m for m in matched if (m["arm_a"], m["metric"]) == (c["arm_a"], c["metric"]))
        assert c["match"]["target_excess"] == pytest.approx(mono["difference"]["mean"])
    lines = text.split("\n")
    answer = lines[lines.index("## The answer") + 2: lines.index("## Details")]
    assert answer[0].startswith("1. **The constraint restricts no function here.**") and "80.0000" in answer[0]
    assert answer[1].startswith("2. **Against the unconstrained reference curve**") and "HotFlip" in answer[1]
    assert answer[2].startswith("3. **Against its damage-matched control**") and "own clean NLL" in answer[2]
    assert "90.0% of the control's constrained-variant weights" in answer[3] and "(50.0% of the baseline's)" in answer[3]
    assert "| flipped |" in "\n".join(answer)
    headline = next(line for line in lines if line.startswith("**Robustness at matched clean NLL"))
    assert "between pretrained-step30 and pretrained-step15" in headline
    recovery = summary["recovery"]["arms"]
    assert not recovery["monotonic"][0]["plateaued"] and recovery["baseline"][0]["plateaued"]
    warning = next(line for line in text.split("\n") if line.startswith("> **Recovery had not plateaued"))
    assert "monotonic seed 0 (-0.050)" in warning and "baseline" not in warning
    assert "Recovery had not plateaued for monotonic (see Details)" in "\n".join(answer)
    # the worst case: every arm's own rows + 0.2, in the compact table beside the gradient attack
    for arm in ARM_NAMES:
        e = summary["arms"][arm]
        assert e["hotflip_worst"]["abs_increase"]["mean"] == pytest.approx(e["hotflip"]["abs_increase"]["mean"] + 0.2)
    assert "| worst case (HotFlip) +NLL |" in "\n".join(answer)
    # ... and of every checkpoint, so it is compared along the curves too: + 0.2 everywhere cancels in each difference
    for rows in (matched, along):
        for c in rows:
            if c["metric"].endswith("_worst.abs_increase"):
                gradient = c["metric"].replace("_worst", "")
                twin = next(g for g in rows if (g["arm_a"], g["arm_b"], g["metric"]) == (c["arm_a"], c["arm_b"], gradient))
                assert c["difference"]["mean"] == pytest.approx(twin["difference"]["mean"])
    assert {c["metric"] for c in matched} == {"uat.abs_increase", "hotflip.abs_increase", "uat_worst.abs_increase",
                                              "hotflip_worst.abs_increase"}
    assert "worst case (HotFlip) -" in answer[1] or "worst case (HotFlip) +" in answer[1]
    gradient_free = text.split("## Gradient vs gradient-free along every curve")[1].split("##")[0]
    assert "| pretrained-step15 | unconstrained |" in gradient_free and "| flipped-step5 | control |" in gradient_free
    # saturation: only monotonic's HotFlip was starved (half its increase came in the last doubling)
    sat = summary["saturation"]["models"]
    assert sat["monotonic"]["hotflip"]["last_doubling_share"] == pytest.approx(0.5)
    assert [(m, a) for m, by in sat.items() for a, v in by.items() if v["flagged"]] == [("monotonic", "hotflip")]
    assert "**1 of " in answer[4] and "had not saturated" in answer[4] and "## Saturation" in text
    # the targeted attack: per arm its exact-match rate (a proportion) and the target's NLL decrease, beside its control
    targeted = summary["arms"]["monotonic"]["targeted"]
    assert targeted["exact_match"]["mean"] == pytest.approx(0.25) and targeted["nll_decrease"]["mean"] == pytest.approx(1.0)
    assert summary["arms"]["baseline"]["targeted"]["exact_match"]["mean"] == pytest.approx(0.5)
    assert summary["arms"]["baseline"]["targeted_random"]["exact_match"]["mean"] == 0.0
    table = text.split("## Targeted attack")[1].split("##")[0]
    assert "| monotonic | 4.000 | 1.000 [" in table and "| 25.0% [" in table


@pytest.mark.parametrize("curve, share", [
    ([[768, 0.17], [1536, 0.29], [2304, 0.38], [3072, 0.44]], 1 - 0.29 / 0.44),   # HotFlip: half at a point
    ([[16, 0.07], [272, 0.24], [528, 0.26], [784, 0.28], [1040, 0.35]], 1 - 0.26 / 0.35),  # UAT: interpolated
    ([[100, 0.3]], 0.5),                       # one point: the curve starts at 0 increase with 0 forwards
    ([[100, 0.3], [200, 0.3]], 0.0),           # flat: saturated
])
def test_last_doubling_share_reads_the_budget_curve(curve, share):
    assert aggregate.last_doubling_share(curve) == pytest.approx(share, abs=0.01)


def test_aggregate_refuses_examples_that_differ_between_seeds():
    seeds = [0, 1]
    loaded = _loaded(seeds, np.random.default_rng(0))
    loaded["runs"]["monotonic"][1]["uat"]["examples"][0]["id"] = "attack_eval:99:0"
    with pytest.raises(ValueError, match="must cross the same examples"):
        aggregate.build_summary(_params(seeds), loaded)


def test_every_arm_and_seed_resamples_the_same_documents():
    seeds = [0, 1, 2]
    design = aggregate.Design(_loaded(seeds, np.random.default_rng(0)), seeds, 100, np.random.default_rng(0))
    for metric in aggregate.ARM_METRICS:
        drawn = {id(design.values(metric, arm)[1]) for arm in ARM_NAMES}
        assert len(drawn) == 1, metric.name
    assert design.values(aggregate.Metric("uat", "abs_increase"), "baseline")[1] is \
        design.values(aggregate.Metric("hotflip", "abs_increase", "random"), "monotonic")[1]


def test_report_says_what_a_seed_varies():
    assert "not estimated" in report.seed_sentence([0])
    text = report.seed_sentence([0, 1, 2])
    assert "for baseline, monotonic, flipped, the recovery-training data order" in text
    assert "for pretrained, monotonic_init, only the attacks' random streams" in text and "2 degrees" in text


@pytest.mark.parametrize("key, value", [("equivalence_margin_nats", 0), ("power", 1.0)])
def test_bad_aggregate_params_fail_with_key_and_value(key, value):
    raw = dataclasses.asdict(_params([0]))
    raw["aggregate"][key] = value
    with pytest.raises(params_mod.ParamsError, match=f"aggregate.{key}"):
        params_mod.validate(raw)


def test_dvc_metrics_show_prints_the_headline_in_200_columns(tmp_path):
    """The report's DVC metrics, one file a row with shared keys, rendered by the real `dvc metrics show` in a
    200-column terminal: every arm and every headline comparison (estimate, interval, Holm p, verdict), numbers
    and verdict words only (provenance stays in results.json)."""
    seeds = [0, 1, 2]
    summary = aggregate.build_summary(_params(seeds), _loaded(seeds, np.random.default_rng(0)))
    rows = report.metric_rows(summary)
    assert set(rows) == {f"arm-{arm}" for arm in ARM_NAMES} | {f"{attack}-{name}" for attack in ("uat", "hotflip")
                                                               for name in ("vs-curve", "vs-control", "vs-control-nll")} \
        | {f"{attack}_worst-{name}" for attack in ("uat", "hotflip") for name in ("vs-curve", "vs-control-nll")}
    for name, row in rows.items():
        assert all(isinstance(v, (int, float)) for k, v in row.items() if k != "verdict"), name
        assert row.get("verdict", "more vulnerable") in ("more vulnerable", "less vulnerable", "equivalent",
                                                         "not resolved")
    hotflip = next(c for c in summary["frontier"]["matched"] if c["arm_a"] == "monotonic"
                   and c["metric"] == "hotflip.abs_increase")
    assert rows["hotflip-vs-curve"]["delta"] == round(hotflip["difference"]["mean"], 4)
    env = {**os.environ, "COLUMNS": "200", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text("stages:\n  aggregate:\n    cmd: 'true'\n    metrics:\n"
                                       "      - outputs/report/metrics:\n          cache: false\n")
    for name, row in rows.items():
        write_json(tmp_path / "outputs/report/metrics" / f"{name}.json", row)
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert max(len(line) for line in shown) <= 200, "\n".join(shown)
    assert shown[0].split() == ["Path", "delta", "delta_lo", "delta_up", "hotflip", "hotflip_worst", "p_holm",
                                "pipeline_lastword_acc", "ppl", "uat", "uat_worst", "verdict"]
    assert len(shown) == 1 + len(rows) and any(line.startswith("outputs/report/metrics/hotflip-vs-curve.json")
                                               for line in shown)
    as_json = json.loads(subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=tmp_path,
                                        env=env, capture_output=True, text=True, check=True).stdout)
    assert "provenance" not in json.dumps(as_json)
