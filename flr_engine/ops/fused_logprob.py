"""Fused gathered log-prob: per-token log p(target | prefix) without the (N, V) logits.

For N scored positions with final hidden states ``hidden`` (N, H), an LM head ``weight``
(V, H), an optional ``bias`` (V,) and ``targets`` (N,), the LM head's logit transform
(:func:`logit_transform`, the one place it is written in Python) and the gathered log-prob::

    z[n, v]  = softcap * tanh((hidden[n] . weight[v] + bias[v]) * logit_scale / softcap)
               (without softcap: (hidden[n] . weight[v] + bias[v]) * logit_scale)
    lse[n]   = log sum_v exp(z[n, v])
    logp[n]  = z[n, targets[n]] - lse[n]          (0, with no gradient, where target == ignore)

With a row index ``rows`` (M,) into ``hidden`` (R, H), many targets share one row's softmax
normaliser (siblings in a prefix tree: every follow-up's first token hangs off one header)::

    lse[r]   = log sum_v exp(z[r, v])                            once per row, (R,)
    logp[m]  = z[rows[m], targets[m]] - lse[rows[m]]             (M,)

The full-vocabulary pass runs once per row; the target logits are a row-wise dot
(:func:`gathered_logits`, (M, H) products, no (M, V) logits).

Every implementation walks the vocabulary in chunks with an online log-sum-exp and picks the
target logit out of the chunk that holds it, so memory is O(N * chunk), never O(N * V):

* ``"torch"``: chunked BLAS matmuls (``torch.matmul`` on slices of ``weight``), fp32
  accumulation; the CPU path, and the fallback everywhere.
* ``"triton"``: :mod:`flr_engine.kernels.fused_logprob` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``).
* ``"cuda"``: ``flr_engine._C_cuda.fused_logprob_forward`` (csrc/cuda/fused_logprob.cu).
  Explicit only: it multiplies on CUDA cores with the hidden rows staged in shared memory,
  so at N=8192, H=4096, V=128256 it streams the LM head once per 8 rows (~1000 times,
  ~1 TB) and does the 8.6 TFLOP on fp32 FMA units: ~0.5-1 s against ~15 ms for a
  tensor-core matmul. ``"auto"`` never picks it (scripts/gpu_check.sh measures all three).
* ``"reference"``: :func:`gathered_logprob_reference` (full logits; for tests).

With ``rows`` every impl computes only ``lse`` (R,) (the kernels get targets that are all
``ignore_index``) and the target logits come from :func:`gathered_logits`.

The backward pass (all impls) recomputes each vocabulary chunk's logits with torch matmuls::

    d logp[m] / d z[r, v] = [rows[m] == r] * (onehot(targets[m])[v] - softmax(z[r])[v])
    d lse[r]  / d z[r, v] = softmax(z[r])[v]

so a row's coefficient of its softmax sums over the targets sharing it; times
``1 - tanh(a / softcap)**2`` (softcap) and ``logit_scale``, it accumulates ``grad_hidden``
(R, H), ``grad_weight`` (V, H) and ``grad_bias`` (V,) chunk by chunk. Gradients that are not
needed (e.g. a frozen LM head under LoRA) are not computed.

Importing this module imports neither triton nor the CUDA extension.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "IMPLS",
    "flr_gathered_logprob",
    "gathered_logits",
    "gathered_logprob_reference",
    "logit_transform",
    "segment_mean",
    "segment_sum",
]

IMPLS = ("auto", "triton", "cuda", "torch", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int64, torch.int32)
# Default chunk: about this many logits (N * chunk) live at once. CPU: 4 Mi (16 MiB fp32),
# cache-friendly and measured faster than one full matmul; CUDA: 64 Mi (256 MiB), few launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
_MIN_CHUNK = 256
_TARGET_BLOCK = 4096  # rows per block of gathered_logits: (block, H) products at once
logger = logging.getLogger(__name__)
# Triton specialisations that failed to launch under impl="auto", keyed by what the kernel is
# compiled for: (device, dtype, launch_config tiles / warps / stages, has bias, has softcap)
# -> cause (logged once). Such a failure (shared memory or registers over the device's limit,
# a compile error) is a property of the device and the specialisation, not of the call, so
# the record is process-wide like Triton's own compile cache: retrying per call would
# recompile (seconds) and warn every time. Other specialisations keep the kernel; a transient
# failure (out of memory) falls back for that call only and is not recorded.
_triton_auto_failed: dict[tuple, str] = {}


# --------------------------------------------------------------------------------------
# the logit transform
# --------------------------------------------------------------------------------------


def logit_transform(
    z: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """The LM head's logits from raw products ``z = hidden . weight[v]`` (any shape, bias
    broadcast over the last dim)::

        a = (z + bias) * logit_scale          (Cohere's logit_scale, Granite's 1/logits_scaling)
        out = softcap * tanh(a / softcap)     (Gemma-2/3 final_logit_softcapping; else a)

    ``inplace`` overwrites ``z`` (the chunked paths; no autograd there). The Triton and CUDA
    kernels apply the same formula inside the kernel."""
    if bias is not None:
        z = z.add_(bias.to(z.dtype)) if inplace else z + bias.to(z.dtype)
    if logit_scale != 1.0:
        z = z.mul_(logit_scale) if inplace else z * logit_scale
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap) if inplace else softcap * torch.tanh(z / softcap)
    return z


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------


def gathered_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_lse: bool = False,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Obviously-correct gathered log-prob: full fp32 (N, V) logits, log_softmax, gather.

    ``hidden`` (*, H), ``weight`` (V, H), ``bias`` (V,) or None, ``targets`` (*) integer.
    Returns ``logp`` (*) (and ``lse`` (*) when ``return_lse``), fp32 (fp64 for fp64 inputs);
    ``logp`` is 0 where ``targets == ignore_index``. With ``rows`` (same shape as
    ``targets``), ``hidden`` is (R, H), ``logp[m] = log_softmax(z[rows[m]])[targets[m]]`` and
    ``lse`` is (R,). Differentiable by plain autograd.
    Memory: O(N * V) -- use :func:`flr_gathered_logprob` for real workloads.
    """
    _validate(hidden, weight, targets, bias, logit_scale, softcap, None, "reference", rows)
    acc = _acc_dtype(hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1]).to(acc)  # (N, H) (R, H with rows)
    t = targets.reshape(-1).long()  # (N,) (M,)
    z = logit_transform(h @ weight.to(acc).T, bias, logit_scale, softcap)  # (N, V)
    valid = t != ignore_index  # (N,)
    logp_all = torch.log_softmax(z, dim=-1)  # (N, V)
    if rows is not None:
        logp_all = logp_all[rows.reshape(-1).long()]  # (M, V)
    logp = logp_all.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    logp = torch.where(valid, logp, torch.zeros((), dtype=acc, device=z.device))
    logp = logp.reshape(targets.shape)
    if return_lse:
        lse = torch.logsumexp(z, dim=-1)
        return logp, lse if rows is not None else lse.reshape(targets.shape)
    return logp


