"""``flr eval``: FLR vs baselines (Direct, length, random, a reward model) on preference
and rating sets, resumable, with a markdown report, JSON and a figure."""

from __future__ import annotations

import functools
import logging

from flr_engine.cli.args import (
    RAW,
    add_model_args,
    add_reward_args,
    scorer_from_args,
    scoring_settings,
)
from flr_engine.errors import ConfigError

log = logging.getLogger("flr_engine")

DEFAULT_OUT = "runs/eval"

EVAL_EXAMPLES = """examples:
  flr eval ../shared/data/pairwise --limit 200          # results in runs/eval
  flr eval --data ../shared/data/rating --out runs/rating
  flr eval ../shared/data --out runs/all --model ./my-model
  flr eval prefs.jsonl ../shared/data/rating/fed-turn.jsonl.gz --out runs/x --reward-model ./rm
  flr eval ../shared/data/pairwise --out runs/cal \
      --calibrate-on hh-rlhf-helpful-base
  flr eval ../shared/data/pairwise --model default-ft --calibration auto --out runs/ft
  torchrun --nproc-per-node 2 -m flr_engine.cli eval ../shared/data/pairwise --out runs/eval

inputs: .jsonl(.gz) files or folders of them (recursive); one set per file, schema detected:
  pairwise  {"context": [messages], "chosen": str, "rejected": str, "tie": bool}
  rating    {"context": [messages], "response": str, "score": float}
  TRL       {"prompt": str|[messages], "chosen": str|[msg], "rejected": str|[msg]}
            or chosen/rejected as whole conversations sharing a prefix (implicit prompt)
  HH        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
Ties (tie: true, or chosen == rejected) are skipped and counted. Methods: FLR, Direct (mean
log p of the reply), Length (characters), Random (seeded), RM (--reward-model). Pairwise
sets: accuracy (score ties count 0.5); rating sets: Pearson/Spearman/Kendall; all with
bootstrap intervals, per dimension and per template.
(The HH sets of ../shared/data hold a few empty replies: counts them as bad.)
Output in --out: results.json, report.md, eval.png, sets/*. A rerun skips finished sets
and resumes an interrupted one row by row (--overwrite starts over). Under torchrun or
accelerate launch each rank scores every N-th batch on its own device; rank 0 merges the
rows and writes the report (the same rows and numbers as one process)."""



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy / correlation of FLR and baselines on preference and rating sets",
        epilog=EVAL_EXAMPLES,
        formatter_class=RAW,
    )
    p.add_argument("data", nargs="*", help=".jsonl(.gz) files or folders of them")
    p.add_argument("--data", dest="data_opt", action="extend", nargs="+", default=[],
                   metavar="FILE_OR_DIR", help="more inputs (the same as giving them positionally)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for results (resumable; default {DEFAULT_OUT})")
    p.add_argument("--limit", type=int, default=None, help="first N non-tie rows per set")
    p.add_argument("--batch-size", type=int, default=4, help="rows scored per backend call")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95, help="interval level")
    p.add_argument("--seed", type=int, default=0, help="seed of bootstrap, random baseline, CV")
    p.add_argument(
        "--calibrate-on",
        default=None,
        metavar="SET",
        help="fit per-template weights on this pairwise set (logistic regression, CV'd L2) "
        "and report the calibrated reward on the other sets",
    )
    p.add_argument(
        "--save-calibration",
        default=None,
        metavar="FILE",
        help="with --calibrate-on: write the fitted weights to FILE (for --calibration)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE|auto",
        help="apply saved per-template weights (from --save-calibration) to every set as the "
        "FLR-cal column; auto: the judge's own calibration-TEMPLATES.json (e.g. default-ft's)",
    )
    p.add_argument(
        "--reward-model",
        default=None,
        metavar="PATH",
        help="a local transformers sequence-classification model, as another column",
    )
    p.add_argument("--on-error", default="skip", choices=["fail", "skip"],
                   help="on a bad row: log it with file:line, count and skip it (default), or stop")
    p.add_argument("--overwrite", action="store_true", help="recompute everything")
    p.add_argument("--no-figure", action="store_true", help="skip eval.png")
    add_model_args(p)
    add_reward_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from flr_engine.distributed import Ranks
    from flr_engine.evaluation.data import load_sets
    from flr_engine.evaluation.run import EvalConfig, run_eval
    from flr_engine.evaluation.scoring import RewardModelScorer
    from flr_engine.io import RowError
    from flr_engine.models import resolve_device
    from flr_engine.templates import load_templates

    args.data = [*args.data, *args.data_opt]
    if not args.data:
        raise ConfigError("flr eval: no inputs; give .jsonl(.gz) files or folders, "
                         "positionally or with --data")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    dims = args.dimensions.split(",") if args.dimensions else None
    templates = load_templates(args.templates).select(dims)  # fail fast, before any model
    try:
        sets = load_sets(args.data, on_error=args.on_error)  # validate all inputs first
    except RowError as exc:
        where = f"{exc.path}:{exc.line}" + (f": field '{exc.field}'" if exc.field else "")
        message = str(exc)[len(where) + 2 :] + " (the default --on-error skip skips, counts and lists such rows)"
        raise RowError(exc.path, exc.line, exc.field, message) from None
    for es in sets:
        log.info("set %s: %s, %d rows, %d usable, %d ties, %d bad", es.name, es.schema,
                 es.rows, len(es.items), es.ties, es.bad)
    if args.calibration and args.calibrate_on:
        raise ConfigError("--calibration and --calibrate-on exclude each other")
    if args.save_calibration and not args.calibrate_on:
        raise ConfigError("--save-calibration needs --calibrate-on SET")
    calibration = None
    if args.calibration:
        from flr_engine.evaluation.calibration import calibration_path, load_calibration

        calibration = load_calibration(calibration_path(args.calibration, args.model, templates), templates)
    cfg = EvalConfig(
        out=args.out,
        scoring=scoring_settings(args),
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        n_boot=args.bootstrap,
        level=args.level,
        calibrate_on=args.calibrate_on,
        reward_model=args.reward_model,
        on_error=args.on_error,
        overwrite=args.overwrite,
        quiet=getattr(args, "quiet", False),
        figure=not args.no_figure,
        calibration=calibration,
        save_calibration=args.save_calibration,
    )
    ranks = Ranks.from_env()
    args.device = ranks.device(args.device)
    rm_factory = None
    if args.reward_model:
        def rm_factory():
            return RewardModelScorer(args.reward_model, device=resolve_device(args.device), dtype=args.dtype)

    res = run_eval(sets, cfg, templates, functools.partial(scorer_from_args, args), rm_factory)
    if not ranks.is_main:  # rank 0 prints the report
        return 0
    print(res["markdown"], end="")
    print(f"\nwrote {', '.join(res['files'].values())} ({res['seconds']:.1f}s)")
    return 0
