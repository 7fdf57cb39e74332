"""The evaluation job: score every set, compute metrics, write the report, JSON and figure.

For each set (see :mod:`flr_engine.evaluation.data`) and each reply the job records, in one
backend pass over both replies of a pair (the engine packs their shared conversation once):

* ``flr``: the FLR reward, its per-dimension rewards and every template's ``lp(f)``;
* ``direct``: the model's own mean log-probability of the reply's tokens given the context,
  ``(1/|R|) sum_{t in R} log p(t | C, R_<t)`` (the paper's "Direct" baseline);
* ``length``: the reply's length in characters;
* ``random``: a uniform random score, from ``numpy.random.default_rng([seed, crc32(set), line, j])``
  (``j`` = 0 chosen / response, 1 rejected), stable across resumes and limits;
* ``rm`` (with ``--reward-model``): a sequence-classification reward model's score.

Pairwise sets report accuracy (:func:`~flr_engine.evaluation.metrics.accuracy_ci`), rating
sets Pearson / Spearman / Kendall against the rating, each with a bootstrap interval, per
method, per template dimension and per template (each template's ``lp`` difference, oriented
by its polarity: a negative follow-up is "right" when it is *less* likely after the chosen
reply; ratings: Spearman of ``+-lp`` with the rating).

Files in ``out`` (resumable; a rerun skips what is done)::

    results.json            everything below, for all sets
    report.md               the markdown tables printed on stdout
    eval.png                accuracy / correlation per set and method (interval bars),
                            FLR per dimension
    sets/NAME.rows.jsonl    per-row scores, written batch by batch (+ .meta.json settings)
    sets/NAME.rm.jsonl      per-row reward-model scores (with --reward-model)
    sets/NAME.result.json   the finished set's metrics, with the settings that made them

A set whose ``result.json`` matches the current settings is not recomputed; an interrupted
set resumes from its ``rows.jsonl``. Calibration (``calibrate_on``) fits per-template
weights on one pairwise set (:func:`~flr_engine.evaluation.metrics.calibrate`) and reports
the calibrated reward ``sum_t w_t lp(t)`` on the *other* sets only. With ``workers > 1``
the batches are scored in that many processes (:mod:`flr_engine.evaluation.parallel`);
a row's ``seconds`` is then its worker's time, so a set's total is summed over workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from flr_engine.chat import InputError
from flr_engine.errors import ConfigError
from flr_engine.evaluation import metrics as M
from flr_engine.evaluation.data import EvalSet, PairItem
from flr_engine.io import OutputBusyError, ResumableWriter, RowError, input_files
from flr_engine.templates import TemplateSet

if TYPE_CHECKING:
    from flr_engine.evaluation.parallel import ScoringPool

log = logging.getLogger("flr_engine.eval")

METHODS = ("flr", "direct", "length", "random")
LABELS = {
    "flr": "FLR",
    "direct": "Direct",
    "length": "Length",
    "random": "Random",
    "rm": "RM",
    "flr-cal": "FLR-cal",
}
CORRS = ("pearson", "spearman", "kendall")


@dataclass
class EvalConfig:
    """Settings of an evaluation run. ``scoring`` describes the scorer (model, templates,
    mode, ...) and keys the per-row caches; the rest keys the per-set results."""

    out: str
    scoring: dict
    limit: int | None = None
    batch_size: int = 4
    seed: int = 0
    n_boot: int = M.DEFAULT_BOOT
    level: float = M.DEFAULT_LEVEL
    calibrate_on: str | None = None
    reward_model: str | None = None
    on_error: str = "fail"
    overwrite: bool = False
    quiet: bool = False
    figure: bool = True
    workers: int = 1  # > 1: score in that many processes (see flr_engine.evaluation.parallel)
    calibration: dict | None = None  # weights fit elsewhere (load_calibration): FLR-cal on every set
    save_calibration: str | None = None  # with calibrate_on: write the fit there (save_calibration)


class _Lazy:
    """Build an expensive object (a model) on first use only."""

    def __init__(self, factory: Callable[[], object] | None):
        self.factory, self.obj = factory, None

    def __call__(self):
        if self.obj is None:
            t0 = time.time()
            self.obj = self.factory()
            log.info("loaded %s in %.1fs", type(self.obj).__name__, time.time() - t0)
        return self.obj


def _num(x) -> float | None:
    """JSON-safe float (NaN/inf -> None)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _clean_json(obj):
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_clean_json(obj), fh, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _sha1_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _texts_hash(texts: list[str]) -> str:
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- scoring


