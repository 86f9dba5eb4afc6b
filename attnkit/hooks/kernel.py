"""The reference attention kernel for the layers a method touches, and the pieces the fast paths share.

``reference`` computes attention for the requested query rows in row blocks: scores, the methods'
``scores`` role, mask, softmax, the ``column_stats`` role (one read-only pass over every requested
row first), the ``probs`` role (a column-form rewrite derived here), rows that see no key set to 0,
``observe``, dropout, P @ V, then ``head_output``. Softcap, dropout, ``output_attentions`` and dead
rows are handled here and nowhere else; the fast paths in fast.py reuse ``block_scores`` and
``apply_probs`` and are each tested against this kernel.

Blocks multiply only the key columns some of their rows can see (causal prefill: about half), so a
block's tensors are (B, H, r, K'); GQA heads share their K/V head without repeat_kv copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .context import View


@dataclass
class KernelOptions:
    """Tuning of attnkit's kernel: options of a handle (``attnkit.wrap(..., options=KernelOptions(...))``,
    ``handle.options``), not globals. None of them changes a result beyond rounding."""

    #: a row block's scores hold at most this many elements on CPU (12 MB fp32) and at most chunk_rows rows
    #: (small enough to stay in cache, large enough to amortise the per-block work; 2-core CPU, 600-3000 keys)
    chunk_elements: int = 3 * 2**20
    chunk_rows: int = 128
    #: the same bound on other devices (GPU), where only memory matters
    chunk_elements_accel: int = 2**26
    #: the statistics pass keeps its blocks' probabilities for the rewrite pass up to this many elements
    stats_cache_elements: int = 2**22
    #: the column form runs for at least this many requested rows (one row costs the same on the plain path)
    column_min_rows: int = 2
    #: the column form's blocks hold at most this many scores (it reads each block again for P@V and sums)
    column_chunk_elements: int = 2**21
    #: the column form recomputes on full rows the rows whose factor exceeds this (rounding grows with it)
    column_max_factor: float = 4.0
    #: switches for the fast paths (tests turn them off to compare with the reference kernel)
    single_row: bool = True
    column_form: bool = True
    padded_sdpa: bool = True
    fused_head_output: bool = True
    #: prefill-only image-free contrast rows (VHR) run packed after the user's tokens (branch.Packed)
    packed_contrast: bool = True

    def rows_per_block(self, device: torch.device, width: int, cap: int | None = None) -> int:
        """Rows per block for ``width`` = B * H * keys scores per row."""
        if device.type == "cpu":
            budget = self.chunk_elements if cap is None else min(self.chunk_elements, cap)
            return max(1, min(self.chunk_rows, budget // max(1, width)))
        return max(1, self.chunk_elements_accel // max(1, width))


class Roles:
    """The roles of the methods active at a layer, bound once per routing (in the methods' order)."""

    def __init__(self, methods: list, stats: bool = True) -> None:
        self.methods = list(methods)
        self.scores = [m.scores for m in methods if m.scores is not None]
        self.stats = [m.column_stats for m in methods if m.column_stats is not None] if stats else []
        #: the methods that rewrite probabilities (``probs``, or a column form applied in full-row form)
        self.rewrites = [m for m in methods if m.probs is not None or m.columns is not None]
        self.observe = [m.observe for m in methods if m.observe is not None]
        self.head_output = [m.head_output for m in methods if m.head_output is not None]
        column = [m for m in methods if m.columns is not None]
        # the column form applies when the layer's only rewrite is one column rewrite and nothing reads or
        # changes full rows (scores, observe, head outputs)
        plain = [m for m in methods if m.probs is not None]
        only = len(column) == 1 and not plain and not self.scores and not self.observe and not self.head_output
        self.column = column[0] if only else None
        #: the layer's methods only rewrite head outputs: fused sdpa, then ``head_output`` (fast.head_output)
        self.output_only = bool(self.head_output) and not (self.scores or self.stats or self.rewrites or self.observe)


@dataclass
class Call:
    """One attention call in normal form. ``mask`` (B|1, 1, q, kv) bool or None with ``causal``: the keys
    each row sees (None and not causal: every key)."""

    module: torch.nn.Module
    query: torch.Tensor  # (B, H, q, D)
    key: torch.Tensor  # (B, KVH, K, D)
    value: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scaling: float
    softcap: float | None
    dropout: float  # 0 unless training
    want_weights: bool
    attention_mask: Any  # the mask as transformers gave it (for sdpa)
    kwargs: dict
    #: flat(key) transposed to (B * KVH, D, K), contiguous: built once by ``keys_t`` for the blocks that
    #: take a key prefix (a prefix of the transposed view makes bmm copy it, at every block)
    _keys_t: torch.Tensor | None = None

    def keys_t(self, kv_end: int) -> torch.Tensor:
        """(B * KVH, D, kv_end): the first ``kv_end`` keys, transposed, for ``q @ k^T``."""
        if kv_end == self.key.shape[2]:
            return flat(self.key).transpose(1, 2)
        if self._keys_t is None:
            self._keys_t = flat(self.key).transpose(1, 2).contiguous()
        return self._keys_t[:, :, :kv_end]

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        b, h, q, d = self.query.shape
        return b, h, q, d, self.key.shape[1], self.key.shape[2]


def bool_mask(mask, q_len: int, kv_len: int, device: torch.device, is_causal: bool = True) -> torch.Tensor | None:
    """The boolean (B|1, 1, q, kv) mask that sdpa applies for ``mask`` (None = sdpa's is_causal rule)."""
    if mask is None:
        if q_len == 1 or not is_causal:
            return None  # sdpa attends to every key
        # sdpa's is_causal is upper-left aligned (it crops keys beyond q_len on prefill)
        rows = torch.arange(q_len, device=device)[:, None]
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def block_mask(call: Call, pos: torch.Tensor, sl: slice | None) -> tuple[torch.Tensor | None, int]:
    """(visible, kv_end) for the query rows ``pos``: the mask cropped to the keys [0, kv_end) that at
    least one of these rows can see (None = every key visible)."""
    base = call.mask
    if base is not None:
        if base.shape[2] > 1:
            base = base[:, :, sl] if sl is not None else base[:, :, pos]
        cols = base.reshape(-1, base.shape[-1]).any(0).nonzero()
        kv_end = int(cols[-1]) + 1 if cols.numel() else 1
        return base[..., :kv_end], kv_end
    if call.causal:
        kv_end = int(pos[-1]) + 1  # pos is sorted
        return (torch.arange(kv_end, device=pos.device)[None, :] <= pos[:, None])[None, None], kv_end
    return None, call.key.shape[2]


def mask_scores(scores: torch.Tensor, visible: torch.Tensor, value: float) -> None:
    """``scores.masked_fill_(~visible, value)``, touching only the runs of key columns some row of the block
    cannot see (left padding, the causal diagonal block): at most a few narrow slices."""
    if visible.shape[2] == 1:  # one row (a decode step): one fill costs less than finding the runs
        scores.masked_fill_(~visible, value)
        return
    cols = (~visible.reshape(-1, visible.shape[-1]).all(0)).nonzero().flatten()
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


def grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, r, n) -> (B * KVH, H/KVH * r, n): the query heads of one KV head side by side (GQA in one bmm)."""
    b, h, r, n = x.shape
    return x.reshape(b * kv_heads, (h // kv_heads) * r, n)


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, KVH, K, D) -> (B * KVH, K, D)."""
    return x.flatten(0, 1)


