"""Tree (prefix-trie) attention over a packed DFS pre-order token trie.

A pack holds every scored sequence in one trie laid out in pre-order (length ``T``). Token
``i`` has ``positions[i]`` (its depth) and ``subtree_end[i]`` (one past the last packed index
of its subtree), so key ``j`` is visible to query ``i`` iff::

    j <= i < subtree_end[j]              (j is i or an ancestor of i)
    and positions[i] - positions[j] < sliding_window      (sliding-window layers only)

For query head ``h`` (kv head ``h // (Hq // Hkv)``)::

    s_ij = scale * <q_hi, k_j>;   s_ij = softcap * tanh(s_ij / softcap)   (if softcap)
    out_ih = sum_{j visible} exp(s_ij - lse_ih) v_j,   lse_ih = log sum_{j visible} exp(s_ij)

Implementations (``impl=``): ``"triton"`` (block-sparse flash kernel, kernels/tree_attention.py),
``"torch"`` (block-sparse batched matmuls on the plan's key blocks: cost ~ visited blocks,
never a T x T mask), ``"dense"`` (full T x T mask + SDPA, small T only) and ``"auto"``.
This module never imports triton at import time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "TreeAttentionPlan",
    "flr_tree_attention",
    "suggested_block_sizes",
    "tree_attention_reference",
    "tree_attention_mask",
]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IMPLS = ("auto", "triton", "torch", "dense")
_PLAN_CELLS_PER_CHUNK = 1 << 24  # query-block x key-block cells per vectorised plan step
_TORCH_SCORE_BUDGET = 1 << 20  # fp32 score elements per torch-path chunk (4 MiB, cache-sized)
# impl="auto" falls back to torch per failing launch configuration, not for the process:
# key (device, dtype, head dim, block_m, block_n, window?, softcap?) -> cause (logged once).
# Process-wide on purpose: a failure to compile / launch a specialisation (shared memory or
# registers over the device's limit) is a property of the device and that specialisation,
# not of the call; retrying per call would recompile and warn every time (as
# ops/fused_logprob.py's record).
_triton_auto_failed: dict[tuple, str] = {}
_triton_import_error: str | None = None  # triton not importable: logged once


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- plan


@dataclass(eq=False)
class TreeAttentionPlan:
    """Block-sparse visit list for one pack, shared by every layer (of one window setting).

    Query block ``qb`` covers packed tokens ``[qb * block_m, (qb + 1) * block_m)``, key block
    ``kb`` covers ``[kb * block_n, (kb + 1) * block_n)``. Its key blocks are
    ``kv_block_idx[kv_block_ptr[qb]:kv_block_ptr[qb + 1]]`` (CSR), FULL ones first (every key
    visible to every query: no mask needed) up to ``kv_block_full_end[qb]``, then PARTIAL
    ones (mask computed). ``kv_block_full`` flags each entry. Block sizes must be powers of
    two >= 16 for the Triton kernel; the torch path takes any size.

    Shapes: kv_block_ptr (nqb + 1,) int32, kv_block_full_end (nqb,) int32,
    kv_block_idx (nnz,) int32, kv_block_full (nnz,) bool; all on one device.
    """

    T: int
    block_m: int
    block_n: int
    sliding_window: int | None
    kv_block_ptr: torch.Tensor
    kv_block_full_end: torch.Tensor
    kv_block_idx: torch.Tensor
    kv_block_full: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.T, self.block_m)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.T, self.block_n)

    @property
    def num_entries(self) -> int:
        """Visited (query block, key block) pairs."""
        return int(self.kv_block_idx.numel())

    @property
    def num_full(self) -> int:
        return int(self.kv_block_full.sum().item())

    @property
    def dense_entries(self) -> int:
        """Pairs a dense (unmasked-grid) kernel would visit: nqb * nkb."""
        return self.num_q_blocks * self.num_kv_blocks

    @property
    def device(self) -> torch.device:
        return self.kv_block_idx.device

    def to(self, device: torch.device | str) -> TreeAttentionPlan:
        """The same plan on ``device`` (cached: repeated calls per layer copy once)."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = ("to", str(device))
        if key not in self._cache:
            self._cache[key] = TreeAttentionPlan(
                self.T,
                self.block_m,
                self.block_n,
                self.sliding_window,
                self.kv_block_ptr.to(device),
                self.kv_block_full_end.to(device),
                self.kv_block_idx.to(device),
                self.kv_block_full.to(device),
            )
        return self._cache[key]

    @classmethod
    def build(
        cls,
        subtree_end: torch.Tensor,
        positions: torch.Tensor,
        *,
        block_m: int = 64,
        block_n: int = 64,
        sliding_window: int | None = None,
        validate: bool = True,
    ) -> TreeAttentionPlan:
        """Visit list from ``subtree_end`` / ``positions`` (T,), vectorised over blocks.

        Key block kb is visited by query block qb iff (block bounds, conservative; the
        in-kernel mask is exact)::

            kb_first <= qb_last  and  max(subtree_end[kb]) > qb_first
            [and min(positions[qb]) - max(positions[kb]) < sliding_window]

        and it is FULL iff ``kb_last < qb_first and min(subtree_end[kb]) > qb_last``
        [and ``max(positions[qb]) - min(positions[kb]) < sliding_window``].
        """
        _check_index_tensor("subtree_end", subtree_end, None, None)
        T = subtree_end.numel()
        _check_index_tensor("positions", positions, T, subtree_end.device)
        for name, b in (("block_m", block_m), ("block_n", block_n)):
            if not isinstance(b, int) or b < 1:
                raise ValueError(f"{name} must be a positive int, got {b!r}")
        _check_window(sliding_window)
        dev = subtree_end.device
        se = subtree_end.to(torch.int64)
        pos = positions.to(torch.int64)
        if validate and T > 0:
            ar = torch.arange(T, device=dev)
            bad = (se <= ar) | (se > T)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"subtree_end must satisfy i < subtree_end[i] <= T={T}; "
                    f"subtree_end[{i}] = {int(se[i])}"
                )
        nqb, nkb = _cdiv(T, block_m), _cdiv(T, block_n)
        big = torch.iinfo(torch.int64).max // 4

        def block_reduce(x: torch.Tensor, b: int, n: int, fill: int, op: str) -> torch.Tensor:
            xp = F.pad(x, (0, n * b - T), value=fill).view(n, b)
            return xp.amax(1) if op == "max" else xp.amin(1)

        se_max_k = block_reduce(se, block_n, nkb, 0, "max")  # (nkb,)
        se_min_k = block_reduce(se, block_n, nkb, big, "min")
        kb_first = torch.arange(nkb, device=dev) * block_n
        kb_last = (kb_first + block_n).clamp(max=T) - 1
        qb_first_all = torch.arange(nqb, device=dev) * block_m
        qb_last_all = (qb_first_all + block_m).clamp(max=T) - 1
        if sliding_window is not None:
            pos_max_k = block_reduce(pos, block_n, nkb, -big, "max")
            pos_min_k = block_reduce(pos, block_n, nkb, big, "min")
            pos_min_q_all = block_reduce(pos, block_m, nqb, big, "min")
            pos_max_q_all = block_reduce(pos, block_m, nqb, -big, "max")

        rows_l, cols_l, full_l = [], [], []
        step = max(1, _PLAN_CELLS_PER_CHUNK // max(nkb, 1))
        for r0 in range(0, nqb, step):  # loop over row chunks only (cheap)
            r1 = min(nqb, r0 + step)
            qf = qb_first_all[r0:r1, None]
            ql = qb_last_all[r0:r1, None]
            need = (kb_first[None, :] <= ql) & (se_max_k[None, :] > qf)  # (R, nkb)
            full = (kb_last[None, :] < qf) & (se_min_k[None, :] > ql)
            if sliding_window is not None:
                need &= (pos_min_q_all[r0:r1, None] - pos_max_k[None, :]) < sliding_window
                full &= (pos_max_q_all[r0:r1, None] - pos_min_k[None, :]) < sliding_window
            full &= need
            r, c = need.nonzero(as_tuple=True)
            rows_l.append(r + r0)
            cols_l.append(c)
            full_l.append(full[r, c])
        rows = torch.cat(rows_l) if rows_l else torch.zeros(0, dtype=torch.int64, device=dev)
        cols = torch.cat(cols_l) if cols_l else torch.zeros(0, dtype=torch.int64, device=dev)
        isfull = torch.cat(full_l) if full_l else torch.zeros(0, dtype=torch.bool, device=dev)
        counts = torch.bincount(rows, minlength=nqb)  # (nqb,)
        n_full = torch.bincount(rows[isfull], minlength=nqb)
        # per query block: FULL entries first, each group in ascending key-block order
        order = torch.sort(rows * 2 + (~isfull).long(), stable=True).indices
        cols, isfull = cols[order], isfull[order]
        ptr = F.pad(torch.cumsum(counts, 0), (1, 0))
        return cls(
            T=T,
            block_m=block_m,
            block_n=block_n,
            sliding_window=sliding_window,
            kv_block_ptr=ptr.to(torch.int32),
            kv_block_full_end=(ptr[:-1] + n_full).to(torch.int32),
            kv_block_idx=cols.to(torch.int32),
            kv_block_full=isfull,
        )


# --------------------------------------------------------------------------- validation


def _check_index_tensor(name: str, x: object, T: int | None, device: torch.device | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (T,), got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if T is not None and x.numel() != T:
        raise ValueError(f"{name} must have T={T} entries (from q), got {x.numel()}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} (q's device), got {x.device}")


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, int)
        or sliding_window < 1
    ):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    positions: torch.Tensor,
    sliding_window: int | None,
    softcap: float | None,
) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            want = "(Hq, T, D)" if name == "q" else "(Hkv, T, D)"
            raise ValueError(f"{name} must be 3-D {want}, got shape {tuple(x.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    Hq, T, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] != T:
        raise ValueError(f"k must have T={T} tokens (dim 1, from q), got {k.shape[1]}")
    if k.shape[2] != D:
        raise ValueError(f"k must have head dim D={D} (dim 2, from q), got {k.shape[2]}")
    Hkv = k.shape[0]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv} (GQA)")
    _check_index_tensor("subtree_end", subtree_end, T, q.device)
    _check_index_tensor("positions", positions, T, q.device)
    _check_window(sliding_window)
    if softcap is not None and not (float(softcap) > 0):
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")


