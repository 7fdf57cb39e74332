"""Token-trie packer: C++ extension vs pure Python on a W1-like batch.

16 conversation prefixes of ~300 tokens x 2 replies of ~100 x 120 follow-ups of ~10 (3840
sequences, ~1.6M tokens, ~46k unique), random token ids, token_budget 16384.

    pytest benches/bench_packer.py --benchmark-enable -q

``benchmark.extra_info`` holds both best-of-N times and the speedup (python / cpp).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from flr_engine.engine.packer import (
    cpp_available,
    pack_flat,
    pack_sequences,
    pack_sequences_python,
)

TOKEN_BUDGET = 16384
needs_cpp = pytest.mark.skipif(
    not cpp_available(), reason="flr_engine._C not built (python setup.py build_ext --inplace)"
)


def w1_batch(seed: int = 0, vocab: int = 150_000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(16):
        prefix = rng.integers(0, vocab, size=int(rng.integers(250, 351))).tolist()
        for _ in range(2):
            reply = rng.integers(0, vocab, size=int(rng.integers(80, 121))).tolist()
            for _ in range(120):
                follow = rng.integers(0, vocab, size=int(rng.integers(6, 15))).tolist()
                seqs.append(prefix + reply + follow)
    return seqs


def best_of(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="module")
def batch() -> dict[str, object]:
    seqs = w1_batch()
    lengths = [len(s) for s in seqs]
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=sum(lengths))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {"seqs": seqs, "flat": flat, "offsets": offsets}


@pytest.fixture(scope="module")
def timings(batch: dict) -> dict[str, float]:
    seqs, flat, offsets = batch["seqs"], batch["flat"], batch["offsets"]
    t: dict[str, float] = {
        "python_s": best_of(lambda: pack_sequences_python(seqs, TOKEN_BUDGET), 2)
    }
    if cpp_available():
        t["cpp_lists_s"] = best_of(lambda: pack_sequences(seqs, TOKEN_BUDGET, impl="cpp"), 10)
        t["cpp_flat_s"] = best_of(lambda: pack_flat(flat, offsets, TOKEN_BUDGET, impl="cpp"), 10)
        t["speedup_lists"] = t["python_s"] / t["cpp_lists_s"]
        t["speedup_flat"] = t["python_s"] / t["cpp_flat_s"]
    return t


def _info(benchmark, batch: dict, timings: dict, res) -> None:
    benchmark.extra_info.update(timings)
    benchmark.extra_info.update(
        num_sequences=len(batch["seqs"]),
        num_tokens=int(batch["offsets"][-1]),
        num_unique=res.num_unique,
        num_packs=len(res.packs),
    )


@needs_cpp
def test_pack_cpp_lists(benchmark, batch: dict, timings: dict) -> None:
    res = benchmark(pack_sequences, batch["seqs"], TOKEN_BUDGET, impl="cpp")
    ref = pack_sequences_python(batch["seqs"][:480], TOKEN_BUDGET)  # spot check vs reference
    n = int(ref.seq_offsets[-1])
    if len(ref.packs) == 1 and res.packs[0].seq_end >= 480:
        assert torch.equal(res.node_index[:n], ref.node_index)
    _info(benchmark, batch, timings, res)


@needs_cpp
def test_pack_cpp_flat(benchmark, batch: dict, timings: dict) -> None:
    res = benchmark(pack_flat, batch["flat"], batch["offsets"], TOKEN_BUDGET, impl="cpp")
    _info(benchmark, batch, timings, res)


def test_pack_python(benchmark, batch: dict, timings: dict) -> None:
    res = benchmark.pedantic(
        pack_sequences_python, args=(batch["seqs"], TOKEN_BUDGET), rounds=2, iterations=1
    )
    _info(benchmark, batch, timings, res)
