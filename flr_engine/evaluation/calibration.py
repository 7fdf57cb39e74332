"""Per-template calibration of the FLR reward: weights ``w`` fit on one pairwise set, the
calibrated reward ``sum_t w_t lp(t)`` reported on the others (the FLR-cal column).

:func:`fit_calibration` fits the weights by L2 logistic regression on the ``lp``
differences of a pairwise set (:func:`~flr_engine.evaluation.metrics.calibrate`, lambda by
k-fold CV) and scores the *other* sets; :func:`save_calibration` / :func:`load_calibration`
keep a fit for ``flr eval --calibration FILE|auto``, which :func:`apply_calibration` applies
to every set. A saved fit records the fingerprint of its template texts and is refused for
other templates.
"""

from __future__ import annotations

import json
import os

import numpy as np

from flr_engine.errors import ConfigError, MissingFileError
from flr_engine.evaluation import metrics as M
from flr_engine.evaluation.config import EvalConfig
from flr_engine.evaluation.data import EvalSet
from flr_engine.evaluation.results import load_scores, set_paths, texts_hash, write_json
from flr_engine.evaluation.set_metrics import length_controlled
from flr_engine.io import OutputBusyError
from flr_engine.templates import TemplateSet


def _set_scores(es: EvalSet, cfg: EvalConfig, templates: TemplateSet):
    items = es.items[: cfg.limit] if cfg.limit is not None else es.items
    return load_scores(es, items, set_paths(cfg.out, es.name), templates.dimension_names, cfg.seed)


def _transfer(
    sets: list[EvalSet], results: dict, cfg: EvalConfig, templates: TemplateSet, w: np.ndarray,
    skip: str | None = None,
) -> dict:
    """The calibrated reward's accuracy (pairwise) or correlations (rating) on every scored
    set but ``skip``."""
    out = {}
    kw = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    for es in sets:
        if es.name == skip or not results.get(es.name, {}).get("n"):
            continue
        t = _set_scores(es, cfg, templates)
        if es.kind == "pairwise":
            d = (t.lp_a - t.lp_b) @ w
            lc = length_controlled(t.a["length"], t.b["length"])
            out[es.name] = {
                "accuracy": M.accuracy_ci(d, **kw),
                "accuracy_lc": M.accuracy_ci(d[lc], **kw),
            }
        else:
            out[es.name] = M.correlation_ci(t.lp_a @ w, t.y, **kw)
    return out


def fit_calibration(
    sets: list[EvalSet], results: dict, cfg: EvalConfig, templates: TemplateSet
) -> dict:
    """Fit template weights on ``cfg.calibrate_on`` and score the other sets with them."""
    fit = next(es for es in sets if es.name == cfg.calibrate_on)
    if fit.name not in results:
        raise OutputBusyError(f"set {fit.name} is being scored by another process")
    s = _set_scores(fit, cfg, templates)
    cal = M.calibrate(s.lp_a - s.lp_b, seed=cfg.seed)
    w = np.array(cal["weights"])
    texts = templates.unique_texts
    order = np.argsort(-np.abs(w))
    return {
        "fit_on": fit.name,
        "n": cal["n"],
        "lam": cal["lam"],
        "folds": cal["folds"],
        "cv": cal["cv"],
        # held-out accuracy on the fit set itself, at the chosen lambda (k-fold CV)
        "cv_accuracy": next(c["accuracy"] for c in cal["cv"] if c["lam"] == cal["lam"]),
        "weights": dict(zip(texts, cal["weights"])),
        "top": [{"text": texts[i], "weight": float(w[i])} for i in order[:10]],
        "transfer": _transfer(sets, results, cfg, templates, w, skip=fit.name),
    }


def save_calibration(path: str, cal: dict, templates: TemplateSet) -> None:
    """Write a calibration fit (``fit_calibration``'s result) for ``--calibration FILE``."""
    keep = ("fit_on", "n", "lam", "folds", "cv", "cv_accuracy", "weights", "top")
    obj = {k: cal[k] for k in keep} | {
        "templates": templates.name,
        "texts": texts_hash(templates.unique_texts),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, obj)


def load_calibration(path: str, templates: TemplateSet) -> dict:
    """Read a saved calibration; its template texts must be those being scored."""
    with open(path, encoding="utf-8") as fh:
        cal = json.load(fh)
    missing = [t for t in templates.unique_texts if t not in cal.get("weights", {})]
    if missing or cal.get("texts") != texts_hash(templates.unique_texts):
        raise ConfigError(
            f"--calibration {path}: fit for template set {cal.get('templates')!r}, not for "
            f"{templates.name!r} (missing weights for {len(missing)} follow-ups)"
        )
    return cal | {"path": path}


def calibration_path(value: str, model: str, templates: TemplateSet) -> str:
    """``--calibration FILE|auto``: auto is ``calibration-<template set>.json`` in the judge's
    folder (the shipped ``default-ft`` or a ``flr feedback-tune`` output)."""
    if value != "auto":
        if not os.path.isfile(value):
            raise MissingFileError(f"--calibration {value}: no such file")
        return value
    from flr_engine.models import DEFAULT_FT_MODEL, shipped_judge_dir

    folder = shipped_judge_dir() if model == DEFAULT_FT_MODEL else model
    path = os.path.join(str(folder), f"calibration-{templates.name}.json")
    if not os.path.isfile(path):
        raise MissingFileError(
            f"--calibration auto: the judge {model!r} has no {os.path.basename(path)} "
            f"(looked in {folder}); fit one with --calibrate-on SET --save-calibration FILE"
        )
    return path


def apply_calibration(
    sets: list[EvalSet], results: dict, cfg: EvalConfig, templates: TemplateSet
) -> dict:
    """The FLR-cal column on every set from weights fit elsewhere (``cfg.calibration``)."""
    cal = cfg.calibration
    w = np.array([cal["weights"][t] for t in templates.unique_texts])
    out = {k: v for k, v in cal.items() if k != "weights"}
    return out | {"transfer": _transfer(sets, results, cfg, templates, w)}
