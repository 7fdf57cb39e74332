"""Evaluation metrics against hand-computed values and independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flr_engine.evaluation import metrics as M


def test_accuracy_counts_score_ties_half_and_drops_nan():
    # correct, wrong, tie (0.5), correct, NaN (left out): (1 + 0 + 0.5 + 1) / 4
    assert M.accuracy([1.0, -2.0, 0.0, 0.3, math.nan]) == pytest.approx(0.625)
    assert M.accuracy([0.0, 0.0]) == 0.5  # a constant scorer is at chance exactly
    assert math.isnan(M.accuracy([math.nan]))
    res = M.accuracy_ci([1.0, -2.0, 0.0, 0.3, math.nan], n_boot=200, seed=1)
    assert res["n"] == 4 and res["value"] == pytest.approx(0.625)


def test_accuracy_bootstrap_is_the_resampled_mean_and_deterministic():
    rng = np.random.default_rng(5)
    d = rng.normal(0.3, 1.0, size=60)
    d[:5] = 0.0
    a = M.accuracy_ci(d, n_boot=300, seed=7)
    assert a == M.accuracy_ci(d, n_boot=300, seed=7)  # same seed, same interval
    assert a["ci"] != M.accuracy_ci(d, n_boot=300, seed=8)["ci"]
    lo, hi = a["ci"]
    assert lo <= a["value"] <= hi and 0 <= lo < hi <= 1
    # independent recomputation: loop over the same index matrix
    idx = np.random.default_rng(7).integers(0, d.size, size=(300, d.size))
    boots = [np.mean([1.0 if d[i] > 0 else 0.5 if d[i] == 0 else 0.0 for i in row]) for row in idx]
    assert [lo, hi] == pytest.approx(list(np.quantile(boots, [0.025, 0.975])))


def test_correlations_by_hand():
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    # dx = dy (up to order) = [-1.5, -.5, .5, 1.5]: sum dx*dy = 4, sum dx^2 = sum dy^2 = 5
    assert M.pearson(x, y) == pytest.approx(0.8)
    assert M.spearman(x, y) == pytest.approx(0.8)  # the ranks are the values
    # 6 pairs, only (2,3) discordant: (5 - 1) / 6
    assert M.kendall(x, y) == pytest.approx(4 / 6)
    # tau-b with ties: pairs (2,3) tied in x, (3,4) tied in y, 4 concordant:
    # 4 / sqrt((6 - 1) * (6 - 1)) = 0.8
    xt, yt = [1, 2, 2, 3], [1, 2, 3, 3]
    assert M.kendall(xt, yt) == pytest.approx(0.8)
    assert M.rowwise_kendall(np.array([xt], float), np.array([yt], float))[0] == pytest.approx(0.8)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    assert M.spearman([1, 2, math.nan, 3], [1, 2, -9, 3]) == pytest.approx(1.0)  # NaN row left out
    assert math.isnan(M.kendall([1, math.nan], [1, 2]))  # one item left: undefined


def test_rowwise_statistics_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(5, 25)).astype(float)  # many ties
    y = x + rng.normal(size=(5, 25)).round(0)
    for i in range(5):
        assert M.rowwise_pearson(x, y)[i] == pytest.approx(stats.pearsonr(x[i], y[i])[0])
        assert M.rowwise_spearman(x, y)[i] == pytest.approx(stats.spearmanr(x[i], y[i])[0])
        assert M.rowwise_kendall(x, y, max_elems=50)[i] == pytest.approx(stats.kendalltau(x[i], y[i])[0])


def test_correlation_interval_deterministic_and_contains_point():
    rng = np.random.default_rng(3)
    y = rng.normal(size=40)
    x = y + rng.normal(size=40)
    c = M.correlation_ci(x, y, n_boot=200, seed=11)
    assert c == M.correlation_ci(x, y, n_boot=200, seed=11)
    assert c["n"] == 40
    for name in ("pearson", "spearman", "kendall"):
        lo, hi = c[name]["ci"]
        assert lo <= c[name]["value"] <= hi
    assert c["pearson"]["value"] == pytest.approx(stats.pearsonr(x, y)[0])


def test_logistic_fit_is_stationary_and_calibration_recovers_signal():
    rng = np.random.default_rng(0)
    n, k = 120, 4
    x = rng.normal(size=(n, k)) * np.array([1.0, 10.0, 0.1, 1.0])
    true = np.array([2.0, 0.0, 0.0, -1.0])
    # flip a pair's sign (swap its replies) when the true model prefers the other reply
    flip = rng.random(n) > 1 / (1 + np.exp(-(x @ true)))
    xs = np.where(flip[:, None], -x, x)
    lam = 0.1
    w = M.fit_logistic(xs, lam)
    p = 1 / (1 + np.exp(xs @ w))  # sigmoid(-m)
    grad = -(xs.T @ p) / n + lam * w
    assert np.abs(grad).max() < 1e-4
    cal = M.calibrate(xs, seed=0)
    wc = np.array(cal["weights"])
    assert wc[0] > 0 and wc[3] < 0 and abs(wc[0]) > abs(wc[2])
    assert cal["lam"] in [c["lam"] for c in cal["cv"]] and cal["folds"] == 5
    assert cal == M.calibrate(xs, seed=0)
    with pytest.raises(ValueError, match="at least 4"):
        M.calibrate(xs[:3])