# --------------------------------------------------------------------------------------
# validation and dispatch
# --------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype the torch path multiplies in: half inputs are upcast on CPU (exact fp32 logits,
    about as fast there); on CUDA they stay half for tensor cores (fp32 accumulate inside
    cuBLAS, logits rounded to the input dtype -- the plain-torch precision)."""
    if dtype in (torch.float16, torch.bfloat16) and device.type != "cuda":
        return torch.float32
    return dtype


def _validate(
    hidden: object,
    weight: object,
    targets: object,
    bias: object,
    logit_scale: object,
    softcap: object,
    chunk_size: object,
    impl: object,
    rows: object = None,
) -> None:
    """Raise early with a message naming the argument and expected vs actual."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    assert isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)
    assert isinstance(targets, torch.Tensor)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (*, H) (e.g. (N, H)), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be fp16/bf16/fp32/fp64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype must match hidden ({hidden.dtype}), got {weight.dtype}; "
            "cast one of them first"
        )
    h_size = hidden.shape[-1]
    if weight.shape[1] != h_size:
        raise ValueError(
            f"weight must have shape (V, H={h_size}) to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1), got V = 0")
    if targets.dtype not in _INT_DTYPES:
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if rows is None:
        if tuple(targets.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                f"got {tuple(targets.shape)}"
            )
    else:
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"rows must be a torch.Tensor or None, got {type(rows).__name__}")
        if hidden.dim() != 2:
            raise ValueError(f"with rows, hidden must have shape (R, H), got {tuple(hidden.shape)}")
        if rows.dtype not in _INT_DTYPES:
            raise TypeError(f"rows must be int64 (or int32), got {rows.dtype}")
        if tuple(rows.shape) != tuple(targets.shape):
            raise ValueError(
                f"rows must have the shape of targets {tuple(targets.shape)}, got {tuple(rows.shape)}"
            )
        if rows.device != hidden.device:
            raise ValueError(f"rows must be on hidden's device {hidden.device}, got {rows.device}")
    for name, x in (("weight", weight), ("targets", targets)):
        if x.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on hidden's device {hidden.device}, got {bias.device}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a float, got {type(logit_scale).__name__}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be a positive finite float or None, got {softcap}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must be in [0, V) or equal ignore_index (one device sync on CUDA)."""
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        first = targets[bad].reshape(-1)[0].item()
        raise ValueError(
            f"targets must be in [0, V={vocab}) or equal ignore_index={ignore_index}, found {first}"
        )


