"""The packed prefix-tree scoring engine: exact per-sequence log-prob sums, each unique token
computed once, behind the backend protocol of :mod:`flr_engine.engine.protocol` (raw sums and
counts; reduction, mode and Direct are :mod:`flr_engine.scorer`'s).

For a batch of sequences (conversation -> replies -> follow-ups) the engine:

1. packs them into token tries under a token budget (C++ packer), pre-order layout::

       input_ids, position_ids = depth, parent, subtree_end      (T,)

2. runs the decoder once per pack with tree attention
   (:func:`~flr_engine.engine.forward.packed_hidden_states`), final hidden states ``h`` (T, H);
3. scores only the unique scored trie nodes ``u`` (U,) (a token shared by many sequences in
   the same context has one log-prob); siblings share their parent's softmax normaliser (all
   follow-ups' first tokens hang off one user-turn header: about 17% fewer full-vocabulary
   passes with the paper's template set), so the fused op runs once per unique parent (P,)::

       lp[u] = z(h[parent[u]])[input_ids[u]] - lse(h[parent[u]])     never (T, V) logits

   (:meth:`~flr_engine.engine.forward.LMHead.logprobs` with ``rows``);
4. sums ``lp`` per sequence over its scored tokens (:func:`~flr_engine.ops.fused_logprob.segment_sum`).

Official mode (``logit_sums``): the raw logits ``z(h[node of logit_pos])[logit_ids]``
(:meth:`~flr_engine.engine.forward.LMHead.logits`), summed per sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from flr_engine.engine.attention import route_tree_attention
from flr_engine.engine.forward import LMHead, packed_hidden_states
from flr_engine.engine.packer import pack_sequences
from flr_engine.engine.protocol import LogitTargets, ScoringBackend, SpanSums, TokenTargets
from flr_engine.ops.fused_logprob import segment_sum

__all__ = ["EngineBackend", "LogitTargets", "ScoringBackend", "SpanSums", "TokenTargets"]

log = logging.getLogger(__name__)


class EngineBackend:
    """The packed engine behind :class:`ScoringBackend`.

    Args:
        token_budget: max unique tokens per packed forward (memory vs. overhead).
        attn_impl: tree attention impl ("auto" | "triton" | "torch" | "dense").
        logprob_impl: fused log-prob impl ("auto" | "triton" | "cuda" | "torch").

    Building it routes the model's attention through tree attention once
    (:func:`~flr_engine.engine.attention.route_tree_attention`; other forwards of the model
    are unchanged). ``last_stats``: packs, unique / total tokens, scored trie nodes and
    full-vocabulary passes of the last call.
    """

    name = "engine"

    def __init__(self, model, token_budget: int = 8192, attn_impl: str = "auto", logprob_impl: str = "auto"):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("the engine needs a decoder-only model")
        self.model = model
        self.head = LMHead.from_model(model)
        self.token_budget = token_budget
        self.attn_impl = attn_impl
        self.logprob_impl = logprob_impl
        self.last_stats: dict = {}
        route_tree_attention(model)

    @property
    def device(self) -> torch.device:
        return self.head.device

    def _packs(self, seqs: Sequence):
        """(pack, its sequences' slice, h (T, H)) per pack; fills ``last_stats``."""
        result = pack_sequences([s.ids for s in seqs], self.token_budget)
        self.last_stats = stats = {
            "packs": len(result.packs),
            "unique_tokens": 0,
            "total_tokens": 0,
            "scored": 0,  # unique scored trie nodes (one log-prob each)
            "normalisers": 0,  # full-vocabulary softmax passes (one per unique parent)
        }
        for pack in result.packs:
            stats["unique_tokens"] += pack.num_unique
            stats["total_tokens"] += pack.num_total
            r = pack.seq_indices
            with torch.no_grad():
                h = packed_hidden_states(self.model, pack, attn_impl=self.attn_impl)  # (T, H)
            yield result, pack, slice(r.start, r.stop), h

    def logprob_sums(self, seqs: Sequence[TokenTargets]) -> SpanSums:
        """``sum_{n in targets} log p(ids[n] | ids[:n])`` and ``len(targets)`` per sequence."""
        sums = torch.zeros(len(seqs), dtype=torch.float64)  # (S,)
        dev = self.device
        for result, pack, sl, h in self._packs(seqs):
            scored = [
                result.nodes_of(si)[torch.as_tensor(seqs[si].targets, dtype=torch.long)]
                for si in range(sl.start, sl.stop)
            ]  # packed node of each scored token, per sequence
            lens = torch.tensor([len(x) for x in scored])  # (S_p,)
            if not int(lens.sum()):
                continue
            nodes, inverse = torch.unique(torch.cat(scored), return_inverse=True)  # (U,), (M,)
            parents, row_of = torch.unique(pack.parent[nodes], return_inverse=True)  # (P,), (U,)
            with torch.no_grad():
                lp = self.head.logprobs(
                    h[parents.to(dev)], pack.input_ids[nodes].to(dev), rows=row_of.to(dev),
                    impl=self.logprob_impl,
                )  # (U,) fp32  # fmt: skip
            self.last_stats["scored"] += len(nodes)
            self.last_stats["normalisers"] += len(parents)
            seg = torch.repeat_interleave(torch.arange(len(scored)), lens)  # (M,)
            sums[sl] = segment_sum(lp.cpu().double()[inverse], seg, len(scored))
        return SpanSums(sums.tolist(), [len(s.targets) for s in seqs])

    def logit_sums(self, seqs: Sequence[LogitTargets]) -> SpanSums:
        """``sum_k z(ids[:logit_pos + 1])[logit_ids[k]]`` (raw logits) and ``len(logit_ids)``."""
        sums = torch.zeros(len(seqs), dtype=torch.float64)  # (S,)
        dev = self.device
        for result, _, sl, h in self._packs(seqs):
            members = [seqs[si] for si in range(sl.start, sl.stop)]
            rows = torch.stack([result.nodes_of(sl.start + i)[s.logit_pos] for i, s in enumerate(members)])
            lens = torch.tensor([len(s.logit_ids) for s in members])  # (S_p,)
            seg = torch.repeat_interleave(torch.arange(len(members)), lens)  # (M,)
            ids = torch.tensor([t for s in members for t in s.logit_ids], dtype=torch.long)  # (M,)
            with torch.no_grad():
                z = self.head.logits(h[rows.to(dev)], ids.to(dev), rows=seg.to(dev))  # (M,)
            sums[sl] = segment_sum(z.cpu().double(), seg, len(members))
        return SpanSums(sums.tolist(), [len(s.logit_ids) for s in seqs])
