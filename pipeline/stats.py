"""Statistics for multi-seed, per-example results: bootstrap CIs over seeds and over examples
(hierarchical: resample seeds, then examples within each), and paired tests between arms."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n_seeds: int
    n_examples: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    mean_difference: float      # arm_a - arm_b
    low: float
    high: float
    p_value: float              # two-sided sign-flip permutation test on paired differences
    n_pairs: int
    n_seeds: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio_of_sums(values: list[np.ndarray], weights: list[np.ndarray] | None) -> float:
    if weights is None:
        return float(np.mean([v.mean() for v in values]))
    return float(sum(v.sum() for v in values) / sum(w.sum() for w in weights))


def hierarchical_bootstrap(per_seed: list[np.ndarray], n_boot: int, confidence: float, rng: np.random.Generator,
                           weights: list[np.ndarray] | None = None) -> Estimate:
    """Mean over seeds of the per-seed mean (or, with weights, the pooled ratio sum(values)/sum(weights),
    e.g. NLL over tokens), with a percentile CI from resampling seeds and then examples within seeds.
    With one seed this reduces to the ordinary bootstrap over examples."""
    per_seed = [np.asarray(v, dtype=np.float64) for v in per_seed]
    weights = None if weights is None else [np.asarray(w, dtype=np.float64) for w in weights]
    point = _ratio_of_sums(per_seed, weights)
    n = len(per_seed)
    chosen = rng.integers(0, n, (n_boot, n))          # the seeds of every bootstrap sample
    value_sums, weight_sums = np.zeros(n_boot), np.zeros(n_boot)
    for draw in range(n):                             # vectorized over bootstrap samples, per (draw, seed)
        for s, values in enumerate(per_seed):
            rows = np.flatnonzero(chosen[:, draw] == s)
            idx = rng.integers(0, len(values), (len(rows), len(values)))
            if weights is None:
                value_sums[rows] += values[idx].mean(axis=1)
            else:
                value_sums[rows] += values[idx].sum(axis=1)
                weight_sums[rows] += weights[s][idx].sum(axis=1)
    stats = value_sums / n if weights is None else value_sums / weight_sums
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(point, float(low), float(high), len(per_seed), int(sum(len(v) for v in per_seed)))


def paired_comparison(a: list[np.ndarray], b: list[np.ndarray], n_boot: int, confidence: float,
                      rng: np.random.Generator) -> PairedComparison:
    """Per-example paired differences a - b (aligned examples, one array per seed): hierarchical bootstrap CI
    of the mean difference and a two-sided sign-flip permutation p-value on all pairs."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"paired arrays differ in length ({x.shape} vs {y.shape}): examples are not aligned")
        diffs.append(x - y)
    est = hierarchical_bootstrap(diffs, n_boot, confidence, rng)
    return PairedComparison(est.mean, est.low, est.high, sign_flip_p_value(np.concatenate(diffs), n_boot, rng),
                            est.n_examples, len(diffs))


def sign_flip_p_value(diff: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided permutation test of mean(diff) = 0 by random sign flips (exact under a symmetric null)."""
    diff = np.asarray(diff, dtype=np.float64)
    observed = abs(diff.mean())
    if observed == 0:
        return 1.0
    signs = rng.choice([-1.0, 1.0], size=(n_perm, len(diff)))
    null = np.abs((signs * diff).mean(axis=1))
    return float((1 + np.sum(null >= observed - 1e-15)) / (n_perm + 1))