def _check_row_range(rows: torch.Tensor, num_rows: int) -> None:
    """Rows must index ``hidden``: in [0, R) (one device sync on CUDA)."""
    if rows.numel() == 0:
        return
    bad = (rows < 0) | (rows >= num_rows)
    if bool(bad.any()):
        first = rows[bad].reshape(-1)[0].item()
        raise ValueError(f"rows must be in [0, R={num_rows}) (rows of hidden), found {first}")


@functools.lru_cache(maxsize=1)
def _cuda_ext() -> tuple[object | None, str]:
    """(flr_engine._C_cuda or None, why not)."""
    try:
        from flr_engine import _C_cuda  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, (
            "impl='cuda' needs flr_engine._C_cuda, which was not built: reinstall with nvcc "
            f"and a CUDA build of torch ({exc})"
        )
    if not hasattr(_C_cuda, "fused_logprob_forward"):
        return None, "flr_engine._C_cuda has no fused_logprob_forward: rebuild the extension"
    return _C_cuda, ""


def _triton_status(device: torch.device) -> str:
    """'' when the Triton kernel can run on ``device``, else why not."""
    try:
        from flr_engine.kernels import fused_logprob as kmod
    except ImportError as exc:  # pragma: no cover - kernels ship with the package
        return f"impl='triton' could not import flr_engine.kernels.fused_logprob ({exc})"
    if not kmod.HAS_TRITON:
        return "impl='triton' needs triton: pip install 'triton>=3.0'"
    if device.type == "cuda":
        return ""
    if device.type == "cpu" and kmod.INTERPRETED:
        return ""
    return (
        f"impl='triton' needs CUDA tensors (got {device.type}), or CPU tensors with "
        "TRITON_INTERPRET=1 set before triton is first imported"
    )


def _resolve_impl(impl: str, hidden: torch.Tensor) -> str:
    """Concrete impl for ``impl``: 'auto' picks triton (CUDA tensors, fp32/bf16/fp16) >
    torch, never the CUDA extension (see the module docstring); a Triton specialisation that
    failed before falls back in :func:`_kernel_forward`. An explicit impl that cannot run
    raises RuntimeError saying why."""
    dtype, device = hidden.dtype, hidden.device
    if impl == "auto":
        if device.type == "cuda" and dtype in _KERNEL_DTYPES and not _triton_status(device):
            return "triton"
        return "torch"
    if impl in ("cuda", "triton") and dtype not in _KERNEL_DTYPES:
        raise RuntimeError(f"impl={impl!r} supports fp32/bf16/fp16 inputs, got {dtype}")
    if impl == "cuda":
        ext, why = _cuda_ext()
        if ext is None:
            raise RuntimeError(why)
        if device.type != "cuda":
            raise RuntimeError(f"impl='cuda' needs CUDA tensors, got {device.type} tensors")
    elif impl == "triton":
        why = _triton_status(device)
        if why:
            raise RuntimeError(why)
    return impl


