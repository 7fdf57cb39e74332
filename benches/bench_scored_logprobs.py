"""Benchmark: the engine's scored log-probs, one softmax pass per scored node vs one per
unique parent (siblings share the normaliser). CPU, fp32, SmolLM2-135M's head.

Shape: U = 1024 scored trie nodes with P = 848 unique parents (P / U = 0.83, as measured on
4 pairs of hh-rlhf-helpful-base with the 117 `flr-helpfulness` follow-ups: 5,344 scored
nodes, 4,416 unique parents).

    pytest benches/bench_scored_logprobs.py --benchmark-enable -s

``extra_info`` of the second test holds the per-node / per-parent time ratio of this run.
"""

from __future__ import annotations

import pytest
import torch

from flr_engine.engine.forward import LMHead
from flr_engine.ops.fused_logprob import flr_gathered_logprob

U, P, H, V = 1024, 848, 576, 49152
_means: dict[str, float] = {}


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=g).mul_(0.05)
    hidden = torch.randn(2 * U, H, generator=g)  # the pack's final hidden states
    # P parents; the first U - P scored nodes get a sibling (a second child of the same parent)
    parents = torch.randperm(2 * U, generator=g)[:P]
    parent = torch.cat([parents, parents[: U - P]])
    ids = torch.randint(0, V, (U,), generator=g)
    return LMHead(weight), hidden, parent, ids


def _mean(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.mean


def test_bench_per_node(benchmark, case):
    head, hidden, parent, ids = case
    out = benchmark.pedantic(
        lambda: head.logprobs(hidden[parent], ids, impl="torch"), rounds=3, warmup_rounds=1
    )
    assert out.shape == (U,)
    _means["per_node"] = _mean(benchmark)


def test_bench_per_parent(benchmark, case):
    head, hidden, parent, ids = case
    def per_parent():  # what the engine does: lse once per unique parent, gathered per node
        uniq, row_of = torch.unique(parent, return_inverse=True)  # (P,), (U,)
        return head.logprobs(hidden[uniq], ids, rows=row_of, impl="torch")

    out = benchmark.pedantic(per_parent, rounds=3, warmup_rounds=1)
    torch.testing.assert_close(out, flr_gathered_logprob(hidden[parent], head.weight, ids), rtol=1e-5, atol=1e-4)
    mean = _mean(benchmark)
    if mean and _means.get("per_node"):
        benchmark.extra_info["per_node_over_per_parent"] = round(_means["per_node"] / mean, 3)
        print(f"\nper node {_means['per_node']:.3f} s, per parent {mean:.3f} s: "
              f"{_means['per_node'] / mean:.2f}x (ideal U / P = {U / P:.2f}x)")
