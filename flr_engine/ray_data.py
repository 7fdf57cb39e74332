"""``FLRBatchScorer``: FLR rewards inside a Ray Data pipeline, one judge per actor.

    import ray
    from flr_engine.ray_data import FLRBatchScorer

    scored = ray.data.read_json("rows.jsonl").map_batches(
        FLRBatchScorer,
        fn_constructor_kwargs={"model": "default"},   # + templates=, engine=, mode=, ...
        concurrency=4,      # 4 actors, each loads its own judge once
        num_gpus=1,         # per actor (leave out on CPU machines)
        batch_size=64,      # rows per Ray batch
    )
    scored.write_parquet("scores/")

Ray 2.51 and later deprecate ``concurrency=4`` (it still works, with a warning) in favour of
``compute=ray.data.ActorPoolStrategy(size=4)``, which older versions take too. Ray calls
the constructor once per actor (the judge loads there, with
:meth:`~flr_engine.scorer.FLRScorer.from_pretrained`, the loader ``flr score`` uses) and
``__call__`` once per batch. Ray is only needed by the pipeline: this module does not import
it (``pip install -e ".[ray]"`` installs a tested ``ray[data]``).

A batch is what ``map_batches`` hands over with ``batch_format="numpy"`` (the default: a
dict of column name -> numpy array) or ``batch_format="pandas"`` (a DataFrame); the result
has the same type. Input rows are those of ``flr score``: a ``context`` (a string or a list
of ``{role, content}`` messages) and a ``response``, or TRL-style ``prompt`` and
``completion`` (Ray stores a column with one Arrow type: in one dataset, contexts are all
strings or all message lists). Every other column (``id``, metadata, ...) is passed through unchanged.
Added columns, per row, are the fields ``flr score`` writes (:class:`~flr_engine.reward.
ScoreResult`): ``reward``, ``positive``, ``negative``, ``per_dimension``,
``template_logprobs``, ``num_tokens``, ``mode``, ``truncated``, plus ``error``. There is no
``line`` column (a dataset has no input lines: carry your own ``id``).

A row that cannot be scored (``flr score --on-error skip`` writes it to its errors file)
gets ``None`` in every result column and the reason in ``error`` (``field 'response': is
empty: ...``); the rest of the batch is scored. ``error`` is ``None`` on scored rows.

The numbers are ``flr score``'s: rows are validated the same way, cut into backend calls of
``batch_size`` rows in order, and scored by the same calls. The reference backend gives the
same rewards whatever the batching; the packed engine packs each call's rows together, so
its last bits can differ when Ray's batches cut the rows differently than ``flr score``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from flr_engine.distributed import chunks
from flr_engine.errors import InputError
from flr_engine.io import RowError, parse_score_row
from flr_engine.reward import RewardConfig
from flr_engine.scorer import FLRScorer
from flr_engine.templates import DEFAULT, load_templates

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("context", "response", "prompt", "completion")
RESULT_COLUMNS = ("reward", "positive", "negative", "per_dimension", "template_logprobs",
                  "num_tokens", "mode", "truncated", "error")  # fmt: skip


class FLRBatchScorer:
    """A callable class for ``ray.data.Dataset.map_batches``: one judge per actor.

    Args:
        model: ``"default"``, ``"default-ft"``, a model folder, hub id or .gguf (``--model``).
        templates, engine, mode, reduction, score_eot, dimensions: the reward options of
            ``flr score`` (``dimensions``: a list or a comma-separated string).
        dtype, device, format, chat_template: how the judge loads
            (:meth:`~flr_engine.scorer.FLRScorer.from_pretrained`; ``chat_template`` is the
            Jinja text, not a file). ``device="auto"``: the actor's GPU when Ray gave it one
            (``num_gpus=``), else the CPU.
        batch_size: rows per backend call (``flr score --batch-size``), whatever the size of
            Ray's batches.
        scorer_kwargs: anything else :class:`~flr_engine.scorer.FLRScorer` takes
            (``max_length``, ``engine_kwargs``).
    """

    def __init__(
        self,
        model: str = "default",
        *,
        templates: str = DEFAULT,
        engine: str = "auto",
        mode: str = "likelihood",
        reduction: str = "mean",
        score_eot: bool = False,
        dimensions: list[str] | str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        format: str | None = None,
        chat_template: str | None = None,
        batch_size: int = 8,
        **scorer_kwargs,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(dimensions, str):
            dimensions = dimensions.split(",")
        config = RewardConfig(mode=mode, reduction=reduction, score_eot=score_eot,
                              dimensions=dimensions)  # fmt: skip
        load_templates(templates)  # fail fast on an unknown set, before loading a model
        self.batch_size = batch_size
        self.scorer = FLRScorer.from_pretrained(
            model, dtype=dtype, device=device, chat_template=chat_template, format=format,
            templates=templates, engine=engine, config=config, **scorer_kwargs,
        )  # fmt: skip

    def __call__(self, batch):
        """Score a numpy (dict of arrays) or pandas batch; returns the same type with the
        result columns added."""
        if isinstance(batch, dict):
            columns = batch
        elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # a pandas DataFrame
            columns = {c: batch[c].to_numpy() for c in batch.columns}
        else:
            raise TypeError(
                f"FLRBatchScorer takes a numpy (dict) or pandas batch, got {type(batch).__name__}:"
                " use map_batches(..., batch_format='numpy') or 'pandas'"
            )
        clash = sorted(set(RESULT_COLUMNS) & set(columns))
        if clash:
            raise InputError(f"the batch already has result column(s) {clash}: rename or drop "
                             "them before scoring")  # fmt: skip
        n = len(next(iter(columns.values()))) if columns else 0
        results = self.score_rows([_row(columns, i) for i in range(n)])
        added = {c: [r[c] for r in results] for c in RESULT_COLUMNS}
        if isinstance(batch, dict):
            return {**batch, **{c: _object_array(v) for c, v in added.items()}}
        import pandas as pd  # there when the batch is a DataFrame

        out = batch.copy()
        for c, v in added.items():  # object columns: None stays None (pandas 3 infers NaN)
            out[c] = pd.Series(_object_array(v), index=batch.index, dtype=object)
        return out

    def score_rows(self, rows: list[dict]) -> list[dict]:
        """One result dict (:data:`RESULT_COLUMNS`) per input row, in order, as ``flr score
        --on-error skip`` would: the rows are validated first, the valid ones cut into
        backend calls of ``batch_size`` in order, and a row the renderer refuses is left out
        of its call."""
        out: list[dict] = [_failed("")] * len(rows)
        valid = []
        for i, obj in enumerate(rows):
            try:
                parsed = parse_score_row("batch", i, obj)
            except RowError as exc:
                out[i] = _failed(str(InputError(exc.message, exc.field)))
            else:
                valid.append((i, parsed))
        for rows_in_call in chunks(valid, self.batch_size):
            chunk, prepared = [], []
            for i, r in rows_in_call:
                try:
                    prepared.append(self.scorer.prepare(r.context, r.response))
                    chunk.append(i)
                except InputError as exc:
                    out[i] = _failed(str(exc))
            if prepared:
                for i, res in zip(chunk, self.scorer.score_prepared(prepared)):
                    out[i] = {**res.to_dict(), "error": None}
        bad = sum(r["error"] is not None for r in out)
        if bad:
            log.warning("%d of %d rows not scored (reason in the 'error' column)", bad, len(rows))
        return out


def _failed(message: str) -> dict:
    return {**dict.fromkeys(RESULT_COLUMNS), "error": message}


def _row(columns: dict, i: int) -> dict:
    """Row ``i``'s input fields as plain Python; ``None`` (and pandas' NaN) is a missing
    field, as a key absent from a JSON row."""
    row = {}
    for k in INPUT_COLUMNS:
        if k in columns:
            v = _plain(columns[k][i])
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                row[k] = v
    return row


def _plain(v):
    """numpy arrays and scalars (Arrow lists and structs as Ray hands them) as lists, dicts
    and Python scalars."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _object_array(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (dicts and ``None`` stay what they are)."""
    a = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        a[i] = v
    return a