def _record(res, direct: float, reply: str, texts: list[str]) -> dict:
    return {
        "reward": res.reward,
        "dims": {d: v["reward"] for d, v in res.per_dimension.items()},
        "lp": [res.template_logprobs[t] for t in texts],
        "direct": _num(direct),
        "length": len(reply),
        "truncated": res.truncated,
    }


def _replies(item) -> list[tuple[str, str]]:
    if isinstance(item, PairItem):
        return [("chosen", item.chosen), ("rejected", item.rejected)]
    return [("response", item.response)]


def score_batch(scorer, items: list, es: EvalSet, on_error: str) -> list[dict]:
    """Per-row records for ``items`` (all replies of the batch in one backend call)."""
    texts = scorer.templates.unique_texts
    rows, prepared, ok = [], [], []
    for it in items:
        try:
            pp = []
            for fld, reply in _replies(it):
                try:
                    pp.append(scorer.prepare(it.context, reply))
                except InputError as exc:
                    f = fld if exc.field == "response" else exc.field
                    raise RowError(es.path, it.line, f, exc.message) from None
        except RowError as exc:
            if on_error == "fail":
                raise
            log.warning("skipping %s", exc)
            rows.append({"line": it.line, "id": it.id, "error": str(exc)})
            continue
        prepared += pp
        ok.append(it)
    if not ok:
        return rows
    results, direct = scorer.score_prepared_with_direct(prepared)
    k = 0
    for it in ok:
        row = {"line": it.line, "id": it.id}
        for fld, reply in _replies(it):
            row[fld] = _record(results[k], direct[k], reply, texts)
            k += 1
        if not isinstance(it, PairItem):
            row["score"] = it.score
        rows.append(row)
    return sorted(rows, key=lambda r: r["line"])


class RewardModelScorer:
    """A local transformers sequence-classification model as a reward column.

    The score of a reply is the logit when the model has one label, ``logit[1] - logit[0]``
    with two, else ``log_softmax(logits)[-1]``. The text is the conversation + reply rendered
    with the tokenizer's chat template, or ``"User: ...\\n\\nAssistant: ..."`` without one;
    too long inputs are cut from the left (the reply is kept).
    """

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.truncation_side = "left"
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
            .to(device)
            .eval()
        )
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_length = min(limit, self.tok.model_max_length or limit)

    def text(self, context: list[dict], reply: str) -> str:
        msgs = context + [{"role": "assistant", "content": reply}]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(msgs, tokenize=False)
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in msgs)

    def score(self, context: list[dict], reply: str) -> float:
        enc = self.tok(
            self.text(context, reply),
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.model.device)
        with self.torch.no_grad():
            logits = self.model(**enc).logits[0].float()
        if logits.numel() == 1:
            return float(logits[0])
        if logits.numel() == 2:
            return float(logits[1] - logits[0])
        return float(self.torch.log_softmax(logits, -1)[-1])


# ---------------------------------------------------------------- per-set arrays


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


def _read_rows(path: str) -> dict[int, dict]:
    rows = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for raw in fh:
                if raw.endswith("\n") and raw.strip():
                    r = json.loads(raw)
                    rows[int(r["line"])] = r
    return rows


def _random(seed: int, set_name: str, line: int, j: int) -> float:
    """Uniform score, reproducible per (seed, set, row, side); independent across sets."""
    return float(np.random.default_rng([seed, zlib.crc32(set_name.encode()), line, j]).random())


