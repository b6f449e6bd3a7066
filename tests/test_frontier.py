"""pipeline/frontier.py: robustness at matched clean NLL against an unconstrained reference curve."""
import numpy as np
import pytest

from pipeline.frontier import CurvePoint, matched, pooled, segment
from pipeline.stats import Clusters, crossed_estimate

N_EXAMPLES, N_DOCS, N_SEEDS = 32, 20, 3


def _point(label, clean, increase):
    return CurvePoint(label, np.atleast_2d(clean), np.atleast_2d(increase))


def test_on_an_exactly_linear_curve_every_example_differs_by_the_offset():
    """Every model obeys increase = 0.2 + 0.5 clean per example; the target sits 0.07 above that line, so the
    linearised per-example differences are 0.07 for every example, whatever the examples' spread."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.4, (N_SEEDS, N_EXAMPLES))
    curve = [_point(f"p{k}", base + c, 0.2 + 0.5 * (base + c)) for k, c in enumerate((4.0, 4.6, 5.3))]
    target_clean = base + 4.9 + rng.normal(0, 0.1, (N_SEEDS, N_EXAMPLES))
    d, match = matched(_point("t", target_clean, 0.2 + 0.5 * target_clean + 0.07), curve, 0.0)
    assert np.allclose(d, 0.07)
    assert (match.lower, match.upper, match.extrapolated) == ("p1", "p2", False)
    assert match.slope == pytest.approx(0.5) and 0 < match.weight < 1


def test_the_linearised_differences_average_to_the_interpolated_difference():
    rng = np.random.default_rng(1)
    curve = [_point(f"p{k}", rng.normal(c, 0.5, (N_SEEDS, N_EXAMPLES)), rng.normal(m, 0.2, (N_SEEDS, N_EXAMPLES)))
             for k, (c, m) in enumerate(((5.5, 0.2), (4.5, 0.4), (5.0, 0.3)))]
    target = _point("t", rng.normal(4.8, 0.5, (N_SEEDS, N_EXAMPLES)), rng.normal(0.5, 0.2, (N_SEEDS, N_EXAMPLES)))
    d, match = matched(target, curve, 0.0)
    lo, hi = sorted(curve, key=lambda p: p.clean_mean)[:2]
    assert (match.lower, match.upper) == (lo.label, hi.label)
    assert np.interp(target.clean_mean, [lo.clean_mean, hi.clean_mean], [lo.increase_mean, hi.increase_mean]) \
        == pytest.approx(match.curve_increase)
    assert d.mean() == pytest.approx(target.increase_mean - match.curve_increase)


def test_a_target_beyond_the_curve_is_extrapolated_from_the_nearest_end():
    curve = [_point(f"p{c}", [c, c], [c / 10, c / 10]) for c in (4.0, 4.5, 5.0)]
    a, b, extrapolated = segment(curve, 6.0)
    assert (a.label, b.label, extrapolated) == ("p4.5", "p5.0", True)
    a, b, extrapolated = segment(curve, 3.0)
    assert (a.label, b.label, extrapolated) == ("p4.0", "p4.5", True)
    with pytest.raises(ValueError, match=">= 2 points"):
        segment(curve[:1], 4.0)


def test_matched_interval_covers_the_true_matched_difference():
    """Shared example effects move clean NLL and vulnerability together (a model that predicts an example
    worse is easier to attack on it), so a step-matched difference is confounded; the matched difference
    of the population means is the truth, and the crossed interval of the linearised values covers it."""
    rng = np.random.default_rng(2)
    mu_clean = {"a": 4.5, "b": 5.2, "t": 4.9}
    mu_inc = {"a": 0.30, "b": 0.45, "t": 0.50}
    w = (mu_clean["t"] - mu_clean["a"]) / (mu_clean["b"] - mu_clean["a"])
    truth = mu_inc["t"] - ((1 - w) * mu_inc["a"] + w * mu_inc["b"])
    covered, reps = 0, 400
    for _ in range(reps):
        docs = np.concatenate([np.arange(N_DOCS), rng.integers(0, N_DOCS, N_EXAMPLES - N_DOCS)])
        ids = [f"attack_eval:{d}:{i}" for i, d in enumerate(docs)]
        example = rng.normal(0, 0.3, N_DOCS)[docs] + rng.normal(0, 0.4, N_EXAMPLES)
        points = {name: _point(name, mu_clean[name] + example + rng.normal(0, 0.1, (N_SEEDS, N_EXAMPLES)),
                               mu_inc[name] + 0.3 * example + rng.normal(0, 0.15, (N_SEEDS, N_EXAMPLES))
                               + rng.normal(0, 0.03, (N_SEEDS, 1)))        # each model's seeds: attack randomness
                  for name in mu_clean}
        d, _ = matched(points["t"], [points["a"], points["b"]], 0.0)
        est = crossed_estimate(d, Clusters.draw(ids, docs.astype(str), 500, rng), 0.95)
        covered += est.low <= truth <= est.high
    assert 0.92 <= covered / reps <= 0.98, covered / reps


def test_near_identical_curve_points_are_pooled_before_matching():
    """Two unconstrained models 0.001 nats apart in clean NLL (the equivalent-init run's pretrained and baseline)
    made a segment whose slope, and so the delta method's interval, was noise: +/-3 nats/token. Pooled at the
    gap, the target is matched between the pooled point and its next neighbour, and its interval is narrow."""
    rng = np.random.default_rng(3)
    base = rng.normal(0, 0.4, (N_SEEDS, N_EXAMPLES))
    far = _point("far", base + 4.3, 0.30 + rng.normal(0, 0.1, base.shape))
    a = _point("a", base + 4.600, 0.40 + rng.normal(0, 0.1, base.shape))
    b = _point("b", base + 4.601, 0.41 + rng.normal(0, 0.1, base.shape))
    target = _point("t", base + 4.6005 + rng.normal(0, 0.05, base.shape), 0.40 + rng.normal(0, 0.1, base.shape))
    clusters = Clusters.draw(list(range(N_EXAMPLES)), [i // 2 for i in range(N_EXAMPLES)], 500, rng)
    width = {}
    for gap in (0.0, 0.01):
        d, match = matched(target, [far, a, b], gap)
        est = crossed_estimate(d, clusters, 0.95)
        width[gap] = est.high - est.low
    assert (match.lower, match.upper) == ("far", "a+b")
    assert [p.label for p in pooled([b, far, a], 0.01)] == ["far", "a+b"]
    assert np.allclose(pooled([a, b], 0.01)[0].clean, (a.clean + b.clean) / 2)
    assert width[0.01] < 0.2 < width[0.0], width
