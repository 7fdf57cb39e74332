"""Workload W1 and the scaling sweep: reference vs plain transformers vs engine vs limit.

    pytest benches/bench_w1.py --benchmark-enable -s            # W1 (16 conv x 2 x 117)
    FLR_BENCH_QUICK=1 pytest benches/bench_w1.py --benchmark-enable -s

Each provider runs in its own subprocess (see ``flr_engine.bench``); the scores of all
providers are checked to agree before any time is reported. ``extra_info`` holds each
provider's scoring seconds, tokens/s, peak memory and its ratio to the engine, all measured
in the same run. The same table is printed by ``flr bench``.
"""

from __future__ import annotations

import os

import pytest

from flr_engine import bench

QUICK = os.environ.get("FLR_BENCH_QUICK") == "1"
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "pairwise", "hh-rlhf-helpful-base.jsonl.gz")

pytestmark = pytest.mark.skipif(not os.path.exists(DATA), reason=f"{DATA} absent")


def _record(benchmark, rows):
    eng = next(r for r in rows if r["provider"] == "engine")
    for r in rows:
        p = r["provider"]
        benchmark.extra_info[f"{p}_seconds"] = round(r["seconds"], 3)
        benchmark.extra_info[f"{p}_tokens_per_s"] = round(r["tokens_per_s"], 1)
        benchmark.extra_info[f"{p}_peak_mem_mb"] = round(r["peak_mem_mb"], 1)
        benchmark.extra_info[f"{p}_over_engine"] = round(r["seconds"] / eng["seconds"], 3)
    benchmark.extra_info["unique_tokens"] = eng["unique_tokens"]
    benchmark.extra_info["total_tokens"] = eng["total_tokens"]
    print("\n" + bench.table(rows))


def test_w1(benchmark):
    kw = dict(n_conv=2, n_followups=16, ref_sample=6) if QUICK else dict(n_conv=16, ref_sample=24)
    rows = benchmark.pedantic(lambda: bench.run_all(bench.PROVIDERS, data=DATA, **kw), rounds=1, iterations=1)
    benchmark.extra_info["agreement"] = bench.check_agreement(rows)
    _record(benchmark, rows)


def _sweep(benchmark, **kw):
    """Plain transformers vs engine on one sweep point, agreement checked first."""
    rows = benchmark.pedantic(
        lambda: bench.run_all(("hf-prefix-cache", "engine"), data=DATA, **kw), rounds=1, iterations=1
    )
    bench.check_agreement(rows)
    _record(benchmark, rows)


@pytest.mark.parametrize("n_followups", [10, 30, 60, 117])
def test_sweep_followups(benchmark, n_followups):
    """Follow-ups per reply grow (2 conversations x 2 replies)."""
    _sweep(benchmark, n_conv=1 if QUICK else 2, n_followups=n_followups)


@pytest.mark.parametrize("n_replies", [1, 4, 16])
def test_sweep_replies(benchmark, n_replies):
    """Replies per conversation: the conversation is shared by all of them in the tree."""
    _sweep(benchmark, n_conv=1, n_replies=n_replies, n_followups=10 if QUICK else 30)


@pytest.mark.parametrize("context_tokens", [128, 512, 2048])
def test_sweep_context(benchmark, context_tokens):
    """Context length: longer shared prefixes favour the tree more."""
    _sweep(benchmark, n_conv=1, context_tokens=context_tokens, n_followups=10 if QUICK else 30)
