"""The measuring stages of scripts/gpu_check.sh, one subcommand each; each writes
``OUT/<stage>.json`` (rows of metrics + ok + notes) and ``summary`` prints them as tables.

    python3 scripts/gpu_check.py aot      --out DIR               compile for sm_90 without a GPU
    python3 scripts/gpu_check.py compiled --out DIR [--dry-run]   kernels compiled, not interpreted
    python3 scripts/gpu_check.py logprob  --out DIR [--dry-run]   fused log-prob, 8B LM-head shape
    python3 scripts/gpu_check.py tree     --out DIR [--dry-run]   tree attention, 8B head shape
    python3 scripts/gpu_check.py engine   --out DIR [--dry-run]   engine vs reference, 8B width
    python3 scripts/gpu_check.py summary  --out DIR

Timing: CUDA events around each call, median of ``reps`` after 2 warm-ups (the LM head of
1 GiB does not fit in L2, so no flush is needed). TFLOP/s count the matmul work only:
``2 N H V`` for the log-prob, ``4 Hq D * (visible query-key pairs)`` for attention. The peak
is an 8192^3 bf16 ``torch.matmul`` measured in the same run (nominal ~790 on an H200).
Errors are against fp32 references computed from the same (rounded) inputs.
``--dry-run``: tiny shapes on the CPU (Triton under TRITON_INTERPRET=1), so CI runs every
line of this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

NOMINAL_PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on this workplace's H200s

# every size, {False: the GPU run, True: the dry run}; one place to read (or shrink) them
SHAPES = {
    "peak": {False: 8192, True: 256},  # square matmul of the peak measurement
    "logprob": {False: (8192, 4096, 128256), True: (64, 48, 1009)},  # N, H, V
    "heads": {False: (32, 8, 128), True: (4, 2, 32)},  # Hq, Hkv, D
    # prefix, replies, reply length, follow-ups per reply, follow-up length
    "trie": {False: (1000, 8, 200, 120, 15), True: (40, 2, 10, 3, 5)},
    # Llama width: hidden, heads, kv heads, MLP, vocab
    "llama": {False: (4096, 32, 8, 14336, 128256), True: (64, 4, 2, 128, 1000)},
    # conversations, replies each, follow-ups each, conversation / reply / follow-up lengths
    "workload": {False: (2, 4, 16, 300, 60, (8, 16)), True: (1, 2, 4, 20, 8, (3, 6))},
}


# --------------------------------------------------------------------------- helpers


def _torch():
    import torch

    return torch


def timed(fn, reps: int, device) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after 2 warm-ups."""
    torch = _torch()
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak(device, dry: bool) -> float:
    """Measured bf16 matmul TFLOP/s (8192^3 on CUDA; a token 256^3 fp32 on the dry run)."""
    torch = _torch()
    n = SHAPES["peak"][dry]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timed(lambda: a @ b, 3 if dry else 10, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_of(dry: bool):
    torch = _torch()
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on the CPU")
    return torch.device("cuda")


def write(out: Path, stage: str, payload: dict) -> None:
    (out / f"{stage}.json").write_text(json.dumps(payload, indent=1, default=str))


def max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max().item())


def compiled_kernels(jit_fn) -> list:
    """The CompiledKernel objects a Triton JITFunction holds (triton 3.x cache layouts)."""
    found = []
    caches = getattr(jit_fn, "device_caches", None) or {}
    for entry in caches.values():
        for part in entry if isinstance(entry, tuple) else (entry,):
            if isinstance(part, dict):
                found += [k for k in part.values() if hasattr(k, "asm")]
    old = getattr(jit_fn, "cache", None)
    if isinstance(old, dict):
        for per_dev in old.values():
            vals = per_dev.values() if isinstance(per_dev, dict) else [per_dev]
            found += [k for k in vals if hasattr(k, "asm")]
    return found


def kernel_info(k) -> dict:
    """Launch facts of one compiled kernel: warps, stages, shared memory, registers, spills,
    and which tensor-core instructions its PTX uses."""
    md = getattr(k, "metadata", None)
    get = (lambda name: getattr(md, name, None)) if md is not None else (lambda name: None)
    if hasattr(k, "_init_handles"):
        try:
            k._init_handles()
        except Exception:  # noqa: BLE001 - informative only
            pass
    ptx = k.asm.get("ptx", "") if isinstance(getattr(k, "asm", None), dict) else ""
    return {
        "warps": get("num_warps"),
        "stages": get("num_stages"),
        "smem": get("shared"),
        "regs": getattr(k, "n_regs", None),
        "spills": getattr(k, "n_spills", None),
        "cubin": "cubin" in getattr(k, "asm", {}),
        "wgmma": "wgmma" in ptx,
        "mma": "mma.sync" in ptx,
    }


