"""Stage `aggregate`: every arm x seed x metric into results.json; estimates and paired comparisons for the
crossed design (the same examples and documents for every arm and seed; pipeline/stats.py) as typed records
(arm estimates, paired comparisons with Holm over the report's family, transfer cells); a Markdown report
computed from the numbers; PNG plots."""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import paths, report
from ..arms import ARM_NAMES, ARMS, TRAINED_ARMS, checkpoints_of, get
from ..io import atomic_write_text, read_json, staged_dir, write_json
from ..frontier import CurvePoint, matched
from ..params import ATTACKS, CONTROLS, STEPS, TARGETED, TARGETED_METHODS
from ..provenance import provenance, record_run
from ..stats import Clusters, Estimate, PairedComparison, crossed_estimate, document_of, holm, paired_comparison

ATTACK_FIELDS = ("clean_nll", "abs_increase", "rel_increase", "success_abs", "success_rel")
CONTROL_FIELDS = ("abs_increase", "success_abs")
TARGETED_FIELDS = ("nll_decrease", "exact_match")     # per example: the target's NLL decrease, greedy decoding emits it
COMPARISONS = (("monotonic", "flipped"), ("monotonic", "baseline"), ("flipped", "baseline"),
               ("monotonic_init", "pretrained"), ("baseline", "pretrained"), ("monotonic", "pretrained"))


def _require(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"aggregate needs {path}: run its stage first (dvc repro)")
    return read_json(path)


def _read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def checkpoint_labels(params) -> list[str]:
    """The frontier's checkpoints along pretraining and recovery (pipeline.arms.at_step)."""
    return [label for labels in families(params.frontier).values() for label in labels if get(label).checkpoint_of]


def _arm_measurements(arm: str, seed: int) -> dict:
    attack_dir = paths.attack_dir(arm, seed)
    return {"eval": _require(paths.eval_dir(arm, seed) / "metrics.json"),
            "per_doc": _require(paths.eval_dir(arm, seed) / "per_doc.json"),
            **{name: _require(attack_dir / f"{name}.json") for name in STEPS}}


def load_runs(params) -> dict:
    """runs[arm][seed] = {"eval", "per_doc", "uat", "hotflip", "controls", "targeted", "train"?}; transfer[seed]. The
    frontier's checkpoints (<arm>-step<N>) are runs too."""
    runs = {arm: {} for arm in (*ARM_NAMES, *checkpoint_labels(params))}
    for seed in params.seeds:
        for label in checkpoint_labels(params):
            runs[label][seed] = _arm_measurements(label, seed)
        for arm in ARM_NAMES:
            run = _arm_measurements(arm, seed)
            if arm in TRAINED_ARMS:
                tdir = paths.train_log_dir(arm, seed)
                run["train"] = _require(tdir / "metrics.json")
                run["train_log"] = _read_csv(tdir / "log.csv")
                run["val_log"] = _read_csv(tdir / "val_log.csv")
            runs[arm][seed] = run
    transfer = {seed: _require(paths.transfer_dir(seed) / "transfer.json") for seed in params.seeds}
    for seed, matrix in transfer.items():
        for label in runs:
            runs[label][seed]["worst_case"] = {attack: matrix["worst_case"][attack][label] for attack in ATTACKS}
    conversion = _require(paths.METRICS_DIR / "monotonic_init.json")
    benchmarks = {arm: {seed: _require(paths.benchmark_dir(paths.run_name(arm, seed) if ARMS[arm].trained
                                                           else arm) / "metrics.json")["tasks"]
                        for seed in params.seeds} for arm in ARM_NAMES}
    return {"runs": runs, "transfer": transfer, "benchmarks": benchmarks, "conversion": conversion}


@dataclass(frozen=True)
class Metric:
    """One per-example quantity: `field` of the attack `source` (a control's run of it if `control`), or the
    test split's per-document NLL per token (source "per_doc", token-weighted)."""
    source: str
    field: str
    control: str | None = None

    @property
    def name(self) -> str:
        return "test_nll_per_token" if self.source == "per_doc" else \
            f"{self.source}{'_' + self.control if self.control else ''}.{self.field}"


