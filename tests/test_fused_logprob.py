"""Fused gathered log-prob: every impl against the full-logits reference.

CPU: the chunked torch path, the Triton kernel under TRITON_INTERPRET=1 (set by conftest.py
when no CUDA device is usable), and the reference. On a GPU machine the same Triton tests run
the compiled kernel: ``_run`` moves the inputs to CUDA (and the outputs back, differentiably).
The CUDA extension and the large GPU shapes are behind ``-m gpu``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flr_engine.ops import fused_logprob as fl
from flr_engine.ops.fused_logprob import (
    flr_gathered_logprob,
    gathered_logprob_reference,
    segment_mean,
    segment_sum,
)

ROOT = Path(__file__).resolve().parents[1]


def _has_triton() -> bool:
    try:
        from flr_engine.kernels import fused_logprob as kmod
    except ImportError:
        return False
    return kmod.HAS_TRITON and (kmod.INTERPRETED or torch.cuda.is_available())


needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton (interpreter) unavailable")


def _triton_device() -> str:
    """Where the Triton tests' tensors go: CPU under the interpreter, else CUDA."""
    from flr_engine.kernels import fused_logprob as kmod

    return "cpu" if kmod.INTERPRETED else "cuda"


CPU_IMPLS = ["torch", pytest.param("triton", marks=needs_triton), "reference"]


def make_inputs(
    n: int = 13,
    h: int = 48,
    v: int = 1009,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    n_ignored: int = 0,
    seed: int = 0,
    device: str = "cpu",
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if n_ignored:
        targets[torch.randperm(n, generator=g)[:n_ignored]] = -100
    cast = {"dtype": dtype, "device": device}
    return (
        hidden.to(**cast),
        weight.to(**cast),
        b.to(**cast) if b is not None else None,
        targets.to(device),
    )


OPTIONS = [
    {},
    {"bias": True},
    {"logit_scale": 0.37},
    {"softcap": 3.0},
    {"bias": True, "logit_scale": 1.7, "softcap": 5.0},
]


def _run(impl, hidden, weight, targets, bias=None, **kw):
    """``flr_gathered_logprob``; for impl="triton" the inputs go to the kernel's device and
    the outputs come back to the inputs' device (autograd flows through both copies)."""
    home = hidden.device
    if impl == "triton" and str(home) != _triton_device():
        dev = _triton_device()
        hidden, weight, targets = hidden.to(dev), weight.to(dev), targets.to(dev)
        bias = bias.to(dev) if bias is not None else None
    out = flr_gathered_logprob(hidden, weight, targets, bias=bias, impl=impl, **kw)
    if isinstance(out, tuple):
        return tuple(o.to(home) for o in out)
    return out.to(home)


# --------------------------------------------------------------------------------------
# forward, fp32 / fp64
# --------------------------------------------------------------------------------------


def test_reference_matches_cross_entropy():
    hidden, weight, bias, targets = make_inputs(bias=True, n_ignored=3, dtype=torch.float64)
    logp = gathered_logprob_reference(hidden, weight, targets, bias=bias, logit_scale=0.5)
    ce = F.cross_entropy((hidden @ weight.T + bias) * 0.5, targets, reduction="none")
    torch.testing.assert_close(logp, -ce, rtol=0, atol=1e-12)
    assert logp.dtype == torch.float64


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_fp32_matches_reference(impl, opts):
    opts = dict(opts)
    hidden, weight, bias, targets = make_inputs(bias=opts.pop("bias", False), n_ignored=2)
    logp, lse = _run(impl, hidden, weight, targets, bias, chunk_size=100, return_lse=True, **opts)
    ref, ref_lse = gathered_logprob_reference(
        hidden.double(), weight.double(), targets,
        bias=bias.double() if bias is not None else None, return_lse=True, **opts,
    )  # fmt: skip
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    torch.testing.assert_close(logp, ref.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=2e-5)
    assert torch.all(logp[targets == -100] == 0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(
    "n,h,v", [(1, 64, 17), (2, 16, 1), (13, 48, 1009), (31, 64, 257), (37, 48, 3001)]
)
def test_odd_sizes(impl, n, h, v):
    hidden, weight, bias, targets = make_inputs(n, h, v, bias=True, seed=n + v)
    logp = _run(impl, hidden, weight, targets, bias, chunk_size=97)
    ref = gathered_logprob_reference(hidden, weight, targets, bias=bias)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1008, 1009, 5000, None])
