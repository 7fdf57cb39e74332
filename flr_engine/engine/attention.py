"""Tree attention inside Hugging Face models, through transformers' attention registry.

The engine registers one attention function, ``"flr_tree"``, and switches a model to it
only for the duration of a packed forward (:func:`tree_attention_mode`), so the same
model object still generates and trains with its usual attention elsewhere. The packed
layout travels to every layer as the ``flr_tree`` keyword argument (a :class:`TreeContext`),
which transformers forwards from ``model(...)`` to each attention call.

Sliding-window layers (Gemma 2/3, Mistral) receive ``sliding_window`` from their module,
soft-capped ones ``softcap``; both are applied over trie depth (= position ids).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

ATTN_NAME = "flr_tree"


@dataclass
class TreeContext:
    """The packed layout of one forward: (T,) ``subtree_end`` and ``positions``, plus
    the block-sparse plans, built once per (sliding window, tile) and reused by every layer.

    Tiles come from :func:`~flr_engine.ops.tree_attention.suggested_block_sizes` for the
    layer's head dim, dtype and device (the Triton kernel's shared memory depends on all
    three; the torch path, used when a gradient is needed or off CUDA, takes 64 x 64).
    """

    subtree_end: torch.Tensor
    positions: torch.Tensor
    impl: str = "auto"
    plans: dict = field(default_factory=dict)

    def block_sizes(self, head_dim: int, dtype: torch.dtype, device: torch.device,
                    needs_grad: bool = False) -> tuple[int, int]:  # fmt: skip
        """(block_m, block_n) of the plan for a layer with these queries."""
        from flr_engine.ops.tree_attention import suggested_block_sizes

        kernel = "torch"
        if self.impl == "triton" or (
            self.impl == "auto" and device.type == "cuda" and not needs_grad
        ):
            kernel = "triton"
        return suggested_block_sizes(head_dim, dtype, kernel, device)

    def plan(self, sliding_window: int | None, block_m: int = 64, block_n: int = 64):
        from flr_engine.ops.tree_attention import TreeAttentionPlan

        key = (sliding_window, block_m, block_n)
        if key not in self.plans:
            self.plans[key] = TreeAttentionPlan.build(
                self.subtree_end, self.positions, block_m=block_m, block_n=block_n,
                sliding_window=sliding_window,
            )  # fmt: skip
        return self.plans[key]


def flr_tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    flr_tree: TreeContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: query (1, Hq, T, D), key/value
    (1, Hkv, T, D) -> ((1, T, Hq, D), None)."""
    from flr_engine.ops.tree_attention import flr_tree_attention

    if flr_tree is None:
        raise RuntimeError(
            "attention 'flr_tree' called without a packed layout: run the model through "
            "flr_engine's engine (the flr_tree= keyword argument is missing)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"flr_tree attention expects batch size 1 (one packed trie), got {query.shape[0]}")
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    bm, bn = flr_tree.block_sizes(query.shape[-1], query.dtype, query.device, grad)
    out = flr_tree_attention(
        query[0],  # (Hq, T, D)
        key[0],  # (Hkv, T, D)
        value[0],
        flr_tree.subtree_end,
        flr_tree.positions,
        scale=scaling,
        sliding_window=sliding_window,
        softcap=softcap or None,  # some configs say 0.0 for "none"
        plan=flr_tree.plan(sliding_window, bm, bn),
        impl=flr_tree.impl,
    )  # (T, Hq, D)
    return out.unsqueeze(0), None


_registered = False


def register() -> None:
    """Register ``"flr_tree"`` with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, flr_tree_attention_forward)
        _registered = True


def _configs(model: torch.nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            out.append(cfg)
    return out


@contextlib.contextmanager
def tree_attention_mode(model: torch.nn.Module):
    """Temporarily route the model's attention through ``flr_tree``."""
    register()
    configs = _configs(model)
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTN_NAME
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s
