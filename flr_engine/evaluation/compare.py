"""``flr compare``: two policies' replies to the same prompts, judged by their rewards.

Inputs are two ``flr score`` outputs (rows ``{"id", "reward", ...}``) over the same prompts,
joined on ``id``, and optionally the two ``flr generate`` reply files (for lengths). With
``d_i = r_B(i) - r_A(i)`` over the ``n`` prompts both sides scored::

    mean reward   (1/n) sum_i r_X(i)          for X = A, B, and mean d
    win rate B    (1/n) sum_i [1(d_i > 0) + 0.5 * 1(d_i = 0)]

With lengths ``w_X(i)`` (words of the reply), two length-controlled views, since a reward
can prefer longer replies and a policy can learn to be longer:

    similar-length win rate   the win rate over prompts with |log(w_B / w_A)| <= log(1.25)
    win rate at equal length  sigmoid(a) for the logistic fit
                              P(B wins | i) = sigmoid(a + c * log(w_B(i) / w_A(i)))
                              (ties as label 0.5; maximum likelihood, L-BFGS)

and one model-free view of degenerate text (small models loop under greedy decoding)::

    repetition  1 - distinct / total word 4-grams of a reply      (0: no 4-gram repeats)

All intervals are percentile bootstraps over prompts (paired: the same resample for every
statistic), see :mod:`flr_engine.evaluation.metrics`.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from flr_engine.errors import InputError
from flr_engine.evaluation.metrics import (
    DEFAULT_BOOT,
    DEFAULT_LEVEL,
    _interval,
    accuracy_ci,
    bootstrap_indices,
    pair_outcomes,
)
from flr_engine.io import RowError, read_jsonl

log = logging.getLogger("flr_engine")

SIMILAR_LENGTH_RATIO = 1.25


def _key(obj: dict, line: int):
    return json.dumps(obj.get("id", line))


def load_field(path: str, field: str, transform=float) -> dict[str, float]:
    """``{id: transform(row[field])}`` of a JSONL file; a missing field names file:line."""
    out = {}
    for line, obj in read_jsonl(path):
        if field not in obj:
            raise RowError(path, line, field, "missing")
        key = _key(obj, line)
        if key in out:
            raise RowError(path, line, "id", f"duplicate id {key}")
        out[key] = transform(obj[field])
    if not out:
        raise InputError(f"{path}: no rows")
    return out


def words(text: str) -> int:
    return len(str(text).split())


def repetition(text: str, n: int = 4) -> float:
    """``1 - |distinct word n-grams| / |word n-grams|`` (0.0 for fewer than n words)."""
    w = str(text).split()
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _mean_ci(x: np.ndarray, idx: np.ndarray, level: float) -> dict:
    return {"value": float(x.mean()), "ci": _interval(x[idx].mean(axis=1), level)}


def fit_length_logistic(credit: np.ndarray, log_ratio: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood ``(a, c)`` of ``P(B wins) = sigmoid(a + c * log_ratio)`` with soft
    labels ``credit`` in {0, 0.5, 1} (a tiny ridge 1e-6 keeps separable data finite)."""
    from scipy.optimize import minimize

    x = np.stack([np.ones_like(log_ratio), log_ratio], axis=1)

    def loss(w):
        m = x @ w
        # -[y log s(m) + (1-y) log(1-s(m))] = log(1+e^m) - y m
        val = np.mean(np.logaddexp(0.0, m) - credit * m) + 0.5e-6 * w @ w
        grad = x.T @ (1.0 / (1.0 + np.exp(-m)) - credit) / len(m) + 1e-6 * w
        return val, grad

    res = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def compare(
    reward_a: dict[str, float],
    reward_b: dict[str, float],
    words_a: dict[str, int] | None = None,
    words_b: dict[str, int] | None = None,
    repetition_a: dict[str, float] | None = None,
    repetition_b: dict[str, float] | None = None,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict:
    """The statistics of the module docstring over the ids both sides have (lengths and
    repetition only when given for both sides)."""
    keys = sorted(set(reward_a) & set(reward_b))
    if not keys:
        raise InputError("the two score files have no id in common")
    ra = np.array([reward_a[k] for k in keys])
    rb = np.array([reward_b[k] for k in keys])
    idx = bootstrap_indices(len(keys), n_boot, seed)
    d = rb - ra
    res = {
        "n": len(keys),
        "only_a": len(set(reward_a) - set(reward_b)),
        "only_b": len(set(reward_b) - set(reward_a)),
        "mean_reward_a": _mean_ci(ra, idx, level),
        "mean_reward_b": _mean_ci(rb, idx, level),
        "mean_difference": _mean_ci(d, idx, level),
        "win_rate_b": accuracy_ci(d, n_boot, seed, level),
    }
    if words_a is not None and words_b is not None:
        missing = [k for k in keys if k not in words_a or k not in words_b]
        if missing:
            raise InputError(f"{len(missing)} scored ids have no reply, e.g. {missing[0]}")
        wa = np.array([words_a[k] for k in keys], dtype=np.float64)
        wb = np.array([words_b[k] for k in keys], dtype=np.float64)
        ratio = np.log(np.maximum(wb, 1) / np.maximum(wa, 1))
        similar = np.abs(ratio) <= math.log(SIMILAR_LENGTH_RATIO)
        credit = pair_outcomes(d)
        a, c = fit_length_logistic(credit, ratio)
        boots = []
        for row in idx:
            a_b, _ = fit_length_logistic(credit[row], ratio[row])
            boots.append(1.0 / (1.0 + math.exp(-a_b)))
        res |= {
            "mean_words_a": _mean_ci(wa, idx, level),
            "mean_words_b": _mean_ci(wb, idx, level),
            "longer_rate_b": accuracy_ci(wb - wa, n_boot, seed, level),
            "similar_length_win_rate_b": accuracy_ci(d[similar], n_boot, seed, level),
            "equal_length_win_rate_b": {
                "value": 1.0 / (1.0 + math.exp(-a)),
                "ci": _interval(np.array(boots), level),
                "length_slope": c,
            },
        }
    if repetition_a is not None and repetition_b is not None:
        pa = np.array([repetition_a[k] for k in keys])
        pb = np.array([repetition_b[k] for k in keys])
        res |= {
            "repetition_a": _mean_ci(pa, idx, level),
            "repetition_b": _mean_ci(pb, idx, level),
        }
    return res


def _fmt(stat: dict, pct: bool = False) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.4f}")
    lo, hi = stat["ci"]
    return f"{f(stat['value'])} [{f(lo)}, {f(hi)}]"