def load_scores(es: EvalSet, items: list, paths: dict, dims: list[str], seed: int) -> SetScores:
    """Collect the per-row files of a set into arrays (rows in ``items`` order)."""
    rows = _read_rows(paths["rows"])
    rm = _read_rows(paths["rm"]) if paths.get("rm") else None
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
            "random": np.array([_random(seed, es.name, r["line"], j) for r in good], dtype=float),
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


# ---------------------------------------------------------------- metrics of a set


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


def _pairwise_metrics(s: SetScores, cfg: EvalConfig, tinfo: list[dict]) -> dict:
    acc = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
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
                "mean_diff": _num(float(np.nanmean(d))) if d.size else None,
            }
        )
    temps.sort(key=lambda e: -(e["accuracy"]["value"] if _num(e["accuracy"]["value"]) else -1))
    return {"methods": methods, "dimensions": dims, "templates": temps, "n_lc": int(lc.sum())}


def _rating_metrics(s: SetScores, cfg: EvalConfig, tinfo: list[dict]) -> dict:
    kw = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    methods = {m: M.correlation_ci(s.a[m], s.y, **kw) for m in s.a}
    dims = {d: M.correlation_ci(s.dims_a[d], s.y, **kw) for d in s.dims_a}
    temps = []
    for j, t in enumerate(tinfo):
        sign = -1.0 if t["polarity"] == "negative" else 1.0
        x = s.lp_a[:, j] if s.lp_a.size else np.zeros(0)
        temps.append({**t, **M.correlation_ci(sign * x, s.y, which=("spearman",), **kw)})
    temps.sort(key=lambda e: -(e["spearman"]["value"] if _num(e["spearman"]["value"]) else -2))
    return {"methods": methods, "dimensions": dims, "templates": temps}


def primary(result: dict, kind: str | None = None) -> str:
    """The headline metric of a set: accuracy (pairwise) or Spearman (rating)."""
    return "accuracy" if (kind or result["kind"]) == "pairwise" else "spearman"


# ---------------------------------------------------------------- the job


def _paths(cfg: EvalConfig, name: str) -> dict:
    d = os.path.join(cfg.out, "sets")
    return {
        "rows": os.path.join(d, f"{name}.rows.jsonl"),
        "rm": os.path.join(d, f"{name}.rm.jsonl") if cfg.reward_model else None,
        "result": os.path.join(d, f"{name}.result.json"),
    }


def _score_serially(get_scorer: Callable, batches: list[list], es: EvalSet, on_error: str):
    """Yield ``(records, seconds)`` per batch, scored in this process."""
    for batch in batches:
        scorer = get_scorer()  # loaded once, before the clock starts
        t0 = time.time()
        recs = score_batch(scorer, batch, es, on_error)
        yield recs, time.time() - t0