def test_torch_chunk_sizes(chunk):
    hidden, weight, bias, targets = make_inputs(bias=True, n_ignored=1, dtype=torch.float64)
    logp = _run("torch", hidden, weight, targets, bias, chunk_size=chunk, softcap=4.0)
    ref = gathered_logprob_reference(hidden, weight, targets, bias=bias, softcap=4.0)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_noncontiguous_hidden(impl, layout):
    n, h, v = 11, 48, 300
    _, weight, _, targets = make_inputs(n, h, v)
    if layout == "transposed":
        hidden = torch.randn(h, n).T  # (N, H) with strides (1, N)
    else:
        hidden = torch.randn(n, 2 * h + 3)[:, 3::2]  # (N, H) with strides (2H+3, 2)
    assert not hidden.is_contiguous()
    logp = _run(impl, hidden, weight, targets, chunk_size=64)
    ref = gathered_logprob_reference(hidden.contiguous(), weight, targets)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_leading_dims(impl):
    hidden, weight, _, targets = make_inputs(12, 32, 100)
    logp = _run(impl, hidden.reshape(3, 4, 32), weight, targets.reshape(3, 4), chunk_size=30)
    assert logp.shape == (3, 4)
    ref = gathered_logprob_reference(hidden, weight, targets)
    torch.testing.assert_close(logp.reshape(-1), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_all_ignored_and_custom_ignore_index(impl):
    hidden, weight, _, targets = make_inputs(5, 16, 50)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logp = _run(impl, hidden, weight, torch.full_like(targets, -100))
    assert torch.equal(logp, torch.zeros(5))
    logp.sum().backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
    # a custom ignore_index inside the vocabulary wins over the id
    targets[0] = 7
    logp = _run(impl, hidden, weight, targets, ignore_index=7)
    ref = gathered_logprob_reference(hidden, weight, targets, ignore_index=7)
    assert logp[0] == 0
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_empty_input(impl):
    hidden = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(20, 16, requires_grad=True)
    logp, lse = _run(impl, hidden, weight, torch.zeros(0, dtype=torch.long), return_lse=True)
    assert logp.shape == (0,) and lse.shape == (0,)
    logp.sum().backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_n", [1, 2, 8])
def test_triton_vocab_splits_and_grouped_order(num_splits, dtype, group_n):
    """The grid is (row blocks x vocabulary splits) in groups of ``group_n`` row blocks: 70 rows
    in 16-row blocks make 5 row blocks (a partial last group for group_n=2), V=1009 a partial
    last tile; every (row block, split) must be visited once and merged exactly."""
    from flr_engine.kernels.fused_logprob import fused_logprob_forward

    dev = _triton_device()
    hidden, weight, bias, targets = make_inputs(70, 40, 1009, bias=True, n_ignored=2, device=dev)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    logp, lse = fused_logprob_forward(
        hidden, weight, bias, targets, 0.9, 6.0, -100, block_n=16, block_v=64, block_h=32,
        num_splits=num_splits, group_n=group_n,
    )  # fmt: skip
    ref, ref_lse = gathered_logprob_reference(
        hidden, weight, targets, bias=bias, logit_scale=0.9, softcap=6.0, return_lse=True
    )
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "n,dtype,smem,want",
    [
        # H100/H200 (227 KB opt-in): 128 x 128 x 64 bf16 at 4 stages = 128 KB of operands
        (8192, torch.bfloat16, 227 * 1024, (128, 128, 64, 8, 4)),
        # A100 (163 KB): the same tile still fits (128 KB + 10% = 141 KB)
        (8192, torch.bfloat16, 163 * 1024, (128, 128, 64, 8, 4)),
        # consumer parts (99 KB): 128 x 128 x 64 at 3 stages = 96 KB does not fit with the
        # margin, 64 x 128 x 64 at 3 stages = 72 KB does
        (8192, torch.float16, 99 * 1024, (64, 128, 64, 4, 3)),
        # fp32 (IEEE dots on FMA units): 64 x 64 x 32, 2 stages (128 x 128 spills on sm_90)
        (8192, torch.float32, 227 * 1024, (64, 64, 32, 4, 2)),
        # few rows: the row tile shrinks to the next power of two >= 16, 4 warps
        (5, torch.bfloat16, 227 * 1024, (16, 128, 64, 4, 4)),
    ],
)
def test_triton_launch_config_fits_shared_memory(n, dtype, smem, want):
    kmod = pytest.importorskip("flr_engine.kernels.fused_logprob")
    got = kmod.launch_config(n, 4096, 128256, dtype, smem)
    assert got == want
    bn, bv, bh, _, stages = got
    elem = 4 if dtype == torch.float32 else 2
    assert stages * (bn * bh + bh * bv) * elem * 1.1 <= smem