TEST_NLL = Metric("per_doc", "nll")
WORST = "worst"     # per example, the max over the attack's gradient, greedy, random and transferred runs (transfer)
ARM_METRICS = (TEST_NLL, *(Metric(a, f) for a in ATTACKS for f in ATTACK_FIELDS),
               *(Metric(a, f, c) for a in ATTACKS for c in (*CONTROLS, WORST) for f in CONTROL_FIELDS),
               *(Metric(TARGETED, f, c) for c in (None, "random") for f in TARGETED_FIELDS))
# what the matched-NLL comparisons compare: each gradient attack's NLL increase and, per example, the worst case
# over every attack (the step-matched arm comparisons: the gradient attacks only, to keep the family small)
INCREASES = (*(Metric(a, "abs_increase") for a in ATTACKS), *(Metric(a, "abs_increase", WORST) for a in ATTACKS))
COMPARED_METRICS = (TEST_NLL, *(Metric(a, "abs_increase") for a in ATTACKS), *(Metric(a, "clean_nll") for a in ATTACKS))
RATE_FIELDS = ("success_abs", "success_rel", "exact_match")     # proportions: intervals clipped to [0, 1]


@dataclass(frozen=True)
class ArmEstimate:
    arm: str
    metric: str
    estimate: Estimate


@dataclass(frozen=True)
class TransferCell:
    attack: str
    source: str
    target: str
    per_seed: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_seed))


class Design:
    """The crossed design of a loaded run: a metric's values as seeds x examples, aligned on the same examples
    for every arm and seed (else it fails), and one table of document draws per example set."""

    def __init__(self, loaded: dict, seeds, n_boot: int, rng: np.random.Generator):
        self.runs, self.seeds, self.n_boot, self.rng = loaded["runs"], list(seeds), n_boot, rng
        self._clusters: dict[tuple, Clusters] = {}

    def _rows(self, metric: Metric, arm: str, seed) -> tuple[list[str], list[float], np.ndarray | None]:
        run = self.runs[arm][seed]
        if metric.source == "per_doc":
            pd = run["per_doc"]
            tokens = np.asarray(pd["tokens"], dtype=np.float64)
            return pd["doc_ids"], list(np.asarray(pd["nll"], dtype=np.float64) / tokens), tokens
        if metric.source == TARGETED:
            result = run[TARGETED][metric.control or "gradient"]
        else:
            result = (run[metric.source] if metric.control is None else run["worst_case"][metric.source]
                      if metric.control == WORST else run["controls"][metric.control][metric.source])
        return [r["id"] for r in result["examples"]], [float(r[metric.field]) for r in result["examples"]], None

    def values(self, metric: Metric, arm: str) -> tuple[np.ndarray, Clusters, np.ndarray | None]:
        ids = weights = None
        out = []
        for seed in self.seeds:
            row_ids, row, w = self._rows(metric, arm, seed)
            if ids is None:
                ids, weights = row_ids, w
            elif row_ids != ids or (w is not None and not np.array_equal(w, weights)):
                raise ValueError(f"{metric.name} of {arm}: seed {seed} has other examples than seed "
                                 f"{self.seeds[0]}: the design must cross the same examples with every seed")
            out.append(row)
        return np.asarray(out), self.clusters(ids, metric.source == "per_doc"), weights

    def clusters(self, ids: list[str], documents_are_examples: bool) -> Clusters:
        key = tuple(ids)
        if key not in self._clusters:
            docs = ids if documents_are_examples else [document_of(i) for i in ids]
            self._clusters[key] = Clusters.draw(ids, docs, self.n_boot, self.rng)
        return self._clusters[key]


def clip_rate(est: Estimate) -> Estimate:
    """A proportion's interval, clipped to [0, 1]."""
    return replace(est, low=max(est.low, 0.0), high=min(est.high, 1.0))


def arm_estimates(design: Design, confidence: float) -> list[ArmEstimate]:
    out = []
    for arm in ARM_NAMES:
        for metric in ARM_METRICS:
            values, clusters, weights = design.values(metric, arm)
            est = crossed_estimate(values, clusters, confidence, weights)
            if metric.field in RATE_FIELDS:
                est = clip_rate(est)
            out.append(ArmEstimate(arm, metric.name, est))
    return out


