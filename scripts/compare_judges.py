"""Compare judges (models) that `flr eval` ran on the same rows, with paired bootstrap
intervals: each judge's FLR and Direct, Length (the same for all), and the differences
that matter (judge - Length, judge - the first judge), resampling the same rows for every
column, so the intervals of the differences are paired.

    python scripts/compare_judges.py 135M=runs/base-llmbar 1.5B=runs/qwen-llmbar \\
        --set llmbar-Processed_MT-Bench

Pairwise sets: accuracy (%, a score tie counts 0.5), on all pairs and on the pairs whose
replies differ in length by < 20%. Rating sets: Spearman with the rating.
Refuses runs whose rows differ (the same lines must have been scored).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from flr_engine.evaluation.metrics import (
    DEFAULT_LEVEL,
    _interval,
    bootstrap_indices,
    pair_outcomes,
    rowwise_spearman,
)
from flr_engine.evaluation.set_metrics import length_controlled
from flr_engine.io import read_output_rows


def load_rows(run: str, name: str) -> dict[int, dict]:
    """A run's scored rows of set ``name`` (error rows and a torn last line left out)."""
    path = os.path.join(run, "sets", f"{name}.rows.jsonl")
    return {n: r for n, r in read_output_rows(path).items() if "error" not in r}


def columns(rows: list[dict]) -> tuple[str, dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """-> (kind, {"FLR", "Direct", "Length": per-row values}, ratings or None, length-controlled
    mask). pairwise: 1 / 0.5 / 0 per row (chosen scored above / tied / below); rating: the
    scores (the mask is all True)."""
    if "chosen" in rows[0]:
        def side(key: str, s: str) -> np.ndarray:
            return np.array([r[s][key] for r in rows], dtype=float)

        vals = {c: pair_outcomes(side(k, "chosen") - side(k, "rejected")) for c, k in KEYS.items()}
        lc = length_controlled(side("length", "chosen"), side("length", "rejected"))
        return "pairwise", vals, None, lc
    vals = {c: np.array([r["response"][k] for r in rows], dtype=float) for c, k in KEYS.items()}
    return "rating", vals, np.array([r["score"] for r in rows], dtype=float), np.ones(len(rows), bool)


KEYS = {"FLR": "reward", "Direct": "direct", "Length": "length"}


def metric(kind: str, v: np.ndarray, y: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    """Accuracy in % (pairwise) or Spearman with the ratings, per row of ``idx`` ``[B, n]``."""
    if kind == "pairwise":
        return 100.0 * v[idx].mean(axis=1)
    return rowwise_spearman(v[idx], y[idx])


def judge_table(runs: list[tuple[str, str]], name: str) -> tuple[str, dict, np.ndarray | None, np.ndarray]:
    """Read each run's rows of set ``name`` once -> (kind, {column: per-row values}, ratings or
    None, length-controlled mask); columns "FLR L" and "Direct L" per run label L, then
    "Length" (Length and the mask from the first run's rows)."""
    loaded = [(label, load_rows(d, name)) for label, d in runs]
    lines = sorted(loaded[0][1])
    for label, rows in loaded[1:]:
        if sorted(rows) != lines:
            raise SystemExit(f"{label}: other rows than {loaded[0][0]} in {name}; score the same rows")
    table: dict[str, np.ndarray] = {}
    kind, y, keep = "", None, None
    for i, (label, rows) in enumerate(loaded):
        kind, vals, y, mask = columns([rows[n] for n in lines])
        table[f"FLR {label}"], table[f"Direct {label}"] = vals["FLR"], vals["Direct"]
        if i == 0:
            table["Length"], keep = vals["Length"], mask
    return kind, table, y, keep


def paired_cells(kind: str, table: dict, y: np.ndarray | None, labels: list[str],
                 bootstrap: int = 2000, seed: int = 0) -> dict:  # fmt: skip
    """-> {"kind", "n", "cells": {column: (estimate, low, high)}}: every column of ``table``
    and the paired differences "FLR L - Length" and "FLR L - FLR <first L>"; the intervals
    resample the same rows for every column."""
    n = int(next(iter(table.values())).size)
    idx = np.concatenate([np.arange(n)[None], bootstrap_indices(n, bootstrap, seed)])
    stats = {c: metric(kind, v, y, idx) for c, v in table.items()}  # row 0: the full sample
    flr = [f"FLR {label}" for label in labels]
    for c1, c2 in [(c, "Length") for c in flr] + [(c, flr[0]) for c in flr[1:]]:
        stats[f"{c1} - {c2}"] = stats[c1] - stats[c2]
    # a resample may be constant (no correlation): _interval leaves its NaN out
    cells = {c: (float(st[0]), *_interval(st[1:], DEFAULT_LEVEL)) for c, st in stats.items()}
    return {"kind": kind, "n": n, "cells": cells}


def compare(runs: list[tuple[str, str]], name: str, bootstrap: int = 2000, seed: int = 0,
            length_control: bool = False) -> dict:  # fmt: skip
    """:func:`paired_cells` of :func:`judge_table`; ``length_control``: only the pairs whose
    replies differ in length by < 20%."""
    kind, table, y, keep = judge_table(runs, name)
    if length_control:
        table = {c: v[keep] for c, v in table.items()}
        y = None if y is None else y[keep]
    return paired_cells(kind, table, y, [label for label, _ in runs], bootstrap, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=DIR: a `flr eval --out` folder per judge")
    ap.add_argument("--set", required=True, help="set name (the file name without .jsonl.gz)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    runs = [tuple(r.split("=", 1)) for r in a.runs]
    if any(len(r) != 2 for r in runs):
        ap.error("each run is LABEL=DIR")
    kind, table, y, keep = judge_table(runs, a.set)
    labels = [label for label, _ in runs]
    res = paired_cells(kind, table, y, labels, a.bootstrap, a.seed)
    views = [("all rows", res)]
    if kind == "pairwise":
        lc = paired_cells(kind, {c: v[keep] for c, v in table.items()}, None, labels, a.bootstrap, a.seed)
        views.append(("replies within 20% in length", lc))
    fmt = "{:.1f} [{:.1f}, {:.1f}]" if res["kind"] == "pairwise" else "{:.3f} [{:.3f}, {:.3f}]"
    what = "accuracy %" if res["kind"] == "pairwise" else "Spearman"
    print(f"{a.set}: {what}, 95% paired bootstrap ({a.bootstrap})\n")
    print("| column | " + " | ".join(f"{v} (n={r['n']})" for v, r in views) + " |")
    print("|---|" + "---|" * len(views))
    for c in res["cells"]:
        print(f"| {c} | " + " | ".join(fmt.format(*r["cells"][c]) for _, r in views) + " |")


if __name__ == "__main__":
    main()
