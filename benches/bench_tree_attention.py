"""Tree attention on CPU: dense full-mask SDPA vs the torch block-sparse path.

Run: ``pytest benches/bench_tree_attention.py --benchmark-enable``. A wide FLR-shaped tree
(conversation -> 4 replies -> 120 follow-ups each, T ~ 4500), 9 query / 3 kv heads, D=64,
fp32. ``extra_info`` holds both times and ``speedup = dense_s / torch_s``; run with 1 thread
and with all of them (the block-sparse path makes many mid-sized calls, so it suffers more
than one big dense call when other processes compete for the cores: compare the 1-thread
row on a busy machine, or set OMP_WAIT_POLICY=PASSIVE).
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from flr_engine.engine.packer import pack_sequences
from flr_engine.ops.tree_attention import TreeAttentionPlan, flr_tree_attention


def _pack(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-order trie pack -> (subtree_end, positions), (T,) int64 (the engine's packer)."""
    pack = pack_sequences(seqs, token_budget=10**9).packs[0]
    return pack.subtree_end, pack.position_ids


def _wide_tree(prefix=500, n_cand=4, cand=60, n_fu=120, fu=8, seed=0):
    r = random.Random(seed)
    tok = lambda n: [r.randrange(1 << 30) for _ in range(n)]  # noqa: E731
    p = tok(prefix)
    seqs = []
    for _ in range(n_cand):
        c = p + tok(cand)
        seqs += [c + tok(r.randint(fu // 2, fu + fu // 2)) for _ in range(n_fu)]
    return _pack(seqs)


def _best(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(params=[1, 0], ids=["1thread", "allthreads"])
def threads(request):
    before = torch.get_num_threads()
    if request.param:
        torch.set_num_threads(request.param)
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def test_bench_tree_attention_cpu(benchmark, threads):
    se, pos = _wide_tree()
    T = se.numel()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, T, 64, generator=g)  # (Hq, T, D)
    k = torch.randn(3, T, 64, generator=g)  # (Hkv, T, D)
    v = torch.randn(3, T, 64, generator=g)
    plan = TreeAttentionPlan.build(se, pos, block_m=64, block_n=64)

    def sparse():
        return flr_tree_attention(q, k, v, se, pos, plan=plan, impl="torch")

    def dense():
        return flr_tree_attention(q, k, v, se, pos, impl="dense")

    torch.testing.assert_close(sparse(), dense(), atol=1e-4, rtol=1e-4)
    dense_s = _best(dense, 2)
    torch_s = _best(sparse, 3)
    benchmark.extra_info.update(
        T=T,
        visited_blocks=plan.num_entries,
        dense_blocks=plan.dense_entries,
        full_blocks=plan.num_full,
        dense_s=round(dense_s, 4),
        torch_s=round(torch_s, 4),
        speedup=round(dense_s / torch_s, 2),
        threads=threads,
        loadavg_1min=round(os.getloadavg()[0], 2),
    )
    benchmark.pedantic(sparse, rounds=3, iterations=1)