def _paired(design: Design, agg, a: tuple[str, Metric], b: tuple[str, Metric], labels: tuple[str, str],
            metric: str) -> PairedComparison:
    (va, clusters, weights), (vb, clusters_b, weights_b) = design.values(a[1], a[0]), design.values(b[1], b[0])
    if clusters_b is not clusters or (weights is not None and not np.array_equal(weights, weights_b)):
        raise ValueError(f"{labels[0]} and {labels[1]} on {metric} are not on the same examples")
    return paired_comparison(*labels, metric, va, vb, clusters, agg.confidence, agg.equivalence_margin_nats,
                             agg.power, design.rng, weights)


def compared_metrics(design: Design) -> list[Metric]:
    """COMPARED_METRICS less the repeats of clean NLL: attacks on the same examples share it (one test)."""
    out, seen = [], set()
    for m in COMPARED_METRICS:
        if m.field == "clean_nll":
            ids = design.values(m, ARM_NAMES[0])[1].ids
            if ids in seen:
                continue
            seen.add(ids)
        out.append(m)
    return out


def arm_comparisons(design: Design, agg) -> list[PairedComparison]:
    metrics = compared_metrics(design)
    return [_paired(design, agg, (a, m), (b, m), (a, b), m.name) for a, b in COMPARISONS for m in metrics]


def control_comparisons(design: Design, agg) -> list[PairedComparison]:
    """Each gradient attack against its random-substitution control at the same budget, per arm."""
    return [_paired(design, agg, (arm, Metric(attack, "abs_increase")),
                    (arm, Metric(attack, "abs_increase", "random")), (arm, f"{arm} random"),
                    f"{attack}.abs_increase") for arm in ARM_NAMES for attack in ATTACKS]


def with_holm(family: list[PairedComparison]) -> list[PairedComparison]:
    """Holm over the family, separately for the difference tests and for the equivalence tests."""
    p_holm = holm([c.p_value for c in family])
    p_eq_holm = holm([c.p_equivalence for c in family])
    return [replace(c, p_holm=float(p), p_equivalence_holm=float(q)) for c, p, q in zip(family, p_holm, p_eq_holm)]


MATCHED_LABEL = "unconstrained at matched clean NLL"
FAMILIES = ("unconstrained", "monotonic", "control")


def families(frontier) -> dict[str, list[str]]:
    """The models of each family (pipeline.arms.Arm.family) along training, each arm after its checkpoints:
    the unconstrained family is the reference curve; the control's curve starts at the model it starts from
    (monotonic_init: the same weights, its step 0)."""
    out = {family: [label for arm in ARMS.values() if arm.family == family
                    for label in (*checkpoints_of(arm.name, frontier), arm.name)] for family in FAMILIES}
    starts = [arm.start for arm in ARMS.values() if arm.family == "control"]
    out["control"] = [*dict.fromkeys(starts), *out["control"]]
    return out


def curve_point(design: Design, label: str, increase: Metric) -> CurvePoint:
    return CurvePoint(label, design.values(Metric(increase.source, "clean_nll"), label)[0],
                      design.values(increase, label)[0])


def matched_comparisons(design: Design, agg, curve_labels: list[str],
                        targets: list[str]) -> list[tuple[PairedComparison, dict]]:
    """Per recovered monotonic model (its recovery checkpoints and the final one) and increase (INCREASES): its NLL
    increase less the unconstrained reference curve's at its clean NLL."""
    out = []
    for label in targets:
        for increase in INCREASES:
            target = curve_point(design, label, increase)
            d, match = matched(target, [curve_point(design, c, increase) for c in curve_labels],
                               agg.curve_min_gap_nats)
            clusters = design.values(Metric(increase.source, "clean_nll"), label)[1]
            comparison = paired_comparison(label, MATCHED_LABEL, increase.name, d, np.zeros_like(d),
                                           clusters, agg.confidence, agg.equivalence_margin_nats, agg.power,
                                           design.rng)
            out.append((comparison, match.to_dict()))
    return out


