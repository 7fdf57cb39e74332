"""Evaluation of the FLR reward on preference (accuracy) and rating (correlation) sets.

    flr eval ../shared/data/pairwise --out runs/eval --limit 200

* :mod:`~flr_engine.evaluation.data`: reading sets (project pairwise / rating schemas, TRL
  preference rows, Anthropic HH transcripts), with file:line:field errors;
* :mod:`~flr_engine.evaluation.metrics`: accuracy and correlations with bootstrap
  intervals, and the logistic calibration of per-template weights;
* :mod:`~flr_engine.evaluation.run`: the resumable job, markdown report, JSON and figure;
* :mod:`~flr_engine.evaluation.cli`: the ``flr eval`` subcommand.
"""

from __future__ import annotations

from flr_engine.evaluation.data import EvalDataError, EvalSet, PairItem, RatingItem, load_sets
from flr_engine.evaluation.metrics import accuracy, accuracy_ci, calibrate, correlation_ci

__all__ = [
    "EvalDataError",
    "EvalSet",
    "PairItem",
    "RatingItem",
    "load_sets",
    "accuracy",
    "accuracy_ci",
    "correlation_ci",
    "calibrate",
]