# --------------------------------------------------------------------------- compiled


def stage_compiled(out: Path, dry: bool) -> bool:
    """The kernels run compiled (TRITON_INTERPRET unset, cubins in the JIT caches) on the
    GPU; interpreted on the dry run. The CUDA extension imports and runs."""
    torch = _torch()
    device = device_of(dry)
    from flr_engine.kernels import fused_logprob as kfl
    from flr_engine.kernels import tree_attention as kta
    from flr_engine.ops.fused_logprob import flr_gathered_logprob, gathered_logprob_reference
    from flr_engine.ops.tree_attention import flr_tree_attention, tree_attention_reference

    rows, notes, ok = [], [], True
    env = os.environ.get("TRITON_INTERPRET")
    want_interp = dry
    rows.append({"check": "TRITON_INTERPRET", "value": env, "ok": (env == "1") == want_interp})
    rows.append({"check": "fused_logprob interpreted", "value": kfl.INTERPRETED,
                 "ok": kfl.INTERPRETED == want_interp})  # fmt: skip
    rows.append({"check": "tree_attention interpreted", "value": kta.triton_interpreting(),
                 "ok": kta.triton_interpreting() == want_interp})  # fmt: skip

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 64, generator=g).to(device)
    w = torch.randn(1009, 64, generator=g).to(device)
    t = torch.randint(0, 1009, (37,), generator=g).to(device)
    lp = flr_gathered_logprob(h, w, t, impl="triton")
    err = max_err(lp, gathered_logprob_reference(h, w, t))
    rows.append({"check": "fused_logprob triton vs reference", "value": err, "ok": err < 1e-4})
    from flr_engine.engine.packer import pack_sequences

    pack = pack_sequences([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9], [1, 7]], 100).packs[0]
    se, pos = pack.subtree_end.to(device), pack.position_ids.to(device)
    q = torch.randn(4, pack.num_unique, 32, generator=g).to(device)
    kv = torch.randn(2, 2, pack.num_unique, 32, generator=g).to(device)
    o = flr_tree_attention(q, kv[0], kv[1], se, pos, scale=0.2, impl="triton")
    err = max_err(o, tree_attention_reference(q, kv[0], kv[1], se, pos, scale=0.2))
    rows.append({"check": "tree_attention triton vs reference", "value": err, "ok": err < 1e-4})

    if not dry:
        for name, fn in (("fused_logprob", kfl._fused_logprob_fwd_kernel),
                         ("tree_attention", kta._tree_attn_fwd_kernel)):  # fmt: skip
            ks = compiled_kernels(fn)
            infos = [kernel_info(k) for k in ks]
            good = bool(ks) and all(i["cubin"] for i in infos)
            rows.append({"check": f"{name} compiled kernels", "value": infos, "ok": good})
        try:
            from flr_engine import _C_cuda

            lp2 = flr_gathered_logprob(h, w, t, impl="cuda")
            err = max_err(lp2, lp)
            rows.append({"check": "_C_cuda built and runs", "value": _C_cuda.__file__,
                         "ok": err < 1e-4})  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            rows.append({"check": "_C_cuda built and runs", "value": repr(exc), "ok": False})
    else:
        notes.append("dry run: the kernels are expected to be interpreted")
    ok = all(r["ok"] for r in rows)
    write(out, "compiled", {"ok": ok, "rows": rows, "notes": notes})
    return ok


# --------------------------------------------------------------------------- AOT (no GPU)