def block_scores(call: Call, pos: torch.Tensor, sl: slice | None, visible, kv_end: int):
    """The one scores-and-mask sequence: (scores (B, H, r, kv_end) in the query dtype, softcapped and
    masked with the dtype's minimum; dead (B|1, 1, r, 1) bool rows that see no key, or None)."""
    query = call.query
    bsz, n_heads, q_len = query.shape[:3]
    kv_heads = call.key.shape[1]
    if sl is None:
        query = query[:, :, pos]
    elif sl.start != 0 or sl.stop != q_len:
        query = query[:, :, sl]
    q = query * call.scaling
    r = q.shape[2]
    scores = torch.bmm(grouped(q, kv_heads), call.keys_t(kv_end)).view(bsz, n_heads, r, kv_end)
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    dead = None
    if visible is not None:
        mask_scores(scores, visible, torch.finfo(call.query.dtype).min)
        dead = ~visible.any(-1, keepdim=True)
        if not dead.any():
            dead = None
    return scores, dead


def softmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs if dtype == torch.float32 else probs.to(dtype)


def visible_counts(visible: torch.Tensor | None, r: int, width: int, device: torch.device) -> torch.Tensor:
    """(B|1, 1, K') fp32: how many of a block's r rows see each key column."""
    if visible is None:
        return torch.full((1, 1, width), float(r), device=device)
    return visible.sum(2, dtype=torch.float32)


