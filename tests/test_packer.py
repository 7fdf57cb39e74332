"""Token-trie packer: C++ vs Python equality, layout invariants, budget policy, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flr_engine.engine import packer as packer_mod
from flr_engine.engine.packer import (
    PackResult,
    cpp_available,
    pack_flat,
    pack_sequences,
    pack_sequences_python,
)

HAS_CPP = cpp_available()
needs_cpp = pytest.mark.skipif(
    not HAS_CPP, reason="flr_engine._C not built (python setup.py build_ext --inplace)"
)
IMPLS = ["python", pytest.param("cpp", marks=needs_cpp)]


# ---------------------------------------------------------------------------------------------
# batches


def w1_like(
    rng: np.random.Generator,
    n_conv: int = 3,
    n_reply: int = 2,
    n_follow: int = 5,
    lens: tuple[int, int, int] = (12, 6, 3),
    vocab: int = 50,
    shuffle: bool = False,
) -> list[list[int]]:
    """prefix + reply + follow-up sequences; reply/follow-up may be empty (prefix-of-another,
    duplicates); a small vocab makes accidental shared prefixes between unrelated branches."""
    seqs = []
    for _ in range(n_conv):
        prefix = rng.integers(0, vocab, size=int(rng.integers(1, lens[0] + 1))).tolist()
        for _ in range(n_reply):
            reply = rng.integers(0, vocab, size=int(rng.integers(0, lens[1] + 1))).tolist()
            for _ in range(n_follow):
                follow = rng.integers(0, vocab, size=int(rng.integers(0, lens[2] + 1))).tolist()
                seqs.append(prefix + reply + follow)
    if shuffle:
        order = rng.permutation(len(seqs))
        seqs = [seqs[i] for i in order]
    return seqs


def random_batches() -> list[tuple[str, list[list[int]], int]]:
    rng = np.random.default_rng(1234)
    cases: list[tuple[str, list[list[int]], int]] = []
    for k in range(12):
        seqs = w1_like(
            rng,
            n_conv=int(rng.integers(1, 5)),
            n_reply=int(rng.integers(1, 4)),
            n_follow=int(rng.integers(1, 7)),
            vocab=int(rng.choice([2, 3, 5, 50, 10**9])),
            shuffle=bool(k % 2),
        )
        total_unique = len({tuple(s[: d + 1]) for s in seqs for d in range(len(s))})
        for budget in (1, 7, 25, max(1, total_unique // 3), total_unique, 10**12):
            cases.append((f"w1like{k}-b{budget}", seqs, budget))
    return cases


EDGE_CASES: list[tuple[str, list[list[int]], int]] = [
    ("doc-example", [[5, 6, 7], [5, 6, 8], [5, 9], [3, 4]], 100),
    ("identical", [[1, 2, 3]] * 4 + [[1, 2, 3, 4]], 100),
    ("prefix-after", [[1, 2, 3, 4], [1, 2], [1], [1, 2, 3]], 100),
    ("prefix-before", [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]], 100),
    ("forest", [[1, 2], [3, 4], [1, 5], [3], [6]], 100),
    ("revisit-branch", [[1, 2, 3], [1, 4, 5], [1, 2, 6], [1, 4, 5, 7]], 100),
    ("repeated-token", [[7] * 10, [7] * 5, [7] * 12], 100),
    ("negative-and-big-ids", [[-5, 2**62, -(2**63)], [-5, 2**62, 0], [2**63 - 1]], 100),
    ("long-over-budget", [[1, 2], [1, 3], list(range(100, 120)), [1, 2], [1, 4]], 5),
    ("long-over-budget-first", [list(range(20)), list(range(20)), [0, 1], [9]], 5),
    ("exact-budget", [[1, 2, 3], [1, 2, 4], [1, 5]], 5),
    ("split-each", [[1, 2], [3, 4], [5, 6]], 2),
    ("budget-1", [[1], [1], [2], [1, 2], [3]], 1),
    ("single", [[42]], 1),
    ("wide-root", [[i, i + 1] for i in range(300)] + [[i] for i in range(300)], 10**6),
    ("wide-branch", [[0, 0, i] for i in range(400)] + [[0, 0, i, 1] for i in range(400)], 1000),
]

ALL_CASES = EDGE_CASES + random_batches()


# ---------------------------------------------------------------------------------------------
# independent checks (neither packer's code)


def distinct_prefixes(seqs: list[list[int]]) -> set[tuple[int, ...]]:
    return {tuple(s[: d + 1]) for s in seqs for d in range(len(s))}


def check_invariants(seqs: list[list[int]], budget: int, res: PackResult) -> None:
    S = len(seqs)
    assert res.num_sequences == S
    assert (
        res.seq_offsets.tolist()
        == np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).tolist()
    )
    assert res.node_index.dtype == torch.int64 and res.pack_of_seq.dtype == torch.int64

    # packs cover the sequences in order, consecutively
    expect_start = 0
    for p_idx, pack in enumerate(res.packs):
        assert pack.seq_start == expect_start and pack.seq_end > pack.seq_start
        expect_start = pack.seq_end
        assert all(int(res.pack_of_seq[s]) == p_idx for s in pack.seq_indices)
    assert expect_start == S

    for pack in res.packs:
        T = pack.num_unique
        ids = pack.input_ids.numpy()
        pos = pack.position_ids.numpy()
        par = pack.parent.numpy()
        end = pack.subtree_end.numpy()
        for t in (pack.input_ids, pack.position_ids, pack.parent, pack.subtree_end):
            assert t.dtype == torch.int64 and t.shape == (T,) and t.is_contiguous()
        members = [seqs[s] for s in pack.seq_indices]

        # unique count = distinct prefixes, totals
        assert T == len(distinct_prefixes(members))
        assert pack.num_total == sum(len(s) for s in members)

        # budget policy: within budget unless a lone over-long sequence; greedy (next would not fit)
        if T > budget:
            assert pack.num_seqs == 1 and len(members[0]) > budget
        if pack.seq_end < S:
            assert len(distinct_prefixes(members + [seqs[pack.seq_end]])) > budget

        # every sequence's tokens, positions and parent chain
        covered = np.zeros(T, dtype=bool)
        first_seq = np.full(T, S, dtype=np.int64)
        for s in pack.seq_indices:
            nodes = res.nodes_of(s).numpy()
            assert res.pack_for(s) is pack
            assert ids[nodes].tolist() == seqs[s]
            assert pos[nodes].tolist() == list(range(len(seqs[s])))
            assert par[nodes[0]] == -1
            assert par[nodes[1:]].tolist() == nodes[:-1].tolist()
            covered[nodes] = True
            first_seq[nodes] = np.minimum(first_seq[nodes], s)
        assert covered.all(), "every node lies on some sequence"

        # trie: no two siblings with the same token
        keys = set(zip(par.tolist(), ids.tolist(), strict=True))
        assert len(keys) == T

        # pre-order: parent before child; depth consistent
        idx = np.arange(T)
        assert (par < idx).all()
        assert (pos[par < 0] == 0).all()
        nonroot = par >= 0
        assert (pos[nonroot] == pos[par[nonroot]] + 1).all()

        # ancestors by the subtree_end invariant == root path by the parent chain
        if T <= 3000:
            by_end = (idx[None, :] <= idx[:, None]) & (idx[:, None] < end[None, :])
            by_parent = np.zeros((T, T), dtype=bool)
            for i in range(T):
                if par[i] >= 0:
                    by_parent[i] = by_parent[par[i]]
                by_parent[i, i] = True
            assert (by_end == by_parent).all()
            assert (pack.ancestor_mask().numpy() == by_parent).all()
        else:  # subtree sizes from the parent chain
            size = np.ones(T, dtype=np.int64)
            for i in range(T - 1, -1, -1):
                if par[i] >= 0:
                    size[par[i]] += size[i]
            assert (end == idx + size).all()

        # children in first-insertion order: siblings ordered by the first sequence through them
        last_child_first: dict[int, int] = {}
        for i in range(T):
            prev = last_child_first.get(int(par[i]))
            if prev is not None:
                assert prev < first_seq[i]
            last_child_first[int(par[i])] = int(first_seq[i])


def assert_same(a: PackResult, b: PackResult) -> None:
    assert len(a.packs) == len(b.packs)
    for pa, pb in zip(a.packs, b.packs, strict=True):
        for name in ("input_ids", "position_ids", "parent", "subtree_end"):
            assert torch.equal(getattr(pa, name), getattr(pb, name)), name
        assert (pa.seq_start, pa.seq_end, pa.num_unique, pa.num_total) == (
            pb.seq_start,
            pb.seq_end,
            pb.num_unique,
            pb.num_total,
        )
    for name in ("pack_of_seq", "node_index", "seq_offsets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "seqs", "budget"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_invariants(impl: str, name: str, seqs: list[list[int]], budget: int) -> None:
    res = pack_sequences(seqs, budget, impl=impl)
    assert res.impl == impl
    check_invariants(seqs, budget, res)


@needs_cpp
@pytest.mark.parametrize(("name", "seqs", "budget"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_cpp_matches_python(name: str, seqs: list[list[int]], budget: int) -> None:
    ref = pack_sequences_python(seqs, budget)
    assert_same(pack_sequences(seqs, budget, impl="cpp"), ref)
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    assert_same(pack_flat(flat, offsets, budget, impl="cpp"), ref)


@needs_cpp
def test_cpp_matches_python_fuzz() -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        seqs = w1_like(
            rng,
            n_conv=int(rng.integers(1, 4)),
            n_reply=int(rng.integers(1, 4)),
            n_follow=int(rng.integers(1, 5)),
            lens=(4, 3, 3),
            vocab=int(rng.integers(2, 6)),
            shuffle=bool(rng.integers(2)),
        )
        budget = int(rng.integers(1, 40))
        assert_same(pack_sequences(seqs, budget, impl="cpp"), pack_sequences_python(seqs, budget))


def test_doc_example_layout() -> None:
    seqs = [[5, 6, 7], [5, 6, 8], [5, 9], [3, 4]]
    for impl in ["python"] + (["cpp"] if HAS_CPP else []):
        res = pack_sequences(seqs, 100, impl=impl)
        (p,) = res.packs
        assert p.input_ids.tolist() == [5, 6, 7, 8, 9, 3, 4]
        assert p.position_ids.tolist() == [0, 1, 2, 2, 1, 0, 1]
        assert p.parent.tolist() == [-1, 0, 1, 1, 0, -1, 5]
        assert p.subtree_end.tolist() == [5, 4, 3, 4, 5, 7, 7]
        assert [res.nodes_of(s).tolist() for s in range(4)] == [
            [0, 1, 2],
            [0, 1, 3],
            [0, 4],
            [5, 6],
        ]
        assert res.nodes_of(-1).tolist() == [5, 6]
        assert (p.num_unique, p.num_total, list(p.seq_indices)) == (7, 10, [0, 1, 2, 3])
        with pytest.raises(IndexError):
            res.nodes_of(4)


@pytest.mark.parametrize("impl", IMPLS)
def test_budget_splits(impl: str) -> None:
    # 3 sequences sharing [1, 2]: unique counts 4, 6, 8; budget 6 closes the pack before the 3rd
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 7, 8], [9]]
    res = pack_sequences(seqs, 6, impl=impl)
    assert [(p.seq_start, p.seq_end, p.num_unique) for p in res.packs] == [(0, 2, 6), (2, 4, 5)]
    assert res.pack_of_seq.tolist() == [0, 0, 1, 1]
    # a sequence over the budget sits alone, even before an identical one
    res = pack_sequences([[1], list(range(10)), list(range(10)), [1]], 4, impl=impl)
    assert [(p.seq_start, p.seq_end) for p in res.packs] == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("impl", IMPLS)
def test_deep_sequences(impl: str) -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 1000, size=9000).tolist()
    seqs = [base, base[:5000] + [1, 2, 3], base + [7]]
    res = pack_sequences(seqs, 10**6, impl=impl)
    (p,) = res.packs
    assert p.num_unique == 9000 + 3 + 1
    assert int(p.subtree_end[0]) == p.num_unique
    check_invariants(seqs, 10**6, res)
    if HAS_CPP and impl == "python":
        assert_same(pack_sequences(seqs, 10**6, impl="cpp"), res)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl: str) -> None:
    res = pack_sequences([], 10, impl=impl)
    assert res.packs == [] and res.num_sequences == 0
    assert res.seq_offsets.tolist() == [0] and res.node_index.numel() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_errors(impl: str) -> None:
    with pytest.raises(ValueError, match="sequence 2 is empty"):
        pack_sequences([[1], [2, 3], [], [4]], 10, impl=impl)
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        pack_flat(np.array([1, 2]), np.array([0, 0, 2]), 10, impl=impl)
    with pytest.raises(ValueError, match="token_budget"):
        pack_sequences([[1]], 0, impl=impl)
    with pytest.raises(TypeError):
        pack_sequences([[1, 2.5]], 10, impl=impl)
    with pytest.raises(ValueError):
        pack_flat(np.array([1, 2, 3]), np.array([0, 2]), 10, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        pack_sequences([[1]], 10, impl="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", IMPLS)
def test_input_forms(impl: str) -> None:
    rng = np.random.default_rng(11)
    seqs = w1_like(rng, vocab=4)
    ref = pack_sequences_python(seqs, 30)
    flat = np.array([t for s in seqs for t in s])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    forms = [
        [tuple(s) for s in seqs],
        tuple(seqs),
        [np.array(s, dtype=np.int32) for s in seqs],
        [torch.tensor(s, dtype=torch.int64) for s in seqs],
        [np.array(s, dtype=np.int64) if i % 2 else s for i, s in enumerate(seqs)],
    ]
    pair = [np.array([1, 2, 3]), np.array([1, 4])]  # not to be read as (flat, offsets)
    assert_same(pack_sequences(tuple(pair), 10, impl=impl), pack_sequences_python(pair, 10))
    for form in forms:
        assert_same(pack_sequences(form, 30, impl=impl), ref)
    for dtype in (np.int32, np.int64):
        assert_same(pack_flat(flat.astype(dtype), offsets.astype(dtype), 30, impl=impl), ref)
    assert_same(pack_flat(torch.from_numpy(flat), torch.from_numpy(offsets), 30, impl=impl), ref)


@needs_cpp
def test_extension_direct() -> None:
    from flr_engine import _C

    assert isinstance(_C.__build_info__, str)
    seqs = [[1, 2, 3], [1, 2, 4], [5]]
    raw = _C.pack_sequences(seqs, 100)
    flat = np.array([1, 2, 3, 1, 2, 4, 5], dtype=np.int32)
    offsets = np.array([0, 3, 6, 7], dtype=np.int32)
    for other in (_C.pack_sequences((flat, offsets), 100), _C.pack_flat(flat, offsets, 100)):
        for key in ("pack_of_seq", "node_index", "seq_offsets"):
            assert np.array_equal(raw[key], other[key])
            assert other[key].dtype == np.int64
    (p,) = raw["packs"]
    assert p["input_ids"].tolist() == [1, 2, 3, 4, 5]
    assert p["subtree_end"].tolist() == [4, 4, 3, 4, 5]
    assert (p["seq_start"], p["seq_end"], p["num_total"]) == (0, 3, 7)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        _C.pack_sequences([[1], []], 100)
    with pytest.raises(TypeError, match=r"sequences\[0\]\[1\]"):
        _C.pack_sequences([[1, "a"]], 100)
    with pytest.raises(TypeError):
        _C.pack_flat(np.array([1.0]), np.array([0, 1]), 100)


def test_missing_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packer_mod, "_load_ext", lambda: None)
    assert not packer_mod.cpp_available()
    res = pack_sequences([[1, 2], [1, 3]], 10)  # auto: quiet fallback
    assert res.impl == "python" and res.packs[0].num_unique == 3
    with pytest.raises(RuntimeError, match="build_ext --inplace"):
        pack_sequences([[1, 2]], 10, impl="cpp")
    with pytest.raises(RuntimeError, match="not built"):
        pack_flat(np.array([1]), np.array([0, 1]), 10, impl="cpp")


@needs_cpp
def test_auto_uses_cpp() -> None:
    assert pack_sequences([[1]], 10).impl == "cpp"