def evaluate_set(
    es: EvalSet,
    cfg: EvalConfig,
    templates: TemplateSet,
    get_scorer: Callable,
    get_rm: Callable | None = None,
    pool: ScoringPool | None = None,
) -> dict:
    """Score (or resume) one set and compute its metrics; reuse a finished result."""
    from tqdm import tqdm

    paths = _paths(cfg, es.name)
    os.makedirs(os.path.dirname(paths["rows"]), exist_ok=True)
    texts = templates.unique_texts
    row_settings = {
        **cfg.scoring,
        "data": os.path.abspath(es.path),
        "data_sha1": _sha1_file(es.path),
        "texts": _texts_hash(texts),
    }
    key = {
        **row_settings,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "n_boot": cfg.n_boot,
        "level": cfg.level,
        "reward_model": cfg.reward_model,
        "on_error": cfg.on_error,
        "metrics": 2,  # 2: pairwise results carry the length-controlled accuracy
    }
    if not cfg.overwrite and os.path.exists(paths["result"]):
        with open(paths["result"], encoding="utf-8") as fh:
            cached = json.load(fh)
        if cached.get("settings") == key:
            log.info("set %s: finished earlier, reusing %s", es.name, paths["result"])
            return {**cached["result"], "cached": True}
    t0 = time.time()
    items = es.items[: cfg.limit] if cfg.limit is not None else list(es.items)
    unit = "pair" if es.kind == "pairwise" else "row"
    computed = 0
    if items:
        from flr_engine.models import model_files

        inputs = input_files(
            es.path, cfg.scoring.get("templates"), cfg.scoring.get("chat_template")
        ) + model_files(cfg.scoring["model"])
        try:
            rows_writer = ResumableWriter(
                paths["rows"], row_settings, resume=not cfg.overwrite, out_flag="--out",
                inputs=inputs,
            )
        except OutputBusyError as exc:  # another `flr eval` on the same --out has this set
            log.warning("set %s skipped here: %s", es.name, exc)
            return {"name": es.name, "path": es.path, "busy": True}
        with rows_writer as w:
            todo = [it for it in items if it.line not in w.done]
            if todo and len(todo) < len(items):
                log.info(
                    "set %s: resuming, %d of %d done", es.name, len(items) - len(todo), len(items)
                )
            bar = tqdm(
                total=len(items),
                initial=len(items) - len(todo),
                unit=unit,
                desc=f"eval {es.name}",
                disable=cfg.quiet,
            )
            batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
            if pool is not None:  # a batch's seconds are its worker's time
                scored = pool.score(batches, es.path, cfg.on_error)
            else:
                scored = _score_serially(get_scorer, batches, es, cfg.on_error)
            for recs, seconds in scored:
                per_row = round(seconds / max(1, len(recs)), 4)
                w.write([{**r, "seconds": per_row} for r in recs])
                computed += len(recs)
                bar.update(len(recs))
            bar.close()
        if get_rm is not None and paths["rm"]:
            rm_settings = {k: row_settings[k] for k in ("data", "data_sha1")}
            rm_settings["reward_model"] = cfg.reward_model
            with ResumableWriter(
                paths["rm"], rm_settings, resume=not cfg.overwrite, out_flag="--out",
                inputs=input_files(es.path),
            ) as w:
                todo = [it for it in items if it.line not in w.done]
                for it in tqdm(todo, desc=f"rm {es.name}", unit=unit, disable=cfg.quiet):
                    rec = {"line": it.line}
                    for fld, reply in _replies(it):
                        rec[fld] = get_rm().score(it.context, reply)
                    w.write([rec])
    scores = load_scores(es, items, paths, templates.dimension_names, cfg.seed)
    result = {
        "name": es.name,
        "path": es.path,
        "schema": es.schema,
        "kind": es.kind,
        "rows": es.rows,
        "ties": es.ties,
        "bad": es.bad + scores.bad,
        "errors": es.errors + scores.errors,
        "limit": cfg.limit,
        "n": len(scores.lines),
        "computed_rows": computed,
        "scoring_seconds": round(scores.seconds, 1),
        "timed_rows": scores.timed_rows,
        "cached": False,
    }
    if not scores.lines:
        result["note"] = "no non-tie pairs" if es.kind == "pairwise" else "no scorable rows"
        result.update(methods={}, dimensions={}, templates=[])
    else:
        tinfo = template_polarity(templates)
        if es.kind == "pairwise":
            result.update(_pairwise_metrics(scores, cfg, tinfo))
        else:
            result.update(_rating_metrics(scores, cfg, tinfo))
    result["seconds"] = round(time.time() - t0, 2)
    _write_json(paths["result"], {"settings": key, "result": result})
    return result


