"""Benchmark: one DPO optimizer step, flr-engine's path vs plain transformers (CPU, fp32).

Model: a random Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 32000).
Batch: 2 pairs; each sequence = a 128-token prompt + a 128-token reply (seq 256); chosen and
rejected share their pair's prompt.

* ``fused``: ``forward="packed"``: chosen and rejected in one token trie (each prompt
  computed once: 768 unique tokens instead of 1024), tree attention, final hidden states of
  the 512 completion-predicting positions through the fused gathered log-prob (no
  (tokens, vocab) logits), backward.
* ``plain``: ``forward="plain"``: chosen and rejected concatenated in a (4, 256) batch,
  ``model(...).logits`` (4, 256, 32000), ``log_softmax``, ``gather``, backward -- what a
  user writes with transformers (TRL's ``concatenated_forward`` does the same).

Both then apply the same DPO loss (fixed reference log-probs), gradient clipping and an AdamW
step. Run with::

    pytest benches/bench_dpo.py --benchmark-enable

Time: pytest-benchmark (wall) in this process. Peak memory: each variant runs in a fresh
subprocess; after one warm-up step (the AdamW state is allocated), the peak RSS is reset
(Linux ``/proc/self/clear_refs``, VmHWM) and one more step is measured: the step's working
memory over what is already resident (model, gradients, optimizer state). Elsewhere the
growth of ``ru_maxrss`` is used (a lower bound). The same subprocess reports the CPU seconds
of two more steps (``time.process_time``). ``extra_info`` holds all of it and the ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

HIDDEN, LAYERS, VOCAB, PROMPT, REPLY, PAIRS = 256, 4, 32000, 128, 128, 2

_SCRIPT = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[2])
from bench_dpo import make_batch, make_model, make_step
forward = sys.argv[1]
model = make_model()
step = make_step(model, forward)
pairs = make_batch()
step(pairs)  # warm-up: allocates gradients and the AdamW state
def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    loss = step(pairs)
    after = status_kib("VmHWM")
except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = step(pairs)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu = []
for _ in range(2):
    c0 = time.process_time()
    step(pairs)
    cpu.append(time.process_time() - c0)
print(json.dumps({"peak_delta_mib": (after - before) / 1024, "cpu_s": min(cpu), "loss": loss}))
"""


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=688, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def make_batch():
    from flr_engine.dpo import EncodedPair

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(PAIRS):
        prompt = torch.randint(0, VOCAB, (PROMPT,), generator=g).tolist()
        c = torch.randint(0, VOCAB, (REPLY,), generator=g).tolist()
        r = torch.randint(0, VOCAB, (REPLY,), generator=g).tolist()
        out.append(EncodedPair(i, prompt + c, PROMPT, prompt + r, PROMPT))
    return out


def make_step(model, forward: str):
    """One DPO optimizer step on ``pairs`` with the given forward; returns the loss."""
    from flr_engine.dpo import DPOConfig, dpo_loss, pair_logprobs

    cfg = DPOConfig(forward=forward, batch_size=PAIRS, lr=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    ref = torch.full((PAIRS, 2), -1300.0)  # fixed reference sums (precomputed in training)

    def step(pairs):
        opt.zero_grad(set_to_none=True)
        pol, _ = pair_logprobs(model, pairs, cfg)
        losses, _ = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], cfg.beta)
        loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        return float(loss.detach())

    return step


_results: dict[str, dict] = {}


def _isolated(forward: str) -> dict:
    import os

    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, forward, os.path.dirname(os.path.abspath(__file__))],
        capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def isolated():
    return {f: _isolated(f) for f in ("plain", "packed")}


def _record(benchmark, name: str, isolated: dict) -> None:
    stats = getattr(benchmark, "stats", None)
    _results[name] = {"mean_s": stats.stats.mean if stats is not None else None}
    plain, packed = isolated["plain"], isolated["packed"]
    info = benchmark.extra_info
    info.update(
        shape=f"llama h={HIDDEN} L={LAYERS} V={VOCAB}; {PAIRS} pairs x (prompt {PROMPT} + "
        f"reply {REPLY}); fp32 cpu",
        threads=torch.get_num_threads(),
        logits_fp32_mib=round(2 * PAIRS * (PROMPT + REPLY) * VOCAB * 4 / 2**20, 1),
        peak_step_mib=round(isolated[name]["peak_delta_mib"], 1),
        cpu_s=round(isolated[name]["cpu_s"], 3),
        mem_ratio_plain_over_fused=round(
            plain["peak_delta_mib"] / max(packed["peak_delta_mib"], 1.0), 2
        ),
        cpu_ratio_plain_over_fused=round(plain["cpu_s"] / packed["cpu_s"], 2),
    )
    if _results[name]["mean_s"] is not None:
        info["mean_s"] = round(_results[name]["mean_s"], 4)
    a, b = _results.get("plain", {}).get("mean_s"), _results.get("packed", {}).get("mean_s")
    if a and b:
        info["time_ratio_plain_over_fused"] = round(a / b, 2)


@pytest.mark.parametrize("forward", ["plain", "packed"])
def test_bench_dpo_step(benchmark, isolated, forward):
    model = make_model()
    step = make_step(model, forward)
    pairs = make_batch()
    step(pairs)
    loss = benchmark.pedantic(step, args=(pairs,), rounds=3, warmup_rounds=0)
    assert loss == loss  # finite
    _record(benchmark, forward, isolated)
    # both variants compute the same first-step loss (same model, batch, reference)
    assert isolated["plain"]["loss"] == pytest.approx(isolated["packed"]["loss"], rel=1e-4)
