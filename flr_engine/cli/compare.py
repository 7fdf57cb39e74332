"""``flr compare``: mean reward and win rate of policy B over A on the same prompts."""

from __future__ import annotations

import json
import logging
import sys

from flr_engine.cli.args import RAW
from flr_engine.errors import ConfigError
from flr_engine.evaluation.compare import (
    DEFAULT_BOOT,
    DEFAULT_LEVEL,
    compare,
    format_report,
    load_field,
    repetition,
    words,
)

log = logging.getLogger("flr_engine")


COMPARE_EXAMPLES = """examples:
  flr compare base.scores.jsonl tuned.scores.jsonl --names base,tuned \\
      --replies base.replies.jsonl tuned.replies.jsonl --json compare.json

Score files are `flr score` outputs, reply files `flr generate` outputs; rows are joined
on "id". B is the second file: "win rate of B" is how often B's reward is higher."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="mean reward and win rate of policy B over A on the same prompts (from flr score)",
        epilog=COMPARE_EXAMPLES,
        formatter_class=RAW,
    )
    p.add_argument("scores_a", help="flr score output of policy A")
    p.add_argument("scores_b", help="flr score output of policy B")
    p.add_argument("--names", default="A,B", help="two comma-separated names (default: A,B)")
    p.add_argument("--replies", nargs=2, metavar=("A", "B"), default=None,
                   help="the two flr generate outputs, for length-controlled win rates")  # fmt: skip
    p.add_argument("--field", default="reward", help="the score field (default: reward)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_BOOT, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="interval level")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    names = args.names.split(",")
    if len(names) != 2:
        raise ConfigError(f"--names needs two comma-separated names, got {args.names!r}")
    ra = load_field(args.scores_a, args.field)
    rb = load_field(args.scores_b, args.field)
    wa = wb = pa = pb = None
    if args.replies:  # each file read once; lengths and repetition from the same texts
        ta, tb = (load_field(path, "response", str) for path in args.replies)
        wa, wb = ({k: words(t) for k, t in x.items()} for x in (ta, tb))
        pa, pb = ({k: repetition(t) for k, t in x.items()} for x in (ta, tb))
    res = compare(ra, rb, wa, wb, pa, pb, args.bootstrap, args.seed, args.level)
    if res["only_a"] or res["only_b"]:
        log.warning("ids in one file only: %d in A, %d in B (left out)", res["only_a"], res["only_b"])
    print(format_report(res, *names, level=args.level))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"a": args.scores_a, "b": args.scores_b, "names": names} | res, fh, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
