"""``flr bench``: the same scoring job through each provider, ratios from one run."""

from __future__ import annotations

import json
import logging
import os
import time

from flr_engine.cli.args import RAW

log = logging.getLogger("flr_engine")


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the same scoring job through reference, plain transformers, engine",
        epilog="examples:\n  flr bench --quick\n  flr bench --n-conv 16 --out w1.json   # workload W1",
        formatter_class=RAW,
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
