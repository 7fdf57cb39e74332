"""Triton forward kernel for tree (prefix-trie) attention, and its launcher.

All sequences of a pack live in one token trie laid out in DFS pre-order (length ``T``).
Key ``j`` is visible to query ``i`` iff ``j <= i < subtree_end[j]`` (optionally also
``positions[i] - positions[j] < sliding_window``). For query head ``h`` (kv head
``h // (Hq // Hkv)``)::

    s_ij   = scale * <q_i, k_j>                      (then softcap * tanh(s_ij / softcap))
    out_i  = sum_j softmax_j(s_ij | visible) v_j      lse_i = log sum_{j visible} exp(s_ij)

One program per (query block of ``BLOCK_M`` packed tokens, query head). It walks only the
key blocks listed for its query block by a :class:`~flr_engine.ops.tree_attention.TreeAttentionPlan`
(CSR: ``kv_block_ptr``, ``kv_block_idx``), FULL blocks first (no mask work at all: e.g. a
shared conversation prefix, whose K/V is read in place once per query block serving many
children) then PARTIAL ones (mask computed from ``subtree_end`` / ``positions``). Softmax
is online (running max and sum, base-2 exponentials), accumulation is fp32.

Triton is imported when this module is imported, guarded: without triton the module still
imports and :func:`tree_attention_fwd` raises an ImportError saying what to install. On CPU
tensors the kernel runs through the Triton interpreter, which needs ``TRITON_INTERPRET=1``
set *before* triton is first imported.
"""

from __future__ import annotations

import contextlib

import torch

from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR  # guarded: may be None
from ._triton import smem_budget, tl, triton  # noqa: F401 (smem_budget re-exported)

__all__ = [
    "launch_config",
    "smem_bytes",
    "tree_attention_fwd",
    "triton_available",
    "triton_interpreting",
]


def triton_available() -> bool:
    """True when triton imported (the kernel can be launched on CUDA tensors)."""
    return triton is not None


