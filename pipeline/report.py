"""The Markdown report and PNG plots. Every sentence is computed from the numbers it states."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .arms import ARM_NAMES
from .arms import ARM_TABLE, TRAINED_ARMS, get
from .params import MONOTONICITY_SCOPE
from .stats import verdict

ATTACK_NAMES = {"uat": "UAT", "hotflip": "HotFlip"}


def _ci(e: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(e['mean'])} [{fmt.format(e['low'])}, {fmt.format(e['high'])}]"


def _pct(e: dict) -> str:
    return f"{100 * e['mean']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"


def _name(attack: str) -> str:
    """"uat" -> "UAT"; "hotflip_worst" (an increase of aggregate.INCREASES) -> "worst case (HotFlip)"."""
    base, _, kind = attack.partition("_")
    return f"worst case ({_name(base)})" if kind == "worst" else ATTACK_NAMES.get(attack, attack)


def main_table(summary: dict) -> str:
    attacks, controls = summary["attacks"], summary["control_methods"]
    head = ("| arm | perplexity | " + " | ".join(f"{_name(a)} +NLL (nats/tok) | {_name(a)} rel. | {_name(a)} success"
                                                 for a in attacks)
            + "".join(f" | {c} ({_name(a)} budget) +NLL" for a in attacks for c in controls) + " |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in ARM_NAMES:
        e = summary["arms"][arm]
        cells = [_ci(e["perplexity"], "{:.2f}")]
        for a in attacks:
            cells += [_ci(e[a]["abs_increase"]), _pct(e[a]["rel_increase"]), _pct(e[a]["success_abs"])]
        cells += [_ci(e[f"{a}_{c}"]["abs_increase"]) for a in attacks for c in controls]
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def metric_label(metric: str) -> str:
    if metric == "test_nll_per_token":
        return "test NLL"
    source, field = metric.split(".")
    return {"abs_increase": f"{_name(source)} +NLL", "clean_nll": "clean NLL, attacked examples"}.get(
        field, f"{_name(source)} {field}")


def _p(x: float) -> str:
    return f"= {x:.2g}" if x >= 0.001 else "< 0.001"


def judgement(c: dict, alpha: float, less: str, more: str) -> str:
    """The wording of a paired comparison, following its Holm-adjusted difference and TOST p-values."""
    m = c["margin"]
    word = verdict(c["p_holm"], c["p_equivalence_holm"], alpha)
    direction = less if c["difference"]["mean"] < 0 else more
    return {"different": f"different: {direction}",
            "different, within the margin": f"different: {direction}, but by less than the +/-{m:g} margin",
            "equivalent": f"equivalent within +/-{m:g} nats/token",
            "not resolved": f"not resolved (neither different nor equivalent within +/-{m:g})"}[word]


def _stats(c: dict, conf: int) -> str:
    d = c["difference"]
    return (f"{d['mean']:+.3f} nats/token ({conf}% CI [{d['low']:+.3f}, {d['high']:+.3f}], p {_p(c['p_value'])}, "
            f"Holm p {_p(c['p_holm'])}; TOST Holm p {_p(c['p_equivalence_holm'])})")


def comparison_sentences(summary: dict) -> list[str]:
    conf, alpha = round(100 * summary["confidence"]), 1 - summary["confidence"]
    arms = summary["arms"]
    by_pair: dict[tuple, dict] = {}
    for c in summary["comparisons"]:
        by_pair.setdefault((c["arm_a"], c["arm_b"]), {})[c["metric"]] = c
    out = []
    for (a, b), comp in by_pair.items():
        ppl_a, ppl_b = arms[a]["perplexity"]["mean"], arms[b]["perplexity"]["mean"]
        t = comp["test_nll_per_token"]
        out.append(f"- **{a} vs {b}, clean quality:** perplexity {ppl_a:.2f} vs {ppl_b:.2f} "
                   f"({ppl_a / ppl_b:.2f}x); test NLL difference {_stats(t, conf)} over "
                   f"{t['difference']['n_documents']} documents: "
                   f"{judgement(t, alpha, f'{a} predicts better', f'{a} predicts worse')}.")
        for metric, d in comp.items():
            source, field = (metric.split(".") + [""])[:2]
            n = f"{d['difference']['n_examples']} examples in {d['difference']['n_documents']} documents"
            if field == "abs_increase":
                out.append(f"  - {_name(source)}: NLL increase {arms[a][source]['abs_increase']['mean']:.3f} vs "
                           f"{arms[b][source]['abs_increase']['mean']:.3f} nats/token, paired difference "
                           f"{_stats(d, conf)} over {n}: "
                           f"{judgement(d, alpha, f'{a} is less vulnerable', f'{a} is more vulnerable')}.")
            elif field == "clean_nll":
                out.append(f"  - Clean NLL of the attacked examples ({_name(source)}'s): difference "
                           f"{_stats(d, conf)} over {n}: "
                           f"{judgement(d, alpha, f'{a} predicts them better', f'{a} predicts them worse')}.")
    return out


def _where(m: dict) -> str:
    """Where a target meets a curve (a frontier.Match as a dict)."""
    return (f"extrapolated from {m['lower']} and {m['upper']}: the curve does not reach it" if m["extrapolated"]
            else f"between {m['lower']} and {m['upper']}")


def matched_paragraph(summary: dict) -> list[str]:
    """The headline: monotonic vs the unconstrained reference curve at monotonic's clean NLL, per attack."""
    conf, alpha = round(100 * summary["confidence"]), 1 - summary["confidence"]
    f = summary["frontier"]
    less, more = ("less vulnerable than an unconstrained model of equal clean NLL",
                  "more vulnerable than an unconstrained model of equal clean NLL")
    parts, sweep = [], []
    for c in f["matched"]:
        attack, m = c["metric"].split(".")[0], c["match"]
        where = _where(m)
        step = get(c["arm_a"]).step
        if step is not None:
            sweep.append(f"{c['arm_a']} (recovery step {step}): difference {_stats(c, conf)} under {_name(attack)} "
                         f"at clean NLL {m['target_clean']:.3f} ({where}): {judgement(c, alpha, less, more)}")
            continue
        mono = summary["arms"]["monotonic"][attack]["abs_increase"]["mean"]
        parts.append(f"under {_name(attack)} the monotonic model's NLL increase is {mono:.3f} nats/token against "
                     f"the curve's {m['curve_increase']:.3f} at its clean NLL of {m['target_clean']:.3f} ({where}); "
                     f"difference {_stats(c, conf)}: " + judgement(c, alpha, less, more))
    return [f"**Robustness at matched clean NLL, against the unconstrained curve.** The unconstrained reference curve runs through "
            f"{', '.join(f['curve'])} (clean NLL and attack NLL increase on the attack-evaluation examples, "
            f"piecewise linear between them; points within {f['min_gap_nats']:g} nats of clean NLL pooled into one, "
            "named a+b); the monotonic model is compared with that curve at its own clean NLL, "
            "so the constraint's effect is not confounded with its perplexity cost: " + "; ".join(parts) + ". "
            "The interval includes the uncertainty of the matching point (delta method over the crossed design: "
            "documents and seeds, every checkpoint attacked with every seed). The step-matched "
            "comparison (same recovery budget, different perplexity) follows below.", "",
            *(["Budget sweep: the same matched comparison for the monotonic model's recovery checkpoints (the "
               "recovery budget so far): " + "; ".join(sweep) + ".", ""] if sweep else [])]


