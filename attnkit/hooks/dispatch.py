"""The attention and mask functions attnkit registers with transformers.

``attention`` is called by every language-model attention layer of a wrapped model.
A layer that no active method touches goes straight to transformers' fused sdpa
function with its arguments untouched. Otherwise the eager path computes scores and
probabilities for the query rows the methods ask for, runs their callbacks, and (when
only some rows were asked for) lets sdpa compute the other rows.

``mask`` is transformers' ``sdpa_mask``: it returns a boolean mask, or None when the
pattern is plain causal, which keeps the fused path exactly as fast as unwrapped sdpa.
The eager path turns that into the additive float mask itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

if TYPE_CHECKING:
    from .manager import Handle

NAME = "attnkit"
HANDLE_ATTR = "_attnkit_handle"


def mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask function registered under NAME: transformers' sdpa mask (bool, or None for plain causal)."""
    return sdpa_mask(*args, **kwargs)


def _bool_mask(
    mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device, is_causal: bool = True
) -> torch.Tensor | None:
    """The boolean (B|1, 1, q, kv) mask that sdpa applies for ``mask`` (None = sdpa's is_causal rule)."""
    if mask is None:
        if q_len == 1 or not is_causal:
            return None  # sdpa attends to every key
        # sdpa's is_causal is upper-left aligned (it crops keys beyond q_len on prefill)
        rows = torch.arange(q_len, device=device)[:, None]
        cols = torch.arange(kv_len, device=device)[None, :]
        return (cols <= rows)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _apply_keep(mask: torch.Tensor | None, keep: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """AND a (B, kv) keep mask into the attention mask (pruning in mask mode)."""
    base = _bool_mask(mask, q_len, kv_len, keep.device)
    keep4 = keep[:, None, None, :kv_len]
    return keep4 if base is None else base & keep4


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered under NAME. Shapes: q (B,H,q,D), k/v (B,KVH,K,D)."""
    handle: Handle | None = getattr(module, HANDLE_ATTR, None)
    if handle is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    layer = module.layer_idx
    ctx = handle.ctx
    keep = ctx.keep_for_layer(layer) if ctx.keep else None
    if keep is not None:
        attention_mask = _apply_keep(attention_mask, keep, query.shape[2], key.shape[2])
    methods = handle.methods_for_layer(layer)
    if not methods:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return _eager(handle, methods, module, layer, query, key, value, attention_mask, *args, **kwargs)


def _eager(
    handle: Handle,
    methods: list,
    module: torch.nn.Module,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    ctx = handle.ctx
    ctx.layer = layer
    _, n_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    if scaling is None:
        scaling = head_dim**-0.5

    # Which query rows need probabilities: the union over methods (None = all rows).
    rows: torch.Tensor | None = None
    for m in methods:
        r = m.rows(ctx, layer)
        if r is None:
            rows = None
            break
        rows = r if rows is None else torch.unique(torch.cat([rows, r]))
    full_out = None
    if rows is not None and rows.numel() < q_len:
        full_out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        query = query[:, :, rows]
    else:
        rows = None

    n_rep = n_heads // key.shape[1]
    k = repeat_kv(key, n_rep)
    v = repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)).mul_(scaling)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    bool_mask = _bool_mask(attention_mask, q_len, kv_len, query.device, is_causal)
    dead_rows = None
    if bool_mask is not None:
        if rows is not None:
            bool_mask = bool_mask[:, :, rows] if bool_mask.shape[2] > 1 else bool_mask
        scores.masked_fill_(~bool_mask, torch.finfo(scores.dtype).min)
        dead_rows = ~bool_mask.any(-1, keepdim=True)
        if not dead_rows.any():
            dead_rows = None

    for m in methods:
        if m.scores is not None:
            scores = m.scores(ctx, layer, scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    for m in methods:
        if m.probs is not None:
            probs = m.probs(ctx, layer, probs)
    if dead_rows is not None:
        # Rows that see no key at all (left padding) attend to nothing, as in sdpa. Done after the
        # methods (which see the uniform row eager attention gives) so a renormalising method
        # cannot turn them into NaN.
        probs = probs.masked_fill(dead_rows, 0.0)
    for m in methods:
        if m.observe is not None:
            m.observe(ctx, layer, probs)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, v).transpose(1, 2)  # (B, q, H, D)
    for m in methods:
        if m.head_output is not None:
            out = m.head_output(ctx, layer, out)
    if full_out is not None:
        full_out = full_out.clone()
        full_out[:, rows] = out.to(full_out.dtype)
        out = full_out
    return out.contiguous(), (probs if kwargs.get("output_attentions") and rows is None else None)
