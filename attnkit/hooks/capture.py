"""Attention probabilities of a decoder layer computed on demand, from that layer's own Q and K.

Pruning methods such as PyramidDrop rank the image tokens, just before a layer, by the attention
that the layer itself would pay them, and then drop tokens before the layer runs. ``layer_attention``
runs the layer's attention module on its input (after the layer's input norm) under a second
attention function registered with transformers, ``attnkit_capture``, which computes softmax
probabilities for the requested query rows only and returns a zero output. The module's own code
makes Q and K (projections, q/k norms, RoPE or mRoPE), so this works for every family; nothing is
written to the KV cache. Only K is needed for every token and Q for the requested rows: while the module
runs, its ``q_proj`` is stood in for by the real projection of those rows (zeros elsewhere), and its
``v_proj`` and ``o_proj``, whose outputs the capture never reads, by zeros of their output shape
(``_standins``; an attention module without those three linear projections runs whole). The cost is then
the layer's K projection over the prompt, about a quarter of its attention projections.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TransformersCompatError
from .compat import AttentionInterface, Cache, get_impl, set_impl, where
from .kernel import attention_probs, bool_mask

NAME = "attnkit_capture"
SPEC_ATTR = "_attnkit_capture"
#: Whether captures stand in for the unread projections (tests switch it off to compare with the whole module).
STANDIN = True


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


#: The attention module's projections that the capture stands in for (see the module docstring).
STANDIN_PROJECTIONS = ("q_proj", "v_proj", "o_proj")


class _RowsOnly(torch.nn.Module):
    """The real projection of the query ``rows`` only (B, q, out), zeros at the other positions."""

    def __init__(self, proj: torch.nn.Linear, rows: torch.Tensor) -> None:
        super().__init__()
        self.proj, self.rows = proj, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows.to(x.device)
        out = x.new_zeros(*x.shape[:-1], self.proj.out_features)
        out[:, rows] = self.proj(x[:, rows])
        return out


class _Zeros(torch.nn.Module):
    """Zeros of the projection's output shape, as a broadcast view (nothing allocated)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


def _standins(attn: torch.nn.Module, rows: torch.Tensor) -> dict[str, torch.nn.Module] | None:
    """name -> stand-in for the capture, or None when the module lacks one of the linear projections."""
    projs = {name: getattr(attn, name, None) for name in STANDIN_PROJECTIONS}
    if not all(isinstance(p, torch.nn.Linear) for p in projs.values()):
        return None
    return {"q_proj": _RowsOnly(projs["q_proj"], rows), "v_proj": _Zeros(projs["v_proj"].out_features),
            "o_proj": _Zeros(projs["o_proj"].out_features)}


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
    standins = _standins(attn, rows) if STANDIN else None
    originals = {name: getattr(attn, name) for name in standins or ()}
    try:
        set_impl(text_config, NAME)
        for name, module in (standins or {}).items():
            setattr(attn, name, module)
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
        for name, module in originals.items():
            setattr(attn, name, module)
        set_impl(text_config, saved)
        delattr(attn, SPEC_ATTR)
