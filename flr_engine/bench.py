"""Scoring-speed benchmark: the same FLR job through each provider, ratios from one run.

Providers (all score the *same* rendered sequences and must agree):

* ``reference``       one full forward per (reply, follow-up), as the paper's scorer;
* ``hf-prefix-cache`` the best plain transformers code: prefix KV reused, padded batches;
* ``engine``          packed prefix tree, tree attention, fused gathered log-prob;
* ``limit``           one plain decoder forward over the engine's unique tokens (causal
                      SDPA over each pack, no LM head, no scoring): what no scorer beats
                      by much on this machine.

Optional providers (not in the default set):

* ``engine-bf16``     the engine with the model in bfloat16, whatever ``--dtype`` says;
* ``llamacpp``        llama.cpp on the GGUF itself (``flr_engine.llamacpp``, extra
                      ``[llamacpp]``): prefix decoded once per reply, follow-ups as sequences
                      sharing its KV cells, logits only at scored positions;
* ``llamacpp-naive``  llama.cpp's high-level API as a new user writes it (all-position logits,
                      ``n_tokens`` rewound per follow-up).

The llama.cpp providers multiply the GGUF's quantised weights (Q4_1 for the default model)
with 8-bit activations, and bf16 rounds every activation, so these are checked against the
exact providers at their own tolerances (``TOLERANCES``), not at 1e-3.

Each provider runs in its own subprocess; its peak memory is the peak RSS above the RSS
before scoring (the model loaded, the sequences rendered, one warm-up call on two sequences
done), sampled every 2 ms. The reference is too slow to run whole on a CPU: it is timed on a
random sample of the sequences and its time scaled by the sequence count (its cost is a
sum of independent per-sequence passes), and labelled so.

Scaling sweep knobs: ``n_replies`` per conversation, ``n_followups`` (a prefix of the unique
template texts), ``context_tokens`` (contexts grown with turns of other rows).

Workload W1: 16 conversations of hh-rlhf-helpful-base x (chosen, rejected) x the
``flr-helpfulness`` follow-ups, default model, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time

from flr_engine.errors import ConfigError, MissingFileError
from flr_engine.io import read_jsonl

PROVIDERS = ("reference", "hf-prefix-cache", "engine", "limit")  # the default set
LLAMACPP_PROVIDERS = ("llamacpp", "llamacpp-naive")
ALL_PROVIDERS = PROVIDERS + ("engine-bf16",) + LLAMACPP_PROVIDERS
EXACT_ATOL = 1e-3  # providers that compute the same fp32 arithmetic (up to summation order)
# max |mean log-prob - exact| allowed per sequence for the inexact providers, measured on
# W1 and a second sample (README, Speed): bf16 max 0.10 vs fp32 (over 3,744 sequences);
# llama.cpp's Q4_1 x 8-bit activations max 0.13, and in llama.cpp the result of a sequence
# moves by up to 0.06 with the batch it is decoded in (a 1e-7 change upstream flips an 8-bit
# rounding), so no tighter bound is meaningful. About 2x the measured maxima.
TOLERANCES = {"engine-bf16": 0.2, "llamacpp": 0.25, "llamacpp-naive": 0.25}
DEFAULT_DATA = os.path.join("..", "shared", "data", "pairwise", "hh-rlhf-helpful-base.jsonl.gz")


def load_pairs(path: str, n_conv: int, n_replies: int = 2, context_tokens: int | None = None,
               tokenizer=None) -> tuple[list, list]:
    """``n_conv`` conversations (non-tie rows) x ``n_replies`` candidate replies.

    Replies: the row's chosen and rejected, then replies of later rows (a realistic spread
    of lengths). ``context_tokens``: grow each context to about that many tokens by
    prepending turns of other rows (the scaling sweep), measured with ``tokenizer``.
    """
    if not os.path.exists(path):
        raise MissingFileError(f"benchmark data {path} not found (pass --data)")
    rows = []
    for _, row in read_jsonl(path):
        if not row.get("tie"):
            rows.append(row)
        if len(rows) >= n_conv + n_replies + 64:
            break
    pool = [x for r in rows for x in (r["chosen"], r["rejected"])]
    filler = [  # (user, assistant) turns of later rows, prepended to grow a context
        [r["context"][0], {"role": "assistant", "content": r["chosen"]}] for r in rows[n_conv:]
    ]
    convs, replies = [], []
    for i, row in enumerate(rows[:n_conv]):
        ctx = list(row["context"])
        for pair in filler if context_tokens else []:
            text = tokenizer.apply_chat_template(ctx, tokenize=False)
            if len(tokenizer(text, add_special_tokens=False).input_ids) >= context_tokens:
                break
            ctx = pair + ctx
        cands = [row["chosen"], row["rejected"]] + pool[2 * (i + 1) :]
        for r in cands[:n_replies]:
            convs.append(ctx)
            replies.append(r)
    return convs, replies


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the lifetime max elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Peak RSS above the starting RSS while the block runs, sampled every 2 ms.

    Workers run with ``MALLOC_MMAP_THRESHOLD_`` set so large freed buffers go back to the OS
    and RSS follows live memory rather than the allocator's high-water mark.
    """

    def __enter__(self):
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def extra_mb(self) -> float:
        return self.peak - self.base