def excess_paragraph(summary: dict) -> list[str]:
    """The damage-matched comparison at matched clean NLL: where each arm meets the unconstrained curve."""
    conf, alpha = round(100 * summary["confidence"]), 1 - summary["confidence"]
    parts = []
    for c in summary["frontier"]["excess_vs_control"]:
        m = c["match"]
        target, control = (f"(clean NLL {m[k]['target_clean']:.3f}, {_where(m[k])})" for k in ("target", "control"))
        parts.append(f"{c['arm_a']} vs {c['arm_b']} under {_name(c['metric'].split('.')[0])}: excess "
                     f"{m['target_excess']:+.3f} {target} less {m['control_excess']:+.3f} {control} = "
                     f"{_stats(c, conf)}: "
                     + judgement(c, alpha, "the constrained model's excess is smaller",
                                 "the constrained model's excess is larger"))
    return ["**The damage-matched control at matched clean NLL.** Each arm's excess vulnerability is its attack NLL "
            "increase less the unconstrained curve's at its own clean NLL; the constrained model's excess less its "
            "control's (the same damaged start, trained without the constraint) removes what the damage and its "
            "recovery do to both. Both are matched on the unconstrained curve, not on the control's own recovery "
            "curve, whose first segment (monotonic_init to its first checkpoint) is a chord across the steepest part "
            "of recovery: " + "; ".join(parts) + ".", ""]


def _headline(c: dict, alpha: float, less: str, more: str) -> str:
    d = c["difference"]
    return (f"{_name(c['metric'].split('.')[0])} {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], "
            f"{judgement(c, alpha, less, more)}")


def conversion_line(conversion: dict) -> str:
    eq, ppl = conversion["equivalent"], conversion["pretrained_validation_perplexity"]
    damage = (f"The `{conversion['init']}` init used here takes validation perplexity from {ppl:.2f} to "
              f"{conversion['validation_perplexity']:.1f} before recovery.")
    if not eq["exists"]:
        return f"1. **The constraint binds here** (no function-preserving conversion exists: RMSNorm). {damage}"
    return (f"1. **The constraint restricts no function here.** The exact conversion (init `equivalent`: LayerNorm "
            f"folded into the MLP input map, constant row/column shifts the LayerNorms cancel) makes every constrained "
            f"weight >= {eq['min_weight']:.0e} with validation perplexity {eq['validation_perplexity']:.4f} vs "
            f"{ppl:.4f} (max |logit difference| {eq['max_abs_logit_diff_fp32']:.0e} in fp32; under bf16 autocast "
            f"{eq['max_abs_logit_diff_bf16']:.2f}, against bf16's own {eq['bf16_floor_max_abs_logit_diff']:.2f} on the "
            f"unconverted model). So any effect below comes from the damage and the training, not from what a "
            f"non-negative model can represent. {damage}")


