"""Attention probabilities of a decoder layer computed on demand, from that layer's own Q and K.

Pruning methods such as PyramidDrop rank the image tokens, just before a layer, by the attention
that the layer itself would pay them, and then drop tokens before the layer runs. ``layer_attention``
runs the layer's attention module on its input (after the layer's input norm) under a second
attention function registered with transformers, ``attnkit_capture``, which computes softmax
probabilities for the requested query rows only and returns a zero output. The module's own code
makes Q and K (projections, q/k norms, RoPE or mRoPE), so this works for every family; nothing is
written to the KV cache. The cost is the layer's projections over the prompt once, not its attention.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TransformersCompatError
from .compat import AttentionInterface, Cache, get_impl, set_impl, where
from .kernel import attention_probs, bool_mask

NAME = "attnkit_capture"
SPEC_ATTR = "_attnkit_capture"


def _capture(module: torch.nn.Module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    spec: dict[str, Any] = getattr(module, SPEC_ATTR)
    rows: torch.Tensor = spec["rows"].to(query.device)
    bsz, heads, q_len, dim = query.shape
    if scaling is None:
        scaling = dim**-0.5
    kv_len = key.shape[2]
    if attention_mask is None:
        visible = (torch.arange(kv_len, device=query.device)[None, :] <= rows[:, None])[None, None]
    else:
        visible = bool_mask(attention_mask[:, :, rows] if attention_mask.shape[2] > 1 else attention_mask, 1, kv_len,
                            query.device)
    keep = spec.get("keep")
    if keep is not None:
        visible = visible & keep[:, None, None, :kv_len].to(visible.device)
    spec["probs"] = attention_probs(query[:, :, rows], key, visible, scaling, kwargs.get("softcap"))
    return query.new_zeros(bsz, q_len, heads, dim), None


def register() -> None:
    AttentionInterface.register(NAME, _capture)


def layer_attention(
    text_config: Any,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    layer_kwargs: dict[str, Any],
    rows: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, r, K) fp32 attention probabilities of ``rows`` at ``layer`` for its input ``hidden``,
    with the layer's mask (and the mask-mode ``keep`` (B, K) when given)."""
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "input_layernorm", None)
    if attn is None or norm is None:
        raise TypeError(f"{type(layer).__name__} has no self_attn / input_layernorm")
    register()
    # the layer's own inputs without the KV cache (found by type: its keyword changed in 5.24), so
    # nothing is written to it
    kwargs = {
        k: v for k, v in layer_kwargs.items() if k not in ("hidden_states", "use_cache") and not isinstance(v, Cache)
    }
    saved = get_impl(text_config)
    setattr(attn, SPEC_ATTR, {"rows": rows, "keep": keep})
    try:
        set_impl(text_config, NAME)
        with torch.no_grad():
            attn(hidden_states=norm(hidden), **kwargs)
        spec = getattr(attn, SPEC_ATTR)
        if "probs" not in spec:
            raise TransformersCompatError(
                f"{type(attn).__name__} did not call its attention function ({where()}); attnkit cannot read "
                "the layer's attention"
            )
        return spec["probs"]
    finally:
        set_impl(text_config, saved)
        delattr(attn, SPEC_ATTR)