def _run_provider(provider: str, scorer, seqs: list, ref_sample: int, token_budget: int, seed: int) -> dict:
    """Time one provider on ``seqs``; return its seconds (and scores / token counts)."""
    import torch

    from flr_engine.scorer import sequence_scores

    t0 = time.perf_counter()
    if provider == "reference":
        sample = sorted(random.Random(seed).sample(range(len(seqs)), min(ref_sample, len(seqs))))
        vals = sequence_scores(scorer.backend, [seqs[i] for i in sample])
        dt = time.perf_counter() - t0
        return dict(seconds=dt * len(seqs) / len(sample), measured_seconds=dt, sampled=len(sample),
                    scores={str(i): v for i, v in zip(sample, vals)})
    if provider == "limit":
        from flr_engine.engine.forward import packed_hidden_states
        from flr_engine.engine.packer import pack_sequences

        result = pack_sequences([s.ids for s in seqs], token_budget)
        with torch.no_grad():
            for pack in result.packs:
                packed_hidden_states(scorer.model, pack, tree=False)
        return dict(seconds=time.perf_counter() - t0, unique_tokens=result.num_unique)
    vals = sequence_scores(scorer.backend, seqs)
    out = dict(seconds=time.perf_counter() - t0, scores={str(i): v for i, v in enumerate(vals)})
    if provider in ("engine", "engine-bf16"):
        out["unique_tokens"] = scorer.backend.last_stats["unique_tokens"]
    if provider in LLAMACPP_PROVIDERS:
        out["decoded_tokens"] = scorer.backend.last_stats["decoded_tokens"]
    return out


def gguf_for(model: str) -> str:
    """The GGUF file the llama.cpp providers run for ``--model``."""
    if model == "default":
        from flr_engine.models import default_gguf

        return str(default_gguf())
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise MissingFileError(f"GGUF file {model} does not exist")
        return model
    raise ConfigError(f"the llama.cpp providers run a GGUF file: --model default or a .gguf, not {model!r}")