# --------------------------------------------------------------------------------------
# forward, half precision
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 10.0])
def test_half_precision_error_bound(impl, dtype, softcap):
    n, h, v = 29, 64, 1009
    hidden, weight, bias, targets = make_inputs(n, h, v, bias=True, seed=3)
    hidden, weight = hidden * 2, weight * 2  # logits of a few tens: rounding matters
    truth = gathered_logprob_reference(hidden, weight, targets, bias=bias, softcap=softcap)
    hl, wl = hidden.to(dtype), weight.to(dtype)
    # plain torch in the same dtype: logits in `dtype`, log_softmax in fp32
    z = (hl @ wl.T + bias.to(dtype)).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    plain = torch.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]
    got = _run(impl, hl, wl, targets, bias.to(dtype), chunk_size=200, softcap=softcap)
    assert got.dtype == torch.float32
    err_plain = (plain - truth).abs().max().item()
    err_got = (got - truth).abs().max().item()
    assert err_got <= 2 * err_plain + 1e-3, (err_got, err_plain)


# --------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------


def test_gradcheck_float64_torch_path():
    hidden, weight, bias, targets = make_inputs(5, 4, 11, bias=True, dtype=torch.float64)
    targets[2] = -100
    inputs = tuple(x.clone().requires_grad_(True) for x in (hidden, weight, bias))

    def fn(h, w, b):
        return flr_gathered_logprob(
            h, w, targets, bias=b, logit_scale=0.8, softcap=2.5, chunk_size=3,
            impl="torch", return_lse=True,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_grads_match_reference(impl, opts):
    opts = dict(opts)
    dtype = torch.float32 if impl == "triton" else torch.float64  # triton: no fp64 dots
    hidden, weight, bias, targets = make_inputs(
        bias=opts.pop("bias", False), n_ignored=3, dtype=dtype, v=301
    )
    params = [x.clone().requires_grad_(True) for x in (hidden, weight, bias) if x is not None]
    ref_params = [x.clone().requires_grad_(True) for x in params]
    w_out = torch.randn(targets.shape[0], dtype=dtype)
    w_lse = torch.randn(targets.shape[0], dtype=dtype)

    def loss(ps, use_impl):
        b = ps[2] if len(ps) > 2 else None
        lp, lse = _run(use_impl, ps[0], ps[1], targets, b, chunk_size=64, return_lse=True, **opts)
        return (lp * w_out).sum() + (lse * w_lse).sum()

    grads = torch.autograd.grad(loss(params, impl), params)
    ref_grads = torch.autograd.grad(loss(ref_params, "reference"), ref_params)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **tol)
    # ignored rows receive gradient only through lse
    grads_lp = torch.autograd.grad(
        _run(impl, params[0], params[1], targets, chunk_size=64).sum(),
        params[0],
    )[0]
    assert torch.count_nonzero(grads_lp[targets == -100]) == 0


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_tied_embeddings_grad(impl):
    """The LM head is the embedding matrix: one Parameter used twice accumulates both grads."""
    v, h, n = 257, 32, 19
    g = torch.Generator().manual_seed(7)
    emb0 = torch.randn(v, h, generator=g) * 0.3
    mix0 = torch.randn(h, h, generator=g) * 0.3
    ids = torch.randint(0, v, (n,), generator=g)
    targets = torch.roll(ids, -1)
    targets[-1] = -100

    def run(use_impl):
        emb = torch.nn.Parameter(emb0.clone())
        mix = torch.nn.Parameter(mix0.clone())
        hidden = torch.tanh(F.embedding(ids, emb) @ mix)  # (N, H)
        logp = _run(use_impl, hidden, emb, targets, chunk_size=50)
        logp.sum().backward()
        return logp.detach(), emb.grad, mix.grad

    got, ref = run(impl), run("reference")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_head_only_hidden_grad():
    hidden, weight, _, targets = make_inputs(7, 16, 100, dtype=torch.float64)
    hidden.requires_grad_(True)
    logp = flr_gathered_logprob(hidden, weight, targets, impl="torch", chunk_size=30)
    (gh,) = torch.autograd.grad(logp.sum(), hidden)
    h2 = hidden.detach().clone().requires_grad_(True)
    (rh,) = torch.autograd.grad(gathered_logprob_reference(h2, weight, targets).sum(), h2)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    assert weight.grad is None


def test_half_precision_grads_close():
    hidden, weight, bias, targets = make_inputs(9, 32, 200, bias=True, n_ignored=1)
    params = [x.bfloat16().requires_grad_(True) for x in (hidden, weight, bias)]
    lp = flr_gathered_logprob(params[0], params[1], targets, bias=params[2], impl="torch")
    grads = torch.autograd.grad(lp.sum(), params)
    ref_params = [x.detach().float().requires_grad_(True) for x in params]
    ref = gathered_logprob_reference(ref_params[0], ref_params[1], targets, bias=ref_params[2])
    ref_grads = torch.autograd.grad(ref.sum(), ref_params)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, rtol=2e-2, atol=2e-2)