def _default_chunk(n: int, vocab: int, device: torch.device) -> int:
    """About _CHUNK_ELEMENTS[device] logits per chunk, a multiple of 256, within [256, V]."""
    chunk = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"]) // max(n, 1)
    chunk = max(_MIN_CHUNK, chunk // _MIN_CHUNK * _MIN_CHUNK)
    return min(chunk, vocab)


# --------------------------------------------------------------------------------------
# chunked torch forward / backward
# --------------------------------------------------------------------------------------


def _chunk_logits(
    h: torch.Tensor,  # (N, H) in mm dtype
    w: torch.Tensor,  # (C, H) in mm dtype
    b: torch.Tensor | None,  # (C,) or None
    logit_scale: float,
    softcap: float | None,
    acc: torch.dtype,
    want_tanh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of one vocabulary chunk, (N, C) in ``acc`` (:func:`logit_transform`, in place);
    plus tanh(a / softcap) = z / softcap (N, C) when ``want_tanh`` and softcap is set (for the
    softcap derivative), else None."""
    z = torch.matmul(h, w.T).to(acc)  # (N, C); .to is free when already acc
    z = logit_transform(z, b, logit_scale, softcap, inplace=True)
    if softcap is None or not want_tanh:
        return z, None
    return z, z / softcap


def _torch_forward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    targets: torch.Tensor | None,  # (N,) int64; None: lse only (logp is all zeros)
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = hidden.shape[0]
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    mm = _mm_dtype(hidden.dtype, hidden.device)
    h = hidden.to(mm)  # (N, H)
    m_run = torch.full((n,), -math.inf, dtype=acc, device=hidden.device)  # (N,) running max
    s_run = torch.zeros(n, dtype=acc, device=hidden.device)  # (N,) sum of exp(z - m_run)
    z_tgt = torch.zeros(n, dtype=acc, device=hidden.device)  # (N,)
    for v0 in range(0, vocab, chunk):
        v1 = min(v0 + chunk, vocab)
        b = bias[v0:v1] if bias is not None else None
        z, _ = _chunk_logits(h, weight[v0:v1].to(mm), b, logit_scale, softcap, acc)  # (N, C)
        if targets is not None:
            in_chunk = (targets >= v0) & (targets < v1)  # (N,)
            local = (targets - v0).clamp_(0, v1 - v0 - 1)  # (N,)
            z_tgt = torch.where(in_chunk, z.gather(1, local[:, None])[:, 0], z_tgt)
        # online log-sum-exp, in place on the chunk (no second (N, C) buffer)
        m_chunk = z.amax(dim=1)  # (N,)
        s_chunk = z.sub_(m_chunk[:, None]).exp_().sum(dim=1)  # (N,)
        m_new = torch.maximum(m_run, m_chunk)
        s_run = s_run * torch.exp(m_run - m_new) + s_chunk * torch.exp(m_chunk - m_new)
        m_run = m_new
        del z
    lse = m_run + torch.log(s_run)  # (N,)
    if targets is None:
        return z_tgt, lse
    valid = targets != ignore_index
    logp = torch.where(valid, z_tgt - lse, torch.zeros((), dtype=acc, device=lse.device))
    return logp, lse


def _torch_backward(
    hidden: torch.Tensor,  # (N, H); (R, H) with rows
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    targets: torch.Tensor,  # (N,) int64; (M,) with rows
    rows: torch.Tensor | None,  # (M,) int64 rows of hidden, or None (row n has target n)
    lse: torch.Tensor,  # (N,) acc dtype
    g_logp: torch.Tensor | None,  # (N,) / (M,)
    g_lse: torch.Tensor | None,  # (N,)
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
    chunk: int,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    need_h, need_w, need_b = need
    n, hsize = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    acc = _acc_dtype(hidden.dtype)
    mm = _mm_dtype(hidden.dtype, device)
    h = hidden.to(mm)  # (N, H)
    valid = targets != ignore_index  # (N,) / (M,)
    zero = torch.zeros((), dtype=acc, device=device)
    g_t = torch.zeros(len(targets), dtype=acc, device=device) if g_logp is None else g_logp.to(acc)
    g_t = torch.where(valid, g_t, zero)  # (N,) / (M,) weight of the one-hot term
    # d/dz of (g_logp * logp + g_lse * lse) = g_t * onehot + (g_lse - g_t) * softmax, where a
    # row's g_t sums over the targets that share it
    g_row = g_t  # (N,)
    if rows is not None:
        g_row = torch.zeros(n, dtype=acc, device=device).index_add_(0, rows, g_t)
    coef = -g_row if g_lse is None else g_lse.to(acc) - g_row  # (N,)
    lse = lse.to(acc)

    grad_h = torch.zeros(n, hsize, dtype=acc, device=device) if need_h else None  # (N, H)
    grad_w = torch.empty_like(weight) if need_w else None  # (V, H)
    grad_b = torch.empty(vocab, dtype=acc, device=device) if need_b else None  # (V,)
    for v0 in range(0, vocab, chunk):
        v1 = min(v0 + chunk, vocab)
        w = weight[v0:v1].to(mm)  # (C, H)
        b = bias[v0:v1] if bias is not None else None
        z, t = _chunk_logits(h, w, b, logit_scale, softcap, acc, want_tanh=True)  # (N, C)
        g = z.sub_(lse[:, None]).exp_().mul_(coef[:, None])  # (N, C): (g_lse - g_t) * p
        in_chunk = (targets >= v0) & (targets < v1)
        local = (targets - v0).clamp_(0, v1 - v0 - 1)
        g_in = torch.where(in_chunk, g_t, zero)  # (N,) / (M,)
        if rows is None:
            g.scatter_add_(1, local[:, None], g_in[:, None])
        else:  # targets sharing a row add into the same (row, target) entries
            g.view(-1).index_add_(0, rows * (v1 - v0) + local, g_in)
        if t is not None:  # d softcap*tanh(a/softcap) / da = 1 - tanh^2
            g.mul_(t.square_().neg_().add_(1.0))
        if logit_scale != 1.0:
            g.mul_(logit_scale)  # g is now d out / d (hidden @ w.T + b), (N, C)
        if need_b:
            grad_b[v0:v1] = g.sum(0)
        gm = g.to(mm)
        if need_h:
            if mm == acc:
                grad_h.addmm_(gm, w)  # (N, C) @ (C, H)
            else:
                grad_h += torch.matmul(gm, w).to(acc)
        if need_w:
            grad_w[v0:v1] = torch.matmul(gm.T, h).to(weight.dtype)  # (C, N) @ (N, H)
        del z, g, gm, t
    return (
        grad_h.to(hidden.dtype) if grad_h is not None else None,
        grad_w,
        grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None,
    )


def _triton_key(kmod, hidden: torch.Tensor, weight: torch.Tensor, bias, softcap) -> tuple:
    """What the Triton kernel is compiled for (the key of ``_triton_auto_failed``)."""
    n, h = hidden.shape
    cfg = kmod.launch_config(
        n, h, weight.shape[0], hidden.dtype, kmod.smem_budget(hidden.device), kmod.INTERPRETED
    )
    return (str(hidden.device), hidden.dtype, cfg, bias is not None, softcap is not None)


def _kernel_forward(
    impl: str,
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    targets: torch.Tensor | None,  # (N,) int64; None: lse only
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (N,), lse (N,)) from ``impl``; without targets logp is all zeros (the kernels get
    targets that are all ``ignore_index``)."""
    if impl == "torch" or hidden.shape[0] == 0:
        return _torch_forward(
            hidden, weight, bias, targets, logit_scale, softcap, ignore_index, chunk
        )
    if targets is None:
        targets = torch.full(
            (hidden.shape[0],), ignore_index, dtype=torch.int64, device=hidden.device
        )
    if impl in ("triton", "auto-triton"):
        from flr_engine.kernels import fused_logprob as kmod

        key = _triton_key(kmod, hidden, weight, bias, softcap) if impl == "auto-triton" else None
        if key is None or key not in _triton_auto_failed:
            try:
                return kmod.fused_logprob_forward(
                    hidden, weight, bias, targets, logit_scale, softcap, ignore_index
                )
            except Exception as exc:
                if key is None:  # impl="triton": fail loudly
                    raise
                cause = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, torch.cuda.OutOfMemoryError):  # transient: this call only
                    logger.warning("flr_gathered_logprob: Triton kernel out of memory, using "
                                   "the torch path for this call (%s)", cause)  # fmt: skip
                else:
                    _triton_auto_failed[key] = cause
                    logger.warning(
                        "flr_gathered_logprob: the Triton kernel failed for %s; impl='auto' uses "
                        "the torch path for this specialisation from now on (%s)", key, cause,
                    )  # fmt: skip
        return _torch_forward(
            hidden, weight, bias, targets, logit_scale, softcap, ignore_index, chunk
        )
    if impl == "cuda":
        ext = _cuda_ext()[0]
        hid = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        b = bias.float().contiguous() if bias is not None else None
        return ext.fused_logprob_forward(  # type: ignore[attr-defined]
            hid,
            weight.contiguous(),
            b,
            targets.contiguous(),
            float(logit_scale),
            float(softcap) if softcap is not None else None,
            int(ignore_index),
        )
    raise AssertionError(impl)  # pragma: no cover


def _gathered_logits(
    hidden: torch.Tensor,  # (N, H); (R, H) with rows
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    targets: torch.Tensor,  # (M,) int64
    rows: torch.Tensor | None,  # (M,) int64 or None (= arange)
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
) -> torch.Tensor:
    """``z[m] = logit_transform(hidden[rows[m]] . weight[targets[m]] + bias[targets[m]])``,
    (M,) in the accumulation dtype (0 where ignored); row blocks of ``_TARGET_BLOCK``, so no
    (M, H) fp32 copy of the gathered weight rows is built. Plain autograd."""
    acc = _acc_dtype(hidden.dtype)
    valid = targets != ignore_index  # (M,)
    t = torch.where(valid, targets, 0)  # (M,)
    parts = []
    for m0 in range(0, len(t), _TARGET_BLOCK):
        tb = t[m0 : m0 + _TARGET_BLOCK]  # (block,)
        hb = hidden[m0 : m0 + len(tb)] if rows is None else hidden[rows[m0 : m0 + len(tb)]]
        parts.append((hb.to(acc) * weight[tb].to(acc)).sum(-1))  # (block,)
    z = torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=hidden.device)  # (M,)
    z = logit_transform(z, bias[t] if bias is not None else None, logit_scale, softcap)
    return torch.where(valid, z, torch.zeros((), dtype=acc, device=z.device))