def damage_matched(label: str) -> str:
    """The control's model at the same recovery step as a recovered monotonic model (flipped-step40 for
    monotonic-step40)."""
    control = next(arm.name for arm in ARMS.values() if arm.family == "control")
    step = get(label).step
    return control if step is None else f"{control}-step{step}"


def excess_comparisons(design: Design, agg, curve_labels: list[str],
                       targets: list[str]) -> list[tuple[PairedComparison, dict]]:
    """Per recovered monotonic model and attack: its excess over the unconstrained curve at its own clean NLL
    less its damage-matched control's excess at the control's own clean NLL (a difference in differences). Both
    arms carry the same damage and are matched on the densely sampled unconstrained curve, never on the
    control's own recovery curve, whose first segment (monotonic_init to the first checkpoint) is a chord across
    the steepest part of recovery."""
    out = []
    for label in targets:
        control = damage_matched(label)
        for increase in INCREASES:
            curve = [curve_point(design, c, increase) for c in curve_labels]
            d_target, m_target = matched(curve_point(design, label, increase), curve, agg.curve_min_gap_nats)
            d_control, m_control = matched(curve_point(design, control, increase), curve, agg.curve_min_gap_nats)
            clusters = design.values(Metric(increase.source, "clean_nll"), label)[1]
            comparison = paired_comparison(label, control, increase.name, d_target, d_control, clusters,
                                           agg.confidence, agg.equivalence_margin_nats, agg.power, design.rng)
            out.append((comparison, {"target": m_target.to_dict(), "control": m_control.to_dict(),
                                     "target_excess": float(d_target.mean()),
                                     "control_excess": float(d_control.mean())}))
    return out


POINT_METRICS = ("clean_nll", "abs_increase", "success_abs")


def frontier_points(design: Design, family_labels: dict[str, list[str]], confidence: float) -> list[dict]:
    """Every model of every family on the attack examples, per attack: clean NLL, NLL increase and success, and the
    NLL increase of its greedy and random controls and of the worst case over every attack it faced."""
    out = []
    for family, labels in family_labels.items():
        for label in labels:
            point = {"label": label, "family": family}
            for attack in ATTACKS:
                metrics = {field: Metric(attack, field) for field in POINT_METRICS}
                metrics |= {f"{c}_abs_increase": Metric(attack, "abs_increase", c) for c in (*CONTROLS, WORST)}
                point[attack] = {}
                for key, metric in metrics.items():
                    values, clusters, _ = design.values(metric, label)
                    est = crossed_estimate(values, clusters, confidence)
                    point[attack][key] = (clip_rate(est) if metric.field in RATE_FIELDS else est).to_dict()
            out.append(point)
    return out


def last_doubling_share(curve: list) -> float:
    """The share of an attack's final NLL increase gained in its last doubling of forwards: 1 - v(F/2) / v(F) on
    the recorded budget curve [(forwards, increase), ...], v(F/2) interpolated (0 before the first point)."""
    forwards, values = np.asarray(curve, dtype=np.float64).T
    final = values[-1]
    half = np.interp(forwards[-1] / 2, np.concatenate([[0.0], forwards]), np.concatenate([[0.0], values]))
    return float((final - half) / final) if final > 0 else float("nan")


def saturation(runs: dict, seeds, tolerance: float) -> dict:
    """Per model (arms and checkpoints) and attack (gradient, and the controls where they ran): the last
    doubling's share, mean over seeds, flagged above `tolerance` (the attack had not saturated)."""
    out = {}
    for label, by_seed in runs.items():
        curves: dict[str, list] = {}
        for seed in seeds:
            run = by_seed[seed]
            for attack in ATTACKS:
                curves.setdefault(attack, []).append(run[attack]["budget_curve"])
                for control in (CONTROLS if "controls" in run else ()):
                    curves.setdefault(f"{attack}_{control}", []).append(
                        run["controls"][control][attack]["budget_curve"])
            for method in (TARGETED_METHODS if TARGETED in run else ()):
                curves.setdefault(TARGETED if method == "gradient" else f"{TARGETED}_{method}", []).append(
                    run[TARGETED][method]["budget_curve"])
        for name, per_seed in curves.items():
            shares = [last_doubling_share(c) for c in per_seed]
            out.setdefault(label, {})[name] = {"last_doubling_share": float(np.nanmean(shares)), "per_seed": shares,
                                               "flagged": bool(np.nanmean(shares) > tolerance)}
    return {"tolerance": tolerance, "models": out}


