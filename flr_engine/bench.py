"""Scoring-speed benchmark: the same FLR job through each provider, ratios from one run.

Providers (all score the *same* rendered sequences and must agree):

* ``reference``       one full forward per (reply, follow-up), as the paper's scorer;
* ``hf-prefix-cache`` the best plain transformers code: prefix KV reused, padded batches;
* ``engine``          packed prefix tree, tree attention, fused gathered log-prob;
* ``limit``           one plain decoder forward over the engine's unique tokens (causal
                      SDPA over each pack, no LM head, no scoring): what no scorer beats
                      by much on this machine.

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
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time

from flr_engine.errors import MissingFileError

PROVIDERS = ("reference", "hf-prefix-cache", "engine", "limit")
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
    with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path) as fh:
        for line in fh:
            row = json.loads(line)
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
    if provider == "engine":
        out["unique_tokens"] = scorer.backend.last_stats["unique_tokens"]
    return out


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
    engine = "engine" if provider == "limit" else provider
    scorer = FLRScorer.from_pretrained(model, dtype=dtype, templates=ts, engine=engine,
                                       engine_kwargs={"token_budget": token_budget} if engine == "engine" else None)
    convs, replies = load_pairs(data, n_conv, n_replies, context_tokens, scorer.tokenizer)
    prepared = [scorer.prepare(c, r) for c, r in zip(convs, replies)]
    seqs = [s for p in prepared for s in p.sequences]
    total_tokens = sum(len(s.ids) for s in seqs)
    out = {"provider": provider, "sequences": len(seqs), "total_tokens": total_tokens,
           "threads": torch.get_num_threads()}
    _run_provider(provider, scorer, seqs[:2], 2, token_budget, seed)  # warm-up: one-off inits
    with PeakMemory() as mem:
        out.update(_run_provider(provider, scorer, seqs, ref_sample, token_budget, seed))
    out["peak_mem_mb"] = mem.extra_mb
    out["tokens_per_s"] = total_tokens / out["seconds"]
    return out


def run_all(providers, *, model="default", data=DEFAULT_DATA, n_conv=16, templates="flr-helpfulness",
            n_followups=None, ref_sample=24, dtype="float32", token_budget=8192, n_replies=2,
            context_tokens=None, log=print) -> list[dict]:
    """Each provider in a fresh subprocess; returns their result dicts."""
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


def check_agreement(rows: list[dict], atol: float = 1e-3) -> float:
    """Max |score difference| between providers on the sequences they all scored."""
    scored = [r for r in rows if "scores" in r]
    worst = 0.0
    for a in scored:
        for b in scored:
            for k in set(a["scores"]) & set(b["scores"]):
                worst = max(worst, abs(a["scores"][k] - b["scores"][k]))
    if worst > atol:
        raise AssertionError(f"providers disagree by {worst:.2e} (> {atol})")
    return worst


def table(rows: list[dict]) -> str:
    """Markdown table with ratios against the engine measured in the same run."""
    by = {r["provider"]: r for r in rows}
    eng = by.get("engine")
    lines = ["| provider | time (s) | tokens/s | ratio vs engine | peak mem (MB) | notes |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['seconds'] / eng['seconds']:.2f}x" if eng else "-"
        note = ""
        if r["provider"] == "reference":
            note = f"extrapolated from {r['sampled']} of {r['sequences']} sequences ({r['measured_seconds']:.1f}s measured)"
        elif r["provider"] == "engine":
            note = f"{r['unique_tokens']} unique of {r['total_tokens']} total tokens"
        elif r["provider"] == "limit":
            note = "decoder forward over the unique tokens only"
        lines.append(f"| {r['provider']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_mem_mb']:.0f} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flr_engine.bench")
    ap.add_argument("--worker", choices=PROVIDERS, required=True)
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