def triton_interpreting() -> bool:
    """True when the kernel was built by the Triton interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    return type(_tree_attn_fwd_kernel).__name__ == "InterpretedFunction"


if triton is not None:

    @triton.jit
    def _attend_block(
        acc,
        m_i,
        l_i,
        q,
        offs_m,
        pos_q,
        kb,
        K_head,
        V_head,
        SubEnd,
        Pos,
        qk_scale,
        softcap,
        window,
        T,
        D,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PARTIAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """One key block: acc (M, Dp), m_i / l_i (M,) in the base-2 logit domain."""
        ar_n = tl.arange(0, BLOCK_N)
        offs_n = kb * BLOCK_N + ar_n
        n0 = (kb * BLOCK_N).to(tl.int64)  # 64-bit block base: T * H * D may exceed 2**31
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if PARTIAL:
            n_ok = offs_n < T
        else:  # FULL blocks lie entirely inside [0, T)
            n_ok = offs_n >= 0
        # K^T tile (Dp, N) and V tile (N, Dp), read in place through strides
        kt = tl.load(
            K_head + n0 * stride_kt + ar_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        vt = tl.load(
            V_head + n0 * stride_vt + ar_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)  # (M, N) fp32
        if HAS_SOFTCAP:
            x = qk * (qk_scale / softcap)
            e = tl.exp(-2.0 * tl.abs(x))
            th = (1.0 - e) / (1.0 + e)
            th = tl.where(x < 0, -th, th)
            qk = th * (softcap * 1.4426950408889634)
        else:
            qk = qk * (qk_scale * 1.4426950408889634)
        if PARTIAL:
            se_k = tl.load(SubEnd + offs_n, mask=n_ok, other=0)
            vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < se_k[None, :])
            if HAS_WINDOW:
                pos_k = tl.load(Pos + offs_n, mask=n_ok, other=0)
                vis = vis & ((pos_q[:, None] - pos_k[None, :]) < window)
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: m_i starts at -1e30
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        return acc, m_new, l_i

    @triton.jit
    def _tree_attn_fwd_kernel(
        Q,
        K,
        V,
        Out,
        Lse,
        SubEnd,
        Pos,
        BlkPtr,
        BlkFullEnd,
        BlkIdx,
        qk_scale,
        softcap,
        window,
        T,
        D,
        GROUP,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vh,
        stride_vt,
        stride_vd,
        stride_ot,
        stride_oh,
        stride_od,
        stride_lt,
        stride_lh,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        WRITE_LSE: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        qb = tl.program_id(0)
        h = tl.program_id(1)
        hk = h // GROUP
        ar_m = tl.arange(0, BLOCK_M)
        offs_m = qb * BLOCK_M + ar_m
        m0 = (qb * BLOCK_M).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < T
        d_ok = offs_d < D

        Q_head = Q + h.to(tl.int64) * stride_qh
        K_head = K + hk.to(tl.int64) * stride_kh
        V_head = V + hk.to(tl.int64) * stride_vh
        q = tl.load(
            Q_head + m0 * stride_qt + ar_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        pos_q = tl.load(Pos + offs_m, mask=m_ok, other=0)

        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

        e_start = tl.load(BlkPtr + qb)
        e_mid = tl.load(BlkFullEnd + qb)
        e_end = tl.load(BlkPtr + qb + 1)
        # the key-block index is read one iteration ahead, so the K / V addresses of the next
        # block are known when an iteration starts and the pipeliner can prefetch them
        kb = tl.load(BlkIdx + e_start, mask=e_start < e_end, other=0)
        for e in range(e_start, e_mid):  # FULL key blocks: no mask
            kb_next = tl.load(BlkIdx + e + 1, mask=e + 1 < e_end, other=0)
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, offs_m, pos_q, kb, K_head, V_head, SubEnd, Pos,
                qk_scale, softcap, window, T, D, stride_kt, stride_kd, stride_vt, stride_vd,
                BLOCK_N, BLOCK_D, False, HAS_WINDOW, HAS_SOFTCAP, UPCAST, DOT_PREC,
            )  # fmt: skip
            kb = kb_next
        for e in range(e_mid, e_end):  # PARTIAL key blocks: tree / window mask
            kb_next = tl.load(BlkIdx + e + 1, mask=e + 1 < e_end, other=0)
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, offs_m, pos_q, kb, K_head, V_head, SubEnd, Pos,
                qk_scale, softcap, window, T, D, stride_kt, stride_kd, stride_vt, stride_vd,
                BLOCK_N, BLOCK_D, True, HAS_WINDOW, HAS_SOFTCAP, UPCAST, DOT_PREC,
            )  # fmt: skip
            kb = kb_next

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # padded rows (i >= T) only
        out = acc / l_safe[:, None]
        tl.store(
            Out
            + m0 * stride_ot
            + h * stride_oh
            + ar_m[:, None] * stride_ot
            + offs_d[None, :] * stride_od,
            out.to(Out.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )
        if WRITE_LSE:
            lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
            tl.store(Lse + offs_m * stride_lt + h * stride_lh, lse, mask=m_ok)
else:  # pragma: no cover
    _tree_attn_fwd_kernel = None


def smem_bytes(block_m: int, block_n: int, head_dim: int, elem_bytes: int, stages: int) -> int:
    """Shared memory of one program, estimated (bytes)::

        (BLOCK_M * Dp + stages * 2 * BLOCK_N * Dp + BLOCK_M * BLOCK_N) * elem_bytes

    the Q tile, the pipelined K and V tiles and the P tile on its way to the second dot;
    ``Dp = pow2(D)``. fp32 tiles count 4 bytes (IEEE / TF32 dots read fp32 operands).
    """
    dp = max(16, 1 << (head_dim - 1).bit_length())
    return (block_m * dp + stages * 2 * block_n * dp + block_m * block_n) * elem_bytes


def launch_config(
    block_m: int, block_n: int, head_dim: int, elem_bytes: int, smem: int
) -> tuple[int, int]:
    """(num_warps, num_stages) for a tile.

    Warps, from sm_90 compiles of this kernel (``triton.compile`` for ``GPUTarget("cuda",
    90, 32)``, ptxas resource usage, unit inner strides as the JIT specialises them):
    16-bit tiles with 128 rows, or 64 rows and D > 64, take 8 warps (bf16 D=128: 128x64 ->
    181 registers, 64x64 -> 178, no spills; 64x64 at 4 warps spills), smaller ones 4; fp32
    (IEEE dots on FMA units) 4. Stages: 3 where the estimated shared memory fits ``smem`` with a 10%
    margin, else 2, else 1.
    """
    dp = max(16, 1 << (head_dim - 1).bit_length())
    wide = block_m >= 128 or (block_m >= 64 and dp > 64)
    warps = 8 if elem_bytes == 2 and wide else 4
    for stages in (3, 2):
        if smem_bytes(block_m, block_n, head_dim, elem_bytes, stages) * 11 // 10 <= smem:
            return warps, stages
    return warps, 1


def _require_triton() -> None:
    if triton is None:
        raise ImportError(
            "flr_engine.kernels.tree_attention needs triton (pip install 'triton>=3.0'; "
            f"import failed: {_TRITON_IMPORT_ERROR})"
        )


def tree_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    positions: torch.Tensor,
    kv_block_ptr: torch.Tensor,
    kv_block_full_end: torch.Tensor,
    kv_block_idx: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel; inputs are assumed validated by ``flr_tree_attention``.

    q (Hq, T, D), k / v (Hkv, T, D) any strides, same dtype (fp32 / bf16 / fp16);
    subtree_end / positions (T,) int32; the plan's CSR arrays int32 on the same device:
    ``kv_block_ptr`` (nqb + 1,), ``kv_block_full_end`` (nqb,), ``kv_block_idx`` (nnz,) with
    each query block's FULL entries in ``[ptr[qb], full_end[qb])`` and PARTIAL ones in
    ``[full_end[qb], ptr[qb + 1])``. ``block_m`` / ``block_n`` powers of two >= 16.

    Returns ``(out, lse)``: out (T, Hq, D) in q's dtype, lse (T, Hq) fp32 natural-log
    log-sum-exp of the (scaled, soft-capped) logits, or None unless ``return_lse``.
    """
    _require_triton()
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError(
            "the Triton tree-attention kernel got CPU tensors but Triton is not in interpreter "
            "mode: set TRITON_INTERPRET=1 before triton is first imported, or use CUDA tensors"
        )
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {b}")
    block_d = max(16, 1 << (D - 1).bit_length())
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)  # (T, Hq, D)
    lse = (
        torch.empty((T, Hq), dtype=torch.float32, device=q.device) if return_lse else out
    )  # (T, Hq); a dummy pointer when not written
    nqb = kv_block_ptr.numel() - 1
    interp = triton_interpreting()
    # numpy has no bf16 matmul: the interpreter upcasts tiles to fp32 before tl.dot
    upcast = interp and q.dtype != torch.float32
    dot_prec = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    kwargs = {}
    if not interp:
        elem = 4 if q.dtype == torch.float32 else 2
        warps, stages = launch_config(block_m, block_n, D, elem, smem_budget(q.device))
        kwargs["num_warps"] = num_warps or warps
        kwargs["num_stages"] = num_stages or stages
    on_gpu = q.device.type == "cuda"  # launch on q's GPU, not the current one
    with torch.cuda.device(q.device) if on_gpu else contextlib.nullcontext():
        _tree_attn_fwd_kernel[(nqb, Hq)](
            q, k, v, out, lse, subtree_end, positions,
            kv_block_ptr, kv_block_full_end, kv_block_idx,
            float(scale),
            float(softcap) if softcap else 1.0,
            int(sliding_window) if sliding_window else 0,
            T, D, Hq // Hkv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            HAS_WINDOW=bool(sliding_window),
            HAS_SOFTCAP=bool(softcap),
            WRITE_LSE=return_lse,
            UPCAST=upcast,
            DOT_PREC=dot_prec,
            **kwargs,
        )  # fmt: skip
    return out, (lse if return_lse else None)
