"""Tree attention inside Hugging Face models, through transformers' attention registry.

transformers picks a layer's attention function by name, ``config._attn_implementation``,
at every call, and has no per-call choice. So the engine routes a model once, when it is
built (:func:`route_tree_attention`): each config's implementation ``X`` becomes
``"flr_tree:X"``, a registered function that

* runs tree attention when the call carries a packed layout: the ``flr_tree`` keyword
  argument (a :class:`TreeContext`), which transformers forwards from the decoder's call to
  each attention call (gradient-checkpointing recomputes included);
* is ``X`` itself otherwise (``X``'s registered function, or the modeling file's own
  ``eager_attention_forward`` for ``"eager"``), with ``X``'s mask function.

Inside a packed forward (:func:`packed_forward`, a context variable: this thread or task
only) the mask function builds no mask, as transformers does for a name it has no mask for.
Nothing is switched around a forward, so the same model object still generates and trains
with its usual attention, from any thread, while packed forwards run on another.
:func:`unroute_tree_attention` restores the names (they are not saved with the config).

Sliding-window layers (Gemma 2/3, Mistral) receive ``sliding_window`` from their module,
soft-capped ones ``softcap``; both are applied over trie depth (= position ids).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from dataclasses import dataclass, field

import torch

ATTN_NAME = "flr_tree"
_PREFIX = ATTN_NAME + ":"
# True inside a packed forward of this thread / task: no attention mask is built
_packed = contextvars.ContextVar("flr_packed_forward", default=False)


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
            "tree attention called without a packed layout: run the model through "
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


@functools.lru_cache(maxsize=1)
def _registries():
    """transformers' (attention functions, mask functions) registries, imported once."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


@functools.cache
def _modeling_eager(cls: type):
    """The ``eager_attention_forward`` of the modeling file that defines ``cls`` (what the
    layer passes transformers as the default for "eager"), or None."""
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)


def _routed_attention(impl: str | None):
    def attention(module, query, key, value, attention_mask, **kwargs):
        tree = kwargs.pop("flr_tree", None)
        if tree is not None:
            return flr_tree_attention_forward(
                module, query, key, value, attention_mask, flr_tree=tree, **kwargs
            )
        if _packed.get():  # a packed forward whose layout did not reach this layer
            raise RuntimeError(
                f"{type(module).__name__} got no flr_tree layout in a packed forward: the model "
                "does not pass keyword arguments through to its attention layers"
            )
        native = _registries()[0].get_interface(impl, _modeling_eager(type(module)))
        if native is None:
            raise RuntimeError(f"no attention function {impl!r} for {type(module).__name__}")
        return native(module, query, key, value, attention_mask, **kwargs)

    return attention


def _routed_mask(impl: str):
    def mask(*args, **kwargs):
        if _packed.get():
            return None  # tree attention takes its layout from TreeContext, not a mask
        return _registries()[1][impl](*args, **kwargs)

    return mask


def _register(impl: str | None) -> str:
    """Register ``"flr_tree:<impl>"`` (idempotent; the registries are process-wide by
    design, the functions stateless) and return the name."""
    attention, masks = _registries()
    name = _PREFIX + (impl or "")
    if name not in attention:
        type(attention).register(name, _routed_attention(impl))
    if impl in masks and name not in masks:  # no mask function for X: none for the route
        type(masks).register(name, _routed_mask(impl))
    return name


def _configs(model: torch.nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            out.append(cfg)
    return out


def _set_name(cfg, name: str | None) -> None:
    # the internal field: the public setter would also overwrite the sub-configs' own names
    if hasattr(cfg, "_attn_implementation_internal"):
        cfg._attn_implementation_internal = name
    else:
        cfg._attn_implementation = name


def route_tree_attention(model: torch.nn.Module) -> None:
    """Route every attention config of ``model`` through ``"flr_tree:<its implementation>"``
    (see the module docstring). Idempotent and cheap when already routed; a config whose
    name was changed since (``model.set_attn_implementation``) is routed again."""
    for cfg in _configs(model):
        impl = cfg._attn_implementation
        if not (isinstance(impl, str) and impl.startswith(_PREFIX)):
            _set_name(cfg, _register(impl))


def unroute_tree_attention(model: torch.nn.Module) -> None:
    """Give every config of ``model`` back its own attention implementation name."""
    for cfg in _configs(model):
        impl = cfg._attn_implementation
        if isinstance(impl, str) and impl.startswith(_PREFIX):
            _set_name(cfg, impl[len(_PREFIX) :] or None)


@contextlib.contextmanager
def packed_forward():
    """Mark a packed (tree-attention) forward for this thread / task: no masks are built."""
    token = _packed.set(True)
    try:
        yield
    finally:
        _packed.reset(token)