def run_worker(provider: str, model: str, data: str, n_conv: int, templates: str, n_followups: int | None,
               ref_sample: int, dtype: str, token_budget: int, n_replies: int = 2,
               context_tokens: int | None = None, seed: int = 0) -> dict:
    """Run one provider in this process; return timing, token counts, memory and scores."""
    import torch

    from flr_engine.scorer import FLRScorer
    from flr_engine.templates import Dimension, TemplateSet, load_templates

    ts = load_templates(templates)
    if n_followups:  # a smaller template set for quick runs / sweeps
        texts = ts.unique_texts[:n_followups]
        half = max(1, len(texts) // 2)
        ts = TemplateSet(f"{ts.name}[:{n_followups}]", (Dimension("all", tuple(texts[:half]), tuple(texts[half:] or texts[:1])),))
    llama = provider in LLAMACPP_PROVIDERS
    if provider == "engine-bf16":
        dtype = "bfloat16"
    engine = {"limit": "engine", "engine-bf16": "engine"}.get(provider, provider)
    if llama:  # the transformers model renders and tokenizes; llama.cpp scores
        engine = "reference"
    scorer = FLRScorer.from_pretrained(model, dtype=dtype, templates=ts, engine=engine,
                                       engine_kwargs={"token_budget": token_budget} if engine == "engine" else None)
    if llama:
        from flr_engine.llamacpp import make_llamacpp_backend

        scorer.backend = make_llamacpp_backend(provider, gguf_for(model), scorer.tokenizer)
    convs, replies = load_pairs(data, n_conv, n_replies, context_tokens, scorer.tokenizer)
    prepared = [scorer.prepare(c, r) for c, r in zip(convs, replies)]
    seqs = [s for p in prepared for s in p.sequences]
    total_tokens = sum(len(s.ids) for s in seqs)
    out = {"provider": provider, "sequences": len(seqs), "total_tokens": total_tokens,
           "threads": torch.get_num_threads(), "dtype": "gguf" if llama else dtype}
    if llama:  # what the engine's trie computes, for the decoded-vs-unique note
        from flr_engine.engine.packer import pack_sequences

        out["unique_tokens"] = pack_sequences([s.ids for s in seqs], token_budget).num_unique
        out["gguf"] = os.path.basename(gguf_for(model))
    _run_provider(provider, scorer, seqs[:2], 2, token_budget, seed)  # warm-up: one-off inits
    out["loadavg_before"] = os.getloadavg()
    with PeakMemory() as mem:
        out.update(_run_provider(provider, scorer, seqs, ref_sample, token_budget, seed))
    out["loadavg_after"] = os.getloadavg()
    out["peak_mem_mb"] = mem.extra_mb
    out["tokens_per_s"] = total_tokens / out["seconds"]
    if hasattr(scorer.backend, "close"):
        scorer.backend.close()
    return out


def run_all(providers, *, model="default", data=DEFAULT_DATA, n_conv=16, templates="flr-helpfulness",
            n_followups=None, ref_sample=24, dtype="float32", token_budget=8192, n_replies=2,
            context_tokens=None, log=print) -> list[dict]:
    """Each provider in a fresh subprocess; returns their result dicts."""
    for p in providers:
        if p not in ALL_PROVIDERS:
            raise ConfigError(f"unknown provider {p!r}; choose from {', '.join(ALL_PROVIDERS)}")
        if p in LLAMACPP_PROVIDERS:
            from flr_engine.llamacpp import import_llama_cpp

            import_llama_cpp()  # a missing extra is a DependencyError here, not in a worker
    rows = []
    for p in providers:
        cmd = [sys.executable, "-m", "flr_engine.bench", "--worker", p, "--model", model, "--data", data,
               "--n-conv", str(n_conv), "--templates", templates, "--ref-sample", str(ref_sample),
               "--dtype", dtype, "--token-budget", str(token_budget)]
        if n_followups:
            cmd += ["--n-followups", str(n_followups)]
        if context_tokens:
            cmd += ["--context-tokens", str(context_tokens)]
        cmd += ["--n-replies", str(n_replies)]
        log(f"[bench] {p} ...")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"bench worker {p} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log(f"[bench] {p}: {rows[-1]['seconds']:.2f}s")
    return rows


def pair_tolerance(a: str, b: str, atol: float = EXACT_ATOL, tolerances: dict | None = None) -> float:
    """Allowed |difference| between providers ``a`` and ``b``: ``atol`` for two exact ones,
    an inexact one's tolerance against an exact one, the sum for two inexact ones."""
    tol = TOLERANCES if tolerances is None else tolerances
    ta, tb = tol.get(a, atol), tol.get(b, atol)
    return max(ta, tb) if atol in (ta, tb) else ta + tb


def check_agreement(rows: list[dict], atol: float = EXACT_ATOL, tolerances: dict | None = None) -> float:
    """Check every pair of providers on the sequences both scored, each pair at
    :func:`pair_tolerance`; return the max |difference| among the exact providers."""
    scored = [r for r in rows if "scores" in r]
    tol = TOLERANCES if tolerances is None else tolerances
    worst_exact = 0.0
    for i, a in enumerate(scored):
        for b in scored[i + 1 :]:
            keys = set(a["scores"]) & set(b["scores"])
            worst = max((abs(a["scores"][k] - b["scores"][k]) for k in keys), default=0.0)
            limit = pair_tolerance(a["provider"], b["provider"], atol, tol)
            if worst > limit:
                raise AssertionError(f"{a['provider']} and {b['provider']} disagree by {worst:.2e} (> {limit})")
            if a["provider"] not in tol and b["provider"] not in tol:
                worst_exact = max(worst_exact, worst)
    return worst_exact


def deviations(rows: list[dict], base: str) -> dict[str, dict]:
    """Per provider: median and max |score - base's score| over the sequences both scored."""
    by = {r["provider"]: r for r in rows if "scores" in r}
    if base not in by:
        return {}
    ref = by[base]["scores"]
    out = {}
    for p, r in by.items():
        d = sorted(abs(v - ref[k]) for k, v in r["scores"].items() if k in ref)
        if p != base and d:
            out[p] = {"n": len(d), "median": statistics.median(d), "max": d[-1]}
    return out


def table(rows: list[dict]) -> str:
    """Markdown table with ratios against the engine measured in the same run."""
    by = {r["provider"]: r for r in rows}
    eng = by.get("engine")
    lines = ["| provider | time (s) | tokens/s | ratio vs engine | peak mem (MB) | load | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['seconds'] / eng['seconds']:.2f}x" if eng else "-"
        note = ""
        if r["provider"] == "reference":
            note = f"extrapolated from {r['sampled']} of {r['sequences']} sequences ({r['measured_seconds']:.1f}s measured)"
        elif r["provider"] in ("engine", "engine-bf16"):
            note = f"{r['unique_tokens']} unique of {r['total_tokens']} total tokens"
        elif r["provider"] in LLAMACPP_PROVIDERS:
            note = (f"{r['decoded_tokens']} tokens decoded ({r['unique_tokens']} unique) of "
                    f"{r['total_tokens']} total; {r['gguf']}")
        elif r["provider"] == "limit":
            note = "decoder forward over the unique tokens only"
        load = r.get("loadavg_after")  # 1-minute load average when it finished (2 cores)
        load = f"{load[0]:.1f}" if load else "-"
        lines.append(f"| {r['provider']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_mem_mb']:.0f} | {load} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flr_engine.bench")
    ap.add_argument("--worker", choices=ALL_PROVIDERS, required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--n-conv", type=int, default=16)
    ap.add_argument("--templates", default="flr-helpfulness")
    ap.add_argument("--n-followups", type=int, default=None)
    ap.add_argument("--ref-sample", type=int, default=24)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--n-replies", type=int, default=2)
    ap.add_argument("--context-tokens", type=int, default=None)
    a = ap.parse_args(argv)
    res = run_worker(a.worker, a.model, a.data, a.n_conv, a.templates, a.n_followups, a.ref_sample,
                     a.dtype, a.token_budget, a.n_replies, a.context_tokens)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
