"""The packed decoder forward and the LM head of the engine and the benchmark.

For a pack of the token trie (:mod:`flr_engine.engine.packer`; pre-order, T unique tokens)::

    h = packed_hidden_states(model, pack)                   (T, H) final normed hidden states
        token i attends to its ancestors j (j <= i < subtree_end[j]) at position = depth

    head = LMHead.from_model(model)                         weight (V, H), bias, scale, softcap
    lp = head.logprobs(h[rows_u], targets, rows=row_of)     log p(targets | row), fused, (M,)
    z  = head.logits(h[rows_u], targets, rows=row_of)       raw target logits, (M,)

where ``logits = logit_transform(h @ W.T, bias, scale, softcap)``
(:func:`~flr_engine.ops.fused_logprob.logit_transform`). Both work with or without a
gradient. They read the decoder and ``lm_head.weight`` directly, which is right for scoring
(one process per model) but not for training under DDP / FSDP / ZeRO-3: ``flr dpo``
(:mod:`flr_engine.dpo`) runs its trie through the model's own forward instead, with TRL's
fused head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flr_engine.engine.attention import TreeContext, packed_forward, route_tree_attention
from flr_engine.engine.packer import PackedBatch
from flr_engine.ops.fused_logprob import flr_gathered_logprob, gathered_logits


def base_model(model):
    """The transformers model under a peft wrapper (its LoRA layers stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _unmerged_adapters(head) -> bool:
    """A peft tuner layer on the LM head with active, unmerged adapters (its ``weight`` is
    the base weight only)."""
    if getattr(head, "base_layer", None) is None:
        return False
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return False
    return bool(getattr(head, "active_adapters", None))


@dataclass(frozen=True, eq=False)
class LMHead:
    """A causal LM's output layer as the fused ops see it::

        logits = softcap * tanh((h @ weight.T + bias) * logit_scale / softcap)

    ``weight`` (V, H) (tied embeddings are fine), ``bias`` (V,) or None, ``logit_scale``
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), ``softcap`` (Gemma-2/3
    ``final_logit_softcapping``) or None. The tensors are the model's own parameters, so
    gradients reach them.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_model(cls, model) -> LMHead:
        """The head of a transformers causal LM (under a peft wrapper too). Raises
        ValueError for a model without a linear head, or with unmerged LoRA adapters on it
        (the fused op reads the weight directly: merge them, or leave the head out of
        ``target_modules``)."""
        base = base_model(model)
        head = base.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(base).__name__} has no linear LM head")
        if _unmerged_adapters(head):
            raise ValueError(
                f"{type(base).__name__}'s LM head carries unmerged LoRA adapters, which the fused "
                "LM head cannot apply: merge them or leave the head out of target_modules"
            )
        cfg = base.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        scale = float(getattr(text_cfg, "logit_scale", None) or 1.0)  # Cohere
        if getattr(text_cfg, "logits_scaling", None):  # Granite divides
            scale /= float(text_cfg.logits_scaling)
        softcap = getattr(text_cfg, "final_logit_softcapping", None) or None
        return cls(head.weight, getattr(head, "bias", None), scale, softcap)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def logprobs(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        *,
        rows: torch.Tensor | None = None,
        impl: str = "auto",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """``log_softmax(logits(hidden[rows[m]]))[targets[m]]`` (M,) fp32, fused (see
        :func:`~flr_engine.ops.fused_logprob.flr_gathered_logprob`); ``rows`` None: row m."""
        return flr_gathered_logprob(
            hidden, self.weight, targets, bias=self.bias, logit_scale=self.logit_scale,
            softcap=self.softcap, impl=impl, chunk_size=chunk_size, rows=rows,
        )  # fmt: skip

    def logits(
        self, hidden: torch.Tensor, targets: torch.Tensor, *, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw ``logits(hidden[rows[m]])[targets[m]]`` (M,) fp32, no softmax."""
        return gathered_logits(
            hidden, self.weight, targets, rows=rows, bias=self.bias,
            logit_scale=self.logit_scale, softcap=self.softcap,
        )  # fmt: skip


def packed_hidden_states(
    model,
    pack: PackedBatch,
    *,
    attn_impl: str = "auto",
    grad: bool | None = None,
    tree: bool = True,
) -> torch.Tensor:
    """Final (normed) hidden states of every token of ``pack``, (T, H), from one decoder
    forward of ``model`` (a transformers causal LM, under a peft wrapper too).

    ``tree``: tree attention (token i sees its ancestors, ``j <= i < subtree_end[j]``, at
    position ids = trie depth; ``attn_impl`` "auto" | "triton" | "torch" | "dense"), the exact
    forward of every sequence in the pack. ``tree=False``: the model's own causal attention
    over the pack in layout order at positions 0..T-1 -- not a score, the benchmark's limit.
    ``grad``: None follows ``torch.is_grad_enabled()``; with a gradient, "auto" attention is
    the differentiable torch path.
    """
    base = base_model(model)
    decoder = base.get_decoder()
    dev = base.get_input_embeddings().weight.device
    ids = pack.input_ids.to(dev)[None]  # (1, T)
    with torch.set_grad_enabled(torch.is_grad_enabled() if grad is None else grad):
        if not tree:
            return decoder(input_ids=ids, use_cache=False).last_hidden_state[0]  # (T, H)
        route_tree_attention(base)  # once per model; a no-op when routed
        pos = pack.position_ids.to(dev)
        ctx = TreeContext(pack.subtree_end.to(dev), pos, impl=attn_impl)
        with packed_forward():
            out = decoder(input_ids=ids, position_ids=pos[None], use_cache=False, flr_tree=ctx)
        return out.last_hidden_state[0]  # (T, H)