def headline_comparisons(summary: dict) -> dict[str, list[dict]]:
    """The answer's comparisons of monotonic's attack NLL increases, one row per attack: against the
    unconstrained curve at matched clean NLL, against the damage-matched control at the same recovery step,
    and the difference in differences (each one's excess over the curve at its own clean NLL)."""
    f = summary["frontier"]

    def pick(rows: list, other: str) -> list[dict]:
        return [c for c in rows if c["arm_a"] == "monotonic" and c["arm_b"] == other
                and c["metric"].endswith("abs_increase")]
    return {"vs-curve": pick(f["matched"], f["matched"][0]["arm_b"]),
            "vs-control": pick(summary["comparisons"], "flipped"),
            "vs-control-nll": pick(f["excess_vs_control"], "flipped")}


def answer(summary: dict) -> list[str]:
    """The first screen: at most five numbered lines, each comparison with its interval and verdict."""
    alpha = 1 - summary["confidence"]
    more, less = "monotonic more vulnerable", "monotonic less vulnerable"
    headline = headline_comparisons(summary)
    curve_rows, excess_rows = headline["vs-curve"], headline["vs-control-nll"]
    same_step = "; ".join(_headline(c, alpha, less, more) for c in headline["vs-control"])
    excess = "; ".join(f"{_headline(c, alpha, less, more)} ({c['match']['target_excess']:+.3f} vs "
                       f"{c['match']['control_excess']:+.3f})" for c in excess_rows)
    shares = {arm: np.mean([t["nonnegative_share"]["final"] for t in summary["arms"][arm]["train"].values()])
              for arm in ("flipped", "baseline")}
    conf = round(100 * summary["confidence"])
    return ["## The answer", "", conversion_line(summary["conversion"]),
            f"2. **Against the unconstrained reference curve** (pretraining checkpoints, pretrained, baseline), "
            f"monotonic's attack NLL increase less the curve's at monotonic's clean NLL (nats/token, {conf}% CI): "
            + "; ".join(_headline(c, alpha, less, more) for c in curve_rows) + ".",
            f"3. **Against its damage-matched control** (`flipped`: monotonic_init's weights, trained identically "
            f"without the constraint), monotonic - flipped at the same recovery step: {same_step}; each one's excess "
            f"over the unconstrained curve at its own clean NLL, monotonic's less the control's: {excess}."
            + control_changes(curve_rows, excess_rows, alpha),
            f"4. After recovery {100 * shares['flipped']:.1f}% of the control's constrained-variant weights are >= 0 "
            f"({100 * shares['baseline']:.1f}% of the baseline's)" + (
                ": line 3 contrasts a constrained model with a mostly non-negative unconstrained one." if
                shares["flipped"] > 0.75 else ".") + plateau_clause(summary),
            "5. Compact table (step-matched, every arm; the full one, the targeted attack and every test follow)."
            + lr_clause(summary) + saturation_clause(summary), "",
            compact_table(summary), ""]


def call(c: dict, alpha: float) -> str:
    """less / more (monotonic's vulnerability, a resolved difference), equivalent, or not resolved."""
    word = verdict(c["p_holm"], c["p_equivalence_holm"], alpha)
    return word if word.startswith(("equivalent", "not")) else ("less" if c["difference"]["mean"] < 0 else "more")


def control_changes(curve: list, excess: list, alpha: float) -> str:
    """A plain sentence for each attack whose verdict against the unconstrained curve does not survive the
    damage-matched control (monotonic's excess over that curve less the control's)."""
    changed = [(_name(a["metric"].split(".")[0]), call(a, alpha), call(b, alpha)) for a in curve for b in excess
               if a["metric"] == b["metric"] and call(a, alpha) != call(b, alpha)]
    return "".join(f" **The control changes the {attack} verdict:** line 2 says {_vulnerability(x)}, the "
                   f"damage-matched difference in differences says {_vulnerability(y)}." for attack, x, y in changed)


def _vulnerability(word: str) -> str:
    return {"less": "less vulnerable", "more": "more vulnerable", "equivalent": "equivalent within the margin",
            "not resolved": "not resolved"}[word]


def plateau_clause(summary: dict) -> str:
    r = summary["recovery"]
    open_arms = sorted({arm for arm, seeds in r["arms"].items() for v in seeds.values() if not v["plateaued"]})
    return (f" Recovery had not plateaued for {', '.join(open_arms)} (see Details): the step-matched numbers compare "
            "models still improving." if open_arms else " Every trained arm's recovery plateaued.")


