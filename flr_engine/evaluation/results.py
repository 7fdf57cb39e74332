"""Per-row result files of an evaluation and the arrays made from them.

``sets/NAME.rows.jsonl`` holds one record per row (written by :mod:`.scoring`, batch by
batch); :func:`load_scores` turns the rows of the selected items into arrays aligned on
their lines: for each side (``a`` chosen / response, ``b`` rejected) a score per method,
per template dimension, and the (n, K) matrix of every template's ``lp(f)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from flr_engine.evaluation.data import EvalSet
from flr_engine.io import read_output_rows


def num(x) -> float | None:
    """JSON-safe float (NaN/inf -> None)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _clean_json(obj):
    if isinstance(obj, float):
        return num(obj)
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON (NaN/inf as null) through a temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_clean_json(obj), fh, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def sha1_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def texts_hash(texts: list[str]) -> str:
    """A short fingerprint of the template texts being scored (keys caches and calibrations)."""
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]


def set_paths(out: str, name: str, reward_model: str | None = None) -> dict:
    """The files of set ``name`` under ``out``: rows, reward-model rows, finished result."""
    d = os.path.join(out, "sets")
    return {
        "rows": os.path.join(d, f"{name}.rows.jsonl"),
        "rm": os.path.join(d, f"{name}.rm.jsonl") if reward_model else None,
        "result": os.path.join(d, f"{name}.result.json"),
    }


@dataclass
class SetScores:
    """Scores of the selected items of a set, as arrays aligned on ``lines``. For pairwise
    sets ``a`` is the chosen reply and ``b`` the rejected one; for rating sets ``a`` is the
    response, ``b`` is None and ``y`` the ratings."""

    lines: list[int]
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray] | None
    dims_a: dict[str, np.ndarray]
    dims_b: dict[str, np.ndarray] | None
    lp_a: np.ndarray
    lp_b: np.ndarray | None
    y: np.ndarray | None
    bad: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0  # scoring time of the rows, summed over every run that wrote them
    timed_rows: int = 0  # rows that carry a time (rows from before timing was kept do not)


def random_score(seed: int, set_name: str, line: int, j: int) -> float:
    """Uniform score, reproducible per (seed, set, row, side); independent across sets."""
    return float(np.random.default_rng([seed, zlib.crc32(set_name.encode()), line, j]).random())


def load_scores(es: EvalSet, items: list, paths: dict, dims: list[str], seed: int) -> SetScores:
    """Collect the per-row files of a set into arrays (rows in ``items`` order)."""
    rows = read_output_rows(paths["rows"])
    rm = read_output_rows(paths["rm"]) if paths.get("rm") else None
    errors = [rows[it.line]["error"] for it in items if "error" in rows.get(it.line, {})]
    good = [rows[it.line] for it in items if it.line in rows and "error" not in rows[it.line]]
    pair = es.kind == "pairwise"
    sides = ("chosen", "rejected") if pair else ("response",)

    def side(j: int, name: str):
        recs = [r[name] for r in good]
        vals = {
            "flr": np.array([x["reward"] for x in recs], dtype=float),
            "direct": np.array(
                [math.nan if x["direct"] is None else x["direct"] for x in recs], dtype=float
            ),
            "length": np.array([x["length"] for x in recs], dtype=float),
            "random": np.array([random_score(seed, es.name, r["line"], j) for r in good], dtype=float),
        }
        if rm is not None:
            vals["rm"] = np.array(
                [rm.get(r["line"], {}).get(name, math.nan) for r in good], dtype=float
            )
        dim_vals = {d: np.array([x["dims"][d] for x in recs], dtype=float) for d in dims}
        lp = np.array([x["lp"] for x in recs], dtype=float) if recs else np.zeros((0, 0))
        return vals, dim_vals, lp

    a, da, la = side(0, sides[0])
    b, db, lb = side(1, sides[1]) if pair else (None, None, None)
    y = None if pair else np.array([r["score"] for r in good], dtype=float)
    timed = [r["seconds"] for r in good if "seconds" in r]
    return SetScores(
        [r["line"] for r in good], a, b, da, db, la, lb, y, len(errors), errors,
        seconds=float(sum(timed)), timed_rows=len(timed),
    )