class Stats:
    """Column sums and visible-row counts over every requested row of a layer (the column_stats role)."""

    def __init__(self, bsz: int, heads: int, kv_len: int, device: torch.device) -> None:
        self.sums = torch.zeros(bsz, heads, kv_len, device=device)
        self.counts = torch.zeros(1, 1, kv_len, device=device)

    @classmethod
    def of(cls, probs: torch.Tensor, visible, dead) -> Stats:
        """The statistics of one block that holds every requested row (a decode step), without accumulators."""
        out = cls.__new__(cls)
        seen = probs if dead is None else probs.masked_fill(dead, 0.0)
        out.sums = seen.sum(2, dtype=torch.float32)
        out.counts = visible_counts(visible, seen.shape[2], seen.shape[-1], seen.device)
        return out

    def add(self, probs: torch.Tensor, visible, dead) -> None:
        seen = probs if dead is None else probs.masked_fill(dead, 0.0)
        width = seen.shape[-1]
        self.sums[..., :width] += seen.sum(2, dtype=torch.float32)
        self.add_counts(visible_counts(visible, seen.shape[2], width, seen.device))

    def add_counts(self, counts: torch.Tensor) -> None:
        if counts.shape[0] > self.counts.shape[0]:
            self.counts = self.counts.expand(counts.shape[0], -1, -1).clone()
        self.counts[..., : counts.shape[-1]] += counts

    def give(self, roles: Roles, view: View) -> None:
        for fn in roles.stats:
            fn(view, self.sums, self.counts)


def apply_probs(roles: Roles, view: View, probs: torch.Tensor, dead, cols) -> torch.Tensor:
    """The post-softmax roles on a block: each method's ``probs`` (a column rewrite applied in full-row
    form), rows that see no key set to 0 as in sdpa (after the methods, which see the uniform row eager
    attention gives: a renormalising method cannot turn them into NaN), then ``observe``."""
    for m in roles.rewrites:
        probs = m.probs(view, probs) if m.columns is None else _column_rewrite(m, view, probs, cols.get(m))
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    for fn in roles.observe:
        fn(view, probs)
    return probs


