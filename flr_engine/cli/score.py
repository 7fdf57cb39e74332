"""``flr score``: the FLR reward of every row of a JSONL file, resumable."""

from __future__ import annotations

import json
import logging
import os
import time

from flr_engine.chat import InputError
from flr_engine.cli.args import (
    RAW,
    add_model_args,
    add_reward_args,
    scorer_from_args,
    scoring_settings,
)
from flr_engine.distributed import Ranks, ShardedOutput, chunks
from flr_engine.io import RowError, input_files, parse_score_row, read_rows

log = logging.getLogger("flr_engine")

SCORE_EXAMPLES = """examples:
  flr score --input rows.jsonl --output scores.jsonl
  flr score --input rows.jsonl --output scores.jsonl --templates flr-mixed --mode official
  flr score --input rows.jsonl --output scores.jsonl --model ./my-model --dimensions relevance
  torchrun --nproc-per-node 4 -m flr_engine.cli score --input rows.jsonl --output scores.jsonl

input rows (JSONL, .gz ok): {"context": [{"role": "user", "content": ...}, ...], "response": "..."}
                        or: {"prompt": "..." | [messages], "completion": "..." | [messages]}
A rerun with the same --output skips rows already scored; an interrupted run loses nothing
already written. A bad row stops the run with file:line: field (or --on-error skip logs it
to OUTPUT.errors.jsonl and goes on). Under torchrun / accelerate launch each rank scores
every N-th batch on its own device into OUTPUT.shard-R; rank 0 merges them in input order."""



def register(sub) -> None:
    p = sub.add_parser("score", help="score replies in a JSONL file (resumable)",
                       epilog=SCORE_EXAMPLES, formatter_class=RAW)  # fmt: skip
    p.add_argument("--input", required=True, help="JSONL(.gz) rows to score")
    p.add_argument("--output", required=True, help="JSONL results, one row per input row")
    add_model_args(p)
    add_reward_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="rows scored per backend call")
    p.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="on a bad row: stop (default) or log and skip",
    )
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--allow-empty", action="store_true", help="an input with no rows is not an error")
    p.set_defaults(func=cmd_score)


class ErrorLog:
    """``OUTPUT.errors.jsonl``: one ``{"line", "error"}`` per skipped row. A resumed run adds
    only rows it does not list yet (each row once, however often the job is rerun);
    ``fresh`` (--overwrite, one process) starts it over."""

    def __init__(self, path: str, fresh: bool = False):
        self.listed: set[int] = set()
        if not fresh and os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                for x in fh:
                    try:
                        self.listed.add(int(json.loads(x)["line"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line: that row is listed again
        self.fh = open(path, "w" if fresh else "a", encoding="utf-8")

    def write(self, line: int, error: str) -> None:
        if line not in self.listed:
            self.listed.add(line)
            self.fh.write(json.dumps({"line": line, "error": error}) + "\n")
            self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def cmd_score(args) -> int:
    from tqdm import tqdm

    from flr_engine.templates import load_templates

    load_templates(args.templates)  # fail fast on an unknown set, before loading a model
    # the whole file is validated before the model loads: every bad row is reported at once
    rows, bad = read_rows(
        args.input, parse_score_row, args.on_error, args.allow_empty, log=log.warning
    )
    settings = {"input": args.input, **scoring_settings(args)}
    ranks = Ranks.from_env()
    args.device = ranks.device(args.device)
    t0 = time.time()
    from flr_engine.models import model_files

    inputs = input_files(args.input, args.templates, args.chat_template) + model_files(args.model)
    # the output is checked (and held) before the model loads: a refusal costs no load
    with ShardedOutput(args.output, settings, ranks, resume=not args.overwrite, inputs=inputs) as out:
        scorer = scorer_from_args(args)
        log.info("model %s loaded in %.1fs; scoring with the %s backend", args.model,
                 time.time() - t0, scorer.engine_name)  # fmt: skip
        # fixed batches by input position, every world-th one for this rank: each row is
        # scored in the same batch however many ranks there are
        mine = ranks.take(chunks(rows, args.batch_size))
        total = sum(len(c) for c in mine)
        todo = [[r for r in c if r.line not in out.done] for c in mine]
        left = sum(len(c) for c in todo)
        if left < total:
            log.info("%sresuming: %d of %d rows already in %s", ranks.tag, total - left, total,
                     args.output)  # fmt: skip
        errors = ErrorLog(args.output + ".errors.jsonl", fresh=args.overwrite and ranks.world == 1) \
            if args.on_error == "skip" else None  # fmt: skip
        skipped = len(bad)
        for err in bad if errors is not None and ranks.is_main else []:
            errors.write(err.line, str(err))
        bar = tqdm(total=total, initial=total - left, unit="row", desc=f"{ranks.tag}flr score",
                   disable=args.quiet or not ranks.is_main)  # fmt: skip
        for chunk in todo:
            batch, prepared = [], []
            for r in chunk:
                try:
                    prepared.append(scorer.prepare(r.context, r.response))
                    batch.append(r)
                except InputError as exc:
                    err = RowError(args.input, r.line, exc.field, exc.message)
                    if errors is None:
                        raise err from None
                    log.warning("skipping %s", err)
                    errors.write(r.line, str(err))
                    skipped += 1
                    bar.update(1)
            if not prepared:
                continue
            results = scorer.score_prepared(prepared)
            out.write(
                [{"line": r.line, "id": r.id, **res.to_dict()} for r, res in zip(batch, results)]
            )
            bar.update(len(batch))
        bar.close()
        if errors:
            errors.close()
    log.info("wrote %s (%d rows) in %.1fs", args.output, len(out.done), time.time() - t0)
    if skipped:
        msg = f"flr score: skipped {skipped} bad rows (listed in {args.output}.errors.jsonl)"
        log.warning(msg)
    return 0