class _GatheredLogprob(torch.autograd.Function):
    """(logp, lse) with a chunked-recompute backward to hidden, weight and bias."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,  # (N, H); (R, H) with rows
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        targets: torch.Tensor,  # (N,) int64; (M,) with rows
        rows: torch.Tensor | None,  # (M,) int64 or None
        logit_scale: float,
        softcap: float | None,
        ignore_index: int,
        chunk: int,
        impl: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            logp, lse = _kernel_forward(
                impl, hidden, weight, bias, targets, logit_scale, softcap, ignore_index, chunk
            )
        else:  # lse once per row of hidden, target logits per (row, target)
            _, lse = _kernel_forward(
                impl, hidden, weight, bias, None, logit_scale, softcap, ignore_index, chunk
            )  # (R,)
            z = _gathered_logits(
                hidden, weight, bias, targets, rows, logit_scale, softcap, ignore_index
            )  # (M,)
            valid = targets != ignore_index
            logp = torch.where(valid, z - lse.to(z.dtype)[rows], torch.zeros_like(z))  # (M,)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse)
        ctx.cfg = (logit_scale, softcap, ignore_index, chunk)
        ctx.set_materialize_grads(False)
        return logp, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp: torch.Tensor | None, g_lse: torch.Tensor | None):  # type: ignore[override]
        hidden, weight, bias, targets, rows, lse = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if (g_logp is None and g_lse is None) or not any(need):
            return (None,) * 10
        logit_scale, softcap, ignore_index, chunk = ctx.cfg
        gh, gw, gb = _torch_backward(
            hidden, weight, bias, targets, rows, lse, g_logp, g_lse,
            logit_scale, softcap, ignore_index, chunk, need,
        )  # fmt: skip
        return gh, gw, gb, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------


def flr_gathered_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused ``log_softmax(logit_transform(hidden @ weight.T, bias, logit_scale, softcap))[targets]``.

    Args:
        hidden: (*, H) final hidden states (fp16/bf16/fp32/fp64; any strides); (R, H) with
            ``rows``.
        weight: (V, H) LM head (same dtype as ``hidden``); tied embeddings are fine.
        targets: (*) = ``hidden.shape[:-1]``, int64 (or int32) token ids in ``[0, V)`` or
            ``ignore_index``; with ``rows``, any shape (the shape of ``rows``).
        bias: optional (V,) LM-head bias.
        logit_scale: multiplies the logits (after the bias).
        softcap: if given, ``z = softcap * tanh(z / softcap)`` after scaling (Gemma-2/3).
        ignore_index: such targets give ``logp = 0`` and no gradient.
        chunk_size: vocabulary chunk of the torch forward and of the backward (every impl);
            default keeps about 4 Mi logits (CPU) / 64 Mi logits (CUDA) per chunk.
        impl: ``"auto"`` (Triton on CUDA, else torch; a Triton specialisation whose launch
            fails falls back to torch from then on, with one warning), ``"cuda"`` (explicit
            only: slow, see the module docstring), ``"triton"``, ``"torch"`` or
            ``"reference"``. An explicit impl that cannot run raises RuntimeError saying why.
        return_lse: also return ``lse`` (differentiable too).
        rows: optional int64 (or int32) row of ``hidden`` for each target, in ``[0, R)``:
            ``logp[m] = z[rows[m], targets[m]] - lse[rows[m]]``; the full-vocabulary pass
            runs once per row of ``hidden`` (pass each distinct row once).

    Returns:
        ``logp`` (shape of ``targets``) -- or ``(logp, lse)``, ``lse`` (*) = per row of
        ``hidden`` ((R,) with ``rows``) -- fp32 (fp64 for fp64 inputs). The (N, V) logits
        are never materialised (except by ``impl="reference"``); gradients flow to
        ``hidden``, ``weight`` and ``bias`` (summed over the targets that share a row).

    Validates shapes, dtypes, devices and the target and row ranges (a device sync on CUDA).
    On CUDA the torch path multiplies half inputs in their dtype (plain-torch precision);
    the Triton / CUDA kernels and the CPU torch path compute fp32 logits from half inputs.
    """
    _validate(hidden, weight, targets, bias, logit_scale, softcap, chunk_size, impl, rows)
    logit_scale = float(logit_scale)
    softcap = float(softcap) if softcap is not None else None
    if impl == "reference":
        _check_target_range(targets, weight.shape[0], ignore_index)
        if rows is not None:
            _check_row_range(rows, hidden.shape[0])
        return gathered_logprob_reference(
            hidden, weight, targets, bias=bias, logit_scale=logit_scale, softcap=softcap,
            ignore_index=ignore_index, return_lse=return_lse, rows=rows,
        )  # fmt: skip
    concrete = _resolve_impl(impl, hidden)
    if impl == "auto" and concrete == "triton":
        concrete = "auto-triton"  # a failing launch falls back to torch (logged once)
    hsize, vocab = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, hsize)  # (N, H): a view when possible
    t1 = targets.reshape(-1).long()  # (N,) / (M,)
    r1 = rows.reshape(-1).long() if rows is not None else None  # (M,)
    _check_target_range(t1, vocab, ignore_index)
    if r1 is not None:
        _check_row_range(r1, h2.shape[0])
    chunk = (
        chunk_size if chunk_size is not None else _default_chunk(h2.shape[0], vocab, hidden.device)
    )
    logp, lse = _GatheredLogprob.apply(
        h2, weight, bias, t1, r1, logit_scale, softcap, int(ignore_index), min(chunk, vocab),
        concrete,
    )  # fmt: skip
    logp = logp.reshape(targets.shape)
    if return_lse:
        return logp, lse if rows is not None else lse.reshape(targets.shape)
    return logp


