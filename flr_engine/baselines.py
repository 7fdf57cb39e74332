"""The best plain-transformers scorer a user would write: the speed baseline of the engine.

For a run of sequences that share a prefix (one conversation + reply, many follow-ups):

1. one forward over the shared prefix ``ids[:p]`` with ``use_cache=True``;
2. the follow-up suffixes in right-padded batches of ``batch_size``, each batch reusing
   the prefix KV cache (repeated to the batch), full logits ``(B, L, V)``,
   ``log_softmax`` and gather.

``p`` = the longest common token prefix of the run, capped at the first scored token, so
the result is exact whatever the chat template does at boundaries. It returns the raw
per-sequence sums and counts of :class:`~flr_engine.engine.backend.ScoringBackend`
(likelihood only: no "official" logits).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from flr_engine.engine.protocol import SpanSums, TokenTargets
from flr_engine.errors import ConfigError


def _lcp(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class PrefixCacheBackend:
    """Padded batches over a reused prefix KV cache (likelihood mode only)."""

    name = "hf-prefix-cache"

    def __init__(self, model, batch_size: int = 32):
        self.model = model
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _groups(seqs: Sequence[TokenTargets], slack: int = 8) -> list[list[int]]:
        """Consecutive runs of sequences that share everything up to (about) their scored
        part: the same conversation and reply, different follow-ups."""
        groups: list[list[int]] = []
        for i, s in enumerate(seqs):
            if groups:
                first = seqs[groups[-1][0]]
                if _lcp([first.ids, s.ids]) >= min(first.targets[0], s.targets[0]) - slack:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        return groups

    def logit_sums(self, seqs) -> SpanSums:
        raise ConfigError("the prefix-cache baseline implements mode='likelihood' only")

    @torch.no_grad()
    def logprob_sums(self, seqs: Sequence[TokenTargets]) -> SpanSums:
        out = [0.0] * len(seqs)
        dev = self.device
        for group in self._groups(seqs):
            members = [seqs[i] for i in group]
            p = min(_lcp([s.ids for s in members]), min(s.targets[0] for s in members))
            pre = self.model(input_ids=torch.tensor([members[0].ids[:p]], device=dev), use_cache=True)
            last = torch.log_softmax(pre.logits[0, -1].float(), -1)  # (V,) predicts token p
            for b0 in range(0, len(group), self.batch_size):
                chunk = members[b0 : b0 + self.batch_size]
                L = max(len(s.ids) - p for s in chunk)
                ids = torch.zeros(len(chunk), L, dtype=torch.long)
                mask = torch.zeros(len(chunk), p + L, dtype=torch.long)
                mask[:, :p] = 1
                for r, s in enumerate(chunk):
                    ids[r, : len(s.ids) - p] = torch.tensor(s.ids[p:])
                    mask[r, p : len(s.ids)] = 1
                cache = copy.deepcopy(pre.cache)
                cache.batch_repeat_interleave(len(chunk))
                pos = torch.arange(p, p + L).expand(len(chunk), L)
                logits = self.model(
                    input_ids=ids.to(dev), attention_mask=mask.to(dev), cache=cache, position_ids=pos.to(dev)
                ).logits  # (B, L, V)
                logp = torch.log_softmax(logits.float(), -1)  # (B, L, V)
                for r, s in enumerate(chunk):
                    vals = []
                    for n in s.targets:  # token n predicted from position n - 1
                        vals.append(last[s.ids[n]] if n == p else logp[r, n - 1 - p, s.ids[n]])
                    out[group[b0 + r]] = torch.stack(vals).double().sum().item()
        return SpanSums(out, [len(s.targets) for s in seqs])