def _aot_compile(fn, sig: dict, consts: dict, unit: tuple, div16: tuple, warps: int, stages: int):
    """``triton.compile`` for sm_90 without a GPU, with the JIT's specialisations: ``unit``
    arguments == 1 (inner strides), ``div16`` ones divisible by 16. Returns kernel facts
    from ptxas (registers, spill stack via cuobjdump), shared memory and wgmma use."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {**consts, **{name: 1 for name in unit}}
    sig = {**sig, **{name: "constexpr" for name in consts}}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    info = {"warps": warps, "stages": stages, "smem": k.metadata.shared,
            "wgmma": "wgmma" in k.asm["ptx"], "regs": None, "spill_bytes": None}  # fmt: skip
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res, re.S)
    if m:
        info.update(regs=int(m.group(1)), spill_bytes=int(m.group(2)))
    return info


def stage_aot(out: Path, dry: bool) -> bool:
    """Compile both Triton kernels for sm_90 on a machine without a GPU, at the tiles the
    library picks on an H100/H200 (227 KB of shared memory), and report registers and spills
    (CI: catches compiled-mode errors the interpreter cannot). Needs TRITON_INTERPRET unset."""
    torch = _torch()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("the aot stage needs TRITON_INTERPRET unset")
    from flr_engine.kernels import fused_logprob as kfl
    from flr_engine.kernels import tree_attention as kta
    from flr_engine.ops.tree_attention import suggested_block_sizes

    smem = 227 * 1024
    rows = []
    fl_sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*fp32", "t_ptr": "*i64",
              "m_ptr": "*fp32", "s_ptr": "*fp32", "zt_ptr": "*fp32", "N": "i32", "H": "i32",
              "V": "i32", "split_size": "i32", "stride_hn": "i32", "stride_hh": "i32",
              "stride_wv": "i32", "stride_wh": "i32", "logit_scale": "fp32", "softcap": "fp32",
              "ignore_index": "i32", "row_blocks": "i32", "num_splits": "i32"}  # fmt: skip
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        bn, bv, bh, nw, ns = kfl.launch_config(8192, 4096, 128256, dtype, smem)
        sig = {**fl_sig, "h_ptr": f"*{name}", "w_ptr": f"*{name}"}
        consts = {"HAS_BIAS": True, "HAS_SOFTCAP": True, "BLOCK_N": bn, "BLOCK_V": bv,
                  "BLOCK_H": bh, "INPUT_PRECISION": "ieee" if name == "fp32" else "tf32",
                  "UPCAST": False, "GROUP_N": 8}  # fmt: skip
        row = {"kernel": f"fused_logprob {name} {bn}x{bv}x{bh}"}
        try:
            row.update(_aot_compile(
                kfl._fused_logprob_fwd_kernel, sig, consts, ("stride_hh", "stride_wh"),
                ("h_ptr", "w_ptr", "b_ptr", "t_ptr", "m_ptr", "s_ptr", "zt_ptr", "H",
                 "stride_hn", "stride_wv"), nw, ns))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failed compile is the result
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    ta_sig = {**{n: "*bf16" for n in ("Q", "K", "V", "Out")}, "Lse": "*fp32",
              **{n: "*i32" for n in ("SubEnd", "Pos", "BlkPtr", "BlkFullEnd", "BlkIdx")},
              "qk_scale": "fp32", "softcap": "fp32", "window": "i32", "T": "i32", "D": "i32",
              "GROUP": "i32"}  # fmt: skip
    for name in "qh qt qd kh kt kd vh vt vd ot oh od lt lh".split():  # the kernel's order
        ta_sig[f"stride_{name}"] = "i32"
    cases = [(64, torch.bfloat16, False), (128, torch.bfloat16, False), (128, torch.bfloat16, True),
             (256, torch.bfloat16, False), (128, torch.float32, False), (256, torch.float32, True)]  # fmt: skip
    for d, dtype, ws in cases:
        name = "fp32" if dtype == torch.float32 else "bf16"
        bm, bn = suggested_block_sizes(d, dtype, "triton", smem=smem)
        nw, ns = kta.launch_config(bm, bn, d, 4 if name == "fp32" else 2, smem)
        sig = {**ta_sig, **{n: f"*{name}" for n in ("Q", "K", "V", "Out")}}
        consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": d, "HAS_WINDOW": ws,
                  "HAS_SOFTCAP": ws, "WRITE_LSE": ws, "UPCAST": False,
                  "DOT_PREC": "ieee" if name == "fp32" else "tf32"}  # fmt: skip
        label = f"tree_attention {name} D={d} {bm}x{bn}" + (" window+softcap" if ws else "")
        row = {"kernel": label}
        try:
            row.update(_aot_compile(
                kta._tree_attn_fwd_kernel, sig, consts,
                ("stride_qd", "stride_kd", "stride_vd", "stride_od"),
                ("Q", "K", "V", "Out", "Lse", "SubEnd", "Pos", "BlkPtr", "BlkFullEnd", "BlkIdx",
                 "stride_qh", "stride_qt", "stride_kh", "stride_kt", "stride_vh", "stride_vt",
                 "stride_ot", "stride_oh"), nw, ns))  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    ok = all("error" not in r and r["smem"] <= smem for r in rows)
    notes = ["compiled for sm_90 (GPUTarget cuda 90) without a GPU; spill_bytes > 0 costs speed"]
    write(out, "aot", {"ok": ok, "rows": rows, "notes": notes})
    return ok


# --------------------------------------------------------------------------- fused log-prob


def stage_logprob(out: Path, dry: bool) -> bool:
    """Fused gathered log-prob at N=8192, H=4096, V=128256 bf16: Triton (default tiles and a
    small sweep), the chunked torch path, naive full logits and the CUDA extension."""
    torch = _torch()
    device = device_of(dry)
    from flr_engine.kernels import fused_logprob as kfl
    from flr_engine.ops import fused_logprob as fl

    n, h, v = SHAPES["logprob"][dry]
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(dtype)  # like a normed state
    weight = (torch.randn(v, h, device=device, generator=g) * 0.05).to(dtype)  # logits ~N(0, 3)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    flop = 2.0 * n * h * v

    z = hidden.float() @ weight.float().T  # (N, V) fp32 reference logits
    ref_lse = torch.logsumexp(z, -1)
    ref_lp = z.gather(1, targets[:, None])[:, 0] - ref_lse
    del z
    peak = matmul_peak(device, dry)

    def naive():
        logits = hidden @ weight.T  # (N, V) in bf16, as plain torch code does
        return torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0], None

    def op(impl, **kw):
        return lambda: fl.flr_gathered_logprob(
            hidden, weight, targets, impl=impl, return_lse=True, **kw
        )

    def tiles(bn, bv, bh, nw, ns):
        return lambda: kfl.fused_logprob_forward(
            hidden, weight, None, targets, block_n=bn, block_v=bv, block_h=bh,
            num_warps=nw, num_stages=ns,
        )  # fmt: skip

    default = kfl.launch_config(n, h, v, dtype, kfl.smem_budget(device), kfl.INTERPRETED)
    providers = [
        ("triton " + "x".join(map(str, default[:3])) + f" w{default[3]} s{default[4]} (auto)",
         op("triton"), 20),
        ("torch chunked (cuBLAS)", op("torch"), 20),
        ("naive logits + log_softmax", naive, 10),
    ]  # fmt: skip
    if not dry:
        # a small sweep around the default; the last is the old fixed tile
        sweep = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                 (64, 128, 64, 8, 2)]  # fmt: skip
        for cfg in sweep:
            if cfg != default:
                name = "triton " + "x".join(map(str, cfg[:3])) + f" w{cfg[3]} s{cfg[4]}"
                providers.append((name, tiles(*cfg), 10))
        if fl._cuda_ext()[0] is not None:
            providers.append(("cuda extension (CUDA cores)", op("cuda"), 3))
    rows, notes = [], []
    for name, fn, reps in providers:
        row = {"provider": name}
        try:
            lp, lse = fn()
            row["max_err_logp"] = max_err(lp, ref_lp)
            if lse is not None:
                row["max_err_lse"] = max_err(lse, ref_lse)
            ms = timed(fn, 2 if dry else reps, device)
            row.update(ms=ms, tflops=flop / (ms * 1e-3) / 1e12)
            row["pct_peak"] = 100 * row["tflops"] / peak
            row["pct_790"] = 100 * row["tflops"] / NOMINAL_PEAK_TFLOPS
        except Exception as exc:  # noqa: BLE001 - a failing provider is a result
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not dry:
        ks = compiled_kernels(kfl._fused_logprob_fwd_kernel)
        notes.append({"compiled fused kernels": [kernel_info(k) for k in ks]})
    notes.append({"shape": [n, h, v], "dtype": str(dtype), "matmul_peak_tflops": peak,
                  "auto_failures": dict(map(lambda kv: (str(kv[0]), kv[1]),
                                            fl._triton_auto_failed.items()))})  # fmt: skip
    ok_rows = [r for r in rows if "error" not in r]
    # pass: the default Triton tile ran, and agrees with fp32 as well as bf16 inputs allow
    ok = bool(ok_rows) and "error" not in rows[0] and rows[0]["max_err_logp"] < 5e-3
    write(out, "logprob", {"ok": ok, "rows": rows, "notes": notes})
    return ok


# --------------------------------------------------------------------------- tree attention


def build_tree(dry: bool, seed: int = 0):
    """One conversation prefix, R replies, F follow-ups per reply (a 3-token role header
    shared by all follow-ups, then their own tokens), packed as one trie."""
    import random

    from flr_engine.engine.packer import pack_sequences

    r = random.Random(seed)
    p_len, n_rep, rep_len, n_fu, fu_len = SHAPES["trie"][dry]
    tok = lambda k: [r.randrange(1000, 120000) for _ in range(k)]  # noqa: E731
    prefix, header = tok(p_len), [7, 8, 9]
    seqs = []
    for _ in range(n_rep):
        reply = tok(rep_len)
        seqs += [prefix + reply + header + tok(fu_len - 3) for _ in range(n_fu)]
    return pack_sequences(seqs, token_budget=10**7).packs[0], len(seqs)


def stage_tree(out: Path, dry: bool) -> bool:
    """Tree attention at Llama-3-8B's head shape (32 q heads, 8 kv heads, D=128, bf16) on a
    realistic trie vs SDPA with a dense boolean mask; causal flash SDPA over as many tokens
    is the ceiling (it does T^2/2 pairs; the trie needs far fewer)."""
    torch = _torch()
    import torch.nn.functional as F

    device = device_of(dry)
    from flr_engine.ops.tree_attention import (
        TreeAttentionPlan,
        _dense_math,
        flr_tree_attention,
        suggested_block_sizes,
        tree_attention_mask,
    )

    hq, hkv, d = SHAPES["heads"][dry]
    dtype = torch.bfloat16
    pack, n_seqs = build_tree(dry)
    T = pack.num_unique
    se, pos = pack.subtree_end.to(device), pack.position_ids.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(hq, T, d, device=device, generator=g).to(dtype)
    k = torch.randn(hkv, T, d, device=device, generator=g).to(dtype)
    v = torch.randn(hkv, T, d, device=device, generator=g).to(dtype)
    scale = d**-0.5
    pairs = float((pos.to(torch.float64) + 1).sum())  # visible (query, key) pairs: depth + 1
    flop_tree = 4.0 * hq * d * pairs
    flop_causal = 4.0 * hq * d * T * (T + 1) / 2

    t0 = time.perf_counter()
    bm, bn = suggested_block_sizes(d, dtype, "triton", device)
    plan = TreeAttentionPlan.build(se, pos, block_m=bm, block_n=bn)
    if device.type == "cuda":
        torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 1e3
    plan_t = TreeAttentionPlan.build(se, pos, block_m=64, block_n=64)  # torch path's tiles
    mask = tree_attention_mask(se, pos)  # (T, T) bool
    # (1, Hq, T, D): K / V repeated per q head once, outside the timing (the backends that
    # take a boolean mask do not all take GQA)
    q4 = q[None]
    k4, v4 = (x.repeat_interleave(hq // hkv, 0)[None] for x in (k, v))

    def sdpa_dense():
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)
        return out[0].transpose(0, 1)  # (T, Hq, D)

    def sdpa_causal():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)

    providers = [
        (f"triton tree {bm}x{bn}", lambda: flr_tree_attention(q, k, v, se, pos, scale=scale,
                                                              plan=plan, impl="triton"), flop_tree),
        ("torch block-sparse 64x64", lambda: flr_tree_attention(q, k, v, se, pos, scale=scale,
                                                                plan=plan_t, impl="torch"), flop_tree),
        ("SDPA dense bool mask", sdpa_dense, flop_tree),
        ("flash SDPA causal, same T (ceiling)", sdpa_causal, flop_causal),
    ]  # fmt: skip
    outs, rows = {}, []
    for name, fn, flop in providers:
        row = {"provider": name}
        try:
            outs[name] = fn()
            ms = timed(fn, 2 if dry else 10, device)
            row.update(ms=ms, useful_tflops=flop / (ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    # fp32 reference, one kv head (G q heads) at a time: (G, T, T) scores, not (Hq, T, T)
    G = hq // hkv
    errs = {name: 0.0 for name in outs if "causal" not in name}
    for j in range(hkv):
        hs = slice(j * G, (j + 1) * G)
        ref, _ = _dense_math(q[hs], k[j : j + 1], v[j : j + 1], mask, scale, None, torch.float32)
        for name in errs:
            errs[name] = max(errs[name], max_err(outs[name][:, hs], ref))
        del ref
    for row in rows:
        if row["provider"] in errs:
            row["max_err"] = errs[row["provider"]]
    tri = rows[0]
    if "ms" in tri:
        for row in rows[1:]:
            if "ms" in row:
                row["ms_ratio_vs_triton"] = row["ms"] / tri["ms"]
    notes = [{"T": T, "sequences": n_seqs, "heads": [hq, hkv, d], "dtype": str(dtype),
              "visible_pairs": pairs, "causal_pairs": T * (T + 1) / 2, "plan_ms": plan_ms,
              "plan_entries": plan.num_entries, "plan_full": plan.num_full,
              "plan_dense_entries": plan.dense_entries}]  # fmt: skip
    if not dry:
        from flr_engine.kernels import tree_attention as kta

        notes.append({"compiled tree kernels": [kernel_info(x) for x in
                                                compiled_kernels(kta._tree_attn_fwd_kernel)]})  # fmt: skip
    sdpa_err = errs.get("SDPA dense bool mask", 0.0)
    # bf16 error at most 2x SDPA's (4x on the dry run: the interpreter truncates to bf16)
    ok = "error" not in tri and tri["max_err"] <= (4 if dry else 2) * sdpa_err + 2e-3
    write(out, "tree", {"ok": ok, "rows": rows, "notes": notes})
    return ok


# --------------------------------------------------------------------------- engine e2e


def random_llama(dry: bool, device, dtype):
    """2 layers of Llama-3-8B's width (hidden 4096, 32 / 8 heads, MLP 14336, vocab 128256),
    random N(0, 0.04) weights: attention sharp enough (q.k / sqrt(D) of a few units) and
    logits spread over a few units, so masking or normaliser mistakes move the scores."""
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, heads, kv_heads, mlp, vocab = SHAPES["llama"][dry]
    dims = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=mlp, vocab_size=vocab)  # fmt: skip
    cfg = LlamaConfig(num_hidden_layers=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, **dims)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.04)
    return model.eval()


def flr_workload(dry: bool, vocab: int):
    """(sequences, groups): per (conversation, reply) the indices of its positive and
    negative follow-up sequences. reward = mean lp(P) - mean lp(N)."""
    import random

    from flr_engine.chat import ScoredSequence

    r = random.Random(1)
    n_conv, n_rep, n_fu, conv_len, rep_len, fu_len = SHAPES["workload"][dry]
    tok = lambda k: [r.randrange(10, vocab) for _ in range(k)]  # noqa: E731
    header = [3, 4, 5]
    seqs, groups = [], []
    for c in range(n_conv):
        conv = tok(conv_len * (3 + 2 * c) // 3)  # 300, 500 tokens on the GPU
        for _ in range(n_rep):
            reply = tok(rep_len)
            pos_idx, neg_idx = [], []
            for f in range(n_fu):
                fu = tok(r.randint(*fu_len))
                ids = conv + reply + header + fu
                start = len(ids) - len(fu)
                (pos_idx if f % 2 == 0 else neg_idx).append(len(seqs))
                seqs.append(ScoredSequence(ids=ids, targets=list(range(start, len(ids))),
                                           logit_pos=start - 1, logit_ids=[0],
                                           reply_targets=[]))  # fmt: skip
            groups.append((pos_idx, neg_idx))
    return seqs, groups


def rewards(scores, groups):
    return [sum(scores[i] for i in p) / len(p) - sum(scores[i] for i in n) / len(n)
            for p, n in groups]  # fmt: skip


def stage_engine(out: Path, dry: bool) -> bool:
    """Engine (trie + tree attention + fused log-prob; impl "auto": Triton on CUDA) vs the
    reference (one full forward per sequence) on a 2-layer random Llama of 8B width, fp32
    and bf16. fp32: the difference is the engine's error; bf16: bounded by 2x the bf16
    reference's own error against the fp32 reference."""
    torch = _torch()
    device = device_of(dry)
    from flr_engine.engine.backend import EngineBackend
    from flr_engine.ops import fused_logprob as fl
    from flr_engine.ops import tree_attention as ta
    from flr_engine.reference import ReferenceBackend
    from flr_engine.scorer import sequence_scores

    # the dry run drives the Triton kernels (interpreted) through the engine explicitly
    impl = "triton" if dry else "auto"
    rows, notes, results = [], [], {}
    seqs, groups = None, None
    for dtype in (torch.float32, torch.bfloat16):
        model = random_llama(dry, device, dtype)
        if seqs is None:
            seqs, groups = flr_workload(dry, model.config.vocab_size)
        for name, backend in (
            ("reference", ReferenceBackend(model)),
            ("engine", EngineBackend(model, token_budget=8192, attn_impl=impl, logprob_impl=impl)),
        ):
            sequence_scores(backend, seqs[:2])  # warm-up (kernel compilation)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            scores = sequence_scores(backend, seqs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[(name, dtype)] = (scores, rewards(scores, groups), time.perf_counter() - t0)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    truth_lp, truth_rw, _ = results[("reference", torch.float32)]
    for (name, dtype), (lp, rw, secs) in results.items():
        rows.append({
            "run": f"{name} {str(dtype).replace('torch.', '')}",
            "seconds": secs,
            "max_dlp_vs_ref_fp32": max(abs(a - b) for a, b in zip(lp, truth_lp)),
            "max_dreward_vs_ref_fp32": max(abs(a - b) for a, b in zip(rw, truth_rw)),
            "finite": all(math.isfinite(x) for x in lp),
        })  # fmt: skip
    by = {r["run"]: r for r in rows}
    e32, e16, r16 = by["engine float32"], by["engine bfloat16"], by["reference bfloat16"]
    ok = (
        all(r["finite"] for r in rows)
        and e32["max_dreward_vs_ref_fp32"] < 1e-3
        and e32["max_dlp_vs_ref_fp32"] < 1e-3
        and e16["max_dlp_vs_ref_fp32"] <= 2 * r16["max_dlp_vs_ref_fp32"] + 1e-2
    )
    notes.append({"sequences": len(seqs), "groups": len(groups), "impl": impl,
                  "logprob_auto_failures": {str(k): v for k, v in fl._triton_auto_failed.items()},
                  "attention_auto_failures": {str(k): v for k, v in ta._triton_auto_failed.items()}})  # fmt: skip
    write(out, "engine", {"ok": ok, "rows": rows, "notes": notes})
    return ok


