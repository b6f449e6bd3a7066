"""Statistics for the crossed design the pipeline runs: the same examples (clustered by document) are
evaluated for every arm and seed. Numpy only (no torch, no scipy), vectorised over bootstrap replicates.

Estimand: the mean over the population of examples (documents) and over seeds (recovery-training and attack
randomness). Its variance has two parts, estimated separately:
  - documents: a cluster bootstrap of the seed-averaged values (x G/(G-1)); one table of document draws
    (`Clusters`) serves every arm, seed and metric of an example set, so every estimate of a replicate
    resamples the same documents (the seed-averaged values carry the example x seed noise / seeds);
  - seeds: the between-seed variance of the per-seed means / seeds, less the example x seed interaction it
    also contains (method of moments; the seed bootstrap's variance with its small-sample factor S/(S-1)).
    Zero where seeds do not differ (an untrained model's clean NLL) and where there is one seed.
The interval scales each part by its own t quantile (documents: G-1 df, seeds: S-1 df) and adds them in
quadrature, so an estimate dominated by 3 seeds gets t(2) = 4.30, one dominated by 20 documents t(19) = 2.09
(Banerjee's conservative combination: in simulations of the design, 32 examples in 20 documents x 3 seeds,
it covered 95-97% across seed shares of the variance, where one Welch-Satterthwaite df covered 92-96%). Tests,
TOST and the power note use the interval's effective df, so p < alpha exactly when it excludes 0."""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np


# --- Student t (regularized incomplete beta by Lentz's continued fraction) ----------------------

def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):                      # the fraction converges fast only below the mean
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                     + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * f


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with df degrees of freedom (df = inf: the standard normal)."""
    if math.isinf(df):
        return 0.5 * math.erfc(-x / math.sqrt(2))
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on t_cdf)."""
    lo, hi = -1e3, 1e3
    for _ in range(64):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


# --- the crossed design ---------------------------------------------------------------------------

def document_of(example_id: str) -> str:
    """The document an attack example comes from: ids are "<split>:<doc index>:<offset>"."""
    split, doc, _ = example_id.rsplit(":", 2)
    return f"{split}:{doc}"


@dataclass(frozen=True)
class Clusters:
    """An example set grouped into documents, with the bootstrap's document draws (replicates x documents
    multiplicities) that every arm, seed and metric on this example set shares."""
    ids: tuple[str, ...]
    index: np.ndarray      # document of each example (n,)
    counts: np.ndarray     # (n_boot, n_documents)

    @classmethod
    def draw(cls, ids, documents, n_boot: int, rng: np.random.Generator) -> Clusters:
        names, index = np.unique(np.asarray(documents, dtype=object).astype(str), return_inverse=True)
        if len(names) < 2:
            raise ValueError(f"{len(ids)} examples come from {len(names)} document: need >= 2 for a CI")
        g = len(names)
        picks = rng.integers(0, g, (n_boot, g)) + g * np.arange(n_boot)[:, None]
        counts = np.bincount(picks.ravel(), minlength=n_boot * g).reshape(n_boot, g).astype(np.float64)
        return cls(tuple(ids), index, counts)

    @property
    def n_documents(self) -> int:
        return self.counts.shape[1]


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    se: float
    df: float
    se_documents: float         # the two parts of se (se^2 = se_documents^2 + se_seeds^2)
    se_seeds: float
    n_seeds: int
    n_examples: int
    n_documents: int

    def to_dict(self) -> dict:
        return asdict(self)


def crossed_estimate(values, clusters: Clusters, confidence: float, weights=None) -> Estimate:
    """Weighted mean over examples and seeds of values (seeds x examples; weights per example, e.g. tokens,
    give the ratio sum(w y) / sum(w)) with an interval that t-scales each variance part by its own df."""
    y = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n_seeds, n = y.shape
    if n != len(clusters.ids):
        raise ValueError(f"{n} values per seed for {len(clusters.ids)} examples: examples are not aligned")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    per_seed = y @ w / w.sum()
    point = float(per_seed.mean())
    g = clusters.n_documents
    totals = np.bincount(clusters.index, w * y.mean(axis=0), g)
    sizes = np.bincount(clusters.index, w, g)
    replicates = (clusters.counts @ totals) / (clusters.counts @ sizes)
    v_docs = float(np.var(replicates, ddof=1)) * g / (g - 1)
    v_seeds = 0.0
    if np.any(y != y[0]):   # seed main effect: between-seed variance less the example x seed interaction in it
        resid = y - y.mean(axis=0) - per_seed[:, None] + point
        v_inter = float(np.sum((w * resid) ** 2) / (n_seeds * w.sum()) ** 2 * n * n_seeds
                        / ((n - 1) * (n_seeds - 1)))
        v_seeds = max(float(np.var(per_seed, ddof=1)) / n_seeds - v_inter, 0.0)
    upper = 1 - (1 - confidence) / 2
    var = v_docs + v_seeds
    half = math.sqrt(t_quantile(upper, g - 1) ** 2 * v_docs
                     + (t_quantile(upper, n_seeds - 1) ** 2 * v_seeds if v_seeds > 0 else 0.0))
    df = effective_df(half / math.sqrt(var), upper) if var > 0 else math.inf
    return Estimate(point, point - half, point + half, math.sqrt(var), df, math.sqrt(v_docs), math.sqrt(v_seeds),
                    n_seeds, n, g)


