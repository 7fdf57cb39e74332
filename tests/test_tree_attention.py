"""Tree attention over a packed pre-order trie: plan, torch / dense / Triton vs the reference.

The Triton kernel runs through the interpreter on CPU (``TRITON_INTERPRET=1``, set by
conftest.py when no CUDA device is usable), so its cases use small shapes; on a GPU machine
the same cases run compiled on CUDA tensors (``TDEV``). Large GPU variants are marked ``gpu``.
"""

from __future__ import annotations

import random

import pytest
import torch

from flr_engine.ops.tree_attention import (
    TreeAttentionPlan,
    _dense_math,
    flr_tree_attention,
    tree_attention_mask,
    tree_attention_reference,
)

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
HAS_CUDA = torch.cuda.is_available()
TDEV = "cuda" if HAS_CUDA else "cpu"  # the Triton tests' device: compiled or interpreted


def _to(dev, *xs):
    return tuple(x.to(dev) for x in xs)

# --------------------------------------------------------------------------- tiny trie


def pack_trie(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-order pack of the token trie of ``seqs`` -> (subtree_end, positions), (T,) int64.

    Iterative DFS (deep chains would overflow Python's recursion limit).
    """
    root: dict = {}
    for s in seqs:
        node = root
        for t in s:
            node = node.setdefault(t, {})
    se: list[int] = []
    pos: list[int] = []
    stack = [(iter(root.items()), -1)]
    while stack:
        it, owner = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            if owner >= 0:
                se[owner] = len(se)
            continue
        se.append(-1)
        pos.append(len(stack) - 1)
        stack.append((iter(nxt[1].items()), len(se) - 1))
    return torch.tensor(se), torch.tensor(pos)


def _rand_seq(r: random.Random, n: int) -> list[int]:
    return [r.randrange(1 << 30) for _ in range(n)]


def chain(n: int) -> list[list[int]]:
    """One sequence: plain causal attention."""
    return [list(range(n))]


def wide(r: random.Random, prefix: int, n_children: int, lo: int = 1, hi: int = 4):
    """One shared prefix, many short children (the follow-up fan)."""
    p = _rand_seq(r, prefix)
    return [p + _rand_seq(r, r.randint(lo, hi)) for _ in range(n_children)]


def conversation(r: random.Random, prefix: int, n_cand: int, cand: int, n_fu: int, fu: int):
    """Conversation prefix -> candidate replies -> follow-up sentences (the FLR layout)."""
    p = _rand_seq(r, prefix)
    out = []
    for _ in range(n_cand):
        c = p + _rand_seq(r, cand)
        out += [c + _rand_seq(r, r.randint(max(1, fu // 2), fu + fu // 2)) for _ in range(n_fu)]
    return out


def random_tree(r: random.Random, n_seqs: int, max_len: int) -> list[list[int]]:
    """Sequences branching off random points of earlier ones (random shared prefixes)."""
    seqs = [_rand_seq(r, r.randint(1, max_len))]
    for _ in range(n_seqs - 1):
        base = r.choice(seqs)
        cut = r.randint(0, len(base))
        seqs.append(base[:cut] + _rand_seq(r, r.randint(1, max_len)))
    return seqs


def deep(r: random.Random, depth: int, n_branches: int) -> list[list[int]]:
    """A long chain with a few long branches off random depths."""
    base = _rand_seq(r, depth)
    return [base] + [base[: r.randint(0, depth)] + _rand_seq(r, 12) for _ in range(n_branches)]


def forest(r: random.Random, n_roots: int, n_seqs: int, max_len: int) -> list[list[int]]:
    return [s for _ in range(n_roots) for s in random_tree(r, n_seqs, max_len)]


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def pad_to_prime(seqs: list[list[int]]) -> list[list[int]]:
    """Add an extra root chain so that T is prime (a forest with an odd tail block)."""
    T = pack_trie(seqs)[0].numel()
    n = T + 1
    while not _is_prime(n):
        n += 1
    return seqs + [[-(i + 1) for i in range(n - T)]]


TREES = {
    "chain67": lambda r: chain(67),
    "wide": lambda r: wide(r, 23, 110),
    "conv": lambda r: conversation(r, 20, 3, 6, 12, 4),
    "random": lambda r: random_tree(r, 20, 12),
    "forest_prime": lambda r: pad_to_prime(forest(r, 3, 6, 8)),
    "deep": lambda r: deep(r, 90, 5),
}


def make(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return pack_trie(TREES[name](random.Random(seed)))


def qkv(T, Hq, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hq, T, D, generator=g).to(dtype)
    k = torch.randn(Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(Hkv, T, D, generator=g).to(dtype)
    return q, k, v


def test_pack_trie_shapes():
    se, pos = pack_trie([[1, 2, 3], [1, 2, 4], [5]])
    assert se.tolist() == [4, 4, 3, 4, 5]  # 1 -> 2 -> {3, 4};  5
    assert pos.tolist() == [0, 1, 2, 2, 0]
    assert _is_prime(make("forest_prime")[0].numel())
    T, P = make("deep")[1].numel(), int(make("deep")[1].max())
    assert P >= 89 and T > P


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("name", list(TREES))
@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (32, 16), (7, 5)])
@pytest.mark.parametrize("window", [None, 6])
def test_plan_is_exact_superset_and_full_is_full(name, bm, bn, window):
    se, pos = make(name)
    T = se.numel()
    plan = TreeAttentionPlan.build(se, pos, block_m=bm, block_n=bn, sliding_window=window)
    nqb, nkb = plan.num_q_blocks, plan.num_kv_blocks
    mask = tree_attention_mask(se, pos, window)  # (T, T)
    mp = torch.zeros(nqb * bm, nkb * bn, dtype=torch.bool)
    mp[:T, :T] = mask
    blk = mp.view(nqb, bm, nkb, bn)
    any_vis = blk.any(3).any(1)  # (nqb, nkb)
    all_vis = torch.zeros(nqb, nkb, dtype=torch.bool)
    ptr = plan.kv_block_ptr.tolist()
    fend = plan.kv_block_full_end.tolist()
    idx = plan.kv_block_idx.tolist()
    listed = torch.zeros(nqb, nkb, dtype=torch.bool)
    for qb in range(nqb):
        q0, q1 = qb * bm, min(T, qb * bm + bm)
        ent = idx[ptr[qb] : ptr[qb + 1]]
        assert len(set(ent)) == len(ent)
        full, part = idx[ptr[qb] : fend[qb]], idx[fend[qb] : ptr[qb + 1]]
        assert full == sorted(full) and part == sorted(part)
        for kb in full:  # FULL really means every (i, j) visible, and inside [0, T)
            k0, k1 = kb * bn, kb * bn + bn
            assert k1 <= T and bool(mask[q0:q1, k0:k1].all())
            all_vis[qb, kb] = True
        listed[qb, ent] = True
    assert not bool((any_vis & ~listed).any()), "a block with visible keys was skipped"
    assert plan.kv_block_full.tolist() == [
        i < fend[qb] for qb in range(nqb) for i in range(ptr[qb], ptr[qb + 1])
    ]
    assert plan.num_full == int(all_vis.sum())
    for t in (plan.kv_block_ptr, plan.kv_block_full_end, plan.kv_block_idx):
        assert t.dtype == torch.int32


def test_plan_skips_work_on_wide_tree():
    se, pos = pack_trie(conversation(random.Random(1), 300, 4, 40, 120, 8))
    T = se.numel()
    assert T > 4000
    plan = TreeAttentionPlan.build(se, pos, block_m=64, block_n=64)
    causal = plan.num_q_blocks * (plan.num_q_blocks + 1) // 2
    assert plan.num_entries < 0.2 * plan.dense_entries
    assert plan.num_entries < 0.4 * causal
    assert plan.num_full > 0.5 * plan.num_entries  # the shared prefix is mask-free
    # a sliding window cuts the visit list further
    pw = TreeAttentionPlan.build(se, pos, block_m=64, block_n=64, sliding_window=64)
    assert pw.num_entries < 0.6 * plan.num_entries


def test_plan_validates_subtree_end():
    with pytest.raises(ValueError, match="subtree_end"):
        TreeAttentionPlan.build(torch.tensor([1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sliding_window"):
        TreeAttentionPlan.build(torch.tensor([1]), torch.tensor([0]), sliding_window=0)


# --------------------------------------------------------------------------- torch / dense


def _check(out, ref, atol=2e-5, rtol=1e-5):
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", ["torch", "dense", "auto"])
@pytest.mark.parametrize("name", list(TREES))
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])
@pytest.mark.parametrize("D", [16, 80])
def test_cpu_impls_match_reference(impl, name, heads, D):
    se, pos = make(name, seed=D)
    q, k, v = qkv(se.numel(), *heads, D, seed=D)
    scale = D**-0.5
    ref, lse_ref = tree_attention_reference(q, k, v, se, pos, scale=scale, return_lse=True)
    plan = TreeAttentionPlan.build(se, pos, block_m=16, block_n=32)
    out = flr_tree_attention(q, k, v, se, pos, scale=scale, plan=plan, impl=impl)
    _check(out, ref)
    out2, lse = flr_tree_attention(q, k, v, se, pos, impl=impl, return_lse=True)  # own plan
    _check(out2, ref)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "dense"])
@pytest.mark.parametrize("window,softcap", [(5, None), (None, 3.0), (9, 1.5), (1, None)])
@pytest.mark.parametrize("name", ["conv", "deep", "forest_prime"])
def test_cpu_window_softcap(impl, window, softcap, name):
    se, pos = make(name, seed=3)
    q, k, v = qkv(se.numel(), 4, 2, 32, seed=3)
    kw = dict(scale=0.3, sliding_window=window, softcap=softcap)
    ref, lse_ref = tree_attention_reference(q, k, v, se, pos, return_lse=True, **kw)
    plan = TreeAttentionPlan.build(se, pos, block_m=32, block_n=16, sliding_window=window)
    out, lse = flr_tree_attention(q, k, v, se, pos, plan=plan, impl=impl, return_lse=True, **kw)
    _check(out, ref)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=1e-5)
    _check(flr_tree_attention(q, k, v, se, pos, plan=plan, impl=impl, **kw), ref)  # no lse


@pytest.mark.parametrize("budget", [1, 1 << 30])
@pytest.mark.parametrize("lse", [False, True])
def test_torch_path_chunking(monkeypatch, budget, lse):
    """One query block per chunk (no padding) and one chunk for everything (max padding)."""
    import flr_engine.ops.tree_attention as ta

    monkeypatch.setattr(ta, "_TORCH_SCORE_BUDGET", budget)
    for name, window in (("conv", None), ("wide", None), ("deep", 5), ("chain67", None)):
        se, pos = make(name, seed=19)
        q, k, v = qkv(se.numel(), 4, 2, 16, seed=19)
        kw = dict(scale=0.25, sliding_window=window)
        ref, lse_ref = tree_attention_reference(q, k, v, se, pos, return_lse=True, **kw)
        for bm, bn in ((16, 16), (8, 24)):
            plan = TreeAttentionPlan.build(se, pos, block_m=bm, block_n=bn, sliding_window=window)
            res = flr_tree_attention(
                q, k, v, se, pos, plan=plan, impl="torch", return_lse=lse, **kw
            )
            _check(res[0] if lse else res, ref)
            if lse:
                torch.testing.assert_close(res[1], lse_ref, atol=2e-5, rtol=1e-5)


def test_torch_path_noncontiguous_and_int32():
    se, pos = make("conv", seed=5)
    T = se.numel()
    g = torch.Generator().manual_seed(5)
    qt = torch.randn(T, 6, 48, generator=g)  # HF-style (T, H, D) storage
    kvt = torch.randn(T, 2, 2, 48, generator=g)  # fused (T, 2, Hkv, D)
    q, k, v = qt.transpose(0, 1), kvt[:, 0].transpose(0, 1), kvt[:, 1].transpose(0, 1)
    assert not q.is_contiguous() and not k.is_contiguous()
    ref = tree_attention_reference(q, k, v, se, pos, scale=0.2)
    for impl in ("torch", "dense"):
        out = flr_tree_attention(q, k, v, se.int(), pos.int(), scale=0.2, impl=impl)
        _check(out, ref)


def _bf16_bound(q, k, v, se, pos, ref, window=None, softcap=None, scale=0.25):
    """2 x the error of the same-dtype (q's) dense computation, plus a small atol."""
    mask = tree_attention_mask(se, pos, window)
    base, _ = _dense_math(q, k, v, mask, scale, softcap, q.dtype)
    return 2 * (base.float() - ref).abs().max().item() + 2e-3


@pytest.mark.parametrize("impl", ["torch", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision(impl, dtype):
    se, pos = make("conv", seed=7)
    q, k, v = qkv(se.numel(), 6, 2, 64, dtype=dtype, seed=7)
    ref = tree_attention_reference(q, k, v, se, pos, scale=0.25, softcap=None)
    out = flr_tree_attention(q, k, v, se, pos, scale=0.25, impl=impl)
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    assert err <= _bf16_bound(q, k, v, se, pos, ref), err


def test_edge_sizes():
    for seqs in ([[1]], [[1], [2]], chain(3)):
        se, pos = pack_trie(seqs)
        q, k, v = qkv(se.numel(), 2, 1, 16)
        ref = tree_attention_reference(q, k, v, se, pos, scale=0.25)
        _check(flr_tree_attention(q, k, v, se, pos, scale=0.25, impl="torch"), ref)
    q, k, v = qkv(0, 2, 1, 16)
    e = torch.zeros(0, dtype=torch.long)
    assert flr_tree_attention(q, k, v, e, e).shape == (0, 2, 16)


def test_validation_messages():
    se, pos = make("random")
    T = se.numel()
    q, k, v = qkv(T, 6, 2, 16)
    call = flr_tree_attention
    with pytest.raises(ValueError, match=r"q must be 3-D \(Hq, T, D\)"):
        call(q[0], k, v, se, pos)
    with pytest.raises(ValueError, match="multiple of k/v heads Hkv=4"):
        call(q, k.repeat(2, 1, 1), v.repeat(2, 1, 1), se, pos)
    with pytest.raises(ValueError, match=f"k must have T={T}"):
        call(q, k[:, :-1], v[:, :-1], se, pos)
    with pytest.raises(ValueError, match="v must have k's shape"):
        call(q, k, v[:, :, :8], se, pos)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        call(q, k.half(), v, se, pos)
    with pytest.raises(TypeError, match="q must be float32"):
        call(q.double(), k.double(), v.double(), se, pos)
    with pytest.raises(ValueError, match=f"positions must have T={T}"):
        call(q, k, v, se, pos[:-1])
    with pytest.raises(TypeError, match="subtree_end must be an integer"):
        call(q, k, v, se.float(), pos)
    with pytest.raises(ValueError, match="impl must be one of"):
        call(q, k, v, se, pos, impl="cuda")
    with pytest.raises(ValueError, match="softcap"):
        call(q, k, v, se, pos, softcap=0.0)
    plan = TreeAttentionPlan.build(se, pos, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="sliding_window=None, called with sliding_window=4"):
        call(q, k, v, se, pos, plan=plan, sliding_window=4)
    with pytest.raises(ValueError, match="plan was built for T="):
        call(q[:, :-1], k[:, :-1], v[:, :-1], se[:-1].clamp(max=T - 1), pos[:-1], plan=plan)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="positions must be on"):
            call(q.cuda(), k.cuda(), v.cuda(), se.cuda(), pos)


def test_triton_needs_power_of_two_blocks():
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    se, pos = _to(TDEV, *make("random"))
    q, k, v = _to(TDEV, *qkv(se.numel(), 2, 2, 16))
    plan = TreeAttentionPlan.build(se, pos, block_m=24, block_n=16)
    with pytest.raises(ValueError, match="power of two"):
        flr_tree_attention(q, k, v, se, pos, plan=plan, impl="triton")


# --------------------------------------------------------------------------- triton (interpreter)

# (tree, Hq, Hkv, D, block_m, block_n, window, softcap): small shapes, the interpreter is slow
TRITON_CASES = [
    ("chain67", 2, 2, 16, 32, 32, None, None),
    ("wide", 6, 2, 16, 32, 32, None, None),
    ("conv", 3, 3, 32, 16, 32, None, None),
    ("forest_prime", 6, 2, 24, 32, 16, None, None),  # D=24: padded to 32 in-kernel
    ("deep", 2, 1, 16, 32, 32, 7, None),
    ("random", 4, 2, 16, 32, 32, None, 2.0),
    ("conv", 2, 1, 80, 32, 32, 4, 5.0),  # D=80: padded to 128
    ("wide", 4, 1, 16, 16, 16, 3, None),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_matches_reference(case):
    name, Hq, Hkv, D, bm, bn, window, softcap = case
    se, pos = _to(TDEV, *make(name, seed=11))
    q, k, v = _to(TDEV, *qkv(se.numel(), Hq, Hkv, D, seed=11))
    kw = dict(scale=D**-0.5, sliding_window=window, softcap=softcap)
    ref, lse_ref = tree_attention_reference(q, k, v, se, pos, return_lse=True, **kw)
    plan = TreeAttentionPlan.build(se, pos, block_m=bm, block_n=bn, sliding_window=window)
    out, lse = flr_tree_attention(q, k, v, se, pos, plan=plan, impl="triton", return_lse=True, **kw)
    _check(out, ref)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_noncontiguous(dtype):
    # note: the interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest)
    se, pos = _to(TDEV, *make("conv", seed=13))
    T = se.numel()
    g = torch.Generator().manual_seed(13)
    qt = torch.randn(T, 6, 32, generator=g).to(dtype).to(TDEV)
    kvt = torch.randn(T, 2, 2, 32, generator=g).to(dtype).to(TDEV)
    q, k, v = qt.transpose(0, 1), kvt[:, 0].transpose(0, 1), kvt[:, 1].transpose(0, 1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    ref = tree_attention_reference(q, k, v, se, pos, scale=0.25)
    plan = TreeAttentionPlan.build(se, pos, block_m=32, block_n=32)
    out = flr_tree_attention(q, k, v, se, pos, scale=0.25, plan=plan, impl="triton")
    assert out.dtype == dtype and out.shape == (T, 6, 32)
    err = (out.float() - ref).abs().max().item()
    assert err <= _bf16_bound(q, k, v, se, pos, ref), err


@needs_triton
def test_triton_default_plan():
    se, pos = _to(TDEV, *make("forest_prime", seed=17))
    q, k, v = _to(TDEV, *qkv(se.numel(), 2, 1, 16, seed=17))
    ref = tree_attention_reference(q, k, v, se.int(), pos.int(), scale=0.25)
    _check(flr_tree_attention(q, k, v, se.int(), pos.int(), scale=0.25, impl="triton"), ref)


@needs_triton
def test_triton_explicit_errors(monkeypatch):
    from flr_engine.kernels import tree_attention as kmod

    se, pos = make("random")
    q, k, v = qkv(se.numel(), 2, 2, 16)
    monkeypatch.setattr(kmod, "triton_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flr_tree_attention(q, k, v, se, pos, impl="triton")
    monkeypatch.setattr(kmod, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="impl='triton' cannot run: triton is not importable"):
        flr_tree_attention(q, k, v, se, pos, impl="triton")
    ref = tree_attention_reference(q, k, v, se, pos, scale=0.25)
    _check(flr_tree_attention(q, k, v, se, pos, scale=0.25, impl="auto"), ref)  # quiet


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("window,softcap", [(None, None), (256, 50.0)])
def test_gpu_triton(dtype, D, window, softcap):
    se, pos = pack_trie(conversation(random.Random(2), 700, 4, 50, 120, 8))
    q, k, v = (t.cuda() for t in qkv(se.numel(), 8, 2, D, dtype=dtype, seed=2))
    se, pos = se.cuda(), pos.cuda()
    kw = dict(scale=D**-0.5, sliding_window=window, softcap=softcap)
    ref, lse_ref = tree_attention_reference(q, k, v, se, pos, return_lse=True, **kw)
    for impl in ("triton", "auto", "torch"):
        out, lse = flr_tree_attention(q, k, v, se, pos, impl=impl, return_lse=True, **kw)
        if dtype == torch.float32:
            _check(out, ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-4)
        else:
            err = (out.float() - ref).abs().max().item()
            assert err <= _bf16_bound(q, k, v, se, pos, ref, window, softcap, D**-0.5), err


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_torch_path_gradients_match_dense_reference(softcap):
    """DPO backpropagates through the torch path: its gradients (soft-capping included)
    equal those of the dense masked reference."""
    g = torch.Generator().manual_seed(0)
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 7, 8, 6, 5], [4, 4]]
    from flr_engine.engine.packer import pack_sequences

    pack = pack_sequences(seqs, 100).packs[0]
    T = pack.num_unique
    q = torch.randn(4, T, 16, generator=g, requires_grad=True)
    k = torch.randn(2, T, 16, generator=g, requires_grad=True)
    v = torch.randn(2, T, 16, generator=g, requires_grad=True)
    w = torch.randn(T, 4, 16, generator=g)
    grads = []
    for impl in ("torch", "reference"):
        kw = dict(scale=0.25, softcap=softcap)
        if impl == "reference":
            out = tree_attention_reference(q, k, v, pack.subtree_end, pack.position_ids, **kw)
        else:
            plan = TreeAttentionPlan.build(pack.subtree_end, pack.position_ids, block_m=16, block_n=16)
            out = flr_tree_attention(q, k, v, pack.subtree_end, pack.position_ids, plan=plan, impl="torch", **kw)
        grads.append(torch.autograd.grad((out.float() * w).sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- tiles, grad, fallback


@pytest.mark.parametrize(
    "D,dtype,smem,want",
    [
        (128, torch.bfloat16, 227 * 1024, (128, 64)),  # H100/H200: two warpgroups of rows
        (64, torch.float16, 163 * 1024, (128, 64)),  # A100
        (256, torch.bfloat16, 227 * 1024, (128, 16)),  # 64x32 spills registers at D=256
        (256, torch.float32, 227 * 1024, (16, 16)),  # 64 x 64 would need ~344 KB
        (128, torch.float32, 163 * 1024, (16, 16)),
        (80, torch.float32, 227 * 1024, (16, 16)),  # D=80 runs padded to 128
        (128, torch.bfloat16, 99 * 1024, (64, 64)),  # consumer parts: 128x64 does not fit
        (256, torch.bfloat16, 99 * 1024, (32, 32)),
    ],
)
def test_suggested_tiles_fit_shared_memory(D, dtype, smem, want):
    kmod = pytest.importorskip("flr_engine.kernels.tree_attention")
    from flr_engine.ops.tree_attention import suggested_block_sizes

    bm, bn = suggested_block_sizes(D, dtype, "triton", smem=smem)
    assert (bm, bn) == want
    elem = 4 if dtype == torch.float32 else 2
    assert kmod.smem_bytes(bm, bn, D, elem, 2) * 1.1 <= smem
    if (D, dtype) == (256, torch.float32):  # the old fixed 64 x 64 tile cannot launch there
        assert kmod.smem_bytes(64, 64, D, elem, 2) > smem
    # 16-bit: 8 warps for 128-row tiles (two warpgroups, one 64-row wgmma each) and for
    # 64-row tiles with D > 64 (4 spill); fp32 (FMA dots): 4
    warps, stages = kmod.launch_config(bm, bn, D, elem, smem)
    wide = bm >= 128 or (bm >= 64 and D > 64)
    assert warps == (8 if elem == 2 and wide else 4) and stages >= 2
    assert suggested_block_sizes(D, dtype, "torch") == (64, 64)


def test_triton_impl_with_grad_raises_and_auto_backpropagates(monkeypatch):
    """The Triton kernel has no backward: impl="triton" must not return an output without a
    gradient path; impl="auto" picks the differentiable torch path when a gradient is needed
    (even where it would pick Triton: ``_auto_wants_triton`` forced True)."""
    import flr_engine.ops.tree_attention as ta

    se, pos = make("wide", seed=3)
    q, k, v = (x.requires_grad_(True) for x in qkv(se.numel(), 4, 2, 16, seed=3))
    with pytest.raises(RuntimeError, match="forward only"):
        flr_tree_attention(q, k, v, se, pos, impl="triton")
    monkeypatch.setattr(ta, "_auto_wants_triton", lambda q: True)
    monkeypatch.setattr(ta, "_run_triton", lambda *a: pytest.fail("triton used with grad"))
    out = flr_tree_attention(q, k, v, se, pos, scale=0.25, impl="auto")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = tree_attention_reference(q, k, v, se, pos, scale=0.25)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_fallback_is_per_configuration_and_logged_once(monkeypatch, caplog):
    """A Triton launch failure under impl="auto" switches only that configuration (device,
    dtype, head dim, tiles, window, softcap) to torch, with one warning naming the cause;
    other configurations keep using Triton."""
    import flr_engine.ops.tree_attention as ta

    calls = []

    def fake_triton(q, k, v, se, pos, plan, scale, window, softcap, want_lse):
        calls.append(q.shape[-1])
        if q.shape[-1] == 32:
            raise RuntimeError("out of resource: shared memory (planted)")
        out, lse = ta._tree_attention_torch(q, k, v, se, pos, plan, scale, window, softcap, want_lse)
        return out, lse

    monkeypatch.setattr(ta, "_triton_auto_failed", {})
    monkeypatch.setattr(ta, "_auto_wants_triton", lambda q: True)
    monkeypatch.setattr(ta, "_triton_kernels", lambda: None)
    monkeypatch.setattr(ta, "_run_triton", fake_triton)
    se, pos = make("conv", seed=5)
    with caplog.at_level("WARNING", logger=ta.__name__):
        for D in (32, 32, 16, 32, 16):
            q, k, v = qkv(se.numel(), 4, 2, D, seed=D)
            out = flr_tree_attention(q, k, v, se, pos, scale=0.3, impl="auto")
            _check(out, tree_attention_reference(q, k, v, se, pos, scale=0.3))
    assert calls == [32, 16, 16]  # D=32 tried once, D=16 still on "triton"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "planted" in warnings[0].getMessage()
    (key,) = ta._triton_auto_failed
    assert key[1:3] == (torch.float32, 32)