def run_calibration(
    sets: list[EvalSet], results: dict, cfg: EvalConfig, templates: TemplateSet
) -> dict:
    """Fit template weights on ``cfg.calibrate_on`` and score the other sets with them."""
    by_name = {es.name: es for es in sets}
    fit = by_name[cfg.calibrate_on]
    if fit.name not in results:
        raise OutputBusyError(f"set {fit.name} is being scored by another process")
    dims = templates.dimension_names

    def scores_of(es):
        items = es.items[: cfg.limit] if cfg.limit is not None else es.items
        return load_scores(es, items, _paths(cfg, es.name), dims, cfg.seed)

    s = scores_of(fit)
    cal = M.calibrate(s.lp_a - s.lp_b, seed=cfg.seed)
    w = np.array(cal["weights"])
    texts = templates.unique_texts
    order = np.argsort(-np.abs(w))
    out = {
        "fit_on": fit.name,
        "n": cal["n"],
        "lam": cal["lam"],
        "folds": cal["folds"],
        "cv": cal["cv"],
        # held-out accuracy on the fit set itself, at the chosen lambda (k-fold CV)
        "cv_accuracy": next(c["accuracy"] for c in cal["cv"] if c["lam"] == cal["lam"]),
        "weights": dict(zip(texts, cal["weights"])),
        "top": [{"text": texts[i], "weight": float(w[i])} for i in order[:10]],
        "transfer": {},
    }
    kw = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    for es in sets:
        if es.name == fit.name or not results.get(es.name, {}).get("n"):
            continue
        t = scores_of(es)
        if es.kind == "pairwise":
            d = (t.lp_a - t.lp_b) @ w
            lc = length_controlled(t.a["length"], t.b["length"])
            out["transfer"][es.name] = {
                "accuracy": M.accuracy_ci(d, **kw),
                "accuracy_lc": M.accuracy_ci(d[lc], **kw),
            }
        else:
            out["transfer"][es.name] = M.correlation_ci(t.lp_a @ w, t.y, **kw)
    return out