class _MaxAlloc(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_torch_path_never_materialises_logits():
    n, h, v, chunk = 64, 16, 4096, 256
    hidden, weight, bias, targets = make_inputs(n, h, v, bias=True)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with _MaxAlloc() as mode:
        logp = flr_gathered_logprob(
            hidden, weight, targets, bias=bias, softcap=5.0, impl="torch", chunk_size=chunk
        )
        logp.sum().backward()
    # the biggest tensors are a (N, chunk) logits chunk and the (V, H) weight gradient
    assert mode.max_numel <= max(n * chunk, v * h) < n * v


# --------------------------------------------------------------------------------------
# shared rows: one log-sum-exp per row of hidden, gathered per target
# --------------------------------------------------------------------------------------


def _naive_rows(hidden, weight, targets, rows, bias=None, logit_scale=1.0, softcap=None):
    """Full logits of every row, log_softmax, then (row, target) picks; written out here,
    independent of the op's logit transform."""
    z = hidden.double() @ weight.double().T  # (R, V)
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != -100
    lp = torch.log_softmax(z, -1)[rows, torch.where(valid, targets, 0)]
    return torch.where(valid, lp, torch.zeros_like(lp)), torch.logsumexp(z, -1), z


def make_row_inputs(r=7, m=23, h=48, v=1009, *, bias=False, dtype=torch.float32, seed=0):
    """``m`` targets on ``r`` rows, every row used, several targets per row, 2 ignored."""
    hidden, weight, b, _ = make_inputs(r, h, v, bias=bias, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.cat([torch.arange(r), torch.randint(0, r, (m - r,), generator=g)])
    rows = rows[torch.randperm(m, generator=g)]
    targets = torch.randint(0, v, (m,), generator=g)
    targets[:2] = -100
    return hidden, weight, b, targets, rows


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_rows_match_naive_reference(impl, opts):
    opts = dict(opts)
    hidden, weight, bias, targets, rows = make_row_inputs(bias=opts.pop("bias", False))
    logp, lse = _run(impl, hidden, weight, targets, bias, chunk_size=100, return_lse=True,
                     rows=rows, **opts)  # fmt: skip
    want, want_lse, _ = _naive_rows(hidden, weight, targets, rows, bias, **opts)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape and lse.shape == (7,)
    torch.testing.assert_close(logp, want.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-5, atol=2e-5)
    assert torch.all(logp[targets == -100] == 0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_rows_identity_equals_the_plain_op(impl):
    hidden, weight, bias, targets = make_inputs(13, 48, 1009, bias=True, n_ignored=2)
    plain = _run(impl, hidden, weight, targets, bias, chunk_size=100, softcap=4.0)
    rows = torch.arange(13)
    got = _run(impl, hidden, weight, targets, bias, chunk_size=100, softcap=4.0, rows=rows)
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_rows_grads_match_naive_reference(impl, opts):
    """Targets sharing a row: its hidden state's gradient sums over them (and over lse)."""
    opts = dict(opts)
    dtype = torch.float32 if impl == "triton" else torch.float64
    hidden, weight, bias, targets, rows = make_row_inputs(
        bias=opts.pop("bias", False), dtype=dtype, v=301
    )
    params = [x.clone().requires_grad_(True) for x in (hidden, weight, bias) if x is not None]
    ref_params = [x.detach().double().requires_grad_(True) for x in params]
    w_out = torch.randn(targets.shape[0], dtype=torch.float64)
    w_lse = torch.randn(hidden.shape[0], dtype=torch.float64)
    b = params[2] if len(params) > 2 else None
    lp, lse = _run(impl, params[0], params[1], targets, b, chunk_size=64, return_lse=True,
                   rows=rows, **opts)  # fmt: skip
    grads = torch.autograd.grad((lp.double() * w_out).sum() + (lse.double() * w_lse).sum(), params)
    rb = ref_params[2] if len(ref_params) > 2 else None
    want, want_lse, _ = _naive_rows(ref_params[0], ref_params[1], targets, rows, rb, **opts)
    ref_grads = torch.autograd.grad((want * w_out).sum() + (want_lse * w_lse).sum(), ref_params)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, **tol)


def test_rows_gradcheck_float64_torch_path():
    inputs = make_row_inputs(4, 9, 4, 11, bias=True, dtype=torch.double)
    hidden, weight, bias, targets, rows = inputs
    inputs = tuple(x.clone().requires_grad_(True) for x in (hidden, weight, bias))

    def fn(h, w, b):
        return flr_gathered_logprob(
            h, w, targets, bias=b, logit_scale=0.8, softcap=2.5, chunk_size=3,
            impl="torch", return_lse=True, rows=rows,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_rows_empty_targets(impl):
    hidden = torch.randn(3, 16, requires_grad=True)
    weight = torch.randn(20, 16)
    empty = torch.zeros(0, dtype=torch.long)
    logp, lse = _run(impl, hidden, weight, empty, rows=empty, return_lse=True)
    assert logp.shape == (0,) and lse.shape == (3,)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_gathered_logits_are_the_raw_logits(opts):
    opts = dict(opts)
    hidden, weight, bias, targets, rows = make_row_inputs(bias=opts.pop("bias", False))
    got = fl.gathered_logits(hidden, weight, targets, rows=rows, bias=bias, **opts)
    _, _, z = _naive_rows(hidden, weight, targets, rows, bias, **opts)
    valid = targets != -100
    want = torch.where(valid, z[rows, torch.where(valid, targets, 0)], torch.zeros(()))
    assert got.dtype == torch.float32 and got.shape == targets.shape
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=2e-5)
    plain = fl.gathered_logits(hidden[rows], weight, targets, bias=bias, **opts)  # no rows
    torch.testing.assert_close(plain, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(rows=a["rows"].float()), TypeError, r"rows must be int64"),
        (lambda a: a.update(rows=a["rows"][:3]), ValueError, r"rows must have the shape of"),
        (lambda a: a.update(rows=a["rows"].to("meta")), ValueError, r"rows must be on"),
        (lambda a: a.update(rows=[0, 1]), TypeError, r"rows must be a torch.Tensor"),
        (lambda a: a.update(hidden=a["hidden"][None]), ValueError, r"hidden must have shape \(R,"),
        (lambda a: a["rows"].__setitem__(0, 7), ValueError, r"rows must be in \[0, R=7\)"),
        (lambda a: a["rows"].__setitem__(0, -1), ValueError, r"found -1"),
    ],
)
@pytest.mark.parametrize("fn", ["logprob", "logits"])
def test_rows_validation_errors(mutate, exc, match, fn):
    hidden, weight, _, targets, rows = make_row_inputs(v=50)
    args = {"hidden": hidden, "weight": weight, "targets": targets, "rows": rows}
    mutate(args)
    op = flr_gathered_logprob if fn == "logprob" else fl.gathered_logits
    with pytest.raises(exc, match=match):
        op(**args)