# --------------------------------------------------------------------------- summary


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}"
    if isinstance(x, (list, dict)):
        return json.dumps(x, default=str)[:110]
    return str(x)


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _kernel_line(info: dict) -> str:
    return (f"warps {info['warps']} stages {info['stages']} smem {info['smem']} "
            f"regs {info['regs']} spills {info['spills']} cubin {info['cubin']} "
            f"wgmma {info['wgmma']} mma.sync {info['mma']}")  # fmt: skip


def _print_note(note) -> None:
    if isinstance(note, str):
        print("   ", note)
        return
    for key, val in note.items():
        if isinstance(val, list) and val and isinstance(val[0], dict) and "warps" in val[0]:
            print(f"    {key}:")
            for info in val:
                print("      ", _kernel_line(info))
        else:
            print(f"    {key}: {json.dumps(val, default=str)}")


def stage_summary(out: Path, dry: bool) -> bool:
    for stage in ("aot", "compiled", "logprob", "tree", "engine"):
        path = out / f"{stage}.json"
        if not path.exists():
            print(f"\n== {stage}: no result (stage failed or skipped; see {stage}.log)")
            continue
        data = json.loads(path.read_text())
        print(f"\n== {stage}: {'PASS' if data['ok'] else 'FAIL'}")
        rows, kernels = data["rows"], []
        if stage == "compiled":  # kernel facts are long: one line each, below the table
            kernels = [(r["check"], r["value"]) for r in rows if isinstance(r["value"], list)]
            rows = [{**r, "value": "see below" if isinstance(r["value"], list) else r["value"]}
                    for r in rows]  # fmt: skip
        print(table(rows))
        for check, infos in kernels:
            print(f"    {check}:")
            for info in infos:
                print("      ", _kernel_line(info))
        for note in data.get("notes", []):
            _print_note(note)
    return True


STAGES = {
    "aot": stage_aot,
    "compiled": stage_compiled,
    "logprob": stage_logprob,
    "tree": stage_tree,
    "engine": stage_engine,
    "summary": stage_summary,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage != "summary":
        torch = _torch()
        torch.manual_seed(0)
        print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
              f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}", flush=True)  # fmt: skip
    try:
        ok = STAGES[args.stage](args.out, args.dry_run)
    except Exception:
        traceback.print_exc()
        return 2
    if args.stage != "summary":
        print(f"{args.stage}: {'ok' if ok else 'CHECK FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