def compact_table(summary: dict) -> str:
    """Per arm: perplexity, each gradient attack's NLL increase and, per example, the worst case over it, its
    gradient-free controls and every other arm's transferred attack; the targeted attack's decrease of the
    target's NLL and its exact-match rate, each beside its random control's mean."""
    attacks = summary["attacks"]
    rows = ["| arm | perplexity | " + " | ".join(f"{_name(a)} +NLL | worst case ({_name(a)}) +NLL" for a in attacks)
            + " | targeted -NLL (random) | targeted exact match (random) |", "|---" * (2 * len(attacks) + 4) + "|"]
    for arm in ARM_NAMES:
        e = summary["arms"][arm]
        rows.append(f"| {arm} | {_ci(e['perplexity'], '{:.2f}')} | "
                    + " | ".join(f"{_ci(e[a]['abs_increase'])} | {_ci(e[a + '_worst']['abs_increase'])}"
                                 for a in attacks)
                    + f" | {_ci(e['targeted']['nll_decrease'])} ({e['targeted_random']['nll_decrease']['mean']:.3f}) | "
                    f"{_pct(e['targeted']['exact_match'])} ({100 * e['targeted_random']['exact_match']['mean']:.1f}%) |")
    return "\n".join(rows)


def targeted_table(summary: dict) -> list[str]:
    """Per arm: the target's NLL before and after the targeted attack and its random control, and how often
    greedy decoding then emits the target."""
    seed0 = summary["seeds"][0]
    first = summary["arms"][ARM_NAMES[0]]["targeted"]["per_seed"][seed0]["gradient"]
    rows = ["| arm | target NLL, clean | decrease: gradient | decrease: random | exact match: gradient | "
            "exact match: random | exact match: clean |", "|---" * 7 + "|"]
    for arm in ARM_NAMES:
        e = summary["arms"][arm]
        clean = np.mean([by["gradient"]["clean_target_nll"] for by in e["targeted"]["per_seed"].values()])
        clean_match = np.mean([by["gradient"]["clean_exact_match"] for by in e["targeted"]["per_seed"].values()])
        rows.append(f"| {arm} | {clean:.3f} | {_ci(e['targeted']['nll_decrease'])} | "
                    f"{_ci(e['targeted_random']['nll_decrease'])} | {_pct(e['targeted']['exact_match'])} | "
                    f"{_pct(e['targeted_random']['exact_match'])} | {100 * clean_match:.1f}% |")
    return [f"GCG's objective (Zou et al. 2023) on a base LM: HotFlip's search, candidate pool and edit budget change "
            f"the prompt so that the model continues it with a target, the first {first['target_tokens']} tokens of "
            "the next evaluation example's continuation; the search minimises the target's NLL, the random control "
            "draws as many random perturbations of the same size. Exact match: greedy decoding of the attacked prompt "
            f"emits the target's first {first['match_tokens']} tokens. Decreases in nats/token.", "",
            *rows, ""]


def metric_rows(summary: dict) -> dict[str, dict]:
    """What `dvc metrics show` prints, one file a row (outputs/report/metrics/<row>.json), numbers and a verdict
    word only: per arm its perplexity, each attack's mean NLL increase and worst case and its benchmark
    accuracies (the targeted attack stays in the report: one more column would not fit 200); per headline
    comparison (headline_comparisons) and attack: delta (monotonic less the other), its interval
    delta_lo..delta_up, the Holm p and the verdict. Rows share their keys: one column per key."""
    alpha = 1 - summary["confidence"]
    rows = {}
    for arm in ARM_NAMES:
        e = summary["arms"][arm]
        row = {"ppl": e["perplexity"]["mean"]}
        for attack in summary["attacks"]:
            row[attack] = e[attack]["abs_increase"]["mean"]
            row[f"{attack}_worst"] = e[attack + "_worst"]["abs_increase"]["mean"]
        for task, b in summary["benchmarks"].items():
            if arm in b["acc"]:
                row[f"{task}_acc"] = b["acc"][arm]["mean"]
        rows[f"arm-{arm}"] = row
    for name, comparisons in headline_comparisons(summary).items():
        for c in comparisons:
            d = c["difference"]
            rows[f"{c['metric'].split('.')[0]}-{name}"] = {
                "delta": d["mean"], "delta_lo": d["low"], "delta_up": d["high"], "p_holm": c["p_holm"],
                "verdict": _vulnerability(call(c, alpha)).replace(" within the margin", "")}
    return {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for name, row in rows.items()}


def saturation_clause(summary: dict) -> str:
    """The gradient attacks' last-doubling shares on the arms of the compact table, and how many models and
    attacks (checkpoints and controls included) were flagged as unsaturated."""
    sat = summary["saturation"]
    flagged = [(label, name) for label, by in sat["models"].items() for name, v in by.items() if v["flagged"]]
    total = sum(len(by) for by in sat["models"].values())
    shares = {a: [sat["models"][arm][a]["last_doubling_share"] for arm in ARM_NAMES] for a in summary["attacks"]}
    ranges = ", ".join(f"{_name(a)} {100 * min(v):.0f}-{100 * max(v):.0f}%" for a, v in shares.items())
    if not flagged:
        return (f" Every attack saturated: its last doubling of forwards added <= {100 * sat['tolerance']:.0f}% "
                f"of its final increase ({ranges}).")
    return (f" **{len(flagged)} of {total} attack runs had not saturated** (their last doubling of forwards added "
            f"> {100 * sat['tolerance']:.0f}% of the final increase; gradient attacks on the arms: {ranges}): "
            "every NLL increase here is a lower bound still rising with budget, and a difference between arms "
            "can change sign with it.")