# --------------------------------------------------------------------------- dense paths


def tree_attention_mask(
    subtree_end: torch.Tensor, positions: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """Dense visibility mask (T, T) bool, ``mask[i, j] = j <= i < subtree_end[j]`` [window]."""
    se = subtree_end.to(torch.int64)
    ar = torch.arange(se.numel(), device=se.device)
    mask = (ar[None, :] <= ar[:, None]) & (ar[:, None] < se[None, :])  # (T_q, T_k)
    if sliding_window is not None:
        pos = positions.to(torch.int64)
        mask &= (pos[:, None] - pos[None, :]) < sliding_window
    return mask


def _dense_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in ``dtype``; returns out (T, Hq, D), lse (T, Hq) fp32."""
    Hq, Hkv = q.shape[0], k.shape[0]
    qf = q.to(dtype)  # (Hq, T, D)
    kf = k.to(dtype).repeat_interleave(Hq // Hkv, dim=0)  # (Hq, T, D)
    vf = v.to(dtype).repeat_interleave(Hq // Hkv, dim=0)
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale  # (Hq, T, T)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)  # (Hq, T)
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, vf)  # (Hq, T, D)
    return out.transpose(0, 1), lse.transpose(0, 1)


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: dense T x T mask, fp32 math, ``softmax``. O(T^2): tests only.

    q (Hq, T, D), k / v (Hkv, T, D). Returns out (T, Hq, D) **fp32** (and lse (T, Hq) fp32
    when ``return_lse``).
    """
    _check_inputs(q, k, v, subtree_end, positions, sliding_window, softcap)
    mask = tree_attention_mask(subtree_end, positions, sliding_window)
    out, lse = _dense_math(q, k, v, mask, scale, softcap, torch.float32)
    return (out, lse) if return_lse else out


def _tree_attention_dense(q, k, v, subtree_end, positions, scale, sliding_window, softcap, lse):
    """Full-mask SDPA in q's dtype; manual fp32 math when softcap / lse is needed."""
    mask = tree_attention_mask(subtree_end, positions, sliding_window)  # (T, T)
    if softcap is not None or lse:
        out, lse_t = _dense_math(q, k, v, mask, scale, softcap, torch.float32)
        return out.to(q.dtype).contiguous(), lse_t.contiguous()
    G = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(G, dim=0) if G > 1 else k  # (Hq, T, D)
    vv = v.repeat_interleave(G, dim=0) if G > 1 else v
    out = F.scaled_dot_product_attention(q[None], kk[None], vv[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1).contiguous(), None  # (T, Hq, D)


# --------------------------------------------------------------------------- torch block-sparse


@dataclass(eq=False)
class _Chunk:
    """C query blocks, each with Lf FULL then Lp PARTIAL key blocks (padded with dummies).

    ``kv_idx`` (C * (Lf + Lp),) key blocks; the dummy block ``nkb`` is all-zero K / V.
    ``full_ok`` (C, Lf * bn) bool, False on dummies of the FULL part (None: no dummy);
    ``part_vis`` (C, bm, Lp * bn) bool, the exact tree / window mask of the PARTIAL part.
    """

    qbs: torch.Tensor
    kv_idx: torch.Tensor
    n_full: int
    n_part: int
    full_ok: torch.Tensor | None
    part_vis: torch.Tensor
    block_n: int

    def mask(self) -> torch.Tensor | None:
        """Visibility (C, bm, (Lf + Lp) * bn) bool, or None when everything is visible."""
        C, bm, _ = self.part_vis.shape
        if self.full_ok is None and self.n_part == 0:
            return None  # FULL blocks only, no dummies: nothing to mask
        if self.full_ok is None:
            full = self.part_vis.new_ones(()).expand(C, bm, self.n_full * self.block_n)
        else:
            full = self.full_ok[:, None, :].expand(C, bm, self.full_ok.shape[1])
        if self.n_part == 0:
            return full.contiguous()
        return torch.cat([full, self.part_vis], dim=2) if self.n_full else self.part_vis


def _torch_schedule(
    plan: TreeAttentionPlan,
    subtree_end: torch.Tensor,
    positions: torch.Tensor,
    n_heads: int,
    budget: int,
) -> list[_Chunk]:
    """Chunks of query blocks sorted by (FULL, PARTIAL) counts so that padding stays low.

    Cached in the plan (per head count): the plan belongs to one pack, whose
    ``subtree_end`` / ``positions`` give the PARTIAL masks, reused by every layer.
    """
    key = ("torch", n_heads, budget)
    if key in plan._cache:
        return plan._cache[key]
    dev = plan.device
    T, bm, bn, nkb = plan.T, plan.block_m, plan.block_n, plan.num_kv_blocks
    ptr = plan.kv_block_ptr.to(torch.int64)
    fend = plan.kv_block_full_end.to(torch.int64)
    nf, npart = fend - ptr[:-1], ptr[1:] - fend  # (nqb,)
    order = torch.argsort(nf * (npart.max() + 1) + npart, descending=True, stable=True)
    nf_s, np_s = nf[order].tolist(), npart[order].tolist()
    idx_all = F.pad(plan.kv_block_idx.to(torch.int64), (0, 1), value=nkb)  # [-1]: dummy
    dummy = idx_all.numel() - 1
    n_pad = (nkb + 1) * bn + plan.num_q_blocks * bm
    se_pad = F.pad(subtree_end.to(device=dev, dtype=torch.int32), (0, n_pad - T))
    pos_pad = F.pad(positions.to(device=dev, dtype=torch.int32), (0, n_pad - T))
    ar_n = torch.arange(bn, device=dev, dtype=torch.int32)
    ar_m = torch.arange(bm, device=dev, dtype=torch.int32)
    chunks, start, nqb = [], 0, plan.num_q_blocks
    while start < nqb:
        C = max(1, budget // (n_heads * bm * bn * max(1, nf_s[start] + np_s[start])))
        qbs = order[start : start + C]
        C = qbs.numel()
        Lf, Lp = max(nf_s[start : start + C]), max(np_s[start : start + C])
        af = torch.arange(Lf, device=dev)
        ap = torch.arange(Lp, device=dev)
        ef = torch.where(af < nf[qbs][:, None], ptr[qbs][:, None] + af, dummy)  # (C, Lf)
        ep = torch.where(ap < npart[qbs][:, None], fend[qbs][:, None] + ap, dummy)  # (C, Lp)
        kf, kp = idx_all[ef], idx_all[ep]
        full_ok = None
        if bool((ef == dummy).any()):
            full_ok = (kf != nkb)[:, :, None].expand(C, Lf, bn).reshape(C, Lf * bn)
        jt = (kp.to(torch.int32)[:, :, None] * bn + ar_n).view(C, 1, Lp * bn)  # key ids
        it = (qbs.to(torch.int32)[:, None] * bm + ar_m)[:, :, None]  # (C, bm, 1) query ids
        vis = (jt <= it) & (it < se_pad[jt])  # dummies: ids >= T, se 0 -> hidden
        if plan.sliding_window is not None:
            vis &= (pos_pad[it] - pos_pad[jt]) < plan.sliding_window
        kv_idx = torch.cat([kf, kp], 1).flatten()
        chunks.append(_Chunk(qbs, kv_idx, Lf, Lp, full_ok, vis, bn))
        start += C
    plan._cache[key] = chunks
    return chunks


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _tree_attention_torch(
    q, k, v, subtree_end, positions, plan, scale, sliding_window, softcap, want_lse
):
    """Block-sparse: each query block against only its listed key blocks, fp32 math.

    Per chunk of C query blocks with L = Lf + Lp key blocks each (gathered, K / V read once
    per query block)::

        S = scale * Q_c K_c^T   (C, Hq, bm, L * bn)  -> softcap, tree mask (PARTIAL part)
        O = softmax(S) V_c      (C, Hq, bm, D)

    as one fused SDPA call per chunk (manual matmul / softmax when softcap or lse is
    needed). Cost ~ visited blocks, not T^2; no T x T tensor is ever built.
    """
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    bm, bn = plan.block_m, plan.block_n
    nqb, nkb = plan.num_q_blocks, plan.num_kv_blocks
    dev, f32 = q.device, torch.float32
    fused = softcap is None and not want_lse and (G == 1 or _SDPA_GQA)
    # (nqb, Hq, bm, D): query blocks; head h = hk * G + g, so also (nqb, Hkv, G * bm, D)
    qL = F.pad(q.to(f32), (0, 0, 0, nqb * bm - T)).view(Hq, nqb, bm, D).transpose(0, 1)
    qL = qL.contiguous()
    # (Hkv, nkb + 1, bn * D): key / value blocks plus an all-zero dummy block at index nkb
    kL = F.pad(k.to(f32), (0, 0, 0, (nkb + 1) * bn - T)).view(Hkv, nkb + 1, bn * D)
    vL = F.pad(v.to(f32), (0, 0, 0, (nkb + 1) * bn - T)).view(Hkv, nkb + 1, bn * D)
    outL = torch.empty((nqb, Hq, bm, D), dtype=f32, device=dev)
    lseL = torch.empty((nqb, Hq, bm), dtype=f32, device=dev) if want_lse else None
    budget = _TORCH_SCORE_BUDGET
    for ch in _torch_schedule(plan, subtree_end, positions, Hq, budget):
        C, L = ch.qbs.numel(), ch.n_full + ch.n_part
        Qc = qL.index_select(0, ch.qbs)  # (C, Hq, bm, D)
        Kc = kL.index_select(1, ch.kv_idx).view(Hkv, C, L * bn, D)
        Vc = vL.index_select(1, ch.kv_idx).view(Hkv, C, L * bn, D)
        mask = ch.mask()  # (C, bm, L * bn) | None
        if fused:
            o = F.scaled_dot_product_attention(
                Qc,
                Kc.transpose(0, 1),
                Vc.transpose(0, 1),
                attn_mask=None if mask is None else mask[:, None],
                scale=scale,
                **({"enable_gqa": True} if G > 1 else {}),
            )  # (C, Hq, bm, D)
            outL.index_copy_(0, ch.qbs, o)
            continue
        s = torch.matmul(Qc.view(C, Hkv, G * bm, D).transpose(0, 1), Kc.transpose(-1, -2))
        # out of place: autograd (DPO through the tree) needs tanh's output intact
        if softcap is not None:  # s: (Hkv, C, G * bm, L * bn)
            s = torch.tanh(s * (scale / softcap)) * softcap
        else:
            s = s * scale
        if mask is not None:
            # finite fill: padding rows (all masked) stay finite, so their zero gradient
            # does not turn into NaN in the softmax backward
            s = s.view(Hkv, C, G, bm, L * bn).masked_fill(~mask[None, :, None], torch.finfo(s.dtype).min)
            s = s.view(Hkv, C, G * bm, L * bn)
        if want_lse:
            lse_c = torch.logsumexp(s, -1)  # (Hkv, C, G * bm)
            lseL.index_copy_(0, ch.qbs, lse_c.transpose(0, 1).reshape(C, Hq, bm))
        o = torch.matmul(torch.softmax(s, -1), Vc)  # (Hkv, C, G * bm, D)
        outL.index_copy_(0, ch.qbs, o.transpose(0, 1).reshape(C, Hq, bm, D))
    out = outL.transpose(1, 2).reshape(nqb * bm, Hq, D)[:T].to(q.dtype).contiguous()
    lse = lseL.transpose(1, 2).reshape(nqb * bm, Hq)[:T].contiguous() if want_lse else None
    return out, lse  # (T, Hq, D), (T, Hq)


# --------------------------------------------------------------------------- public API


def _triton_kernels():
    """The kernel module, or an ImportError naming the missing piece."""
    from flr_engine.kernels import tree_attention as kmod

    if not kmod.triton_available():
        raise ImportError(
            f"triton is not importable (pip install 'triton>=3.0'): {kmod._TRITON_IMPORT_ERROR}"
        )
    return kmod


def _run_triton(q, k, v, subtree_end, positions, plan, scale, sliding_window, softcap, want_lse):
    kmod = _triton_kernels()
    for name, b in (("block_m", plan.block_m), ("block_n", plan.block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"the Triton kernel needs plan.{name} a power of two >= 16, got {b}")
    if q.device.type != "cuda" and not kmod.triton_interpreting():
        raise RuntimeError(
            f"tensors are on {q.device} and Triton is not in interpreter mode: use CUDA tensors "
            "or set TRITON_INTERPRET=1 before triton is first imported"
        )
    return kmod.tree_attention_fwd(
        q,
        k,
        v,
        subtree_end.to(torch.int32).contiguous(),
        positions.to(torch.int32).contiguous(),
        plan.kv_block_ptr,
        plan.kv_block_full_end,
        plan.kv_block_idx,
        block_m=plan.block_m,
        block_n=plan.block_n,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        return_lse=want_lse,
    )


# Triton tiles (block_m, block_n) per padded head dim, chosen from sm_90 compiles of the
# kernel (ptxas resource usage; see kernels/tree_attention.py:launch_config): the largest
# query tile whose registers do not spill. 16-bit: bf16 D=128 at 128x64 uses 181 registers
# (8 warps; 231 with window and softcap), D=256 at 128x16 uses 235-245 where 64x32 spills.
# fp32 (IEEE dots on FMA units): small tiles (64x64 at D=128 spills 2 KB per thread and
# compiles for 15 s, 16x32 spills 448 B; 16x16 uses 97-104 registers, 32x16 at D=64 202).
_TILES_16BIT = {64: (128, 64), 128: (128, 64), 256: (128, 16)}
_TILES_FP32 = {64: (32, 16), 128: (16, 16), 256: (16, 16)}
# then, where the shared memory of the preferred tile does not fit, in this order
_FALLBACK_TILES = ((64, 64), (64, 32), (32, 32), (16, 32), (16, 16))


def suggested_block_sizes(
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    impl: str = "triton",
    device: torch.device | str | None = None,
    smem: int | None = None,
) -> tuple[int, int]:
    """(block_m, block_n) for :meth:`TreeAttentionPlan.build`.

    Triton: the tile of ``_TILES_16BIT`` / ``_TILES_FP32`` for ``pow2(head_dim)`` (register
    fit, measured by compiling for sm_90), or the first of ``_FALLBACK_TILES`` whose shared
    memory at 2 stages (:func:`flr_engine.kernels.tree_attention.smem_bytes`, plus 10%, a
    conservative estimate) fits ``smem`` -- by default the opt-in limit of ``device`` (227 KB
    on H100/H200, 163 KB on A100, 99 KB on consumer parts; 96 KB when no CUDA device is
    given). E.g. bf16 D=128 -> (128, 64); fp32 D=256 -> (16, 16) (the old fixed 64 x 64
    needed ~344 KB there and could not launch). torch / dense: (64, 64).
    """
    if impl not in ("triton", "auto"):
        return 64, 64
    from flr_engine.kernels.tree_attention import smem_budget, smem_bytes

    if smem is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        smem = smem_budget(dev)
    elem = 4 if dtype == torch.float32 else 2
    dp = max(64, 1 << (head_dim - 1).bit_length())
    table = _TILES_FP32 if elem == 4 else _TILES_16BIT
    preferred = table.get(dp, _FALLBACK_TILES[-1])
    for bm, bn in (preferred, *_FALLBACK_TILES):
        if smem_bytes(bm, bn, head_dim, elem, 2) * 11 // 10 <= smem:
            return bm, bn
    return _FALLBACK_TILES[-1]


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _auto_wants_triton(q: torch.Tensor) -> bool:
    """impl="auto" tries Triton for CUDA tensors (a seam for tests)."""
    return q.device.type == "cuda"


def flr_tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    plan: TreeAttentionPlan | None = None,
    impl: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a packed pre-order token trie.

    ``out[i, h] = sum_j softmax_j(s_ij) v[h // G, j]`` over keys j with
    ``j <= i < subtree_end[j]`` (and ``positions[i] - positions[j] < sliding_window``),
    ``s_ij = scale * <q[h, i], k[h // G, j]>`` (``softcap * tanh(s / softcap)`` if softcap),
    ``G = Hq // Hkv``, ``scale`` defaults to ``1 / sqrt(D)``.

    Args:
        q: (Hq, T, D); k, v: (Hkv, T, D); any strides; fp32 / bf16 / fp16, one device.
        subtree_end, positions: (T,) integer, q's device.
        plan: a :class:`TreeAttentionPlan` for this pack built with the same
            ``sliding_window`` (build once per pack, reuse in every layer); built if None.
        impl: "triton" | "torch" | "dense" | "auto" (triton on CUDA when importable and
            no gradient is needed, else torch; a triton launch that fails falls back to
            torch for that configuration -- device, dtype, head dim, tiles, window,
            softcap -- with one warning giving the cause). The Triton kernel is forward
            only: ``impl="triton"`` with inputs that require grad raises.
        return_lse: also return lse (T, Hq) fp32, natural-log log-sum-exp of the logits.

    Returns:
        out (T, Hq, D) contiguous in q's dtype [, lse (T, Hq) fp32].
    """
    global _triton_import_error
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    _check_inputs(q, k, v, subtree_end, positions, sliding_window, softcap)
    Hq, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    if T == 0:
        out = q.new_empty((0, Hq, D))
        return (out, q.new_empty((0, Hq), dtype=torch.float32)) if return_lse else out
    if plan is not None:
        if not isinstance(plan, TreeAttentionPlan):
            raise TypeError(f"plan must be a TreeAttentionPlan, got {type(plan).__name__}")
        if plan.T != T:
            raise ValueError(f"plan was built for T={plan.T} tokens, q has T={T}")
        if plan.sliding_window != sliding_window:
            raise ValueError(
                f"plan was built with sliding_window={plan.sliding_window}, called with "
                f"sliding_window={sliding_window}: build one plan per window setting"
            )
    grad = _needs_grad(q, k, v)
    if impl == "triton" and grad:
        raise RuntimeError(
            "impl='triton' is forward only and q/k/v require grad: use impl='torch' (or "
            "'auto', which picks it) to backpropagate, or run under torch.no_grad()"
        )

    chosen = impl
    if impl == "auto":
        chosen = "torch"
        pow2 = plan is None or all(
            b >= 16 and not b & (b - 1) for b in (plan.block_m, plan.block_n)
        )
        if _auto_wants_triton(q) and not grad and pow2 and _triton_import_error is None:
            try:
                _triton_kernels()
                chosen = "triton"
            except ImportError as exc:
                _triton_import_error = str(exc)
                logger.warning("flr_tree_attention: triton unavailable, using torch (%s)", exc)

    if chosen == "dense":
        out, lse = _tree_attention_dense(
            q, k, v, subtree_end, positions, scale, sliding_window, softcap, return_lse
        )
        return (out, lse) if return_lse else out

    if plan is None:
        bm, bn = suggested_block_sizes(D, q.dtype, chosen, q.device)
        plan = TreeAttentionPlan.build(
            subtree_end, positions, block_m=bm, block_n=bn, sliding_window=sliding_window
        )
    plan = plan.to(q.device)

    if chosen == "triton":
        key = (str(q.device), q.dtype, D, plan.block_m, plan.block_n,
               sliding_window is not None, softcap is not None)  # fmt: skip
        if impl == "triton":
            try:
                out, lse = _run_triton(
                    q, k, v, subtree_end, positions, plan, scale, sliding_window, softcap,
                    return_lse,
                )  # fmt: skip
            except ImportError as exc:
                raise RuntimeError(f"impl='triton' cannot run: {exc}") from exc
            return (out, lse) if return_lse else out
        if key not in _triton_auto_failed:
            try:
                out, lse = _run_triton(
                    q, k, v, subtree_end, positions, plan, scale, sliding_window, softcap,
                    return_lse,
                )  # fmt: skip
                return (out, lse) if return_lse else out
            except Exception as exc:  # auto: fall back for this configuration, say why once
                _triton_auto_failed[key] = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "flr_tree_attention: the Triton kernel failed for %s; impl='auto' uses the "
                    "torch path for this configuration from now on (%s)",
                    key, _triton_auto_failed[key],
                )  # fmt: skip

    out, lse = _tree_attention_torch(
        q, k, v, subtree_end, positions, plan, scale, sliding_window, softcap, return_lse
    )
    return (out, lse) if return_lse else out
