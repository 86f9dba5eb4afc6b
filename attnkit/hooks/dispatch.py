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

With a method active, every call first runs ``_check_call``: not inside torch.compile, one call
per layer and forward, and the key length the ForwardContext expects (compat.check_keys), so a
forward attnkit misread raises instead of being rewritten at the wrong columns. A forward that asks
for ``output_attentions`` takes the eager path on every layer, for every row.

``mask`` is transformers' ``sdpa_mask``: it returns a boolean mask, or None when the
pattern is plain causal, which keeps the fused path exactly as fast as unwrapped sdpa.
The eager path turns that into the additive float mask itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from ..errors import TransformersCompatError, UnsupportedCacheError
from .compat import check_keys, sdpa_attention_forward, sdpa_mask, where

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
#: The column path is taken for at least this many requested rows; a decode step (one row) costs the
#: same on the plain path, which needs fewer calls.
COLUMN_MIN_ROWS = 2
#: The column path's chunks hold at most this many scores (8 MB in fp32, at most CHUNK_ELEMENTS): its
#: P@V and column sums read each chunk again, which pays off while the chunk stays near the cache.
COLUMN_CHUNK_ELEMENTS = 2**21
#: The column path corrects out_i by factor_i * (out_i - P_iJ V_J): fp32 rounding grows with the factor
#: (ACT's factor is large when a row's attention is nearly all on its sinks). Rows whose factor exceeds
#: this are computed again on the plain path (the method's ``probs`` on the full row).
COLUMN_MAX_FACTOR = 4.0
#: A decode step (one query row) takes the short single-row path (tests switch it off to compare).
SINGLE_ROW = True


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


