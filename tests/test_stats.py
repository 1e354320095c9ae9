"""Paired bootstrap intervals and mean ± std over seeds (mixllm.stats), on cases checked by hand."""

import numpy as np
import pytest

from mixllm.stats import mean_std, paired_bootstrap


def test_two_users_give_the_exact_bootstrap_distribution_s_quantiles():
    # Differences [0, 1]: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % quantiles of the bootstrap means are exactly 0 and 1.
    result = paired_bootstrap([1, 1], [1, 0])
    assert (result.mean, result.low, result.high, result.n) == (0.5, 0.0, 1.0, 2)
    assert not result.above_zero


def test_the_interval_matches_the_normal_approximation_and_excludes_zero():
    # 100 users: a wins 60 of them by 1, b never wins -> mean 0.6, standard error sqrt(0.6 * 0.4 / 100) = 0.049,
    # so the 95 % interval is about 0.6 +- 1.96 * 0.049 = [0.504, 0.696].
    a, b = np.r_[np.ones(60), np.zeros(40)], np.zeros(100)
    result = paired_bootstrap(a, b)
    assert result.mean == pytest.approx(0.6)
    assert 0.48 < result.low < 0.53 and 0.67 < result.high < 0.72
    assert result.above_zero and result.to_dict()["above_zero"] is True
    # Swapping the arms mirrors the interval; a constant difference has no spread.
    swapped = paired_bootstrap(b, a)
    assert swapped.mean == pytest.approx(-0.6) and swapped.high < 0
    constant = paired_bootstrap(np.full(50, 0.3), np.full(50, 0.1))
    assert constant.low == pytest.approx(0.2) and constant.high == pytest.approx(0.2)


def test_seeded_and_clear_errors():
    a, b = np.arange(30) % 3, np.arange(30) % 2
    assert paired_bootstrap(a, b, seed=1) == paired_bootstrap(a, b, seed=1)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1], [0], confidence=95)


def test_mean_std_over_seeds():
    out = mean_std([0.4, 0.5, 0.6])
    assert out["mean"] == pytest.approx(0.5) and out["std"] == pytest.approx(0.1) and out["n"] == 3
    assert mean_std([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="non-empty"):
        mean_std([])
