"""The attention and mask functions attnkit registers with transformers.

``attention`` is called by every language-model attention layer of a wrapped model.
A layer that no active method touches goes straight to transformers' fused sdpa
function with its arguments untouched. Otherwise the eager path computes scores and
probabilities for the query rows the methods ask for, runs their callbacks, and (when
only some rows were asked for) lets sdpa compute the other rows.

The eager path goes through the requested rows in chunks (``CHUNK_ELEMENTS``) and multiplies
only the key columns a chunk can see (causal prefill: about half), so materialising attention
costs little more than the fused kernel and never holds a full (q, K) map. Callbacks therefore
see (B, H, r, K') tensors: r rows whose query indices are ``ctx.query_rows``, and the key
columns [0, K') (K' <= kv_len; the columns beyond are masked for all r rows). GQA heads are
multiplied against their shared K/V head without ``repeat_kv`` copies.

``mask`` is transformers' ``sdpa_mask``: it returns a boolean mask, or None when the
pattern is plain causal, which keeps the fused path exactly as fast as unwrapped sdpa.
The eager path turns that into the additive float mask itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

if TYPE_CHECKING:
    from .manager import Handle

NAME = "attnkit"
HANDLE_ATTR = "_attnkit_handle"
#: The eager path handles query rows in chunks whose scores hold at most this many elements
#: (12 MB in fp32) and, on CPU, at most CHUNK_ROWS rows: small enough to stay in cache, large
#: enough to amortise the per-chunk work (measured on a 2-core CPU at 600-3000 keys).
CHUNK_ELEMENTS = 3 * 2**20
CHUNK_ROWS = 128
#: Other devices (GPU) take larger chunks: only the memory bound matters there.
CHUNK_ELEMENTS_ACCEL = 2**26
#: A ``collect`` pass keeps its chunks' probabilities for the rewrite pass while they hold at most
#: this many elements in all (16 MB in fp32); beyond, the rewrite pass recomputes them.
COLLECT_CACHE_ELEMENTS = 2**22


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


def _chunk_mask(
    base: torch.Tensor | None, causal: bool, pos: torch.Tensor, sl: slice | None, kv_len: int
) -> tuple[torch.Tensor | None, int]:
    """(visible, kv_end) for the query rows ``pos``: the bool mask cropped to the keys [0, kv_end)
    that at least one of these rows can see (None = every key visible)."""
    if base is not None:
        if base.shape[2] > 1:
            base = base[:, :, sl] if sl is not None else base[:, :, pos]
        cols = base.reshape(-1, base.shape[-1]).any(0).nonzero()
        kv_end = int(cols[-1]) + 1 if cols.numel() else 1
        return base[..., :kv_end], kv_end
    if causal:
        kv_end = int(pos[-1]) + 1  # pos is sorted
        cols = torch.arange(kv_end, device=pos.device)
        return (cols[None, :] <= pos[:, None])[None, None], kv_end
    return None, kv_len


def _mask_scores(scores: torch.Tensor, visible: torch.Tensor, value: float) -> None:
    """``scores.masked_fill_(~visible, value)``, touching only the runs of key columns that some row
    of the chunk cannot see (left padding, the causal diagonal block): at most a few narrow slices."""
    hidden = ~visible.reshape(-1, visible.shape[-1]).all(0)
    cols = hidden.nonzero().flatten()
    if cols.numel() == 0:
        return
    cuts = (cols[1:] - cols[:-1] > 1).nonzero().flatten().tolist()
    if len(cuts) > 3:
        scores.masked_fill_(~visible, value)
        return
    starts = [int(cols[0])] + [int(cols[c + 1]) for c in cuts]
    ends = [int(cols[c]) + 1 for c in cuts] + [int(cols[-1]) + 1]
    for a, b in zip(starts, ends):
        scores[..., a:b].masked_fill_(~visible[..., a:b], value)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, r, n) -> (B * KVH, H/KVH * r, n): the query heads of one KV head side by side, so one bmm
    serves the whole group (GQA without repeat_kv copies)."""
    b, h, r, n = x.shape
    return x.reshape(b * kv_heads, (h // kv_heads) * r, n)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, KVH, K, D) -> (B * KVH, K, D), a view for a cache slice [:, :, :k]."""
    return x.flatten(0, 1)


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
    bsz, n_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if scaling is None:
        scaling = head_dim**-0.5

    # Which query rows need probabilities: the union over methods (None = all rows). Each method
    # gives sorted, distinct indices; a single new token (decode) is always computed.
    rows: torch.Tensor | None = None
    if q_len > 1:
        merged = 0
        for m in methods:
            r = m.rows(ctx, layer)
            if r is None:
                rows = None
                break
            rows = r if rows is None else torch.cat([rows, r])
            merged += 1
        if rows is not None:
            rows = (torch.unique(rows) if merged > 1 else rows).to(query.device)
    full_out = None
    if rows is not None and rows.numel() < q_len:
        full_out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        n_rows = rows.numel()
    else:
        rows = None
        n_rows = q_len

    softcap = kwargs.get("softcap")
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None:
        base_mask, causal = None, bool(is_causal) and q_len > 1
    else:
        base_mask, causal = _bool_mask(attention_mask, q_len, kv_len, query.device, is_causal), False

    # Rows go through in chunks sized so one chunk's scores stay small (cache friendly, bounded
    # memory), and each chunk only multiplies the key columns some of its rows can see.
    if query.device.type == "cpu":
        per_chunk = max(1, min(CHUNK_ROWS, CHUNK_ELEMENTS // max(1, bsz * n_heads * kv_len)))
    else:
        per_chunk = max(1, CHUNK_ELEMENTS_ACCEL // max(1, bsz * n_heads * kv_len))
    chunks: list[tuple[torch.Tensor, slice | None]] = []
    for start in range(0, n_rows, per_chunk):
        end = min(n_rows, start + per_chunk)
        if rows is None:
            chunks.append((torch.arange(start, end, device=query.device), slice(start, end)))
        else:
            chunks.append((rows[start:end], None))
    min_value = torch.finfo(query.dtype).min

    def chunk_probs(pos: torch.Tensor, sl: slice | None):
        visible, kv_end = _chunk_mask(base_mask, causal, pos, sl, kv_len)
        q = (query[:, :, sl] if sl is not None else query[:, :, pos]) * scaling
        r = q.shape[2]
        scores = torch.bmm(_grouped(q, kv_heads), _flat(key[:, :, :kv_end]).transpose(1, 2))
        scores = scores.view(bsz, n_heads, r, kv_end)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        dead = None
        if visible is not None:
            _mask_scores(scores, visible, min_value)
            dead = ~visible.any(-1, keepdim=True)
            if not dead.any():
                dead = None
        ctx.query_rows, ctx.visible = pos, visible
        for m in methods:
            if m.scores is not None:
                scores = m.scores(ctx, layer, scores)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return probs, visible, dead, kv_end

    # Methods that need statistics over every requested row first (ACT's column means) get a
    # read-only pass before any probs callback; its chunks are kept for the rewrite pass when they
    # are small in all, else computed again.
    cached: list | None = None
    if any(m.collect is not None for m in methods):
        cached, kept = [], 0
        for pos, sl in chunks:
            probs, visible, dead, kv_end = chunk_probs(pos, sl)
            seen = probs if dead is None else probs.masked_fill(dead, 0.0)
            for m in methods:
                if m.collect is not None:
                    m.collect(ctx, layer, seen)
            kept += probs.numel()
            if cached is not None and (len(chunks) == 1 or kept <= COLLECT_CACHE_ELEMENTS):
                cached.append((probs, visible, dead, kv_end))
            else:
                cached = None

    want_weights = bool(kwargs.get("output_attentions")) and rows is None
    weights = query.new_zeros(bsz, n_heads, q_len, kv_len) if want_weights else None
    out = query.new_empty(bsz, n_heads, n_rows, head_dim) if len(chunks) > 1 else None
    done = 0
    for i, (pos, sl) in enumerate(chunks):
        probs, visible, dead, kv_end = cached[i] if cached is not None else chunk_probs(pos, sl)
        ctx.query_rows, ctx.visible = pos, visible
        for m in methods:
            if m.probs is not None:
                probs = m.probs(ctx, layer, probs)
        if dead is not None:
            # Rows that see no key at all (left padding) attend to nothing, as in sdpa. Done after the
            # methods (which see the uniform row eager attention gives) so a renormalising method
            # cannot turn them into NaN.
            probs = probs.masked_fill(dead, 0.0)
        for m in methods:
            if m.observe is not None:
                m.observe(ctx, layer, probs)
        if weights is not None:
            weights[:, :, done : done + probs.shape[2], :kv_end] = probs
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
        r = probs.shape[2]
        part = torch.bmm(_grouped(probs, kv_heads), _flat(value[:, :, :kv_end])).view(bsz, n_heads, r, head_dim)
        if out is None:
            out = part
        else:
            out[:, :, done : done + r] = part
        done += r
    out = out.transpose(1, 2)  # (B, q, H, D)
    ctx.visible = None
    if any(m.head_output is not None for m in methods):
        ctx.query_rows = rows if rows is not None else torch.arange(q_len, device=query.device)
        for m in methods:
            if m.head_output is not None:
                out = m.head_output(ctx, layer, out)
    if full_out is not None:
        full_out[:, rows] = out.to(full_out.dtype)  # sdpa's output is a fresh tensor
        out = full_out
    return out.contiguous(), weights
