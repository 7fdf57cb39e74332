"""Benchmark: sampling K replies for P prompts, per-prompt ``generate`` vs one batched call.

Model: a random Llama shaped like SmolLM2-135M in width (hidden 576, 9 heads / 3 kv heads,
intermediate 1536, vocab 49152) with 6 layers instead of 30, fp32 on CPU (1 thread, as
``flr mine`` shards run). P = 4 prompts of 64-160 tokens, K = 8 samples, 48 new tokens.

* ``per_prompt``: what ``flr mine`` did before: one ``model.generate(do_sample=True,
  num_return_sequences=K, top_p=0.9, temperature=0.7)`` per prompt (the weights are read
  once per step for K rows).
* ``batched``: :func:`flr_engine.sampling.generate` over all P prompts at once (left-padded
  P*K rows, a seeded generator per row; the weights are read once per step for P*K rows).

Both run ``max_new_tokens`` steps: ``per_prompt`` with ``min_new_tokens``; ``batched`` stops
only when every row has drawn the stop id 0, which a random model does with negligible
probability (a row that draws it early is still computed, padded). Run with::

    pytest benches/bench_sampling.py --benchmark-enable

``extra_info`` holds the speed-up of ``batched`` over ``per_prompt`` measured in this run.
"""

from __future__ import annotations

import pytest
import torch

from flr_engine.sampling import generate

P, K, NEW = 4, 8, 48
_times: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=6, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 49152, (n,), generator=gen).tolist() for n in (64, 96, 128, 160)]
    return model, prompts


def _per_prompt(model, prompts):
    out = []
    for j, p in enumerate(prompts):
        torch.manual_seed(j)
        ids = torch.tensor([p])
        out.append(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=0.7, top_p=0.9, top_k=0, num_return_sequences=K,
                                  max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=0,
                                  pad_token_id=0))  # fmt: skip
    return out


def _batched(model, prompts):
    return generate(model, prompts, max_new_tokens=NEW, stop_ids=[0], pad_id=0, num_samples=K,
                    temperature=0.7, top_p=0.9, seeds=list(range(P)))  # fmt: skip


@pytest.mark.parametrize("variant", ["per_prompt", "batched"])
def test_sampling(benchmark, setup, variant):
    model, prompts = setup
    fn = _per_prompt if variant == "per_prompt" else _batched
    with torch.no_grad():
        benchmark.pedantic(fn, args=(model, prompts), rounds=2, iterations=1, warmup_rounds=0)
    _times[variant] = benchmark.stats.stats.min if benchmark.stats else float("nan")
    benchmark.extra_info["rows_per_call"] = K if variant == "per_prompt" else P * K
    if len(_times) == 2:
        benchmark.extra_info["speedup_batched_vs_per_prompt"] = (
            _times["per_prompt"] / _times["batched"]
        )
        print(f"\nbatched sampling: {_times['per_prompt'] / _times['batched']:.2f}x faster")