def _attack_run_name(name: str) -> str:
    """"hotflip" -> "HotFlip"; "hotflip_random" -> "random (HotFlip budget)"."""
    attack, _, control = name.partition("_")
    return f"{control} ({_name(attack)} budget)" if control else _name(attack)


def gradient_free_table(summary: dict) -> list[str]:
    """Gradient vs gradient-free at every model a headline comparison reads: each family's curve, checkpoints
    included (mean NLL increase over examples and seeds at the gradient attack's forward cap)."""
    attacks, f = summary["attacks"], summary["frontier"]
    methods_ = (("abs_increase", "gradient"), ("greedy_abs_increase", "greedy"), ("random_abs_increase", "random"),
                ("worst_abs_increase", "worst"))
    rows = ["| model | family | " + " | ".join(f"{_name(a)} {name}" for a in attacks for _, name in methods_) + " |",
            "|---" * (2 + len(attacks) * len(methods_)) + "|"]
    for point in f["points"]:
        rows.append(f"| {point['label']} | {point['family']} | "
                    + " | ".join(f"{point[a][key]['mean']:.3f}" for a in attacks for key, _ in methods_) + " |")
    return ["## Gradient vs gradient-free along every curve", "",
            "NLL increase (nats/token, mean over examples and seeds) of each gradient attack, its greedy and random "
            "controls at the same forward cap, and the per-example worst case, for every model of the "
            "unconstrained, monotonic and control curves. A gradient attack below its controls on one family only "
            "would be gradient masking, not robustness.", "", *rows, ""]


def saturation_table(summary: dict) -> list[str]:
    sat = summary["saturation"]
    names = list(dict.fromkeys(name for by in sat["models"].values() for name in by))
    rows = ["| model | " + " | ".join(map(_attack_run_name, names)) + " |",
            "|---" * (len(names) + 1) + "|"]
    for label, by in sat["models"].items():
        cells = [f"{100 * by[n]['last_doubling_share']:.0f}%{' !' if by[n]['flagged'] else ''}" if n in by else "-"
                 for n in names]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return ["## Saturation", "", "Share of each attack's final NLL increase gained in its last doubling of "
            f"forwards (budget curve, mean over seeds; `!`: above aggregate.saturation_tolerance = "
            f"{sat['tolerance']:g}, not saturated).", "", *rows, ""]


def recovery_warning(summary: dict) -> list[str]:
    r = summary["recovery"]
    open_runs = [f"{arm} seed {seed} (-{v['drop']:.3f})" for arm, seeds in r["arms"].items()
                 for seed, v in seeds.items() if not v["plateaued"]]
    if not open_runs:
        return []
    return [f"> **Recovery had not plateaued** (validation loss still fell by >= {r['threshold_nats']:g} nats/token "
            f"over the last {r['window']} validations): {', '.join(open_runs)}. The step-matched comparison "
            "compares arms that were still improving; the matched-NLL comparison above does not depend on it.", ""]


def control_sentences(summary: dict) -> list[str]:
    conf, alpha = round(100 * summary["confidence"]), 1 - summary["confidence"]
    by_arm: dict[str, list] = {}
    for c in summary["controls"]:
        attack = c["metric"].split(".")[0]
        by_arm.setdefault(c["arm_a"], []).append(
            f"{_name(attack)} over random {_stats(c, conf)}: "
            + judgement(c, alpha, "random substitution is stronger", "the gradient attack is stronger"))
    return [f"- {arm}: " + "; ".join(parts) + "." for arm, parts in by_arm.items()]


def seed_sentence(seeds: list) -> str:
    trained = ", ".join(a.name for a in ARM_TABLE if a.trained)
    untrained = ", ".join(a.name for a in ARM_TABLE if not a.trained)
    if len(seeds) == 1:
        return ("One seed: the intervals cover example/document sampling only; seed-to-seed variation "
                "(recovery data order, attack randomness) is not estimated.")
    return (f"What a seed varies: for {trained}, the recovery-training data order and the attacks' random "
            f"streams; for {untrained}, only the attacks' random streams (the model is one and the same, so its "
            f"clean NLL does not vary by seed). Examples and test documents are the same for every arm and seed. "
            f"With {len(seeds)} seeds the seed part of the variance has {len(seeds) - 1} degrees of freedom: "
            "where it dominates, intervals are wide by construction (t with "
            f"{len(seeds) - 1} df), not by accident.")