def gathered_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Raw target logits, no softmax: ``z[m] = logit_transform(hidden[rows[m]] .
    weight[targets[m]] + bias[targets[m]])`` (``rows`` None: row m), shape of ``targets``,
    fp32 (fp64 for fp64 inputs), 0 where ignored. Row-wise dots ((M, H) products, no (M, V)
    logits); differentiable by plain autograd. (The released FLR scorer's "official" mode
    averages such raw logits.) Arguments as :func:`flr_gathered_logprob`."""
    _validate(hidden, weight, targets, bias, logit_scale, softcap, None, "torch", rows)
    hsize, vocab = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, hsize)
    t1 = targets.reshape(-1).long()
    r1 = rows.reshape(-1).long() if rows is not None else None
    _check_target_range(t1, vocab, ignore_index)
    if r1 is not None:
        _check_row_range(r1, h2.shape[0])
    z = _gathered_logits(
        h2, weight, bias, t1, r1, float(logit_scale),
        float(softcap) if softcap is not None else None, int(ignore_index),
    )  # fmt: skip
    return z.reshape(targets.shape)


# --------------------------------------------------------------------------------------
# segment reductions
# --------------------------------------------------------------------------------------


def _validate_segments(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int):
    if not isinstance(values, torch.Tensor) or not isinstance(segment_ids, torch.Tensor):
        raise TypeError("values and segment_ids must be torch.Tensors")
    if values.dim() < 1:
        raise ValueError("values must have shape (T, *), got a 0-d tensor")
    if segment_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"segment_ids must be int64 (or int32), got {segment_ids.dtype}")
    if tuple(segment_ids.shape) != (values.shape[0],):
        raise ValueError(
            f"segment_ids must have shape (T,) = ({values.shape[0]},), "
            f"got {tuple(segment_ids.shape)}"
        )
    if segment_ids.device != values.device:
        raise ValueError(
            f"segment_ids must be on values' device {values.device}, got {segment_ids.device}"
        )
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be a non-negative int, got {num_segments!r}")
    if segment_ids.numel() and bool(((segment_ids < 0) | (segment_ids >= num_segments)).any()):
        raise ValueError(f"segment_ids must lie in [0, num_segments={num_segments})")


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum ``values`` (T, *) into ``num_segments`` buckets: out (S, *), ``out[s] = sum of
    values[i] with segment_ids[i] == s`` (``index_add``; differentiable). Empty segments give
    0. Typical use: per-token log-probs (T,) -> per-sequence scores (B,)."""
    _validate_segments(values, segment_ids, num_segments)
    out = values.new_zeros((num_segments, *values.shape[1:]))  # (S, *)
    return out.index_add(0, segment_ids.long(), values)


def segment_mean(
    values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """Mean of ``values`` (T, *) per segment: out (S, *). Empty segments give NaN (0 / 0),
    deliberately: a sequence with no scored tokens has no mean; mask or ``nan_to_num`` it.
    Integer values are averaged in the default float dtype."""
    _validate_segments(values, segment_ids, num_segments)
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    sums = segment_sum(values, segment_ids, num_segments)  # (S, *)
    counts = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    counts.index_add_(0, segment_ids.long(), torch.ones_like(segment_ids, dtype=values.dtype))
    return sums / counts.reshape(-1, *([1] * (values.dim() - 1)))