def _padded_starts(ctx, mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """(B,) each row's first real token when ``mask`` is a prefill's boolean mask made only of left
    padding and the causal rule (pad query rows see nothing; what transformers' sdpa mask gives a
    left-padded batch), else None. Checked once per mask tensor and forward (the layers share it)."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or q_len != kv_len or q_len < 2:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != q_len or mask.shape[3] != kv_len:
        return None
    cache = ctx.__dict__.setdefault("_padded", {})
    hit = cache.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1]
    starts = (~mask[:, 0, -1]).sum(-1)  # the last row sees its row's whole real prefix
    idx = torch.arange(kv_len, device=mask.device)
    causal = idx[None, :] <= idx[:, None]
    found = starts
    for b, start in enumerate(starts.tolist()):  # one (q, kv) map at a time: bounded memory
        if not torch.equal(mask[b, 0], causal & (idx >= start)[None, :]):
            found = None
            break
    cache[id(mask)] = (mask, found)  # holds mask, so its id stays its own for the forward
    return found


def _sdpa_padded(module, query, key, value, starts: torch.Tensor, scaling, kwargs) -> tuple[torch.Tensor, None]:
    """sdpa over a left-padded prefill batch without its mask: the rows with the same padding go
    together, on their real tokens only, with the fused causal kernel; pad query rows get zeros (as
    sdpa gives a row that sees no key). Same result as sdpa with the mask, without its masked path
    and without the padded rows' work."""
    bsz, n_heads, q_len, head_dim = query.shape
    rest = {k: v for k, v in kwargs.items() if k not in ("is_causal", "dropout", "scaling")}
    out = query.new_zeros(bsz, q_len, n_heads, head_dim)
    if starts.numel() == 1 and bsz > 1:  # one mask row shared by the batch
        starts = starts.expand(bsz)
    groups: dict[int, list[int]] = {}
    for b, start in enumerate(starts.tolist()):
        groups.setdefault(int(start), []).append(b)
    for start, rows in groups.items():
        if start >= q_len:
            continue
        sel = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
        part, _ = sdpa_attention_forward(
            module, query[sel, :, start:], key[sel, :, start:], value[sel, :, start:], None,
            dropout=0.0, scaling=scaling, is_causal=True, **rest,
        )
        out[sel, start:] = part
    return out, None


def _sdpa(ctx, module, query, key, value, attention_mask, dropout, scaling, kwargs) -> tuple[torch.Tensor, None]:
    """Fused attention for every row of a layer the eager path works on, or of a forward that carries
    attnkit's own branch rows: a left-padded prefill batch runs unmasked per padding group
    (``_sdpa_padded``), everything else as transformers' sdpa function."""
    if not (dropout and module.training) and kwargs.get("softcap") is None:
        starts = _padded_starts(ctx, attention_mask, query.shape[2], key.shape[2])
        if starts is not None:
            return _sdpa_padded(module, query, key, value, starts, scaling, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


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
    if not handle.methods:
        if handle.want_weights:  # output_attentions: the weights of every layer, from the eager path
            return _eager(handle, [], module, layer, query, key, value, attention_mask, *args, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    _check_call(handle, layer, key.shape[2])
    keep = ctx.keep_for_layer(layer) if ctx.keep else None
    methods = handle.methods_for_layer(layer)
    pad = ctx.kv_len - key.shape[2]  # > 0 only on a sliding-window layer past its window (check_keys)
    if pad > 0 and (methods or keep is not None or handle.want_weights):
        key, value, attention_mask = _unwindow(key, value, attention_mask, pad, query.shape[2])
    if keep is not None:
        attention_mask = _apply_keep(attention_mask, keep, query.shape[2], key.shape[2])
    if not methods and not handle.want_weights:
        if ctx.branch_rows and not args:  # attnkit's image-free rows, left-padded to the prompt
            return _sdpa(ctx, module, query, key, value, attention_mask, kwargs.pop("dropout", 0.0),
                         kwargs.pop("scaling", None), kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    out, weights = _eager(handle, methods, module, layer, query, key, value, attention_mask, *args, **kwargs)
    if pad > 0 and weights is not None:
        weights = weights[..., pad:]  # the layer's own keys, as eager attention returns them
    return out, weights


def _unwindow(key, value, attention_mask, pad: int, q_len: int) -> tuple:
    """A sliding-window layer's cache holds only the last keys of the sequence: put them back at their
    positions (``pad`` invisible zero keys in front) so that key column j is sequence position j, as
    the context and the methods index them, and so that a method rewrites the columns it means to.
    The new columns are masked for every row: the result is the layer's own attention."""
    width = key.shape[2]
    if attention_mask is None:  # every cached key visible to the last query row, causal before it
        rows = torch.arange(q_len, device=key.device)[:, None]
        cols = torch.arange(width, device=key.device)[None, :]
        base = (cols <= width - q_len + rows)[None, None]
    else:
        if attention_mask.shape[-1] != width:
            raise TransformersCompatError(
                f"a sliding-window layer got {width} keys and a mask over {attention_mask.shape[-1]} ({where()})"
            )
        base = _bool_mask(attention_mask, q_len, width, key.device)
    mask = torch.cat([base.new_zeros(*base.shape[:3], pad), base], dim=-1)
    key = torch.cat([key.new_zeros(*key.shape[:2], pad, key.shape[3]), key], dim=2)
    value = torch.cat([value.new_zeros(*value.shape[:2], pad, value.shape[3]), value], dim=2)
    return key, value, mask


def _check_call(handle: Handle, layer: int, key_len: int) -> None:
    """The checks that keep a wrapped model from computing on silently when attnkit misread the forward:
    not inside torch.compile, one attention call per layer and forward (a second call means the
    model's forward pre-hook did not run, e.g. ``model.forward`` called directly), and the key length
    the context expects (compat.check_keys)."""
    if torch.compiler.is_compiling():
        raise UnsupportedCacheError(
            "attnkit's methods cannot run inside torch.compile (they follow each forward in Python); compile "
            "the model unwrapped or wrapped with no method"
        )
    if layer in handle.ran:
        raise TransformersCompatError(
            f"layer {layer} attended twice in one forward: the wrapped model's forward pre-hook did not run "
            f"(call the model, not model.forward; {where()})"
        )
    handle.ran.add(layer)
    check_keys(handle.ctx, layer, key_len, layer in handle.windowed)


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
    # output_attentions (by argument or config): every row's weights, so no row subset, no column path
    want_weights = handle.want_weights or bool(kwargs.get("output_attentions"))
    if SINGLE_ROW and q_len == 1 and not (dropout and module.training):
        visible = _bool_mask(attention_mask, 1, kv_len, query.device)
        if visible is None or (visible.dim() == 4 and visible.shape[1:3] == (1, 1) and visible.shape[3] == kv_len):
            return _single_row(ctx, methods, layer, query, key, value, scaling, kwargs, visible, want_weights)

    # Which query rows need probabilities: the union over methods (None = all rows). Each method
    # gives sorted, distinct indices; a single new token (decode) is always computed.
    rows: torch.Tensor | None = None
    if q_len > 1 and not want_weights:
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
    n_req = q_len if rows is None else rows.numel()
    rewriter = _column_rewriter(methods) if n_req >= COLUMN_MIN_ROWS else None
    if (
        rewriter is not None
        and kwargs.get("softcap") is None
        and not (dropout and module.training)
        and not want_weights
    ):
        return _column_path(
            ctx, methods, rewriter, module, layer, query, key, value, attention_mask, rows, scaling, kwargs
        )
    full_out = None
    if rows is not None and rows.numel() < q_len:
        full_out, _ = _sdpa(ctx, module, query, key, value, attention_mask, dropout, scaling, kwargs)
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
    # are small in all, else computed again. A method with ``column_sums`` but no ``collect`` gets
    # each chunk's column sums and visible-row counts.
    cached: list | None = None
    if any(m.collect is not None or m.column_sums is not None for m in methods):
        cached, kept = [], 0
        for pos, sl in chunks:
            probs, visible, dead, kv_end = chunk_probs(pos, sl)
            _collect(ctx, methods, layer, probs, visible, dead)
            kept += probs.numel()
            if cached is not None and (len(chunks) == 1 or kept <= COLLECT_CACHE_ELEMENTS):
                cached.append((probs, visible, dead, kv_end))
            else:
                cached = None

    weights = query.new_zeros(bsz, n_heads, q_len, kv_len) if want_weights else None
    out = query.new_empty(bsz, n_heads, n_rows, head_dim) if len(chunks) > 1 else None
    done = 0
    for i, (pos, sl) in enumerate(chunks):
        probs, visible, dead, kv_end = cached[i] if cached is not None else chunk_probs(pos, sl)
        ctx.query_rows, ctx.visible = pos, visible
        probs = _rewrite(ctx, methods, layer, probs, dead)
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


def _collect(ctx, methods: list, layer: int, probs: torch.Tensor, visible, dead) -> None:
    """The read-only statistics callbacks on a chunk of probabilities (rows that see no key count as
    zeros): ``collect`` gets the chunk, ``column_sums`` its column sums and visible-row counts."""
    if not any(m.collect is not None or m.column_sums is not None for m in methods):
        return
    seen = probs if dead is None else probs.masked_fill(dead, 0.0)
    sums = counts = None
    for m in methods:
        if m.collect is not None:
            m.collect(ctx, layer, seen)
        elif m.column_sums is not None:
            if sums is None:
                sums = seen.sum(2, dtype=torch.float32)
                counts = _visible_counts(visible, seen.shape[2], seen.shape[3], seen.device)
            m.column_sums(ctx, layer, sums, counts)


def _rewrite(ctx, methods: list, layer: int, probs: torch.Tensor, dead) -> torch.Tensor:
    """The ``probs`` callbacks, then rows that see no key at all (left padding) set to zero as in sdpa,
    then the ``observe`` callbacks. Zeroing after the methods (which see the uniform row eager
    attention gives) keeps a renormalising method from turning those rows into NaN."""
    for m in methods:
        if m.probs is not None:
            probs = m.probs(ctx, layer, probs)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    for m in methods:
        if m.observe is not None:
            m.observe(ctx, layer, probs)
    return probs


def _visible_counts(visible: torch.Tensor | None, r: int, width: int, device: torch.device) -> torch.Tensor:
    """(B|1, 1, K') fp32: how many of a chunk's r rows see each key column."""
    if visible is None:
        return torch.full((1, 1, width), float(r), device=device)
    return visible.sum(2, dtype=torch.float32)


def _column_rewriter(methods: list):
    """The method whose ``sparse_probs`` rewrite the column path can apply, or None when the layer needs
    the plain path: exactly one method with a column rewrite, and every method's other attention
    callbacks limited to ``column_sums`` (a ``collect`` too when it also has ``column_sums``) and a
    ``probs`` that its ``sparse_probs`` replaces. A ``scores``, ``observe`` or ``head_output`` callback,
    or a second rewrite, keeps the plain path (they need every row's full probabilities)."""
    found = None
    for m in methods:
        if m.scores is not None or m.observe is not None or m.head_output is not None:
            return None
        if m.collect is not None and m.column_sums is None:
            return None
        if m.sparse_probs is not None:
            if found is not None:
                return None
            found = m
        elif m.probs is not None:
            return None
    return found


def _column_path(
    ctx, methods: list, rewriter, module, layer: int, query, key, value, attention_mask, rows, scaling, kwargs
) -> tuple[torch.Tensor, None]:
    """Attention for a layer whose only rewrite is a column rewrite (see Method.sparse_probs), in one pass.

    Each chunk of requested rows computes its scores and softmax once, adds the column sums (when a
    method wants ``column_sums``), multiplies the unchanged probabilities with V and keeps each row's
    logsumexp (row max of the scores minus the log of the largest probability: no extra exp). After
    the last chunk the methods get the column sums, the rewriter names its few special columns J,
    their probabilities are recomputed from q.k_j and the logsumexp (rows x |J|), and the output is
    corrected: out'_i = factor_i * out_i + sum_{j in J} (new_ij - factor_i * P_ij) V_j. So the
    statistics need no second pass and the rewrite no pass over the full (rows, keys) probabilities."""
    bsz, n_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    dev = query.device
    full_out = None
    if rows is not None and rows.numel() < q_len:
        full_out, _ = _sdpa(ctx, module, query, key, value, attention_mask, 0.0, scaling, kwargs)
    else:
        rows = None
    pos_all = rows if rows is not None else torch.arange(q_len, device=dev)
    n_rows = pos_all.numel()
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None:
        base_mask, causal = None, bool(is_causal) and q_len > 1
    else:
        base_mask, causal = _bool_mask(attention_mask, q_len, kv_len, dev, is_causal), False
    if dev.type == "cpu":
        budget = min(CHUNK_ELEMENTS, COLUMN_CHUNK_ELEMENTS)
        per_chunk = max(1, min(CHUNK_ROWS, budget // max(1, bsz * n_heads * kv_len)))
    else:
        per_chunk = max(1, CHUNK_ELEMENTS_ACCEL // max(1, bsz * n_heads * kv_len))

    want_sums = any(m.column_sums is not None for m in methods)
    sums = torch.zeros(bsz, n_heads, kv_len, device=dev) if want_sums else None
    counts = torch.zeros(1 if base_mask is None else base_mask.shape[0], 1, kv_len, device=dev) if want_sums else None
    lse = torch.empty(bsz, n_heads, n_rows, device=dev)
    out = query.new_empty(bsz, n_heads, n_rows, head_dim)
    min_value = torch.finfo(query.dtype).min
    # plain causal attention over all rows: only each chunk's diagonal block needs masking, no row is
    # dead, and column j is seen by the rows j..n_rows-1
    plain_causal = causal and rows is None
    tri = torch.ones(per_chunk, per_chunk, dtype=torch.bool, device=dev).triu_(1) if plain_causal else None
    for start in range(0, n_rows, per_chunk):
        end = min(n_rows, start + per_chunk)
        r = end - start
        sl = slice(start, end) if rows is None else None
        pos = pos_all[start:end]
        if plain_causal:
            visible, kv_end = None, end
        else:
            visible, kv_end = _chunk_mask(base_mask, causal, pos, sl, kv_len)
        q = (query[:, :, sl] if sl is not None else query[:, :, pos]) * scaling
        scores = torch.bmm(_grouped(q, kv_heads), _flat(key[:, :, :kv_end]).transpose(1, 2))
        scores = scores.view(bsz, n_heads, r, kv_end)
        dead = None
        if plain_causal:
            scores[..., start:end].masked_fill_(tri[:r, :r], min_value)
        elif visible is not None:
            _mask_scores(scores, visible, min_value)
            dead = ~visible.any(-1, keepdim=True)
            if not dead.any():
                dead = None
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        # the largest probability is exp(max - lse); a dead row gets lse = +inf (it sees nothing)
        lse[:, :, start:end] = scores.amax(-1).float().sub_(probs.amax(-1).log_())
        if dead is not None:
            probs.masked_fill_(dead, 0.0)
        if sums is not None:
            sums[..., :kv_end] += probs.sum(2)
            if not plain_causal:
                counts[..., :kv_end] += _visible_counts(visible, r, kv_end, dev)
        p = probs.to(query.dtype)
        part = torch.bmm(_grouped(p, kv_heads), _flat(value[:, :, :kv_end]))
        out[:, :, start:end] = part.view(bsz, n_heads, r, head_dim)
    if sums is not None:
        if plain_causal:
            counts[0, 0] = (n_rows - torch.arange(kv_len, device=dev)).clamp_min_(0)
        ctx.query_rows, ctx.visible = pos_all, None
        for m in methods:
            if m.column_sums is not None:
                m.column_sums(ctx, layer, sums, counts)

    ctx.query_rows, ctx.visible = pos_all, None
    cols = rewriter.sparse_columns(ctx, layer)
    if cols is not None and cols.numel():
        cols = cols.to(dev)
        q = (query if rows is None else query[:, :, rows]) * scaling
        k_j, v_j = key[:, :, cols], value[:, :, cols]
        s_j = torch.bmm(_grouped(q, kv_heads), _flat(k_j).transpose(1, 2))  # as the chunks computed them
        s_j = s_j.view(bsz, n_heads, n_rows, cols.numel()).float().sub_(lse[..., None])
        if base_mask is not None:
            seen = base_mask[:, :, pos_all] if base_mask.shape[2] > 1 else base_mask
            seen = seen[..., cols]
        elif causal:
            seen = (cols[None, :] <= pos_all[:, None])[None, None]
        else:
            seen = None
        p_j = s_j.exp_() if seen is None else s_j.exp_().masked_fill_(~seen, 0.0)
        ctx.visible = seen
        factor, new = rewriter.sparse_probs(ctx, layer, p_j, cols)
        delta = (new - factor * p_j).to(value.dtype)
        corr = torch.bmm(_grouped(delta, kv_heads), _flat(v_j)).view(bsz, n_heads, n_rows, head_dim)
        out = (out.float() * factor + corr.float()).to(query.dtype)
        redo = (factor.abs() > COLUMN_MAX_FACTOR).flatten(0, 1).any(0).flatten().nonzero().flatten()
        if redo.numel():
            out[:, :, redo] = _plain_rows(
                ctx, layer, rewriter, query, key, value, base_mask, causal, pos_all[redo], scaling, per_chunk
            )
    ctx.visible = None
    out = out.transpose(1, 2)  # (B, r, H, D)
    if full_out is not None:
        full_out[:, rows] = out.to(full_out.dtype)  # sdpa's output is a fresh tensor
        out = full_out
    return out.contiguous(), None


def _plain_rows(ctx, layer, method, query, key, value, base_mask, causal, pos, scaling, per_chunk) -> torch.Tensor:
    """(B, H, len(pos), D): the rows ``pos`` computed on the plain path with one method's ``probs``."""
    bsz, n_heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    min_value = torch.finfo(query.dtype).min
    parts = []
    for start in range(0, pos.numel(), per_chunk):
        rows = pos[start : start + per_chunk]
        visible, kv_end = _chunk_mask(base_mask, causal, rows, None, kv_len)
        q = query[:, :, rows] * scaling
        scores = torch.bmm(_grouped(q, kv_heads), _flat(key[:, :, :kv_end]).transpose(1, 2))
        scores = scores.view(bsz, n_heads, rows.numel(), kv_end)
        dead = None
        if visible is not None:
            _mask_scores(scores, visible, min_value)
            dead = ~visible.any(-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        ctx.query_rows, ctx.visible = rows, visible
        probs = method.probs(ctx, layer, probs)
        if dead is not None:
            probs = probs.masked_fill(dead, 0.0)
        part = torch.bmm(_grouped(probs, kv_heads), _flat(value[:, :, :kv_end]))
        parts.append(part.view(bsz, n_heads, rows.numel(), head_dim))
    ctx.visible = None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


_ROW0: dict[torch.device, torch.Tensor] = {}


def _single_row(
    ctx, methods: list, layer: int, query, key, value, scaling: float, kwargs, visible=None, want_weights=False
) -> tuple:
    """The eager path for one new token (a decode step): the plain path's steps and callbacks in the
    same order, without its chunk bookkeeping. ``visible`` (B|1, 1, 1, K) bool: the keys the row may
    see (padding), or None for every key."""
    bsz, n_heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    scores = torch.bmm(_grouped(query * scaling, kv_heads), _flat(key).transpose(1, 2)).view(bsz, n_heads, 1, kv_len)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    dead = None
    if visible is not None:
        scores.masked_fill_(~visible, torch.finfo(query.dtype).min)
        dead = ~visible.any(-1, keepdim=True)  # a row that sees nothing: zero after the methods, as sdpa
    row0 = _ROW0.get(query.device)
    if row0 is None:
        row0 = _ROW0[query.device] = torch.zeros(1, dtype=torch.long, device=query.device)
    ctx.query_rows, ctx.visible = row0, visible
    for m in methods:
        if m.scores is not None:
            scores = m.scores(ctx, layer, scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if query.dtype != torch.float32:
        probs = probs.to(query.dtype)
    _collect(ctx, methods, layer, probs, visible, dead)
    probs = _rewrite(ctx, methods, layer, probs, dead)
    weights = probs if want_weights else None
    out = torch.bmm(_grouped(probs, kv_heads), _flat(value)).view(bsz, n_heads, 1, head_dim).transpose(1, 2)
    ctx.visible = None
    for m in methods:
        if m.head_output is not None:
            out = m.head_output(ctx, layer, out)
    return out.contiguous(), weights