def _column_rewrite(method, view: View, probs: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """A column-form rewrite on full rows: P' = factor * P off ``cols``, the method's new values on them."""
    if cols is None or cols.numel() == 0:
        return probs
    if cols.device != probs.device:
        cols = cols.to(probs.device)
    p = probs.float()  # the same tensor for fp32: rewritten in place
    if int(cols[-1]) < p.shape[-1]:  # cols are sorted: all of them inside this block's keys
        p_cols = p[..., cols]  # masked columns hold 0 already (rows that see no key are zeroed later)
        factor, new = method.reweight(view, p_cols, cols)
        p.mul_(factor)
        p[..., cols] = new
    else:  # columns beyond this block's keys: no row of it sees them
        inside = cols[cols < p.shape[-1]]
        p_cols = torch.cat([p[..., inside], p.new_zeros(*p.shape[:3], cols.numel() - inside.numel())], dim=-1)
        factor, new = method.reweight(view, p_cols, cols)
        p.mul_(factor)
        p[..., inside] = new[..., : inside.numel()]
    return p if probs.dtype == torch.float32 else p.to(probs.dtype)


def layer_columns(roles: Roles, view: View) -> dict:
    """Each column rewrite's columns for this layer (asked once, after the statistics)."""
    return {m: m.columns(view) for m in roles.rewrites if m.columns is not None}


def reference(call: Call, roles: Roles, view: View, rows: torch.Tensor | None, opts: KernelOptions):
    """Attention of the query ``rows`` (None = all) with every role: (out (B, r, H, D), weights or None)."""
    bsz, n_heads, q_len, head_dim, kv_heads, kv_len = call.shape
    dev = call.query.device
    n_rows = q_len if rows is None else rows.numel()
    per = opts.rows_per_block(dev, bsz * n_heads * kv_len)
    blocks = []
    for start in range(0, n_rows, per):
        end = min(n_rows, start + per)
        blocks.append((torch.arange(start, end, device=dev), slice(start, end)) if rows is None else (rows[start:end], None))

    def probs_of(pos, sl):
        visible, kv_end = block_mask(call, pos, sl)
        scores, dead = block_scores(call, pos, sl, visible, kv_end)
        v = view.at(pos, visible)
        for fn in roles.scores:
            scores = fn(v, scores)
        return softmax(scores, call.query.dtype), v, dead, kv_end

    cached = _stats_pass(call, roles, view, blocks, probs_of, opts) if roles.stats else None
    cols = {}
    if any(m.columns is not None for m in roles.rewrites):  # asked once per layer, after the statistics
        cols = layer_columns(roles, view.at(rows if rows is not None else torch.arange(q_len, device=dev)))
    weights = call.query.new_zeros(bsz, n_heads, q_len, kv_len) if call.want_weights else None
    out = call.query.new_empty(bsz, n_heads, n_rows, head_dim)
    done = 0
    for i, (pos, sl) in enumerate(blocks):
        probs, v, dead, kv_end = cached[i] if cached is not None else probs_of(pos, sl)
        probs = apply_probs(roles, v, probs, dead, cols)
        r = probs.shape[2]
        if weights is not None:
            weights[:, :, done : done + r, :kv_end] = probs
        if call.dropout:
            probs = torch.nn.functional.dropout(probs, p=call.dropout, training=True)
        part = torch.bmm(grouped(probs, kv_heads), flat(call.value[:, :, :kv_end]))
        out[:, :, done : done + r] = part.view(bsz, n_heads, r, head_dim)
        done += r
    out = out.transpose(1, 2)  # (B, r, H, D)
    if roles.head_output:
        v = view.at(rows if rows is not None else torch.arange(q_len, device=dev))
        for fn in roles.head_output:
            out = fn(v, out)
    return out, weights


def _stats_pass(call: Call, roles: Roles, view: View, blocks: list, probs_of, opts: KernelOptions) -> list | None:
    """The read-only pass of the column_stats role over every requested row, before any rewrite. Its blocks
    are kept for the rewrite pass while they are small in all (else the rewrite pass computes them again,
    and the ``scores`` roles run twice: they must be pure)."""
    bsz, n_heads, q_len, _, _, kv_len = call.shape
    stats = Stats(bsz, n_heads, kv_len, call.query.device)
    cached: list | None = []
    kept = 0
    for pos, sl in blocks:
        probs, v, dead, kv_end = probs_of(pos, sl)
        stats.add(probs, v.visible, dead)
        kept += probs.numel()
        if cached is not None and (len(blocks) == 1 or kept <= opts.stats_cache_elements):
            cached.append((probs, v, dead, kv_end))
        else:
            cached = None
    all_rows = torch.cat([p for p, _ in blocks]) if len(blocks) > 1 else blocks[0][0]
    stats.give(roles, view.at(all_rows))
    return cached


def attention_probs(query, key, visible: torch.Tensor | None, scaling: float, softcap: float | None = None):
    """Plain fp32 softmax probabilities (B, H, r, K) of ``query`` (B, H, r, D) against ``key`` (B, KVH, K, D)
    with ``visible`` (broadcastable to (B, H, r, K)) bool or None: for code that only reads attention
    (layer capture, vision-tower statistics)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    k = key.repeat_interleave(heads // kv_heads, dim=1) if kv_heads != heads else key
    scores = torch.matmul(query * scaling, k.transpose(-1, -2))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)