@functools.lru_cache(maxsize=None)
def _quantile_curve(p: float) -> tuple[np.ndarray, np.ndarray]:
    log_df = np.linspace(0.0, np.log(1e4), 400)
    return log_df, np.array([t_quantile(p, math.exp(d)) for d in log_df])


def effective_df(multiplier: float, p: float) -> float:
    """The df whose t p-quantile equals multiplier (interpolated on a cached grid of df in [1, 1e4])."""
    log_df, q = _quantile_curve(p)
    return float(math.exp(np.interp(multiplier, q[::-1], log_df[::-1])))


# --- paired comparisons: difference, equivalence, power -------------------------------------------

@dataclass(frozen=True)
class PairedComparison:
    """arm_a - arm_b on one metric, paired by example and seed."""
    arm_a: str
    arm_b: str
    metric: str
    difference: Estimate
    p_value: float              # two-sided t test of difference = 0 (same SE and df as the interval)
    p_equivalence: float        # TOST against +/- margin: the larger of the two one-sided p-values
    margin: float
    p_sign_flip: float          # exact/random sign flips of per-document differences (seed-averaged)
    detectable: float           # smallest |difference| detected with the stated power at this SE and df
    p_holm: float = math.nan    # filled by holm() over the report's family
    p_equivalence_holm: float = math.nan

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(arm_a: str, arm_b: str, metric: str, a, b, clusters: Clusters, confidence: float,
                      margin: float, power: float, rng: np.random.Generator, weights=None,
                      n_perm: int = 10000) -> PairedComparison:
    """a, b: seeds x examples of the two arms on the same examples (seed s of a with seed s of b)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape ({a.shape} vs {b.shape}): examples are not aligned")
    diff = a - b
    est = crossed_estimate(diff, clusters, confidence, weights)
    alpha = 1 - confidence
    return PairedComparison(arm_a, arm_b, metric, est, two_sided_p(est), equivalence_p(est, margin), margin,
                            sign_flip_p_value(diff, clusters, n_perm, rng, weights),
                            detectable_difference(est, alpha, power))


def two_sided_p(est: Estimate) -> float:
    if est.se == 0:
        return float(est.mean == 0)
    return 2 * (1 - t_cdf(abs(est.mean) / est.se, est.df))


def equivalence_p(est: Estimate, margin: float) -> float:
    """TOST: p < alpha exactly when the (1 - 2 alpha) interval lies inside (-margin, +margin)."""
    if est.se == 0:
        return float(abs(est.mean) >= margin)
    lower = 1 - t_cdf((est.mean + margin) / est.se, est.df)     # H0: difference <= -margin
    upper = t_cdf((est.mean - margin) / est.se, est.df)         # H0: difference >= +margin
    return max(lower, upper)


def detectable_difference(est: Estimate, alpha: float, power: float) -> float:
    """(t_{1-alpha/2} + t_{power}) * SE: the true difference a two-sided level-alpha test detects with
    probability `power`, taking the observed SE and df as the truth under the alternative."""
    return (t_quantile(1 - alpha / 2, est.df) + t_quantile(power, est.df)) * est.se


def sign_flip_p_value(diff, clusters: Clusters, n_perm: int, rng: np.random.Generator, weights=None) -> float:
    """Two-sided test of mean difference 0 flipping the sign of whole documents (their seed-averaged,
    weighted difference totals): exact over all 2^G flips for G <= 16 documents, else n_perm random ones.
    Conditional on the seeds run: it does not see seed-to-seed variance."""
    diff = np.atleast_2d(np.asarray(diff, dtype=np.float64))
    w = np.ones(diff.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    totals = np.bincount(clusters.index, w * diff.mean(axis=0), clusters.n_documents)
    observed = abs(totals.sum())
    if observed == 0:
        return 1.0
    g = len(totals)
    if g <= 16:
        signs = 1.0 - 2.0 * ((np.arange(2 ** g)[:, None] >> np.arange(g)) & 1)
        return float(np.mean(np.abs(signs @ totals) >= observed * (1 - 1e-12)))
    signs = rng.choice([-1.0, 1.0], size=(n_perm, g))
    return float((1 + np.sum(np.abs(signs @ totals) >= observed * (1 - 1e-12))) / (n_perm + 1))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment (controls the family-wise error rate) of a family of p-values."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def verdict(p_holm: float, p_equivalence_holm: float, alpha: float) -> str:
    """"different", "equivalent" (TOST), "different, within the margin" (both) or "not resolved", from the
    Holm-adjusted p-values of a comparison in its family."""
    different, equivalent = p_holm < alpha, p_equivalence_holm < alpha
    if different and equivalent:
        return "different, within the margin"
    return "different" if different else "equivalent" if equivalent else "not resolved"