# --------------------------------------------------------------------------------------
# validation and dispatch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(weight=a["weight"][:, :5]), ValueError, r"weight must have shape"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, r"weight dtype must match"),
        (lambda a: a.update(targets=a["targets"][:3]), ValueError, r"targets must have shape"),
        (lambda a: a.update(targets=a["targets"].float()), TypeError, r"targets must be int64"),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, r"hidden must be"),
        (lambda a: a.update(bias=torch.zeros(3)), ValueError, r"bias must have shape \(V,\)"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, r"weight must be on"),
        (lambda a: a.update(softcap=0.0), ValueError, r"softcap must be a positive"),
        (lambda a: a.update(chunk_size=0), ValueError, r"chunk_size must be a positive"),
        (lambda a: a.update(impl="fast"), ValueError, r"impl must be one of"),
        (lambda a: a.update(logit_scale=float("nan")), ValueError, r"logit_scale must be"),
        (lambda a: a["targets"].__setitem__(0, 50), ValueError, r"targets must be in \[0, V=50\)"),
        (lambda a: a["targets"].__setitem__(0, -1), ValueError, r"found -1"),
    ],
)
def test_validation_errors(mutate, exc, match):
    hidden, weight, _, targets = make_inputs(6, 8, 50)
    args = {"hidden": hidden, "weight": weight, "targets": targets}
    mutate(args)
    with pytest.raises(exc, match=match):
        flr_gathered_logprob(**args)


def test_explicit_cuda_impl_without_extension(monkeypatch):
    hidden, weight, _, targets = make_inputs(4, 8, 20)
    why = "impl='cuda' needs flr_engine._C_cuda, which was not built: reinstall with nvcc"
    monkeypatch.setattr(fl, "_cuda_ext", lambda: (None, why))
    with pytest.raises(RuntimeError, match=r"impl='cuda' needs flr_engine._C_cuda"):
        flr_gathered_logprob(hidden, weight, targets, impl="cuda")
    assert fl._resolve_impl("auto", hidden) == "torch"  # quiet fallback


def test_auto_never_picks_the_cuda_extension(monkeypatch):
    """On CUDA, "auto" is Triton (or torch), never the CUDA-core extension, even when it is
    built."""
    from types import SimpleNamespace

    monkeypatch.setattr(fl, "_cuda_ext", lambda: (object(), ""))
    monkeypatch.setattr(fl, "_triton_status", lambda device: "")
    cuda0 = torch.device("cuda", 0)
    bf16 = SimpleNamespace(dtype=torch.bfloat16, device=cuda0)
    fp64 = SimpleNamespace(dtype=torch.float64, device=cuda0)
    assert fl._resolve_impl("auto", bf16) == "triton"
    assert fl._resolve_impl("auto", fp64) == "torch"
    monkeypatch.setattr(fl, "_triton_status", lambda device: "no triton")
    assert fl._resolve_impl("auto", bf16) == "torch"


