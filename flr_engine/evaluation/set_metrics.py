"""The metrics of one evaluated set, per method, per template dimension and per template.

Pairwise sets: accuracy of ``s(chosen) - s(rejected)`` with its bootstrap interval
(:func:`~flr_engine.evaluation.metrics.accuracy_ci`), also on the length-controlled pairs
(replies differing in length by less than ``LC_RATIO`` of the longer one). Rating sets:
Pearson / Spearman / Kendall against the rating. Templates are oriented by polarity: a
negative follow-up is "right" when it is *less* likely after the chosen reply (ratings:
Spearman of ``+-lp`` with the rating).
"""

from __future__ import annotations

import numpy as np

from flr_engine.evaluation import metrics as M
from flr_engine.evaluation.results import SetScores, num
from flr_engine.templates import TemplateSet


def template_polarity(templates: TemplateSet) -> list[dict]:
    """Per unique text: its dimensions and polarity (+1 positive, -1 negative, by majority
    of its occurrences; "mixed" texts are oriented positive)."""
    info: dict[str, dict] = {}
    for d, sign, t in templates.followups:
        e = info.setdefault(t, {"text": t, "dimensions": [], "pos": 0, "neg": 0})
        if d not in e["dimensions"]:
            e["dimensions"].append(d)
        e["pos" if sign == "positive" else "neg"] += 1
    out = []
    for t in templates.unique_texts:
        e = info[t]
        pol = "positive" if e["pos"] >= e["neg"] else "negative"
        if e["pos"] and e["neg"]:
            pol = "mixed"
        out.append({"text": t, "dimensions": e["dimensions"], "polarity": pol})
    return out


LC_RATIO = 0.2  # length-controlled accuracy: replies differ in length by less than 20%


def length_controlled(len_a: np.ndarray, len_b: np.ndarray, ratio: float = LC_RATIO) -> np.ndarray:
    """Mask of the pairs whose replies differ in length (characters) by less than ``ratio``
    of the longer one: ``|a - b| < ratio * max(a, b)``. On these pairs, length alone cannot
    carry a method far, so accuracy there is a check against length bias."""
    a, b = np.asarray(len_a, dtype=float), np.asarray(len_b, dtype=float)
    return np.abs(a - b) < ratio * np.maximum(a, b)


def pairwise_metrics(
    s: SetScores, tinfo: list[dict], n_boot: int = M.DEFAULT_BOOT, seed: int = 0,
    level: float = M.DEFAULT_LEVEL,
) -> dict:
    """Accuracy (and length-controlled accuracy) per method, dimension and template."""
    acc = dict(n_boot=n_boot, seed=seed, level=level)
    lc = length_controlled(s.a["length"], s.b["length"])
    methods = {
        m: {
            "accuracy": M.accuracy_ci(s.a[m] - s.b[m], **acc),
            "accuracy_lc": M.accuracy_ci((s.a[m] - s.b[m])[lc], **acc),
        }
        for m in s.a
    }
    dims = {d: {"accuracy": M.accuracy_ci(s.dims_a[d] - s.dims_b[d], **acc)} for d in s.dims_a}
    diff = s.lp_a - s.lp_b
    temps = []
    for j, t in enumerate(tinfo):
        sign = -1.0 if t["polarity"] == "negative" else 1.0
        d = diff[:, j] if diff.size else np.zeros(0)
        temps.append(
            {
                **t,
                "accuracy": M.accuracy_ci(sign * d, **acc),
                "mean_diff": num(float(np.nanmean(d))) if d.size else None,
            }
        )
    temps.sort(key=lambda e: -(e["accuracy"]["value"] if num(e["accuracy"]["value"]) else -1))
    return {"methods": methods, "dimensions": dims, "templates": temps, "n_lc": int(lc.sum())}


def rating_metrics(
    s: SetScores, tinfo: list[dict], n_boot: int = M.DEFAULT_BOOT, seed: int = 0,
    level: float = M.DEFAULT_LEVEL,
) -> dict:
    """Pearson / Spearman / Kendall with the rating per method and dimension; Spearman per
    template."""
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    methods = {m: M.correlation_ci(s.a[m], s.y, **kw) for m in s.a}
    dims = {d: M.correlation_ci(s.dims_a[d], s.y, **kw) for d in s.dims_a}
    temps = []
    for j, t in enumerate(tinfo):
        sign = -1.0 if t["polarity"] == "negative" else 1.0
        x = s.lp_a[:, j] if s.lp_a.size else np.zeros(0)
        temps.append({**t, **M.correlation_ci(sign * x, s.y, which=("spearman",), **kw)})
    temps.sort(key=lambda e: -(e["spearman"]["value"] if num(e["spearman"]["value"]) else -2))
    return {"methods": methods, "dimensions": dims, "templates": temps}


def primary(result: dict, kind: str | None = None) -> str:
    """The headline metric of a set: accuracy (pairwise) or Spearman (rating)."""
    return "accuracy" if (kind or result["kind"]) == "pairwise" else "spearman"
