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
set resumes from its ``rows.jsonl``. The parts live in their own modules: rows are scored
by :mod:`.scoring`, kept and read back by :mod:`.results`, measured by :mod:`.set_metrics`,
calibrated by :mod:`.calibration` and reported by :mod:`.report`. Calibration (``calibrate_on``) fits per-template
weights on one pairwise set (:func:`~flr_engine.evaluation.metrics.calibrate`) and reports
the calibrated reward ``sum_t w_t lp(t)`` on the *other* sets only. Under a launcher
(``torchrun --nproc-per-node N -m flr_engine.cli eval ...``) each rank scores every N-th
batch into its own shard (:mod:`flr_engine.distributed`) and rank 0 merges them and writes
the results; a row's ``seconds`` is its rank's time, so a set's total is summed over ranks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from flr_engine.distributed import Ranks, ShardedOutput, chunks
from flr_engine.errors import ConfigError
from flr_engine.evaluation.calibration import apply_calibration, fit_calibration, save_calibration
from flr_engine.evaluation.config import EvalConfig
from flr_engine.evaluation.data import EvalSet
from flr_engine.evaluation.report import markdown_report, plot
from flr_engine.evaluation.results import load_scores, set_paths, sha1_file, texts_hash, write_json
from flr_engine.evaluation.scoring import replies, score_batch
from flr_engine.evaluation.set_metrics import pairwise_metrics, rating_metrics, template_polarity
from flr_engine.io import OutputBusyError, claim_output_folder, input_files
from flr_engine.templates import TemplateSet

log = logging.getLogger("flr_engine.eval")


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


def evaluate_set(
    es: EvalSet,
    cfg: EvalConfig,
    templates: TemplateSet,
    get_scorer: Callable,
    get_rm: Callable | None = None,
    ranks: Ranks | None = None,
) -> dict:
    """Score (or resume) one set and compute its metrics; reuse a finished result. Under a
    launcher (``ranks``) every rank scores its share; rank 0 computes the metrics."""
    from tqdm import tqdm

    ranks = ranks or Ranks()
    paths = set_paths(cfg.out, es.name, cfg.reward_model)
    os.makedirs(os.path.dirname(paths["rows"]), exist_ok=True)
    texts = templates.unique_texts
    row_settings = {
        **cfg.scoring,
        "data": os.path.abspath(es.path),
        "data_sha1": sha1_file(es.path),
        "texts": texts_hash(texts),
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
            rows_writer = ShardedOutput(
                paths["rows"], row_settings, ranks, resume=not cfg.overwrite, out_flag="--out",
                inputs=inputs,
            )
        except OutputBusyError as exc:  # another `flr eval` on the same --out has this set
            log.warning("set %s skipped here: %s", es.name, exc)
            return {"name": es.name, "path": es.path, "busy": True}
        # batches fixed by input position; under a launcher every world-th one is this rank's
        mine = ranks.take(chunks(items, cfg.batch_size))
        with rows_writer as w:
            total = sum(len(c) for c in mine)
            batches = [b for b in ([it for it in c if it.line not in w.done] for c in mine) if b]
            left = sum(len(b) for b in batches)
            if left and left < total:
                log.info("%sset %s: resuming, %d of %d done", ranks.tag, es.name, total - left, total)
            bar = tqdm(
                total=total,
                initial=total - left,
                unit=unit,
                desc=f"{ranks.tag}eval {es.name}",
                disable=cfg.quiet or not ranks.is_main,
            )
            for batch in batches:
                scorer = get_scorer()  # loaded once, before the clock starts
                t1 = time.time()
                recs = score_batch(scorer, batch, es, cfg.on_error)
                per_row = round((time.time() - t1) / max(1, len(recs)), 4)
                w.write([{**r, "seconds": per_row} for r in recs])
                computed += len(recs)
                bar.update(len(recs))
            bar.close()
        if get_rm is not None and paths["rm"]:
            rm_settings = {k: row_settings[k] for k in ("data", "data_sha1")}
            rm_settings["reward_model"] = cfg.reward_model
            with ShardedOutput(
                paths["rm"], rm_settings, ranks, resume=not cfg.overwrite, out_flag="--out",
                inputs=input_files(es.path),
            ) as w:
                todo = [it for c in mine for it in c if it.line not in w.done]
                for it in tqdm(todo, desc=f"{ranks.tag}rm {es.name}", unit=unit,
                               disable=cfg.quiet or not ranks.is_main):  # fmt: skip
                    rec = {"line": it.line}
                    for fld, reply in replies(it):
                        rec[fld] = get_rm().score(it.context, reply)
                    w.write([rec])
    if not ranks.is_main:  # rank 0 alone reads the merged rows and writes the result
        return {"name": es.name, "path": es.path, "rank": ranks.rank}
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
            result.update(pairwise_metrics(scores, tinfo, cfg.n_boot, cfg.seed, cfg.level))
        else:
            result.update(rating_metrics(scores, tinfo, cfg.n_boot, cfg.seed, cfg.level))
    result["seconds"] = round(time.time() - t0, 2)
    write_json(paths["result"], {"settings": key, "result": result})
    return result


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
    ranks = Ranks.from_env()
    # rank 0 claims the folder; sets/: runs before the marker
    ranks.on_main(lambda: claim_output_folder(cfg.out, "flr eval", earlier=("sets",)))
    t0 = time.time()
    get_scorer = _Lazy(scorer_factory)
    get_rm = _Lazy(rm_factory) if rm_factory is not None and cfg.reward_model else None
    results = {}
    busy = []  # sets another process is scoring into the same --out: left out of this report
    for es in sets:
        r = evaluate_set(es, cfg, templates, get_scorer, get_rm, ranks)
        if r.get("busy"):
            busy.append(es.name)
        else:
            results[es.name] = r
    if not ranks.is_main:
        return {"rank": ranks.rank, "sets": results, "markdown": "", "files": {}}
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
            "engine": getattr(get_scorer.obj, "engine_name", None),
            "ranks": ranks.world,
        },
        "sets": results,
        "busy": busy,
        "calibration": None,
    }
    if cfg.calibrate_on is not None:
        try:
            out["calibration"] = fit_calibration(sets, results, cfg, templates)
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
    write_json(files["results"], out)
    with open(files["report"], "w", encoding="utf-8") as fh:
        fh.write(md)
    out["markdown"] = md
    return out
