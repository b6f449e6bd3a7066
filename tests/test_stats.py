import numpy as np
import pytest

from pipeline.stats import hierarchical_bootstrap, paired_comparison, sign_flip_p_value


def test_bootstrap_ci_covers_true_mean_and_narrows_with_data():
    rng = np.random.default_rng(0)
    covered, widths = 0, {}
    for n in (20, 400):
        for trial in range(20):
            data = [rng.normal(1.0, 1.0, n) for _ in range(3)]
            est = hierarchical_bootstrap(data, n_boot=300, confidence=0.95, rng=rng)
            covered += est.low <= 1.0 <= est.high
            widths.setdefault(n, []).append(est.high - est.low)
    assert covered >= 34   # ~95% of 40, with slack
    assert np.mean(widths[400]) < 0.5 * np.mean(widths[20])


def test_seed_level_variation_widens_the_interval():
    rng = np.random.default_rng(1)
    same = [rng.normal(0, 1, 200) for _ in range(3)]
    shifted = [x + off for x, off in zip(same, (-2.0, 0.0, 2.0))]
    narrow = hierarchical_bootstrap(same, 500, 0.95, np.random.default_rng(2))
    wide = hierarchical_bootstrap(shifted, 500, 0.95, np.random.default_rng(2))
    assert (wide.high - wide.low) > 5 * (narrow.high - narrow.low)


def test_weighted_estimate_is_token_weighted_ratio():
    nll = [np.array([10.0, 1.0])]
    tokens = [np.array([10.0, 1.0])]
    est = hierarchical_bootstrap(nll, 100, 0.95, np.random.default_rng(0), weights=tokens)
    assert est.mean == pytest.approx(1.0)
    est = hierarchical_bootstrap([np.array([20.0, 1.0])], 100, 0.95, np.random.default_rng(0),
                                 weights=[np.array([10.0, 1.0])])
    assert est.mean == pytest.approx(21 / 11)


def test_paired_comparison_detects_shift_and_not_noise():
    rng = np.random.default_rng(3)
    base = [rng.normal(0, 1, 60) for _ in range(2)]
    shifted = [b + 0.5 + rng.normal(0, 0.1, 60) for b in base]
    c = paired_comparison(shifted, base, 1000, 0.95, np.random.default_rng(4))
    assert c.low > 0 and c.p_value < 0.01 and c.n_pairs == 120 and c.n_seeds == 2
    null = [b + rng.normal(0, 0.1, 60) for b in base]
    c0 = paired_comparison(null, base, 1000, 0.95, np.random.default_rng(4))
    assert c0.low < 0 < c0.high and c0.p_value > 0.01


def test_paired_comparison_refuses_misaligned_examples():
    with pytest.raises(ValueError, match="not aligned"):
        paired_comparison([np.zeros(3)], [np.zeros(4)], 100, 0.95, np.random.default_rng(0))


def test_sign_flip_p_value_is_one_for_zero_mean():
    assert sign_flip_p_value(np.array([1.0, -1.0]), 100, np.random.default_rng(0)) == 1.0
