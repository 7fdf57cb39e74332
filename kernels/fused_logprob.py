"""Triton forward kernel for the fused gathered log-prob (``flr_engine.kernels.fused_logprob``).

For rows ``n`` of ``hidden`` (N, H), an LM head ``weight`` (V, H) and an optional ``bias`` (V,)::

    z[n, v]  = (hidden[n] . weight[v] + bias[v]) * logit_scale
    z[n, v]  = softcap * tanh(z[n, v] / softcap)                 # only when softcap is given
    lse[n]   = logsumexp_v z[n, v]
    logp[n]  = z[n, targets[n]] - lse[n]     (0 where targets[n] == ignore_index)

One program handles ``BLOCK_N`` rows and walks one vocabulary split in ``BLOCK_V`` tiles; each
tile's logits (BLOCK_N, BLOCK_V) come from ``tl.dot`` over ``BLOCK_H`` slices of the hidden size
and are folded into an online (running max, running sum) log-sum-exp, while the target logit is
picked out of the tile that holds it. The (N, V) logits never exist in memory.

Compiled tiles (:func:`launch_config`): 128 x 128 x 64 with 8 warps (two Hopper warpgroups)
and 4 stages where the device has >= ~144 KB of shared memory per block (A100 / H100 / H200;
128 KB of bf16 operand buffers), smaller elsewhere. The hidden block is re-read per vocabulary
tile (from L2), so the arithmetic intensity against L2 is ``BLOCK_N * BLOCK_V / (BLOCK_N +
BLOCK_V)`` flop/byte: 64 at 128 x 128 vs 43 at the old 64 x 128 (85 at 128 x 256, whose
128-register fp32 accumulator per thread risks spills in the softmax epilogue; the GPU check
sweeps both). Programs are ordered in groups of ``GROUP_N`` row blocks
(all splits of a group before the next group), so the hidden rows in flight stay L2-resident.

With shared rows (``flr_gathered_logprob(..., rows=)``) the op launches the kernel with every
target = ``ignore_index``: only ``lse`` per row is used, the target logits are row-wise dots.

The kernel runs on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). Importing this module never
fails for want of triton; :func:`fused_logprob_forward` raises a clear ImportError instead.
The backward pass lives in :mod:`flr_engine.ops.fused_logprob` (chunked torch matmuls).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR  # guarded: may be None
from ._triton import smem_budget, tl, triton  # noqa: F401 (smem_budget re-exported)

__all__ = ["HAS_TRITON", "INTERPRETED", "fused_logprob_forward"]

HAS_TRITON = triton is not None
# Triton decides at decoration time whether @triton.jit functions are interpreted; refined
# below from the decorated kernel itself.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # tanh from exp, stable for any |x| (exp of a non-positive number never overflows);
        # works the same compiled and under the interpreter.
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _fused_logprob_fwd_kernel(
        h_ptr,  # (N, H) any strides
        w_ptr,  # (V, H) any strides
        b_ptr,  # (V,) fp32 or a dummy when HAS_BIAS is False
        t_ptr,  # (N,) int64
        m_ptr,  # (S, N) fp32 out: per-split max of the logits
        s_ptr,  # (S, N) fp32 out: per-split sum of exp(z - max)
        zt_ptr,  # (S, N) fp32 out: target logit if it lies in the split, else 0
        N,
        H,
        V,
        split_size,  # vocabulary entries per split, a multiple of BLOCK_V
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        logit_scale,
        softcap,
        ignore_index,
        row_blocks,
        num_splits,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        GROUP_N: tl.constexpr,
    ):
        # grouped order over (row block, split): GROUP_N row blocks x all splits, then the next
        # GROUP_N row blocks; the hidden rows a wave of programs touches stay in L2
        p = tl.program_id(0)
        per_group = GROUP_N * num_splits
        first = (p // per_group) * GROUP_N
        size = tl.minimum(row_blocks - first, GROUP_N)
        pid = first + (p % per_group) % size
        split = (p % per_group) // size
        v_begin = split * split_size
        v_end = tl.minimum(v_begin + split_size, V)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)  # 64-bit offsets: N * H or V * H may pass 2**31
        tgt = tl.load(t_ptr + rows64, mask=row_ok, other=ignore_index)  # (BLOCK_N,) int64

        m_run = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max
        s_run = tl.zeros([BLOCK_N], tl.float32)  # running sum of exp(z - m_run)
        z_tgt = tl.zeros([BLOCK_N], tl.float32)  # target logit, once its tile passes
        offs_v = tl.arange(0, BLOCK_V)
        offs_h = tl.arange(0, BLOCK_H)

        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + offs_v  # (BLOCK_V,)
            col_ok = cols < v_end
            cols64 = cols.to(tl.int64)
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for h0 in range(0, H, BLOCK_H):
                ks = h0 + offs_h
                k_ok = ks < H
                ks64 = ks.to(tl.int64)
                a = tl.load(  # (BLOCK_N, BLOCK_H)
                    h_ptr + rows64[:, None] * stride_hn + ks64[None, :] * stride_hh,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                b = tl.load(  # (BLOCK_H, BLOCK_V): the weight tile, transposed by indexing
                    w_ptr + cols64[None, :] * stride_wv + ks64[:, None] * stride_wh,
                    mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if UPCAST:  # interpreter: its bf16 tl.dot multiplies the raw uint16 storage
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                bias = tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)
                acc = acc + bias[None, :]
            acc = acc * logit_scale
            if HAS_SOFTCAP:
                acc = softcap * _tanh(acc / softcap)
            acc = tl.where(col_ok[None, :], acc, float("-inf"))

            # online log-sum-exp; the first tile always has a valid column, so m_new is finite
            m_new = tl.maximum(m_run, tl.max(acc, axis=1))
            s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
            m_run = m_new
            hit = cols64[None, :] == tgt[:, None]  # (BLOCK_N, BLOCK_V): at most one per row
            z_tgt += tl.sum(tl.where(hit, acc, 0.0), axis=1)

        out = split.to(tl.int64) * N + rows64  # (BLOCK_N,) offsets into the (S, N) partials
        tl.store(m_ptr + out, m_run, mask=row_ok)
        tl.store(s_ptr + out, s_run, mask=row_ok)
        tl.store(zt_ptr + out, z_tgt, mask=row_ok)

    INTERPRETED = type(_fused_logprob_fwd_kernel).__name__ == "InterpretedFunction"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def operand_smem(block_n: int, block_v: int, block_h: int, stages: int, elem_bytes: int) -> int:
    """Bytes of the pipelined operand buffers: ``stages * (BN * BH + BH * BV) * elem``."""
    return stages * (block_n * block_h + block_h * block_v) * elem_bytes


def launch_config(
    n: int, h: int, v: int, dtype: torch.dtype, smem: int, interpreted: bool = False
) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) for (N, H) rows, V entries, ``dtype``.

    The first candidate whose operand buffers (plus a 10% margin for the epilogue's layout
    conversions) fit ``smem`` wins. tl.dot needs every block dim >= 16; small N shrinks
    BLOCK_N to the next power of two (the vocabulary splits keep the GPU busy then).
    """
    if interpreted:  # numpy per program: few, wide tiles keep the Python loop short
        return 16, min(256, max(16, _next_pow2(v))), min(128, max(16, _next_pow2(h))), 4, 1
    elem = 4 if dtype == torch.float32 else 2
    if elem == 4:  # fp32: IEEE dots run on FMA units; 128x128 spills registers on sm_90
        cands = [(64, 64, 32, 4, 2), (32, 64, 16, 4, 2)]
    else:
        cands = [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
                 (64, 64, 32, 4, 2)]  # fmt: skip
    bn, bv, bh, nw, ns = cands[-1]
    for c in cands:
        if operand_smem(c[0], c[1], c[2], c[4], elem) * 11 // 10 <= smem:
            bn, bv, bh, nw, ns = c
            break
    if n < bn:  # few rows: a smaller row tile, 4 warps
        bn = max(16, _next_pow2(n))
        nw = 4 if bn < 128 else nw
    return bn, bv, bh, nw, ns