def recovery_plateau(runs: dict, seeds, agg) -> dict:
    """Per trained arm and seed: the validation-loss drop over the last plateau_window validations, and whether
    it is below plateau_threshold_nats (recovery has stopped improving)."""
    out = {}
    for arm in TRAINED_ARMS:
        for seed in seeds:
            val = [row["val_loss"] for row in runs[arm][seed]["val_log"]]
            window = min(agg.plateau_window, len(val) - 1)
            drop = val[-1 - window] - val[-1] if window > 0 else float("nan")
            out.setdefault(arm, {})[seed] = {"validation_loss": val[-1], "drop": drop, "window": window,
                                             "plateaued": bool(window > 0 and drop < agg.plateau_threshold_nats)}
    return {"threshold_nats": agg.plateau_threshold_nats, "window": agg.plateau_window, "arms": out}


def transfer_cells(loaded: dict, seeds) -> list[TransferCell]:
    return [TransferCell(attack, src, dst, tuple(loaded["transfer"][s][attack]["abs_increase"][src][dst]
                                                 for s in seeds))
            for attack in ATTACKS for src in ARM_NAMES for dst in ARM_NAMES]


def benchmark_summary(loaded: dict, seeds, agg, rng: np.random.Generator) -> dict:
    """Per task: each arm's accuracy (items crossed with seeds: an untrained arm's scores are the same for
    every seed) and monotonic - baseline paired by item and seed, each item its own cluster."""
    bench = loaded["benchmarks"]
    out = {}
    for task in bench[ARM_NAMES[0]][seeds[0]]:
        acc = {arm: np.array([[item["acc"] for item in bench[arm][s][task]["items"]] for s in seeds]) for arm in ARM_NAMES}
        ids = [f"{task}:{item['doc_id']}" for item in bench[ARM_NAMES[0]][seeds[0]][task]["items"]]
        clusters = Clusters.draw(ids, ids, agg.bootstrap_samples, rng)
        diff = paired_comparison("monotonic", "baseline", f"{task}.acc", acc["monotonic"], acc["baseline"], clusters,
                                 agg.confidence, agg.equivalence_margin_nats, agg.power, rng)
        out[task] = {"acc": {arm: clip_rate(crossed_estimate(a, clusters, agg.confidence)).to_dict()
                             for arm, a in acc.items()},
                     "monotonic_vs_baseline": diff.to_dict(), "items": len(ids)}
    return out


def conversion_summary(metrics: dict) -> dict:
    """What the conversion does before any training: the damaging init's perplexity and the equivalent one's."""
    return {k: metrics[k] for k in ("init", "eps", "validation_perplexity", "pretrained_validation_perplexity",
                                    "equivalent")}


def _arm_entry(arm: str, estimates: list[ArmEstimate], runs: dict, seeds) -> dict:
    est = {e.metric: e.estimate for e in estimates if e.arm == arm}
    nll = est[TEST_NLL.name]
    entry = {"test_nll_per_token": nll.to_dict(),
             "perplexity": {"mean": math.exp(nll.mean), "low": math.exp(nll.low), "high": math.exp(nll.high),
                            "n_seeds": nll.n_seeds, "n_documents": nll.n_documents},
             "perplexity_per_seed": {s: runs[arm][s]["eval"]["perplexity"] for s in seeds}}
    for name, e in est.items():
        if name != TEST_NLL.name:
            group, field = name.split(".")
            entry.setdefault(group, {})[field] = e.to_dict()
    for attack in ATTACKS:
        entry[attack]["per_seed"] = {s: runs[arm][s][attack]["summary"] for s in seeds}
    entry[TARGETED]["per_seed"] = {s: {m: runs[arm][s][TARGETED][m]["summary"] for m in TARGETED_METHODS} for s in seeds}
    if ARMS[arm].trained:
        entry["train"] = {s: {k: v for k, v in runs[arm][s]["train"].items() if k != "provenance"} for s in seeds}
    return entry