@needs_triton
def test_auto_triton_failure_falls_back_with_one_warning(monkeypatch, caplog):
    from flr_engine.kernels import fused_logprob as kmod

    calls = []

    def boom(hidden, weight, bias, *args, **kwargs):
        calls.append(bias is not None)
        if bias is not None:
            raise RuntimeError("out of resource: shared memory (planted)")
        return real(hidden, weight, bias, *args, **kwargs)

    real = kmod.fused_logprob_forward
    monkeypatch.setattr(fl, "_triton_auto_failed", {})
    monkeypatch.setattr(kmod, "fused_logprob_forward", boom)
    hidden, weight, bias, targets = make_inputs(9, 16, 100, bias=True)
    ref, ref_lse = gathered_logprob_reference(hidden, weight, targets, bias=bias, return_lse=True)
    with caplog.at_level("WARNING", logger=fl.__name__):
        for _ in range(2):  # the second call does not launch the failing specialisation again
            logp, lse = fl._kernel_forward("auto-triton", hidden, weight, bias, targets, 1.0,
                                           None, -100, 64)  # fmt: skip
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=2e-5)
    key = fl._triton_key(kmod, hidden, weight, bias, None)
    assert key[:2] == ("cpu", torch.float32) and key[3:] == (True, False)
    assert fl._triton_auto_failed == {key: "RuntimeError: out of resource: shared memory (planted)"}
    assert calls == [True] and sum("planted" in r.getMessage() for r in caplog.records) == 1
    # another specialisation (no bias) still runs the kernel
    fl._kernel_forward("auto-triton", hidden, weight, None, targets, 1.0, None, -100, 64)
    assert calls == [True, False]
    with pytest.raises(RuntimeError, match="planted"):  # an explicit impl fails loudly
        fl._kernel_forward("triton", hidden, weight, bias, targets, 1.0, None, -100, 64)


@needs_triton
def test_auto_triton_out_of_memory_is_not_recorded(monkeypatch):
    from flr_engine.kernels import fused_logprob as kmod

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("planted")

    monkeypatch.setattr(fl, "_triton_auto_failed", {})
    monkeypatch.setattr(kmod, "fused_logprob_forward", oom)
    hidden, weight, _, targets = make_inputs(9, 16, 100)
    logp, _ = fl._kernel_forward("auto-triton", hidden, weight, None, targets, 1.0, None, -100, 64)
    torch.testing.assert_close(logp, gathered_logprob_reference(hidden, weight, targets))
    assert fl._triton_auto_failed == {}


def test_interpreter_only_without_a_usable_gpu():
    """conftest.py sets TRITON_INTERPRET=1 exactly when torch sees no CUDA device, so the
    Triton tests run interpreted on CPU machines and compiled on GPU machines."""
    kmod = pytest.importorskip("flr_engine.kernels.fused_logprob")
    if not kmod.HAS_TRITON:
        pytest.skip("triton not installed")
    assert kmod.INTERPRETED == (not torch.cuda.is_available())


def test_cuda_extension_status():
    ext, why = fl._cuda_ext()
    if ext is None:
        assert "flr_engine._C_cuda" in why and "reinstall" in why
    else:
        assert hasattr(ext, "fused_logprob_forward")
        hidden, weight, _, targets = make_inputs(4, 8, 20)
        with pytest.raises(RuntimeError, match=r"impl='cuda' needs CUDA tensors"):
            flr_gathered_logprob(hidden, weight, targets, impl="cuda")


