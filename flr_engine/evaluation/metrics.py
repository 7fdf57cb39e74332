"""Evaluation metrics with bootstrap intervals, and the logistic calibration of templates.

Pairwise accuracy, for score differences ``d_i = s(chosen_i) - s(rejected_i)``::

    acc = (1/n) sum_i [ 1(d_i > 0) + 0.5 * 1(d_i = 0) ]

A tie *in the score* counts one half (the expected accuracy of breaking it by a coin
flip), so a constant scorer gets exactly 0.5. Pairs whose score is NaN (e.g. a Direct
score with no reply tokens) are left out and ``n`` says how many pairs were counted.

Correlations (NaN pairs left out; NaN when either side is constant):

    Pearson   r   = sum (x - x̄)(y - ȳ) / sqrt(sum (x - x̄)^2 sum (y - ȳ)^2)
    Spearman  rho = Pearson r of the ranks (ties get their average rank)
    Kendall   tau_b = (P - Q) / sqrt((n0 - n1)(n0 - n2)),  n0 = n(n-1)/2,
              P / Q concordant / discordant pairs, n1 / n2 pairs tied in x / in y

Point estimates come from scipy.stats; the intervals are percentile bootstrap intervals:
``B`` resamples of the ``n`` items with replacement (indices from
``numpy.random.default_rng(seed)``, so a seed gives the same interval every time, and two
methods evaluated on the same items with the same seed are resampled *paired*), the
statistic computed on all resamples at once (vectorised), and the ``(1-level)/2`` and
``(1+level)/2`` quantiles taken. Kendall's tau on the resamples is computed over all pairs
(O(B n^2), in chunks), intended for rating sets of a few thousand items at most.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from flr_engine.errors import ConfigError

DEFAULT_BOOT = 1000
DEFAULT_LEVEL = 0.95


def _clean(*arrays) -> list[np.ndarray]:
    arrs = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    if len({a.size for a in arrs}) > 1:
        raise ValueError(f"arrays of different lengths: {[a.size for a in arrs]}")
    keep = np.ones(arrs[0].size, dtype=bool)
    for a in arrs:
        keep &= ~np.isnan(a)
    return [a[keep] for a in arrs]


def pair_outcomes(diff) -> np.ndarray:
    """Per-pair credit: 1 if ``diff > 0``, 0.5 if ``diff == 0``, 0 if below (NaN stays NaN)."""
    d = np.asarray(diff, dtype=np.float64)
    out = (d > 0).astype(np.float64) + 0.5 * (d == 0)
    out[np.isnan(d)] = np.nan
    return out


def accuracy(diff) -> float:
    """Pairwise accuracy with score ties counted 0.5 (NaN left out; NaN if nothing left)."""
    (d,) = _clean(diff)
    return float(pair_outcomes(d).mean()) if d.size else math.nan


def bootstrap_indices(n: int, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` resampling indices, a function of (n, n_boot, seed) only."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(stats: np.ndarray, level: float) -> list[float]:
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def accuracy_ci(
    diff, n_boot: int = DEFAULT_BOOT, seed: int = 0, level: float = DEFAULT_LEVEL
) -> dict:
    """``{"value", "ci": [lo, hi], "n"}``: accuracy and its percentile bootstrap interval."""
    (d,) = _clean(diff)
    if d.size == 0:
        return {"value": math.nan, "ci": [math.nan, math.nan], "n": 0}
    credit = pair_outcomes(d)
    boots = credit[bootstrap_indices(d.size, n_boot, seed)].mean(axis=1)
    return {"value": float(credit.mean()), "ci": _interval(boots, level), "n": int(d.size)}


# ---------------------------------------------------------------- correlations (point)


def _scipy_stat(fn, x, y) -> float:
    x, y = _clean(x, y)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y)[0])


def pearson(x, y) -> float:
    """Pearson's r (scipy.stats.pearsonr); NaN for constant input."""
    from scipy.stats import pearsonr

    return _scipy_stat(pearsonr, x, y)


def spearman(x, y) -> float:
    """Spearman's rho (scipy.stats.spearmanr); NaN for constant input."""
    from scipy.stats import spearmanr

    return _scipy_stat(spearmanr, x, y)


def kendall(x, y) -> float:
    """Kendall's tau-b (scipy.stats.kendalltau); NaN for constant input."""
    from scipy.stats import kendalltau

    return _scipy_stat(kendalltau, x, y)


# ---------------------------------------------------------------- correlations (row-wise)


def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of two ``[B, n]`` arrays (NaN where a row is constant)."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    num = (xc * yc).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den <= 1e-300] = np.nan
    return np.clip(r, -1.0, 1.0)


def rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: Pearson r of average ranks."""
    from scipy.stats import rankdata

    return rowwise_pearson(rankdata(x, axis=1), rankdata(y, axis=1))


def rowwise_kendall(x: np.ndarray, y: np.ndarray, max_elems: int = 1 << 22) -> np.ndarray:
    """Kendall tau-b of each row pair, over all ``n(n-1)/2`` item pairs, in chunks of rows."""
    b, n = x.shape
    iu, ju = np.triu_indices(n, 1)
    out = np.full(b, np.nan)
    if iu.size == 0:
        return out
    step = max(1, max_elems // iu.size)
    for s in range(0, b, step):
        dx = np.sign(x[s : s + step, iu] - x[s : s + step, ju])
        dy = np.sign(y[s : s + step, iu] - y[s : s + step, ju])
        num = (dx * dy).sum(axis=1)
        den = np.sqrt(np.count_nonzero(dx, axis=1) * np.count_nonzero(dy, axis=1).astype(float))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s : s + step] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


CORRELATIONS = {
    "pearson": (pearson, rowwise_pearson),
    "spearman": (spearman, rowwise_spearman),
    "kendall": (kendall, rowwise_kendall),
}


def correlation_ci(
    x,
    y,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    which: tuple[str, ...] = ("pearson", "spearman", "kendall"),
) -> dict:
    """``{name: {"value", "ci"}, ..., "n"}`` for the correlations in ``which`` between the
    scores ``x`` and the ratings ``y``, with paired percentile bootstrap intervals."""
    x, y = _clean(x, y)
    out: dict = {"n": int(x.size)}
    idx = bootstrap_indices(x.size, n_boot, seed) if x.size >= 2 else None
    for name in which:
        point, rowwise = CORRELATIONS[name]
        if idx is None:
            out[name] = {"value": math.nan, "ci": [math.nan, math.nan]}
            continue
        out[name] = {"value": point(x, y), "ci": _interval(rowwise(x[idx], y[idx]), level)}
    return out


# ---------------------------------------------------------------- calibration


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def fit_logistic(x: np.ndarray, lam: float) -> np.ndarray:
    """L2-regularised logistic regression without intercept on preference features.

    ``x[i]`` is the feature difference chosen-minus-rejected of pair ``i``; the model is
    ``P(chosen preferred) = sigmoid(w . x)`` (swapping the two replies negates ``x``, so
    the model is symmetric and needs no intercept). Minimises (L-BFGS)::

        L(w) = (1/n) sum_i log(1 + exp(-w . x_i)) + (lam / 2) ||w||^2

    Returns ``w``. Features should be on comparable scales (see :func:`calibrate`).
    """
    from scipy.optimize import minimize

    x = np.asarray(x, dtype=np.float64)
    n, k = x.shape

    def loss(w):
        m = x @ w
        val = np.logaddexp(0.0, -m).mean() + 0.5 * lam * w @ w
        grad = -(x.T @ _sigmoid(-m)) / n + lam * w
        return val, grad

    res = minimize(loss, np.zeros(k), jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    return res.x


def _logloss(x: np.ndarray, w: np.ndarray) -> float:
    return float(np.logaddexp(0.0, -(x @ w)).mean())


def calibrate(
    x,
    lams: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """Fit per-feature weights on preference differences ``x`` ``[n, k]`` (chosen minus
    rejected), choosing ``lam`` by ``folds``-fold cross-validation (lowest held-out log
    loss; on equal loss the larger ``lam``).

    Features are divided by their root mean square ``s_j = sqrt(mean_i x_ij^2)`` before
    fitting (no centring: that would break the chosen/rejected symmetry); the returned
    ``weights`` are on the original scale, so a reply's calibrated score is
    ``sum_j weights[j] * feature_j(reply)``. Returns ``{"weights", "lam", "cv": [{"lam",
    "logloss", "accuracy"}], "folds", "n"}``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"calibration features must be [pairs, templates], got {x.shape}")
    keep = ~np.isnan(x).any(axis=1)
    x = x[keep]
    n = x.shape[0]
    if n < 4:
        raise ConfigError(f"calibration needs at least 4 non-tie pairs, got {n}")
    scale = np.sqrt((x * x).mean(axis=0))
    scale[scale == 0] = 1.0
    z = x / scale
    k = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, k)
    cv = []
    for lam in lams:
        losses, credit = [], []
        for f in range(k):
            test = parts[f]
            train = np.concatenate([parts[g] for g in range(k) if g != f])
            w = fit_logistic(z[train], lam)
            losses.append(_logloss(z[test], w) * test.size)
            credit.append(np.nansum(pair_outcomes(z[test] @ w)))
        cv.append(
            {"lam": float(lam), "logloss": float(sum(losses) / n), "accuracy": float(sum(credit) / n)}
        )
    best = min(cv, key=lambda c: (round(c["logloss"], 12), -c["lam"]))
    w = fit_logistic(z, best["lam"])
    return {
        "weights": (w / scale).tolist(),
        "lam": best["lam"],
        "cv": cv,
        "folds": k,
        "n": int(n),
    }
