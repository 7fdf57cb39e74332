"""The ``flr`` command line: one console script, one module per subcommand.

    flr score --input rows.jsonl --output scores.jsonl      # FLR reward per row, resumable
    flr eval ../shared/data/pairwise --out runs/eval         # FLR vs baselines on benchmarks
    flr mine / generate / dpo / feedback-tune / compare      # the paper's training flow
    flr bench                                               # W1: providers side by side
    flr env;  flr model fetch                               # versions; the default model

Each subcommand module has ``register(subparsers)`` (its flags, examples and ``cmd_*``);
flags shared between commands come from :mod:`flr_engine.cli.args`. The project's own
errors (:class:`~flr_engine.errors.FLRError`: bad input, settings, files) end with a
one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from flr_engine.errors import FLRError
from flr_engine.logs import setup_logging

COMMANDS = ("score", "evaluate", "mine", "generate", "dpo", "feedback_tune", "compare", "bench", "env")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="flr",
        description="Follow-up Likelihood as Reward: score replies by how likely a model finds "
        "positive vs negative user follow-ups.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"flr_engine.cli.{name}").register(sub)
    return parser


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