def test_explicit_triton_on_cpu_without_interpreter(monkeypatch):
    kmod = pytest.importorskip("flr_engine.kernels.fused_logprob")
    if not kmod.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setattr(kmod, "INTERPRETED", False)
    hidden, weight, _, targets = make_inputs(4, 16, 20)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        flr_gathered_logprob(hidden, weight, targets, impl="triton")
    with pytest.raises(RuntimeError, match=r"supports fp32/bf16/fp16"):
        fl._resolve_impl("triton", hidden.double())


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_imports_are_lazy():
    res = _run_python(
        "import sys\n"
        "import flr_engine.ops.fused_logprob as m\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert 'flr_engine._C_cuda' not in sys.modules\n"
        "sys.modules['triton'] = None  # make `import triton` fail\n"
        "import flr_engine.kernels.fused_logprob as k\n"
        "assert not k.HAS_TRITON\n"
        "import torch\n"
        "try:\n"
        "    k.fused_logprob_forward(torch.zeros(1, 16), torch.zeros(4, 16), None,\n"
        "                            torch.zeros(1, dtype=torch.long))\n"
        "except ImportError as e:\n"
        "    assert 'pip install' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
        "print(m.flr_gathered_logprob(torch.zeros(2, 4), torch.zeros(3, 4),\n"
        "                             torch.tensor([0, 2])).tolist())\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("[-1.0986")


# --------------------------------------------------------------------------------------
# segment reductions
# --------------------------------------------------------------------------------------


def test_segment_sum_and_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    ids = torch.tensor([0, 0, 2, 2, 2])
    s = segment_sum(values, ids, 4)
    m = segment_mean(values, ids, 4)
    torch.testing.assert_close(s, torch.tensor([3.0, 0.0, 12.0, 0.0]))
    torch.testing.assert_close(m[[0, 2]], torch.tensor([1.5, 4.0]))
    assert torch.isnan(m[1]) and torch.isnan(m[3])  # empty segments: documented NaN
    (g,) = torch.autograd.grad(m[[0, 2]].sum() + s.sum(), values)
    torch.testing.assert_close(g, torch.tensor([1.5, 1.5, 4 / 3, 4 / 3, 4 / 3]))
    # (T, *) values and integer values
    v2 = torch.arange(10.0).reshape(5, 2)
    torch.testing.assert_close(segment_mean(v2, ids, 3)[2], torch.tensor([6.0, 7.0]))
    torch.testing.assert_close(segment_mean(torch.arange(5), ids, 3)[0], torch.tensor(0.5))
    assert segment_sum(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2).tolist() == [0, 0]


def test_segment_validation():
    with pytest.raises(ValueError, match=r"segment_ids must lie in \[0, num_segments=2\)"):
        segment_sum(torch.ones(3), torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(T,\)"):
        segment_sum(torch.ones(3), torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match=r"segment_ids must be int64"):
        segment_mean(torch.ones(3), torch.ones(3), 2)


def test_segment_sum_of_token_logprobs():
    """Per-token log-probs of a packed batch -> per-sequence scores."""
    hidden, weight, _, targets = make_inputs(10, 16, 64, dtype=torch.float64)
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    logp = flr_gathered_logprob(hidden, weight, targets, impl="torch")
    ref = gathered_logprob_reference(hidden, weight, targets)
    expect = torch.stack([ref[:3].sum(), ref[3:5].sum(), ref[5:].sum()])
    torch.testing.assert_close(segment_sum(logp, seq, 3), expect)


# --------------------------------------------------------------------------------------
# CUDA (opt in with -m gpu) and the nvcc compile check
# --------------------------------------------------------------------------------------


def _cuda_ext_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ext, why = fl._cuda_ext()
    if ext is None:
        pytest.skip(why)
    return ext


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,h,v", [(1, 64, 1009), (13, 48, 1009), (300, 576, 49152), (2048, 128, 5000)]
)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_cuda_extension_matches_reference(dtype, n, h, v, opts):
    _cuda_ext_or_skip()
    opts = dict(opts)
    hidden, weight, bias, targets = make_inputs(
        n, h, v, bias=opts.pop("bias", False), n_ignored=n // 5, dtype=dtype, device="cuda"
    )
    got, lse = _run("cuda", hidden, weight, targets, bias, return_lse=True, **opts)
    ref, ref_lse = gathered_logprob_reference(
        hidden, weight, targets, bias=bias, return_lse=True, **opts
    )
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_cuda_extension_strided_hidden_grads_and_auto():
    _cuda_ext_or_skip()
    hidden, weight, bias, targets = make_inputs(33, 64, 3001, bias=True, device="cuda")
    wide = torch.randn(33, 200, device="cuda")
    wide[:, 10:74] = hidden
    strided = wide[:, 10:74]  # (N, H), row stride 200
    assert fl._resolve_impl("auto", strided) == "triton"  # never the CUDA-core extension
    got = _run("cuda", strided, weight, targets, bias, softcap=7.0)
    ref = gathered_logprob_reference(hidden, weight, targets, bias=bias, softcap=7.0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    params = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_params = [x.clone().requires_grad_(True) for x in params]
    out = flr_gathered_logprob(params[0], params[1], targets, bias=params[2], impl="cuda")
    grads = torch.autograd.grad(out.sum(), params)
    ref_out = gathered_logprob_reference(ref_params[0], ref_params[1], targets, bias=ref_params[2])
    ref_grads = torch.autograd.grad(ref_out.sum(), ref_params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda", "auto"])
def test_gpu_rows_match_naive_reference(impl):
    """Shared rows on CUDA: the kernels compute lse per row (all-ignored targets), the target
    logits are row-wise dots; values and gradients against full logits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if impl == "cuda":
        _cuda_ext_or_skip()
    hidden, weight, bias, targets, rows = make_row_inputs(37, 200, 64, 3001, bias=True)
    params = [x.cuda().requires_grad_(True) for x in (hidden, weight, bias)]
    lp, lse = flr_gathered_logprob(params[0], params[1], targets.cuda(), bias=params[2],
                                   softcap=7.0, impl=impl, return_lse=True, rows=rows.cuda())  # fmt: skip
    want, want_lse, _ = _naive_rows(hidden, weight, targets, rows, bias, softcap=7.0)
    torch.testing.assert_close(lp.cpu().double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(lp.sum() + lse.sum(), params)
    ref_params = [x.double().requires_grad_(True) for x in (hidden, weight, bias)]
    want, want_lse, _ = _naive_rows(*ref_params[:2], targets, rows, ref_params[2], softcap=7.0)
    ref_grads = torch.autograd.grad(want.sum() + want_lse.sum(), ref_params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    if not torch.cuda.is_available() or not _has_triton():
        pytest.skip("needs CUDA and triton")
    hidden, weight, bias, targets = make_inputs(
        300, 576, 49152, bias=True, n_ignored=7, dtype=dtype, device="cuda"
    )
    got = _run("triton", hidden, weight, targets, bias, softcap=30.0)
    ref = gathered_logprob_reference(hidden, weight, targets, bias=bias, softcap=30.0)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "sliced-hidden", "transposed-weight"])
def test_triton_on_gpu_odd_shapes_noncontiguous_and_grads(dtype, layout):
    """Compiled kernel with its default (large) tiles at prime N and H and a vocabulary that
    is no multiple of any block (partial row, K and vocabulary tiles, several splits), on
    strided inputs; the backward (chunked torch, from the kernel's lse) too."""
    if not torch.cuda.is_available() or not _has_triton():
        pytest.skip("needs CUDA and triton")
    n, h, v = 1237, 1031, 50021  # primes
    hidden, weight, bias, targets = make_inputs(
        n, h, v, bias=True, n_ignored=11, dtype=dtype, device="cuda", seed=5
    )
    if layout == "sliced-hidden":
        wide = torch.zeros(n, 2 * h + 3, dtype=dtype, device="cuda")
        wide[:, 3::2] = hidden
        hidden = wide[:, 3::2]  # strides (2H + 3, 2)
    elif layout == "transposed-weight":
        weight = weight.T.contiguous().T  # strides (1, V)
    ref, ref_lse = gathered_logprob_reference(
        hidden, weight, targets, bias=bias, softcap=30.0, return_lse=True
    )
    got, lse = _run("triton", hidden, weight, targets, bias, softcap=30.0, return_lse=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    if dtype != torch.float32:
        return
    params = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_params = [x.clone().requires_grad_(True) for x in params]
    out = _run("triton", params[0], params[1], targets, params[2], softcap=30.0)
    grads = torch.autograd.grad(out.sum(), params)
    ref_out = gathered_logprob_reference(
        ref_params[0], ref_params[1], targets, bias=ref_params[2], softcap=30.0
    )
    for g, r in zip(grads, torch.autograd.grad(ref_out.sum(), ref_params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_launches_on_the_tensors_device():
    hidden, weight, bias, targets = make_inputs(67, 96, 3001, bias=True, device="cuda:1")
    with torch.cuda.device(0):
        got = _run("triton", hidden, weight, targets, bias)
    ref = gathered_logprob_reference(hidden, weight, targets, bias=bias)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_compile_cuda_script():
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "compile_cuda.sh")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok    sm_80  csrc/cuda/fused_logprob.cu" in res.stdout
    assert "ok    sm_90  csrc/cuda/fused_logprob.cu" in res.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_build_flags_keep_the_softcap_tanh_accurate(tmp_path):
    """setup.py and compile_cuda.sh share csrc/cuda/nvcc.flags; with them the CUDA softcap's
    tanhf is the accurate one (no ``tanh.approx`` in the PTX), unlike --use_fast_math."""
    flags = (ROOT / "csrc" / "cuda" / "nvcc.flags").read_text().split()
    assert "--use_fast_math" not in flags

    def ptx(extra):
        out = tmp_path / "k.ptx"
        cmd = ["nvcc", "-ptx", *flags, *extra, "-arch=sm_90", f"-I{ROOT / 'csrc' / 'cuda'}",
               "-o", str(out), str(ROOT / "csrc" / "cuda" / "fused_logprob.cu")]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        return out.read_text()

    assert "tanh.approx" not in ptx([])
    assert "tanh.approx" in ptx(["--use_fast_math"])  # the check can see the difference


def test_compile_cuda_script_without_nvcc(tmp_path):
    env = {"PATH": str(tmp_path), "NVCC": "definitely-not-nvcc"}
    res = subprocess.run(
        ["/bin/bash", str(ROOT / "scripts" / "compile_cuda.sh")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0
    assert "nvcc not found, skipping CUDA compile check" in res.stdout