def format_report(res: dict, name_a: str, name_b: str, level: float = DEFAULT_LEVEL) -> str:
    """A markdown table of :func:`compare`'s result."""
    lines = [
        f"| {res['n']} prompts | value [{100 * level:g}% interval] |",
        "|---|---|",
        f"| mean reward, {name_a} | {_fmt(res['mean_reward_a'])} |",
        f"| mean reward, {name_b} | {_fmt(res['mean_reward_b'])} |",
        f"| mean difference {name_b} - {name_a} | {_fmt(res['mean_difference'])} |",
        f"| win rate of {name_b} (%) | {_fmt(res['win_rate_b'], True)} |",
    ]
    if "mean_words_a" in res:
        sim = res["similar_length_win_rate_b"]
        lines += [
            f"| mean words, {name_a} | {res['mean_words_a']['value']:.1f} |",
            f"| mean words, {name_b} | {res['mean_words_b']['value']:.1f} |",
            f"| {name_b} longer (%) | {_fmt(res['longer_rate_b'], True)} |",
            f"| win rate of {name_b}, similar length (n={sim['n']}) (%) | {_fmt(sim, True)} |",
            f"| win rate of {name_b} at equal length, logistic (%) | "
            f"{_fmt(res['equal_length_win_rate_b'], True)} |",
        ]
    if "repetition_a" in res:
        lines += [
            f"| repeated word 4-grams, {name_a} (%) | {_fmt(res['repetition_a'], True)} |",
            f"| repeated word 4-grams, {name_b} (%) | {_fmt(res['repetition_b'], True)} |",
        ]
    return "\n".join(lines)