def build_summary(params, loaded: dict) -> dict:
    agg = params.aggregate
    runs, seeds = loaded["runs"], params.seeds
    design = Design(loaded, seeds, agg.bootstrap_samples, np.random.default_rng(agg.seed))
    estimates = arm_estimates(design, agg.confidence)
    between_arms = arm_comparisons(design, agg)
    family_labels = families(params.frontier)
    curve_labels = family_labels["unconstrained"]
    recovered = [label for label in family_labels["monotonic"] if get(label).trained]
    at_matched_nll = matched_comparisons(design, agg, curve_labels, recovered)
    along_control = excess_comparisons(design, agg, curve_labels, recovered)
    family = with_holm(between_arms + [c for c, _ in at_matched_nll + along_control]
                       + control_comparisons(design, agg))
    n_arm, n_matched, n_control = len(between_arms), len(at_matched_nll), len(along_control)
    matched_rows = [{**c.to_dict(), "match": m} for c, (_, m) in
                    zip(family[n_arm:n_arm + n_matched + n_control], at_matched_nll + along_control)]
    transfer = {}
    for cell in transfer_cells(loaded, seeds):
        transfer.setdefault(cell.attack, {}).setdefault(cell.source, {})[cell.target] = cell.mean
    overrides = {arm: {s: runs[arm][s]["train"].get("overrides") or {} for s in seeds} for arm in TRAINED_ARMS}
    return {"arms": {arm: _arm_entry(arm, estimates, runs, seeds) for arm in ARM_NAMES},
            "benchmarks": benchmark_summary(loaded, seeds, agg, design.rng),
            "comparisons": [c.to_dict() for c in family[:n_arm]],
            "frontier": {"curve": curve_labels, "control_curve": family_labels["control"],
                         "min_gap_nats": agg.curve_min_gap_nats,
                         "points": frontier_points(design, family_labels, agg.confidence),
                         "matched": matched_rows[:n_matched], "excess_vs_control": matched_rows[n_matched:]},
            "controls": [c.to_dict() for c in family[n_arm + n_matched + n_control:]],
            "conversion": conversion_summary(loaded["conversion"]),
            "recovery": recovery_plateau(runs, seeds, agg),
            "saturation": saturation(runs, seeds, agg.saturation_tolerance),
            "family_size": len(family), "attacks": list(ATTACKS), "control_methods": list(CONTROLS),
            "transfer_abs_increase": transfer, "arm_overrides": overrides,
            "seeds": list(seeds), "confidence": agg.confidence, "bootstrap_samples": agg.bootstrap_samples,
            "equivalence_margin_nats": agg.equivalence_margin_nats, "power": agg.power,
            "thresholds": {"abs_nats": params.attack.success_threshold_nats,
                           "relative": params.attack.success_threshold_relative},
            "variant": params.monotonic.variant, "init": params.monotonic.init,
            "input_params_hashes": sorted({runs[a][s][k]["provenance"]["params_hash"] for a in runs for s in seeds
                                           for k in ("eval", *ATTACKS, "controls") if k in runs[a][s]})}


def run(params, args) -> int:
    loaded = load_runs(params)
    summary = build_summary(params, loaded)
    t0 = time.time()
    prov = provenance(params, "aggregate", seed=params.aggregate.seed)
    per_run = {arm: {seed: {k: v for k, v in run.items() if k not in ("train_log", "val_log", "worst_case")}
                     for seed, run in seeds.items()} for arm, seeds in loaded["runs"].items()}
    with staged_dir(paths.REPORT_DIR) as out:
        write_json(out / "results.json", {"summary": summary, "runs": per_run, "transfer": loaded["transfer"],
                                          "benchmarks": loaded["benchmarks"], "provenance": prov})
        for name, row in report.metric_rows(summary).items():
            write_json(out / "metrics" / f"{name}.json", row)
        plot_files = report.plots(loaded, summary, out / "plots", params)
        text = report.markdown(summary, params, prov, [p.relative_to(out).as_posix() for p in plot_files])
        atomic_write_text(out / "report.md", text)
    record_run("aggregate", prov, seconds=round(time.time() - t0, 1))
    print(f"aggregate: report at {paths.REPORT_DIR / 'report.md'}")
    print(report.main_table(summary))
    return 0