def save_calibration(path: str, cal: dict, templates: TemplateSet) -> None:
    """Write a calibration fit (``run_calibration``'s result) for ``--calibration FILE``."""
    keep = ("fit_on", "n", "lam", "folds", "cv", "cv_accuracy", "weights", "top")
    obj = {k: cal[k] for k in keep} | {
        "templates": templates.name,
        "texts": _texts_hash(templates.unique_texts),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_json(path, obj)


def load_calibration(path: str, templates: TemplateSet) -> dict:
    """Read a saved calibration; its template texts must be those being scored."""
    with open(path, encoding="utf-8") as fh:
        cal = json.load(fh)
    missing = [t for t in templates.unique_texts if t not in cal.get("weights", {})]
    if missing or cal.get("texts") != _texts_hash(templates.unique_texts):
        raise ConfigError(
            f"--calibration {path}: fit for template set {cal.get('templates')!r}, not for "
            f"{templates.name!r} (missing weights for {len(missing)} follow-ups)"
        )
    return cal | {"path": path}


def apply_calibration(
    sets: list[EvalSet], results: dict, cfg: EvalConfig, templates: TemplateSet
) -> dict:
    """The FLR-cal column on every set from weights fit elsewhere (``cfg.calibration``)."""
    cal = cfg.calibration
    dims = templates.dimension_names
    w = np.array([cal["weights"][t] for t in templates.unique_texts])
    out = {k: v for k, v in cal.items() if k != "weights"} | {"transfer": {}}
    kw = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    for es in sets:
        if not results.get(es.name, {}).get("n"):
            continue
        items = es.items[: cfg.limit] if cfg.limit is not None else es.items
        t = load_scores(es, items, _paths(cfg, es.name), dims, cfg.seed)
        if es.kind == "pairwise":
            d = (t.lp_a - t.lp_b) @ w
            lc = length_controlled(t.a["length"], t.b["length"])
            out["transfer"][es.name] = {
                "accuracy": M.accuracy_ci(d, **kw),
                "accuracy_lc": M.accuracy_ci(d[lc], **kw),
            }
        else:
            out["transfer"][es.name] = M.correlation_ci(t.lp_a @ w, t.y, **kw)
    return out


def run_eval(
    sets: list[EvalSet],
    cfg: EvalConfig,
    templates: TemplateSet,
    scorer_factory: Callable[[], object],
    rm_factory: Callable[[], object] | None = None,
) -> dict:
    """Evaluate every set; write ``results.json``, ``report.md`` and ``eval.png`` in
    ``cfg.out``; return the results (with ``"markdown"``: the report text)."""
    if cfg.calibrate_on is not None:
        names = {es.name: es for es in sets}
        if cfg.calibrate_on not in names:
            raise ConfigError(
                f"--calibrate-on {cfg.calibrate_on!r}: no such set; sets are {sorted(names)}"
            )
        if names[cfg.calibrate_on].kind != "pairwise":
            raise ConfigError(
                f"--calibrate-on {cfg.calibrate_on!r}: calibration needs a pairwise set"
            )
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    get_scorer = _Lazy(scorer_factory)
    get_rm = _Lazy(rm_factory) if rm_factory is not None and cfg.reward_model else None
    results = {}
    busy = []  # sets another process is scoring into the same --out: left out of this report
    pool = None
    if cfg.workers > 1:
        import torch

        from flr_engine.evaluation.parallel import ScoringPool

        threads = max(1, torch.get_num_threads() // cfg.workers)
        pool = ScoringPool(scorer_factory, cfg.workers, threads, cfg.quiet)
    try:
        for es in sets:
            r = evaluate_set(es, cfg, templates, get_scorer, get_rm, pool)
            if r.get("busy"):
                busy.append(es.name)
            else:
                results[es.name] = r
    finally:
        if pool is not None:
            pool.close()
    out = {
        "settings": {
            **cfg.scoring,
            "limit": cfg.limit,
            "seed": cfg.seed,
            "n_boot": cfg.n_boot,
            "level": cfg.level,
            "reward_model": cfg.reward_model,
            "calibrate_on": cfg.calibrate_on,
            "calibration": (cfg.calibration or {}).get("path"),
            "engine": getattr(get_scorer.obj, "engine_name", None)
            or getattr(pool, "engine_name", None),
            "workers": cfg.workers,
        },
        "sets": results,
        "busy": busy,
        "calibration": None,
    }
    if cfg.calibrate_on is not None:
        try:
            out["calibration"] = run_calibration(sets, results, cfg, templates)
            if cfg.save_calibration:
                save_calibration(cfg.save_calibration, out["calibration"], templates)
        except ValueError as exc:  # e.g. too few pairs: keep the rest of the report
            log.warning("calibration on %s failed: %s", cfg.calibrate_on, exc)
            out["calibration"] = {"fit_on": cfg.calibrate_on, "error": str(exc)}
    elif cfg.calibration is not None:
        out["calibration"] = apply_calibration(sets, results, cfg, templates)
    out["seconds"] = round(time.time() - t0, 2)
    md = markdown_report(out)
    files = {
        "results": os.path.join(cfg.out, "results.json"),
        "report": os.path.join(cfg.out, "report.md"),
    }
    if cfg.figure:
        files["figure"] = os.path.join(cfg.out, "eval.png")
        plot(out, files["figure"])
    out["files"] = files
    _write_json(files["results"], out)
    with open(files["report"], "w", encoding="utf-8") as fh:
        fh.write(md)
    out["markdown"] = md
    return out


# ---------------------------------------------------------------- report


def _fmt(m: dict | None, pct: bool) -> str:
    if not m or _num(m.get("value")) is None:
        return "–"
    f = 100.0 if pct else 1.0
    nd = 1 if pct else 3
    v, (lo, hi) = m["value"] * f, m["ci"]
    if _num(lo) is None:
        return f"{v:.{nd}f}"
    return f"{v:.{nd}f} [{lo * f:.{nd}f}, {hi * f:.{nd}f}]"


def _columns(res: dict) -> list[str]:
    cols = [
        m for m in (*METHODS, "rm") if any(m in r.get("methods", {}) for r in res["sets"].values())
    ]
    if "transfer" in (res.get("calibration") or {}):
        cols.append("flr-cal")
    return cols


def markdown_report(res: dict) -> str:
    """Markdown tables: pairwise accuracy, rating correlations, FLR per dimension, and the
    templates that carry the most signal."""
    sets = res["sets"]
    cal = res.get("calibration") or {}
    transfer = cal.get("transfer", {})
    cols = _columns(res)
    level = int(round(100 * res["settings"]["level"]))
    lines = []

    def method_metric(name, r, m, metric):
        if m == "flr-cal":
            return transfer.get(name, {}).get(metric)
        return r["methods"].get(m, {}).get(metric)

    pw = {k: r for k, r in sets.items() if r["kind"] == "pairwise"}
    if pw:
        lines += [
            f"### Pairwise accuracy (%, {level}% bootstrap interval; score ties count 0.5)",
            "",
            "| set | n | ties | bad | " + " | ".join(LABELS[c] for c in cols) + " |",
            "|---|---:|---:|---:|" + "---|" * len(cols),
        ]
        means: dict[str, list[float]] = {c: [] for c in cols}
        for name, r in pw.items():
            if r.get("note"):
                lines.append(
                    f"| {name} | 0 | {r['ties']} | {r['bad']} | {r['note']} |"
                    + " |" * (len(cols) - 1)
                )
                continue
            cells = []
            for c in cols:
                m = method_metric(name, r, c, "accuracy")
                cells.append(
                    "(fit set)" if c == "flr-cal" and name == cal.get("fit_on") else _fmt(m, True)
                )
                if m and _num(m.get("value")) is not None:
                    means[c].append(m["value"])
            lines.append(
                f"| {name} | {r['n']} | {r['ties']} | {r['bad']} | " + " | ".join(cells) + " |"
            )
        if len([r for r in pw.values() if not r.get("note")]) > 1:
            avg = [f"{100 * np.mean(v):.1f}" if v else "–" for v in means.values()]
            lines.append("| **average** | | | | " + " | ".join(avg) + " |")
        lines.append("")
        lc_sets = {k: r for k, r in pw.items() if "n_lc" in r}
        if lc_sets:
            lines += [
                f"### Length-controlled accuracy (%, pairs whose replies differ in length by "
                f"less than {int(100 * LC_RATIO)}%)",
                "",
                "| set | n | " + " | ".join(LABELS[c] for c in cols) + " |",
                "|---|---:|" + "---|" * len(cols),
            ]
            for name, r in lc_sets.items():
                cells = [
                    "(fit set)"
                    if c == "flr-cal" and name == cal.get("fit_on")
                    else _fmt(method_metric(name, r, c, "accuracy_lc"), True)
                    for c in cols
                ]
                lines.append(f"| {name} | {r['n_lc']} | " + " | ".join(cells) + " |")
            lines.append("")
    rt = {k: r for k, r in sets.items() if r["kind"] == "rating"}
    if rt:
        lines += [
            f"### Rating correlation with the score ({level}% bootstrap interval)",
            "",
            "| set | n | metric | " + " | ".join(LABELS[c] for c in cols) + " |",
            "|---|---:|---|" + "---|" * len(cols),
        ]
        for name, r in rt.items():
            if r.get("note"):
                lines.append(f"| {name} | 0 | {r['note']} |" + " |" * len(cols))
                continue
            for corr in CORRS:
                cells = [
                    "(fit set)"
                    if c == "flr-cal" and name == cal.get("fit_on")
                    else _fmt(method_metric(name, r, c, corr), False)
                    for c in cols
                ]
                lines.append(f"| {name} | {r['n']} | {corr} | " + " | ".join(cells) + " |")
        lines.append("")
    done = {k: r for k, r in sets.items() if r.get("dimensions")}
    if done:
        dims = list(next(iter(done.values()))["dimensions"])
        lines += [
            "### FLR per dimension (pairwise: accuracy %; rating: Spearman)",
            "",
            "| set | " + " | ".join(dims) + " |",
            "|---|" + "---|" * len(dims),
        ]
        for name, r in done.items():
            pct = r["kind"] == "pairwise"
            cells = [_fmt(r["dimensions"][d].get(primary(r)), pct) for d in dims]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["### Templates carrying the most signal (oriented by polarity; top 3)", ""]
        for name, r in done.items():
            pct = r["kind"] == "pairwise"
            top = ", ".join(
                f"{t['text']!r} ({t['polarity'][:3]}) {_fmt(t.get(primary(r)), pct).split(' [')[0]}"
                for t in r["templates"][:3]
            )
            lines.append(f"- {name}: {top}")
        lines.append("")
    if cal.get("error"):
        lines += [f"### Calibration on {cal['fit_on']} failed: {cal['error']}", ""]
    elif cal.get("path"):
        lines += [
            f"### Calibration from {cal['path']}: per-template weights fit on {cal['fit_on']} "
            f"(n={cal['n']}, lambda={cal['lam']:g}; {cal['folds']}-fold CV accuracy there "
            f"{100 * cal['cv_accuracy']:.1f}%), applied to every set (FLR-cal)",
            "",
        ]
    elif cal:
        lines += [
            f"### Calibration: per-template logistic weights fit on {cal['fit_on']} "
            f"(n={cal['n']}, lambda={cal['lam']:g} by {cal['folds']}-fold CV)",
            "",
            f"held-out accuracy on {cal['fit_on']} itself ({cal['folds']}-fold CV): "
            f"{100 * cal['cv_accuracy']:.1f}%; the FLR-cal column shows the other sets",
            "",
            "largest weights: "
            + ", ".join(f"{t['text']!r} {t['weight']:+.2f}" for t in cal["top"][:5]),
            "",
        ]
    timed = [
        f"{k} {r['scoring_seconds']:.0f} s"
        + ("" if r["timed_rows"] == r["n"] else f" ({r['timed_rows']} of {r['n']} rows timed)")
        for k, r in sets.items()
        if r.get("timed_rows")
    ]
    if timed:
        lines.append(f"(scoring time, summed over the runs that wrote the rows: {', '.join(timed)})")
    cached = [k for k, r in sets.items() if r.get("cached")]
    if cached:
        lines.append(f"(reused finished results for: {', '.join(cached)})")
    if res.get("busy"):
        lines.append(
            f"(left out, being scored by another process: {', '.join(res['busy'])}; "
            "run again when it has finished)"
        )
    return "\n".join(lines).rstrip() + "\n"


def plot(res: dict, path: str) -> None:
    """Accuracy / Spearman per set and method with interval bars, and FLR per dimension."""
    from matplotlib.figure import Figure

    sets = {k: r for k, r in res["sets"].items() if r.get("methods")}
    cal = res.get("calibration") or {}
    cols = _columns(res)
    panels = []
    for kind in ("pairwise", "rating"):
        sub = {k: r for k, r in sets.items() if r["kind"] == kind}
        if sub:
            panels.append(("methods", kind, sub))
    for kind in ("pairwise", "rating"):
        sub = {k: r for k, r in sets.items() if r["kind"] == kind}
        if sub:
            panels.append(("dimensions", kind, sub))
    fig = Figure(
        figsize=(
            max(7, 1.6 * max([len(p[2]) for p in panels] or [1]) + 3),
            3.6 * max(len(panels), 1),
        )
    )
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no results (no non-tie pairs / scorable rows)", ha="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        return
    for p, (what, kind, sub) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        metric = "accuracy" if kind == "pairwise" else "spearman"
        names = list(sub)
        series = cols if what == "methods" else list(next(iter(sub.values()))["dimensions"])
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(names))
        for j, s in enumerate(series):
            vals, lo, hi = [], [], []
            for n in names:
                if what == "dimensions":
                    m = sub[n]["dimensions"].get(s, {}).get(metric)
                elif s == "flr-cal":
                    m = cal.get("transfer", {}).get(n, {}).get(metric)
                else:
                    m = sub[n]["methods"].get(s, {}).get(metric)
                v = _num(m["value"]) if m else None
                vals.append(np.nan if v is None else v)
                a, b = m["ci"] if m and v is not None else (None, None)
                lo.append(0 if _num(a) is None else v - a)
                hi.append(0 if _num(b) is None else b - v)
            ax.bar(
                x + (j - (len(series) - 1) / 2) * width,
                vals,
                width,
                yerr=[lo, hi],
                capsize=2,
                label=LABELS.get(s, s),
            )
        ax.axhline(0.5 if kind == "pairwise" else 0.0, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0.0 if kind == "pairwise" else -1.0, 1.25)
        ax.set_xticks(x, names, fontsize=8)
        ylabel = "accuracy" if kind == "pairwise" else "Spearman"
        title = "per method" if what == "methods" else "FLR per dimension"
        ax.set_title(f"{kind} sets: {ylabel} {title}", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, ncol=min(len(series), 7), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
