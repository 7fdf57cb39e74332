"""``flr score``: the FLR reward of every row of a JSONL file, resumable."""

from __future__ import annotations

import json
import logging
import time

from flr_engine.chat import InputError
from flr_engine.cli.args import (
    RAW,
    add_model_args,
    add_reward_args,
    scorer_from_args,
    scoring_settings,
)
from flr_engine.io import ResumableWriter, RowError, input_files, parse_score_row, read_rows

log = logging.getLogger("flr_engine")

SCORE_EXAMPLES = """examples:
  flr score --input rows.jsonl --output scores.jsonl
  flr score --input rows.jsonl --output scores.jsonl --templates flr-mixed --mode official
  flr score --input rows.jsonl --output scores.jsonl --model ./my-model --dimensions relevance

input rows (JSONL, .gz ok): {"context": [{"role": "user", "content": ...}, ...], "response": "..."}
                        or: {"prompt": "..." | [messages], "completion": "..." | [messages]}
A rerun with the same --output skips rows already scored; an interrupted run loses nothing
already written. A bad row stops the run with file:line: field (or --on-error skip logs it
to OUTPUT.errors.jsonl and goes on)."""



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


def cmd_score(args) -> int:
    from tqdm import tqdm

    from flr_engine.templates import load_templates

    load_templates(args.templates)  # fail fast on an unknown set, before loading a model
    # the whole file is validated before the model loads: every bad row is reported at once
    rows, bad = read_rows(
        args.input, parse_score_row, args.on_error, args.allow_empty, log=log.warning
    )
    settings = {"input": args.input, **scoring_settings(args)}
    t0 = time.time()
    scorer = scorer_from_args(args)
    log.info(
        "model %s loaded in %.1fs; scoring with the %s backend",
        args.model,
        time.time() - t0,
        scorer.engine_name,
    )
    from flr_engine.models import model_files

    inputs = input_files(args.input, args.templates, args.chat_template) + model_files(args.model)
    with ResumableWriter(args.output, settings, resume=not args.overwrite, inputs=inputs) as out:
        todo = [r for r in rows if r.line not in out.done]
        if len(todo) < len(rows):
            log.info(
                "resuming: %d of %d rows already in %s",
                len(rows) - len(todo),
                len(rows),
                args.output,
            )
        errors = open(args.output + ".errors.jsonl", "a") if args.on_error == "skip" else None
        skipped = len(bad)
        for err in bad if errors is not None else []:
            errors.write(json.dumps({"line": err.line, "error": str(err)}) + "\n")
        bar = tqdm(
            total=len(rows),
            initial=len(rows) - len(todo),
            unit="row",
            desc="flr score",
            disable=args.quiet,
        )
        for i in range(0, len(todo), args.batch_size):
            batch, prepared = [], []
            for r in todo[i : i + args.batch_size]:
                try:
                    prepared.append(scorer.prepare(r.context, r.response))
                    batch.append(r)
                except InputError as exc:
                    err = RowError(args.input, r.line, exc.field, exc.message)
                    if errors is None:
                        raise err from None
                    log.warning("skipping %s", err)
                    errors.write(json.dumps({"line": r.line, "error": str(err)}) + "\n")
                    skipped += 1
                    bar.update(1)
            results = scorer.score_prepared(prepared) if prepared else []
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
