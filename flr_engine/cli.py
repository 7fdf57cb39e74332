"""The ``flr`` command line: one console script with subcommands.

flr score --input rows.jsonl --output scores.jsonl      # FLR reward per row, resumable
flr env                                                 # versions and usable backends
flr model fetch                                         # pre-fetch the default model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from flr_engine.chat import InputError
from flr_engine.errors import FLRError, MissingFileError
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct), a model folder, hub id or .gguf file",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when there is one, else cpu), cpu, cuda, cuda:1, ..."
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="file with a Jinja chat template (for models without one)",
    )
    p.add_argument(
        "--format",
        default=None,
        choices=["follow-up", "role-swapped"],
        help="conversation format to score in (default: the one a feedback-tuned judge was "
        "tuned in, else follow-up); role-swapped = the paper's fine-tuned scorer",
    )


def _add_reward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--templates",
        default="flr-helpfulness",
        help="flr-helpfulness | flr-mixed | path to a JSON/YAML set",
    )
    p.add_argument(
        "--mode",
        default="likelihood",
        choices=["likelihood", "official"],
        help="official = the paper's released scorer",
    )
    p.add_argument("--reduction", default="mean", choices=["mean", "sum"])
    p.add_argument("--score-eot", action="store_true", help="also score the end-of-turn token")
    p.add_argument("--dimensions", default=None, help="comma-separated subset of dimensions")
    p.add_argument("--engine", default="auto", choices=["auto", "engine", "reference", "hf-prefix-cache"])


def scoring_settings(args) -> dict:
    """The options that change scores: a resumed job must have the same ones."""
    keys = ("model", "templates", "mode", "reduction", "score_eot", "dimensions", "dtype", "chat_template")
    out = {k: getattr(args, k) for k in keys}
    if getattr(args, "format", None):  # only when given: older outputs stay resumable
        out["format"] = args.format
    return out


def read_chat_template(path: str | None) -> str | None:
    """The Jinja text of ``--chat-template FILE`` (None without one)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: --chat-template file does not exist") from None


def _scorer_from_args(args):
    from flr_engine.scorer import FLRScorer

    return FLRScorer.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        chat_template=read_chat_template(args.chat_template),
        format=getattr(args, "format", None),
        templates=args.templates,
        engine=args.engine,
        mode=args.mode,
        reduction=args.reduction,
        score_eot=args.score_eot,
        dimensions=args.dimensions.split(",") if args.dimensions else None,
    )


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
    scorer = _scorer_from_args(args)
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


def cmd_bench(args) -> int:
    from flr_engine import bench

    if args.quick:
        args.n_conv, args.n_followups, args.ref_sample = 2, 16, 6
    t0 = time.time()
    rows = bench.run_all(
        args.providers.split(","), model=args.model, data=args.data, n_conv=args.n_conv,
        templates=args.templates, n_followups=args.n_followups, ref_sample=args.ref_sample,
        dtype=args.dtype, token_budget=args.token_budget, log=log.info,
    )
    worst = bench.check_agreement(rows)
    print(bench.table(rows))
    print(f"\nexact providers agree to {worst:.1e}; {args.n_conv} conversations x 2 replies; "
          f"total {time.time() - t0:.0f}s; load average {os.getloadavg()[0]:.1f} (1 min)")
    agreement = {b: bench.deviations(rows, b) for b in ("engine", "reference")}
    for base, devs in agreement.items():
        for p, d in devs.items():
            if p in bench.TOLERANCES:
                print(f"{p} vs {base}: |diff| median {d['median']:.4f}, max {d['max']:.4f} over {d['n']} "
                      f"sequences (tolerance {bench.TOLERANCES[p]})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "agreement": agreement, "args": vars(args) | {"func": None}}, fh, indent=1)
    return 0


def cmd_env(args) -> int:
    from flr_engine.env import env_report

    print(env_report())
    return 0


def cmd_model_fetch(args) -> int:
    from flr_engine.models import fetch_default

    t0 = time.time()
    folder = fetch_default(force=args.force)
    print(f"default model ready in {folder} ({time.time() - t0:.1f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flr",
        description="Follow-up Likelihood as Reward: score replies by how likely a model finds "
        "positive vs negative user follow-ups.",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, warnings only"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "score",
        help="score replies in a JSONL file (resumable)",
        epilog=SCORE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="JSONL(.gz) rows to score")
    p.add_argument("--output", required=True, help="JSONL results, one row per input row")
    _add_model_args(p)
    _add_reward_args(p)
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

    p = sub.add_parser(
        "bench",
        help="time the same scoring job through reference, plain transformers, engine",
        epilog="examples:\n  flr bench --quick\n  flr bench --n-conv 16 --out w1.json   # workload W1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2 conversations, 16 follow-ups: under a minute")
    p.add_argument("--providers", default="reference,hf-prefix-cache,engine,limit",
                   help="comma-separated, from: reference, hf-prefix-cache, engine, limit, engine-bf16, "
                   'llamacpp, llamacpp-naive (the last two need the extra: pip install -e ".[llamacpp]")')
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=os.path.join("..", "shared", "data", "pairwise", "hh-rlhf-helpful-base.jsonl.gz"))
    p.add_argument("--n-conv", type=int, default=16, help="conversations (x2 replies: chosen, rejected)")
    p.add_argument("--templates", default="flr-helpfulness")
    p.add_argument("--n-followups", type=int, default=None, help="use only the first N unique follow-ups")
    p.add_argument("--ref-sample", type=int, default=24, help="sequences the reference is timed on")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--out", default=None, help="write all results as JSON")
    p.set_defaults(func=cmd_bench)

    from flr_engine.evaluation.cli import add_eval_parser

    add_eval_parser(sub)

    from flr_engine.training_cli import add_dpo_parser, add_generate_parser, add_mine_parser

    add_mine_parser(sub)
    add_dpo_parser(sub)
    add_generate_parser(sub)

    from flr_engine.training_cli import add_feedback_tune_parser

    add_feedback_tune_parser(sub)

    from flr_engine.evaluation.compare import add_compare_parser

    add_compare_parser(sub)

    p = sub.add_parser("env", help="versions and which backends are built and usable")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="download and convert the default model into the cache")
    f.add_argument("--force", action="store_true", help="convert again even if cached")
    f.set_defaults(func=cmd_model_fetch)
    return parser


def _quiet_libraries() -> None:
    """-q also silences the libraries' own bars (transformers' "Loading weights", hub
    downloads): by environment before they are imported, directly if they already are."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def setup_logging(level: int, quiet: bool) -> None:
    """The command line's log format at ``level``; ``quiet`` also silences library bars
    (also used by ``flr eval --workers`` processes)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if quiet:
        _quiet_libraries()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO, args.quiet)
    try:
        return args.func(args)
    except FLRError as exc:  # the project's own: bad input or settings, no traceback
        print(f"flr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flr {args.command}: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
