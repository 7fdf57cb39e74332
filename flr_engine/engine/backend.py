"""The packed prefix-tree scoring engine: exact FLR scores, each unique token computed once.

For a batch of rendered sequences (conversation -> replies -> follow-ups):

1. pack them into token tries under a token budget (C++ packer), pre-order layout::

       input_ids, position_ids = depth, subtree_end      (T,)

2. run the decoder once per pack with tree attention (token i attends to its ancestors,
   ``j <= i < subtree_end[j]``), giving final hidden states ``h`` (T, H);
3. score only what is needed: the unique scored trie nodes ``u`` (a token shared by many
   sequences in the same context has one log-prob) through the fused gathered log-prob::

       lp[u] = log_softmax(lm_head(h[parent[u]]))[input_ids[u]]       never (T, V) logits

4. reduce per sequence: mean (or sum) of ``lp`` over its scored tokens.
"""

from __future__ import annotations

import logging

import torch

from flr_engine.chat import ScoredSequence
from flr_engine.engine.attention import TreeContext, tree_attention_mode
from flr_engine.engine.packer import PackedBatch, pack_sequences

log = logging.getLogger(__name__)


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None, float, float | None]:
    """(weight (V, H), bias (V,) | None, logit_scale, softcap) reproducing ``model``'s logits:
    ``logits = softcap * tanh(((h @ W.T + b) * scale) / softcap)`` (softcap optional)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no linear LM head")
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = float(getattr(text_cfg, "logit_scale", None) or 1.0)  # Cohere
    if getattr(text_cfg, "logits_scaling", None):  # Granite divides
        scale /= float(text_cfg.logits_scaling)
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), scale, softcap


class EngineBackend:
    """Scores :class:`ScoredSequence` lists with the packed engine.

    Args:
        token_budget: max unique tokens per packed forward (memory vs. overhead).
        attn_impl: tree attention impl ("auto" | "triton" | "torch" | "dense").
        logprob_impl: fused log-prob impl ("auto" | "triton" | "cuda" | "torch").
    """

    name = "engine"

    def __init__(self, model, token_budget: int = 8192, attn_impl: str = "auto", logprob_impl: str = "auto"):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("the engine needs a decoder-only model")
        self.model = model
        self.decoder = model.get_decoder()
        self.head = lm_head_params(model)
        self.token_budget = token_budget
        self.attn_impl = attn_impl
        self.logprob_impl = logprob_impl
        self.last_stats: dict = {}

    @property
    def device(self) -> torch.device:
        return self.head[0].device

    @torch.no_grad()
    def hidden_states(self, pack: PackedBatch) -> torch.Tensor:
        """Final (normed) hidden states of every packed token, (T, H)."""
        dev = self.device
        ctx = TreeContext(pack.subtree_end.to(dev), pack.position_ids.to(dev), impl=self.attn_impl)
        with tree_attention_mode(self.model):
            out = self.decoder(
                input_ids=pack.input_ids.to(dev)[None],
                position_ids=pack.position_ids.to(dev)[None],
                use_cache=False,
                flr_tree=ctx,
            )
        return out.last_hidden_state[0]  # (T, H)

    def _logits_at(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Raw logits ``h @ W[ids].T`` with the model's bias / scale / softcap, (N, K)."""
        w, b, scale, softcap = self.head
        z = h.float() @ w[ids].float().T
        if b is not None:
            z = z + b[ids].float()
        z = z * scale
        return softcap * torch.tanh(z / softcap) if softcap else z

    def sequence_scores(
        self, seqs: list[ScoredSequence], mode: str = "likelihood", reduction: str = "mean"
    ) -> list[float]:
        from flr_engine.ops.fused_logprob import flr_gathered_logprob

        result = pack_sequences([s.ids for s in seqs], self.token_budget)
        out = [0.0] * len(seqs)
        w, b, scale, softcap = self.head
        stats = {"packs": len(result.packs), "unique_tokens": 0, "total_tokens": 0, "scored": 0}
        for pack in result.packs:
            stats["unique_tokens"] += pack.num_unique
            stats["total_tokens"] += pack.num_total
            h = self.hidden_states(pack)
            idx = list(pack.seq_indices)
            if mode == "official":
                for si in idx:
                    s = seqs[si]
                    node = result.nodes_of(si)[s.logit_pos]
                    z = self._logits_at(h[node][None], torch.tensor(s.logit_ids, device=h.device))
                    out[si] = z.mean().item()
                continue
            scored = [result.nodes_of(si)[torch.tensor(seqs[si].targets)] for si in idx]
            nodes, inverse = torch.unique(torch.cat(scored), return_inverse=True)
            stats["scored"] += len(nodes)
            parent = pack.parent[nodes]
            lp = flr_gathered_logprob(
                h[parent.to(h.device)],
                w,
                pack.input_ids[nodes].to(h.device),
                bias=b,
                logit_scale=scale,
                softcap=softcap,
                impl=self.logprob_impl,
            ).cpu()  # (U,) fp32
            per_token = lp[inverse]
            seg = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([len(x) for x in scored]))
            sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, seg, per_token.double())
            counts = torch.tensor([len(x) for x in scored], dtype=torch.float64)
            vals = sums / counts if reduction == "mean" else sums
            for si, v in zip(idx, vals.tolist()):
                out[si] = v
        self.last_stats = stats
        return out