def methods(summary: dict) -> list[str]:
    conf, m = round(100 * summary["confidence"]), summary["equivalence_margin_nats"]
    return [
        f"Estimates are means over examples (clustered by source document) and seeds with {conf}% intervals for "
        "the crossed design: the document variance comes from a cluster bootstrap "
        f"({summary['bootstrap_samples']} replicates; the same resampled documents for every arm, seed and metric), "
        "the seed variance from the spread of per-seed means less the example x seed noise it contains, each scaled "
        "by its own t quantile (documents: documents - 1 df, seeds: seeds - 1 df). A paired comparison "
        "applies this to the per-example differences (seed s of one arm with seed s of the other); its p-value is "
        "the t test with the interval's effective df, so p < 0.05 exactly when the interval excludes 0.",
        seed_sentence(summary["seeds"]),
        f"Family: all {summary['family_size']} paired tests of this report (the matched-NLL comparisons above, each "
        "gradient attack's and each worst case's, arm comparisons on test NLL, attack NLL increase and clean NLL of "
        "the attacked examples, and every gradient attack against its random control). "
        "Holm's step-down correction controls the family-wise error at "
        f"{100 - conf}%; both raw and Holm-adjusted p-values are shown. Equivalence: two one-sided tests (TOST) "
        f"against the margin +/-{m:g} nats/token declared in params (aggregate.equivalence_margin_nats), Holm over "
        "the same family. Wording: \"different\" when the Holm-adjusted difference test rejects, "
        f"\"equivalent within +/-{m:g}\" when the Holm-adjusted TOST rejects, otherwise \"not resolved\". "
        "results.json also holds, per comparison, an exact sign-flip test over documents (seed-averaged), which "
        "conditions on the seeds run.", ""]


def power_table(summary: dict) -> list[str]:
    """The smallest paired difference each comparison could detect, with its assumptions."""
    alpha = 1 - summary["confidence"]
    f = summary["frontier"]
    compared = [(c, f"{c['arm_a']} vs {c['arm_b']}") for c in summary["comparisons"] + f["matched"]] + [
        (c, f"{c['arm_a']} vs {c['arm_b']}, excess over the unconstrained curve") for c in f["excess_vs_control"]]
    metrics = list(dict.fromkeys(c["metric"] for c in summary["comparisons"]))
    pairs = list(dict.fromkeys(row for _, row in compared))
    cell = {(row, c["metric"]): f"{c['detectable']:.3f}" for c, row in compared}
    rows = ["| comparison | " + " | ".join(map(metric_label, metrics)) + " |", "|---" * (len(metrics) + 1) + "|"]
    rows += [f"| {row} | " + " | ".join(cell.get((row, m), "-") for m in metrics) + " |" for row in pairs]
    return [f"Smallest paired difference (nats/token) detected with {100 * summary['power']:.0f}% power by a "
            f"two-sided test at alpha = {alpha:g} (unadjusted; under Holm the first of {summary['family_size']} "
            "tests runs at alpha / family size, which needs more), computed as (t(1 - alpha/2) + t(power)) x SE with "
            "the SE and effective df observed in this run, assuming the difference is normal with that SE under "
            "the alternative and the seed and document variances stay as observed.", "", *rows, ""]


def benchmark_table(benchmarks: dict, conf: int) -> list[str]:
    """Zero-shot accuracy per task and arm, and monotonic - baseline (items crossed with seeds)."""
    head = "| task | items | " + " | ".join(ARM_NAMES) + " | monotonic - baseline |"
    rows = [head, "|" + "---|" * (len(ARM_NAMES) + 3)]
    for task, b in benchmarks.items():
        d = b["monotonic_vs_baseline"]["difference"]
        rows.append(f"| {task} | {b['items']} | " + " | ".join(_pct(b["acc"][arm]) for arm in ARM_NAMES)
                    + f" | {100 * d['mean']:+.1f} pts [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")
    return ["Accuracy through lm-evaluation-harness (its task definitions and scoring; `pipeline_lastword`: the "
            "LAMBADA-style last word of test-split passages, defined here in the harness's format), mean over seeds "
            f"with {conf}% intervals over items crossed with seeds (not in the family of tests above).", "", *rows,
            ""]


def transfer_table(matrix: dict) -> str:
    rows = ["| trigger/flips from \\ applied to | " + " | ".join(ARM_NAMES) + " |", "|---" * (len(ARM_NAMES) + 1) + "|"]
    for src in ARM_NAMES:
        rows.append(f"| {src} | " + " | ".join(f"{matrix[src][dst]:.3f}" for dst in ARM_NAMES) + " |")
    return "\n".join(rows)


def optimizer_differences(summary: dict) -> list[str]:
    """Every optimizer setting in which the monotonic arm's recovery differs from the baseline's: train keys
    that differ, and the constrained group (V) against the baseline's weights of the same layers (W)."""
    seed = summary["seeds"][0]
    b, m = (summary["arms"][arm]["train"][seed]["train"] for arm in ("baseline", "monotonic"))
    out = [f"`train.{k}` {b[k]} (baseline) vs {m[k]} (monotonic)" for k in b
           if k != "arm_overrides" and b[k] != m.get(k)]
    if m["constrained_weight_decay"] != b["weight_decay"]:
        out.append(f"weight decay {m['constrained_weight_decay']:g} on the constrained V tensors, {b['weight_decay']:g} "
                   "on the baseline's W of the same layers (decay on V would pull W toward softplus(0) = 0.69, not 0)")
    if m["constrained_lr_multiplier"] * m["lr"] != b["lr"]:
        out.append(f"learning rate {m['constrained_lr_multiplier'] * m['lr']:g} for V, {b['lr']:g} for the baseline's W")
    return out


def lr_selections(summary: dict) -> dict[str, dict]:
    """Each trained arm's select_lr record (one per run, the same for every seed)."""
    return {arm: next(iter(summary["arms"][arm]["train"].values()))["lr_selection"] for arm in TRAINED_ARMS}


