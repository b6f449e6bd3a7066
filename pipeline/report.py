"""The Markdown report and PNG plots. Every sentence is computed from the numbers it states."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .arms import ARM_NAMES as ARMS
from .arms import TRAINED_ARMS
from .params import MONOTONICITY_SCOPE

ATTACK_NAMES = {"uat": "UAT", "hotflip": "HotFlip"}


def _ci(e: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(e['mean'])} [{fmt.format(e['low'])}, {fmt.format(e['high'])}]"


def _pct(e: dict) -> str:
    return f"{100 * e['mean']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"


def main_table(summary: dict) -> str:
    head = ("| arm | perplexity | UAT +NLL (nats/tok) | UAT rel. | UAT success | HotFlip +NLL (nats/tok) "
            "| HotFlip rel. | HotFlip success | random (HotFlip budget) +NLL | greedy (HotFlip budget) +NLL |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in ARMS:
        e = summary["arms"][arm]
        rows.append(" | ".join([
            f"| {arm}", _ci(e["perplexity"], "{:.2f}"),
            _ci(e["uat"]["abs_increase"]), _pct(e["uat"]["rel_increase"]), _pct(e["uat"]["success_abs"]),
            _ci(e["hotflip"]["abs_increase"]), _pct(e["hotflip"]["rel_increase"]),
            _pct(e["hotflip"]["success_abs"]),
            _ci(e["hotflip_random"]["abs_increase"]), _ci(e["hotflip_greedy"]["abs_increase"]) + " |"]))
    return "\n".join(rows)


def _verdict(c: dict, less: str, more: str) -> str:
    if c["high"] < 0:
        return less
    if c["low"] > 0:
        return more
    return "no difference resolved at this confidence"


def comparison_sentences(summary: dict) -> list[str]:
    conf = round(100 * summary["confidence"])
    arms = summary["arms"]
    out = []
    for key, comp in summary["comparisons"].items():
        a, b = key.split("_vs_")
        ppl_a, ppl_b = arms[a]["perplexity"]["mean"], arms[b]["perplexity"]["mean"]
        t = comp["test_nll_per_token"]
        out.append(f"- **{a} vs {b}, clean quality:** perplexity {ppl_a:.2f} vs {ppl_b:.2f} "
                   f"({ppl_a / ppl_b:.2f}x); per-document NLL difference {t['mean_difference']:+.3f} nats/token "
                   f"({conf}% CI [{t['low']:+.3f}, {t['high']:+.3f}], p = {t['p_value']:.3g}, "
                   f"{t['n_pairs']} documents x seeds): "
                   f"{_verdict(t, f'{a} predicts better', f'{a} predicts worse')}.")
        for attack, name in ATTACK_NAMES.items():
            d = comp[f"{attack}_abs_increase"]
            clean = comp[f"{attack}_clean_nll"]
            out.append(f"  - {name}: NLL increase {arms[a][attack]['abs_increase']['mean']:.3f} vs "
                       f"{arms[b][attack]['abs_increase']['mean']:.3f} nats/token, paired difference "
                       f"{d['mean_difference']:+.3f} ({conf}% CI [{d['low']:+.3f}, {d['high']:+.3f}], "
                       f"p = {d['p_value']:.3g}, {d['n_pairs']} examples x seeds): "
                       f"{_verdict(d, f'{a} is less vulnerable', f'{a} is more vulnerable')}; "
                       f"clean NLL on the same examples differs by {clean['mean_difference']:+.3f} nats/token.")
    return out


def control_sentences(summary: dict) -> list[str]:
    out = []
    for arm, per_attack in summary["gradient_vs_random"].items():
        parts = []
        for attack, c in per_attack.items():
            parts.append(f"{ATTACK_NAMES[attack]} {c['mean_difference']:+.3f} nats/token over random "
                         f"(CI [{c['low']:+.3f}, {c['high']:+.3f}], p = {c['p_value']:.3g})")
        out.append(f"- {arm}: " + "; ".join(parts) + ".")
    return out


def transfer_table(matrix: dict) -> str:
    rows = ["| trigger/flips from \\ applied to | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for src in ARMS:
        rows.append(f"| {src} | " + " | ".join(f"{matrix[src][dst]:.3f}" for dst in ARMS) + " |")
    return "\n".join(rows)


def markdown(summary: dict, params, prov: dict, plot_files: list[str]) -> str:
    conf = round(100 * summary["confidence"])
    th = summary["thresholds"]
    lines = [f"# Monotonic ({summary['variant']}, init {summary['init']}) vs baseline: robustness and perplexity",
             "",
             f"Profile `{params.profile}`, seeds {summary['seeds']}, params hash `{prov['params_hash']}`, "
             f"torch {prov['packages']['torch']}, transformers {prov['packages']['transformers']}. The code that ran "
             "is pinned by its file hashes in dvc.lock; commit, host, device and wall times of each step are in its "
             "run record (outputs/runs/), outside the hashed outputs.",
             f"Estimates are means with {conf}% bootstrap CIs ({summary['bootstrap_samples']} resamples over seeds, "
             "then examples within seeds); p-values are paired sign-flip permutation tests over all example x seed "
             "pairs, which ignore seed clustering, so a CI that resamples seeds can include 0 while p is small.",
             f"Success: NLL increase on the continuation >= {th['abs_nats']} nats/token (absolute) or "
             f">= {100 * th['relative']:.0f}% (relative).",
             f"Scope of monotonicity: {MONOTONICITY_SCOPE}.", ""]
    overridden = {arm: o for arm, o in summary["arm_overrides"].items() if any(o.values())}
    if overridden:
        lines += ["> **WARNING: the arms were NOT trained with identical budgets.** Per-arm overrides in params: "
                  + "; ".join(f"{arm}: {next(v for v in o.values() if v)}" for arm, o in overridden.items())
                  + ". Differences below confound the constraint with these settings.", ""]
    lines += ["## Main table", "", main_table(summary), "",
              "## Paired comparisons", "", *comparison_sentences(summary), "",
              "## Gradient-guided attacks against the random-substitution control (same budget)", "",
              *control_sentences(summary), ""]
    for attack, name in ATTACK_NAMES.items():
        lines += [f"## Transfer: {name} NLL increase (nats/token, mean over seeds)", "",
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
    colors = dict(zip(ARMS, ("tab:gray", "tab:blue", "tab:orange", "tab:red")))

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

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, attack in zip(axes, ATTACK_NAMES):
        for arm in ARMS:
            for seed in summary["seeds"]:
                ppl = summary["arms"][arm]["perplexity_per_seed"][seed]
                rate = runs[arm][seed][attack]["summary"]["success_rate_abs"]
                ax.scatter(ppl, rate, color=colors[arm], label=arm if seed == summary["seeds"][0] else None)
        ax.set(xscale="log", xlabel="test perplexity", ylabel="success rate (absolute threshold)",
               title=f"{ATTACK_NAMES[attack]}: perplexity vs attack success")
        ax.legend()
    files.append(_save(fig, out_dir / "perplexity_vs_success.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, attack in zip(axes, ATTACK_NAMES):
        data = [np.concatenate([[r["abs_increase"] for r in runs[arm][s][attack]["examples"]]
                                for s in summary["seeds"]]) for arm in ARMS]
        ax.violinplot(data, showmedians=True)
        ax.axhline(params.attack.success_threshold_nats, color="k", ls="--", lw=0.8, label="success threshold")
        ax.set_xticks(range(1, len(ARMS) + 1), ARMS, rotation=15)
        ax.set(ylabel="NLL increase (nats/token)", title=f"{ATTACK_NAMES[attack]}: per-example NLL increase")
        ax.legend()
    files.append(_save(fig, out_dir / "nll_increase_distributions.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
