"""Compare judges (models) that `flr eval` ran on the same rows, with paired bootstrap
intervals: each judge's FLR and Direct, Length (the same for all), and the differences
that matter (judge - Length, judge - the first judge), resampling the same rows for every
column, so the intervals of the differences are paired.

    python scripts/compare_judges.py 135M=runs/base-llmbar 1.5B=runs/qwen-llmbar \\
        --set llmbar-Processed_MT-Bench

Pairwise sets: accuracy (%, a score tie counts 0.5). Rating sets: Spearman with the rating.
Refuses runs whose rows differ (the same lines must have been scored).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from scipy.stats import spearmanr

from flr_engine.io import read_output_rows


def load_rows(run: str, name: str) -> dict[int, dict]:
    """A run's scored rows of set ``name`` (error rows and a torn last line left out)."""
    path = os.path.join(run, "sets", f"{name}.rows.jsonl")
    return {n: r for n, r in read_output_rows(path).items() if "error" not in r}


def columns(rows: list[dict]) -> tuple[str, dict[str, np.ndarray], np.ndarray | None]:
    """-> (kind, {"FLR", "Direct", "Length": per-row values}, ratings or None).
    pairwise: 1 / 0.5 / 0 per row (chosen scored above / tied / below); rating: the scores."""
    if "chosen" in rows[0]:
        def win(key: str) -> np.ndarray:
            d = np.array([r["chosen"][key] - r["rejected"][key] for r in rows], dtype=float)
            return (d > 0) + 0.5 * (d == 0)

        return "pairwise", {c: win(k) for c, k in KEYS.items()}, None
    vals = {c: np.array([r["response"][k] for r in rows], dtype=float) for c, k in KEYS.items()}
    return "rating", vals, np.array([r["score"] for r in rows], dtype=float)


KEYS = {"FLR": "reward", "Direct": "direct", "Length": "length"}


def metric(kind: str, v: np.ndarray, y: np.ndarray | None, idx: np.ndarray) -> float:
    """Accuracy in % (pairwise) or Spearman with the ratings, on rows ``idx``."""
    if kind == "pairwise":
        return 100.0 * float(v[idx].mean())
    return float(spearmanr(v[idx], y[idx]).statistic)


def compare(runs: list[tuple[str, str]], name: str, bootstrap: int = 2000, seed: int = 0) -> dict:
    """-> {"kind", "n", "cells": {column: (estimate, low, high)}} with columns "FLR L" and
    "Direct L" per run label L, "Length", and the paired differences "FLR L - Length" and
    "FLR L - FLR <first L>"; the intervals resample the same rows for every column."""
    loaded = [(label, load_rows(d, name)) for label, d in runs]
    lines = sorted(loaded[0][1])
    for label, rows in loaded[1:]:
        if sorted(rows) != lines:
            raise SystemExit(f"{label}: other rows than {loaded[0][0]} in {name}; score the same rows")
    table: dict[str, np.ndarray] = {}
    kind, y = "", None
    for i, (label, rows) in enumerate(loaded):
        kind, vals, y = columns([rows[n] for n in lines])
        table[f"FLR {label}"], table[f"Direct {label}"] = vals["FLR"], vals["Direct"]
        if i == 0:
            table["Length"] = vals["Length"]
    stats = {c: (lambda i, v=v: metric(kind, v, y, i)) for c, v in table.items()}
    flr = [f"FLR {label}" for label, _ in loaded]
    pairs = [(c, "Length") for c in flr] + [(c, flr[0]) for c in flr[1:]]
    for c1, c2 in pairs:
        stats[f"{c1} - {c2}"] = lambda i, f1=stats[c1], f2=stats[c2]: f1(i) - f2(i)
    n = len(lines)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, n, n) for _ in range(bootstrap)]
    cells = {}
    for c, f in stats.items():
        lo, hi = np.nanpercentile([f(b) for b in boots], [2.5, 97.5])  # a resample may be constant
        cells[c] = (f(np.arange(n)), float(lo), float(hi))
    return {"kind": kind, "n": n, "cells": cells}


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
    res = compare(runs, a.set, a.bootstrap, a.seed)
    fmt = "{:.1f} [{:.1f}, {:.1f}]" if res["kind"] == "pairwise" else "{:.3f} [{:.3f}, {:.3f}]"
    what = "accuracy %" if res["kind"] == "pairwise" else "Spearman"
    print(f"{a.set}: {res['n']} rows, {what}, 95% paired bootstrap ({a.bootstrap})\n")
    print("| column | value |\n|---|---|")
    for c, cell in res["cells"].items():
        print(f"| {c} | {fmt.format(*cell)} |")


if __name__ == "__main__":
    main()