def at_edge(c: dict) -> bool:
    """The selection is the grid's smallest or largest value: the best lr may lie beyond the grid."""
    return c["selected"] in (c["multipliers"][0], c["multipliers"][-1])


def lr_clause(summary: dict) -> str:
    chosen = lr_selections(summary)
    steps = next(iter(chosen.values()))["steps"]
    edge = [arm for arm, c in chosen.items() if at_edge(c)]
    return (" Learning rates by equal tuning effort (each arm's best of as many trials of " + f"{steps} steps): "
            + ", ".join(f"{arm} {c['selected_lr']:.2g}" + (" for V" if c["knob"] != "lr" else "")
                        for arm, c in chosen.items()) + "."
            + (f" **At the edge of its grid: {', '.join(edge)}** (a better lr may lie beyond it)." if edge else ""))


def lr_table(summary: dict) -> list[str]:
    """Every trained arm's learning-rate trials: the grid, each trial's validation perplexity, the choice."""
    rows = ["| arm | grid (x) | learning rates tried | validation perplexity after the trial | selected |",
            "|---|---|---|---|---|"]
    for arm, c in lr_selections(summary).items():
        what = "train.lr" if c["knob"] == "lr" else "the lr of V (train.constrained_lr_multiplier)"
        rows.append(f"| {arm} | {what} x {', '.join(f'{m:g}' for m in c['multipliers'])} | "
                    f"{', '.join(f'{lr:.2g}' for lr in c['lr'])} | "
                    f"{', '.join(f'{math.exp(v):.2f}' for v in c['validation_loss'])} | {c['selected_lr']:.2g}"
                    + (" (grid edge)" if at_edge(c) else "") + " |")
    return ["## Learning rates (equal tuning effort)", "",
            "Under W = softplus(V) a step on V moves W by about lr x W, so one shared lr is not one budget: each "
            "trained arm tried as many learning rates, each for the same short run from its own start, and trained "
            "at the one with the lowest validation loss (stages/select_lr.py).", "", *rows, ""]


