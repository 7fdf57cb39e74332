"""Batched generation whose samples do not depend on the batch: one seeded RNG per row.

``transformers``' ``generate(do_sample=True)`` draws every row from the one global RNG, so a
prompt's samples change with whatever else is in the batch. Here each output row ``r`` (prompt
``j``, sample ``k``) owns a ``torch.Generator`` seeded from ``(seed_j, k)``, and the draw is made
inside a logits processor; ``generate`` then runs greedy (``do_sample=False``) and picks the
drawn token. Per step and row, with logits ``z`` over the vocabulary::

    p      = softmax(z / T)
    keep   = smallest set of most likely tokens with mass >= top_p   (transformers' top-p:
             token i, in descending order, is kept iff sum_{j<i} p_j < top_p)
    y      ~ Categorical(p[keep] / sum p[keep])       drawn with the row's generator

The kept set is found from a ``topk`` of the first ``_TOPK`` tokens (exact: a row whose top-k
mass is still below ``top_p`` falls back to a full sort), not by sorting all ``V`` logits.

Many prompts share one ``generate`` call (left-padded), which is what makes CPU sampling fast:
the weights are read once per step for all rows instead of once per prompt. Greedy decoding
(``temperature=0``) uses the same batching without a processor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_TOPK = 256


class SeededTopPSampler:
    """A ``LogitsProcessor`` that samples one token per row (temperature, top-p) with its own
    generator, and returns scores that are 0 at the drawn token and ``-inf`` elsewhere.

    ``generators[r]`` belongs to row ``r`` of the batch that ``generate`` runs."""

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float):
        self.generators = list(generators)
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} generators")
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (R, V)
        k = min(_TOPK, probs.shape[-1])
        top_p, top_i = probs.topk(k, dim=-1)  # descending
        out = torch.full_like(scores, float("-inf"))
        for r, gen in enumerate(self.generators):
            p, idx = top_p[r], top_i[r]
            before = torch.cumsum(p, 0) - p  # mass strictly before each token
            keep = before < self.top_p
            if bool(keep[-1]) and k < probs.shape[-1]:  # the nucleus may go past the top-k
                p, idx = probs[r].sort(descending=True)
                keep = (torch.cumsum(p, 0) - p) < self.top_p
            keep[0] = True  # at least one token
            kept = p[keep]
            choice = torch.multinomial(kept / kept.sum(), 1, generator=gen)
            out[r, idx[keep][choice]] = 0.0
        return out


def row_generators(seeds: Sequence[int], num_samples: int, device="cpu") -> list[torch.Generator]:
    """Generators for ``len(seeds) * num_samples`` rows: row ``j * num_samples + k`` is seeded
    with ``seeds[j] * 1_000_003 + k`` (mod 2**63)."""
    gens = []
    for s in seeds:
        for k in range(num_samples):
            g = torch.Generator(device=device)
            g.manual_seed((int(s) * 1_000_003 + k) % (1 << 63))
            gens.append(g)
    return gens


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
) -> list[list[list[int]]]:
    """Replies to token-id ``prompts``: ``out[j][k]`` is sample ``k`` of prompt ``j`` (its new
    tokens, cut before the first stop id).

    ``temperature == 0``: greedy (``num_samples`` must be 1). Otherwise sampled as in the module
    docstring, with ``seeds[j]`` fixing prompt ``j``'s samples whatever else is in the batch
    (up to float rounding differences from the padded batch shape).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if not prompts:
        return []
    sampled = temperature > 0
    if not sampled and num_samples != 1:
        raise ValueError("greedy decoding gives one reply per prompt: num_samples must be 1")
    if sampled and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    dev = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    rows, mask = [], []
    for p in prompts:  # left padding: every prompt ends where generation starts
        rows += [[pad_id] * (width - len(p)) + list(p)] * num_samples
        mask += [[0] * (width - len(p)) + [1] * len(p)] * num_samples
    input_ids = torch.tensor(rows, device=dev)
    attention_mask = torch.tensor(mask, device=dev)
    processors = LogitsProcessorList()
    if sampled:
        processors.append(
            SeededTopPSampler(row_generators(seeds, num_samples, dev), temperature, top_p)
        )
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=processors,
    )[:, width:].tolist()
    stop = set(stop_ids)
    cut = [row[: next((i for i, t in enumerate(row) if t in stop), len(row))] for row in out]
    return [cut[j * num_samples : (j + 1) * num_samples] for j in range(len(prompts))]
