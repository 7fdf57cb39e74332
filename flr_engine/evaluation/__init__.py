"""Evaluation of the FLR reward on preference (accuracy) and rating (correlation) sets.

    flr eval ../shared/data/pairwise --out runs/eval --limit 200

* :mod:`~flr_engine.evaluation.data`: reading sets (project pairwise / rating schemas, TRL
  preference rows, Anthropic HH transcripts), with file:line:field errors;
* :mod:`~flr_engine.evaluation.metrics`: accuracy and correlations with bootstrap
  intervals, and the logistic calibration of per-template weights;
* :mod:`~flr_engine.evaluation.scoring`: a batch of rows -> per-reply records (FLR, Direct,
  length) in one backend pass; the reward-model column;
* :mod:`~flr_engine.evaluation.results`: the per-row files and the arrays read back from them;
* :mod:`~flr_engine.evaluation.set_metrics`: a set's metrics per method, dimension, template;
* :mod:`~flr_engine.evaluation.calibration`: per-template weights, fit, saved, applied;
* :mod:`~flr_engine.evaluation.report`: the markdown report and the figure;
* :mod:`~flr_engine.evaluation.config` / :mod:`~flr_engine.evaluation.run`: the resumable job;
* :mod:`~flr_engine.evaluation.compare`: two policies' rewards on the same prompts.

The ``flr eval`` command itself is :mod:`flr_engine.cli.evaluate`.
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