def markdown(summary: dict, params, prov: dict, plot_files: list[str]) -> str:
    th = summary["thresholds"]
    lines = [f"# Monotonic ({summary['variant']}, init {summary['init']}) vs baseline: robustness and perplexity",
             "", *answer(summary), "## Details", "",
             *matched_paragraph(summary), *excess_paragraph(summary),
             f"Profile `{params.profile}`, seeds {summary['seeds']}, params hash `{prov['params_hash']}`, "
             f"torch {prov['packages']['torch']}, transformers {prov['packages']['transformers']}. The code that ran "
             "is pinned by its file hashes in dvc.lock; commit, host, device and wall times of each step are in its "
             "run record (outputs/runs/), outside the hashed outputs.",
             *methods(summary),
             f"Success: NLL increase on the continuation >= {th['abs_nats']} nats/token (absolute) or "
             f">= {100 * th['relative']:.0f}% (relative).",
             f"Scope of monotonicity: {MONOTONICITY_SCOPE}.", ""]
    overridden = {arm: o for arm, o in summary["arm_overrides"].items() if any(o.values())}
    if overridden:
        lines += ["> **WARNING: the arms were NOT trained with identical budgets.** Per-arm overrides in params: "
                  + "; ".join(f"{arm}: {next(v for v in o.values() if v)}" for arm, o in overridden.items())
                  + ". Differences below confound the constraint with these settings.", ""]
    lines += recovery_warning(summary)
    differences = optimizer_differences(summary)
    if differences:
        lines += ["> **Optimizer differences between the trained arms** (same data, token budget and schedule "
                  "otherwise): " + "; ".join(differences) + ".", ""]
    lines += ["## Step-matched comparison: main table (same recovery budget)", "", main_table(summary), "",
              "## Paired comparisons", "", *comparison_sentences(summary), "",
              "## Gradient-guided attacks against the random-substitution control (same budget)", "",
              *control_sentences(summary), "",
              "Worst case: per example, the highest attacked NLL over the gradient attack, its greedy and random "
              "controls and every arm's transferred attack (outputs/transfer/; another arm's for an arm). The "
              "frontier's checkpoints face the same attacks, so the worst case is compared like each attack: between "
              "arms, at matched clean NLL and against the damage-matched control, each its own row in the family.",
              "", *gradient_free_table(summary),
              "## Targeted attack", "", *targeted_table(summary),
              *saturation_table(summary),
              *lr_table(summary),
              "## Power", "", *power_table(summary),
              "## Zero-shot benchmarks", "", *benchmark_table(summary["benchmarks"], round(100 * summary["confidence"]))]
    for attack in summary["attacks"]:
        lines += [f"## Transfer: {_name(attack)} NLL increase (nats/token, mean over seeds)", "",
                  transfer_table(summary["transfer_abs_increase"][attack]), ""]
    lines += ["## Training", "",
              "Update norms: distance of each parameter group from its starting point after training "
              "(the constrained V is its own group, so a frozen arm shows as ~0).", ""]
    for arm in TRAINED_ARMS:
        for seed, t in summary["arms"][arm]["train"].items():
            norms = ", ".join(f"{group} {value:.3g}" for group, value in t["update_norm_total"].items())
            lines.append(f"- {arm} seed {seed}: validation perplexity {t['validation_perplexity']:.2f} after "
                         f"{t['steps']} steps ({t['tokens_seen']} tokens); update norms: {norms}")
    lines += ["", "## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plot_files], ""]
    return "\n".join(lines)


def plots(loaded: dict, summary: dict, out_dir: Path, params) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    runs, files = loaded["runs"], []
    colors = dict(zip(ARM_NAMES, ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:green")))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in TRAINED_ARMS:
        for i, (seed, run) in enumerate(runs[arm].items()):
            steps = [r["step"] for r in run["train_log"]]
            axes[0].plot(steps, [r["loss"] for r in run["train_log"]], color=colors[arm], alpha=0.6,
                         label=arm if i == 0 else None)
            axes[1].plot([r["step"] for r in run["val_log"]], [r["val_loss"] for r in run["val_log"]],
                         color=colors[arm], marker="o", alpha=0.7, label=arm if i == 0 else None)
    for ax, title in zip(axes, ("training loss", "validation loss")):
        ax.set(xlabel="step", ylabel="nats/token", title=title)
        ax.legend()
    files.append(_save(fig, out_dir / "training_curves.png"))

    attacks = summary["attacks"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.5 * len(attacks), 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for arm in ARM_NAMES:
            for seed in summary["seeds"]:
                ppl = summary["arms"][arm]["perplexity_per_seed"][seed]
                rate = runs[arm][seed][attack]["summary"]["success_rate_abs"]
                ax.scatter(ppl, rate, color=colors[arm], label=arm if seed == summary["seeds"][0] else None)
        ax.set(xscale="log", xlabel="test perplexity", ylabel="success rate (absolute threshold)",
               title=f"{_name(attack)}: perplexity vs attack success")
        ax.legend()
    files.append(_save(fig, out_dir / "perplexity_vs_success.png"))

    fig, axes = plt.subplots(1, len(attacks), figsize=(5.5 * len(attacks), 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        data = [np.concatenate([[r["abs_increase"] for r in runs[arm][s][attack]["examples"]]
                                for s in summary["seeds"]]) for arm in ARM_NAMES]
        ax.violinplot(data, showmedians=True)
        ax.axhline(params.attack.success_threshold_nats, color="k", ls="--", lw=0.8, label="success threshold")
        ax.set_xticks(range(1, len(ARM_NAMES) + 1), ARM_NAMES, rotation=15)
        ax.set(ylabel="NLL increase (nats/token)", title=f"{_name(attack)}: per-example NLL increase")
        ax.legend()
    files.append(_save(fig, out_dir / "nll_increase_distributions.png"))
    files.append(frontier_plot(summary["frontier"], attacks, out_dir / "frontier.png"))
    return files


def frontier_plot(frontier: dict, attacks, path: Path) -> Path:
    """NLL increase and success against clean NLL on the attack examples, per family, with the matching point of
    the final monotonic model. monotonic_init (the constraint before recovery) is far to the right of every
    other model and is left out so that the matched region is readable; the report's table has it."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(attacks), figsize=(5.5 * len(attacks), 8), squeeze=False)
    colors = {"unconstrained": "tab:blue", "monotonic": "tab:red", "control": "tab:green"}
    shown = [p for p in frontier["points"] if p["label"] != "monotonic_init"]
    for col, attack in enumerate(attacks):
        for row, field in enumerate(("abs_increase", "success_abs")):
            ax = axes[row][col]
            for family, color in colors.items():
                points = sorted((p for p in shown if p["family"] == family), key=lambda p: p[attack]["clean_nll"]["mean"])
                x = [p[attack]["clean_nll"]["mean"] for p in points]
                y = [p[attack][field]["mean"] for p in points]
                yerr = [[v - p[attack][field]["low"] for v, p in zip(y, points)],
                        [p[attack][field]["high"] - v for v, p in zip(y, points)]]
                ax.errorbar(x, y, yerr=yerr, color=color, marker="o", capsize=3, label=family,
                            ls="-" if family == "unconstrained" else ":")
                for xi, yi, p in zip(x, y, points):
                    ax.annotate(p["label"].replace("pretrained-step", "step "), (xi, yi), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
            if field == "abs_increase":
                m = next(c["match"] for c in frontier["matched"]
                         if c["arm_a"] == "monotonic" and c["metric"] == f"{attack}.abs_increase")   # the gradient attack
                ax.scatter([m["target_clean"]], [m["curve_increase"]], marker="x", s=80, color="k",
                           label="curve at monotonic's clean NLL", zorder=5)
            ax.set(xlabel="clean NLL on the attack examples (nats/token)",
                   ylabel="NLL increase (nats/token)" if field == "abs_increase" else "success rate (absolute)",
                   title=f"{_name(attack)}: {'NLL increase' if field == 'abs_increase' else 'success'} vs clean NLL "
                         "(monotonic_init not shown)")
            ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