def _default_splits(
    row_blocks: int, v: int, block_v: int, device: torch.device, per_sm: int
) -> int:
    """Vocabulary splits S that make ``row_blocks * S`` programs fill whole waves of
    ``SMs * per_sm`` (the last wave of a 2.4-wave grid idles 60% of the GPU), keeping >= 4
    tiles per split; 1 on the interpreter. Ties go to fewer splits (less merging)."""
    if device.type != "cuda":
        return 1
    slots = torch.cuda.get_device_properties(device).multi_processor_count * max(1, per_sm)
    most = max(1, min(v // (4 * block_v), 4 * slots))
    best, best_eff = 1, -1.0
    for s in range(1, most + 1):
        progs = row_blocks * s
        waves = -(-progs // slots)
        eff = progs / (waves * slots)
        if eff > best_eff + 0.02:  # a split more must buy > 2% of the GPU
            best, best_eff = s, eff
        if progs >= 4 * slots:
            break
    return best


def fused_logprob_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
    group_n: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton forward: returns ``(logp, lse)``, both (N,) fp32.

    ``hidden`` (N, H) and ``weight`` (V, H) share one dtype (fp32, bf16 or fp16) and may have
    any strides; ``bias`` is (V,) or None; ``targets`` is (N,) int64. The grid is the
    (row blocks x vocabulary splits) programs in grouped order; each program writes a partial (max, sum, target logit)
    and a few (S, N) torch ops merge the splits. Inputs are trusted (the public op
    :func:`flr_engine.ops.fused_logprob.flr_gathered_logprob` validates them); a target
    outside ``[0, V)`` that is not ``ignore_index`` yields ``-lse`` silently.
    fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
    Tiles default to :func:`launch_config` for the device; the keyword arguments override
    them (benchmarks sweep them).
    """
    if not HAS_TRITON:
        raise ImportError(
            "flr_engine.kernels.fused_logprob needs triton (pip install 'triton>=3.0'); "
            f"importing it failed: {_TRITON_IMPORT_ERROR}"
        )
    if hidden.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton fused log-prob kernel got CPU tensors but Triton is not in interpreter "
            "mode: move the tensors to CUDA, or set TRITON_INTERPRET=1 before triton is imported"
        )
    if hidden.dtype not in _SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            f"Triton fused log-prob supports fp32/bf16/fp16 hidden and weight of one dtype, "
            f"got hidden {hidden.dtype} and weight {weight.dtype}"
        )
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty.clone()
    targets = targets.to(torch.int64).contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    smem = smem_budget(device)
    bn, bv, bh, nw, ns = launch_config(n, h, v, hidden.dtype, smem, INTERPRETED)
    bn, bv, bh = block_n or bn, block_v or bv, block_h or bh
    nw, ns = num_warps or nw, num_stages or ns
    if min(bn, bv, bh) < 16:
        raise ValueError(f"block sizes must be >= 16 for tl.dot, got {(bn, bv, bh)}")
    row_blocks = triton.cdiv(n, bn)
    elem = hidden.element_size()
    per_sm = max(1, smem // max(1, operand_smem(bn, bv, bh, ns, elem) * 11 // 10))
    splits = num_splits or _default_splits(row_blocks, v, bv, device, min(per_sm, 2))
    split_size = triton.cdiv(triton.cdiv(v, splits), bv) * bv  # whole tiles per split
    splits = triton.cdiv(v, split_size)  # no empty split
    # fp32: IEEE dots unless torch allows TF32; half dtypes: Triton's default (the setting
    # only affects fp32 operands)
    precision = "tf32"
    if hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    part = torch.empty(3, splits, n, dtype=torch.float32, device=device)  # (3, S, N)
    launch = {} if INTERPRETED else {"num_warps": nw, "num_stages": ns}
    on_gpu = device.type == "cuda"  # launch on the tensors' GPU, not the current one
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
        _fused_logprob_fwd_kernel[(row_blocks * splits,)](
            hidden,
            weight,
            bias if bias is not None else part,  # dummy pointer, never read
            targets,
            part[0],
            part[1],
            part[2],
            n,
            h,
            v,
            split_size,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            float(logit_scale),
            float(softcap) if softcap is not None else 1.0,
            int(ignore_index),
            row_blocks,
            splits,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            BLOCK_N=bn,
            BLOCK_V=bv,
            BLOCK_H=bh,
            INPUT_PRECISION=precision,
            UPCAST=INTERPRETED and hidden.dtype == torch.bfloat16,
            GROUP_N=max(1, int(group_n)),
            **launch,
        )
    m_part, s_part, zt_part = part.unbind(0)  # (S, N) each
    m = m_part.amax(dim=0)  # (N,)
    lse = m + torch.log((s_part * torch.exp(m_part - m)).sum(dim=0))  # (N,)
    z_tgt = zt_part.sum(dim=0)  # the split holding the target contributes, the others add 0
    logp = torch.where(targets == ignore_index, torch.zeros_like(lse), z_tgt - lse)
    return logp, lse
