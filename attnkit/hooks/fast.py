"""Fast paths of the kernel, picked by the dispatcher and invisible to method authors; each gives the
reference kernel's result (tests compare them with the switches of KernelOptions):

- ``single_row``: one new token (a decode step): the reference steps without block bookkeeping;
- ``sdpa``: fused attention for rows no method asks for, a left-padded prefill batch run unmasked per
  padding group on its real tokens;
- ``column_form``: a layer whose only rewrite is one column rewrite, in one pass without ever holding
  the rewritten probabilities (see ``column_form``);
- ``head_output``: a layer whose methods only rewrite per-head outputs (VHR): fused sdpa, whose output
  before o_proj holds every head's slice, then the ``head_output`` roles (never eager attention).
"""

from __future__ import annotations

import torch

from .compat import sdpa_attention_forward
from .context import ForwardState, View
from .kernel import (
    Call,
    KernelOptions,
    Roles,
    Stats,
    apply_probs,
    block_mask,
    block_scores,
    flat,
    grouped,
    layer_columns,
    reference,
    softmax,
    visible_counts,
)

_ROW0: dict[torch.device, torch.Tensor] = {}  # a constant (0,) index per device


def single_row(call: Call, roles: Roles, view: View, visible) -> tuple:
    """The reference kernel for one query row; ``visible`` (B|1, 1, 1, K) bool or None."""
    bsz, n_heads, _, head_dim, kv_heads, kv_len = call.shape
    row0 = _ROW0.get(call.query.device)
    if row0 is None:
        row0 = _ROW0[call.query.device] = torch.zeros(1, dtype=torch.long, device=call.query.device)
    scores, dead = block_scores(call, row0, slice(0, 1), visible, kv_len)
    v = view.at(row0, visible)
    for fn in roles.scores:
        scores = fn(v, scores)
    probs = softmax(scores, call.query.dtype)
    if roles.stats:
        Stats.of(probs, visible, dead).give(roles, v)
    cols = layer_columns(roles, v) if roles.rewrites else {}
    probs = apply_probs(roles, v, probs, dead, cols)
    weights = probs if call.want_weights else None
    out = torch.bmm(grouped(probs, kv_heads), flat(call.value)).view(bsz, n_heads, 1, head_dim).transpose(1, 2)
    for fn in roles.head_output:
        out = fn(v, out)
    return out.contiguous(), weights


def head_output(call: Call, roles: Roles, view: View, state: ForwardState, opts: KernelOptions) -> torch.Tensor:
    """(B, q, H, D) for a layer whose only roles are ``head_output``: fused attention of every row (``sdpa``,
    the padded-group form included), then each role on every row."""
    return apply_head_output(roles, view, sdpa(call, state, opts))


def apply_head_output(roles: Roles, view: View, out: torch.Tensor) -> torch.Tensor:
    """The ``head_output`` roles on the fused output (B, q, H, D) of every row of the forward."""
    v = view.at(torch.arange(out.shape[1], device=out.device))
    for fn in roles.head_output:
        out = fn(v, out)
    return out


def padded_starts(state: ForwardState, mask, q_len: int, kv_len: int) -> torch.Tensor | None:
    """(B,) each row's first real token when ``mask`` is a prefill's boolean mask made only of left padding
    and the causal rule (pad query rows see nothing; what transformers' sdpa mask gives a left-padded
    batch), else None. Checked once per forward (the layers share the mask tensor)."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or q_len != kv_len or q_len < 2:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != q_len or mask.shape[3] != kv_len:
        return None
    hit = state.padded
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
    state.padded = (mask, found)  # holds mask, so the identity check stays valid for the forward
    return found


def sdpa(call: Call, state: ForwardState, opts: KernelOptions) -> torch.Tensor:
    """Fused attention of every row (B, q, H, D): a left-padded prefill batch runs unmasked per padding
    group on its real tokens with the causal kernel (pad query rows get zeros, as sdpa gives a row that
    sees no key), everything else as transformers' sdpa function with the call's own mask."""
    query, key, value = call.query, call.key, call.value
    starts = None
    if opts.padded_sdpa and not call.dropout and call.softcap is None:
        starts = padded_starts(state, call.attention_mask, query.shape[2], key.shape[2])
    if starts is None:
        out, _ = sdpa_attention_forward(
            call.module, query, key, value, call.attention_mask, dropout=call.dropout, scaling=call.scaling, **call.kwargs
        )
        return out
    return left_padded(call, starts)


def left_padded(call: Call, starts: torch.Tensor | list[int]) -> torch.Tensor:
    """(B, q, H, D) fused causal attention of a left-padded batch whose row b starts at ``starts[b]`` (a tensor,
    or a list, which saves a device sync), run unmasked per group of rows with the same start on their real
    tokens (pad query rows get zeros)."""
    query, key, value = call.query, call.key, call.value
    rest = {k: v for k, v in call.kwargs.items() if k not in ("is_causal", "dropout", "scaling")}
    bsz, n_heads, q_len, head_dim = query.shape
    starts = starts.tolist() if isinstance(starts, torch.Tensor) else list(starts)
    if len(starts) == 1 and bsz > 1:  # one mask row shared by the batch
        starts = starts * bsz
    if not any(starts):  # no padding: one causal call
        part, _ = sdpa_attention_forward(
            call.module, query, key, value, None, dropout=0.0, scaling=call.scaling, is_causal=True, **rest
        )
        return part
    out = query.new_zeros(bsz, q_len, n_heads, head_dim)
    groups: dict[int, list[int]] = {}
    for b, start in enumerate(starts):
        groups.setdefault(int(start), []).append(b)
    for start, rows in groups.items():
        if start >= q_len:
            continue
        sel = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
        part, _ = sdpa_attention_forward(
            call.module, query[sel, :, start:], key[sel, :, start:], value[sel, :, start:], None,
            dropout=0.0, scaling=call.scaling, is_causal=True, **rest,
        )
        out[sel, start:] = part
    return out


def column_form(call: Call, roles: Roles, view: View, rows, opts: KernelOptions) -> torch.Tensor:
    """(B, r, H, D) for a layer whose only rewrite is one column rewrite (Method.columns/reweight), in one pass.

    Each block computes its scores and softmax once, adds the column sums, multiplies the unchanged
    probabilities with V and keeps each row's logsumexp (row max minus the log of the largest probability:
    no extra exp). After the last block the methods get the statistics, the rewriter names its columns J,
    their probabilities are recomputed from q.k_j and the logsumexp (rows x |J|), and the output is
    corrected: out'_i = factor_i * out_i + sum_{j in J} (new_ij - factor_i * P_ij) V_j. Rows whose factor
    exceeds ``column_max_factor`` are computed again with the reference kernel (rounding grows with it)."""
    bsz, n_heads, q_len, head_dim, kv_heads, kv_len = call.shape
    dev = call.query.device
    pos_all = rows if rows is not None else torch.arange(q_len, device=dev)
    per = opts.rows_per_block(dev, bsz * n_heads * kv_len, opts.column_chunk_elements)
    stats = Stats(bsz, n_heads, kv_len, dev) if roles.stats else None
    lse = torch.empty(bsz, n_heads, pos_all.numel(), device=dev)
    out = _column_blocks(call, pos_all, rows is None, per, stats, lse)
    v = view.at(pos_all)
    if stats is not None:
        stats.give(roles, v)
    method = roles.column
    cols = method.columns(v)
    if cols is None or cols.numel() == 0:
        return out.transpose(1, 2)
    cols = cols.to(dev)
    k_cols = flat(call.key[:, :, cols]).transpose(1, 2)
    v_cols = flat(call.value[:, :, cols])
    # the correction a block of rows at a time (its fp32 temporaries, rows x (|J| + 2 D) per head, would take
    # several times the output's size for all rows at once: 180 MB at 2969 tokens and LLaMA-7B width)
    step = opts.rows_per_block(dev, bsz * n_heads * (cols.numel() + 2 * head_dim), opts.column_chunk_elements)
    redo = []
    for start in range(0, pos_all.numel(), step):
        end = min(pos_all.numel(), start + step)
        pos = pos_all[start:end]
        q = (call.query[:, :, start:end] if rows is None else call.query[:, :, pos]) * call.scaling
        s_j = torch.bmm(grouped(q, kv_heads), k_cols)  # as the blocks had them
        s_j = s_j.view(bsz, n_heads, end - start, cols.numel()).float().sub_(lse[:, :, start:end, None])
        if call.mask is not None:
            seen = (call.mask[:, :, pos] if call.mask.shape[2] > 1 else call.mask)[..., cols]
        else:
            seen = (cols[None, :] <= pos[:, None])[None, None] if call.causal else None
        p_j = s_j.exp_() if seen is None else s_j.exp_().masked_fill_(~seen, 0.0)
        factor, new = method.reweight(view.at(pos, seen), p_j, cols)
        delta = (new - factor * p_j).to(call.value.dtype)
        corr = torch.bmm(grouped(delta, kv_heads), v_cols).view(bsz, n_heads, end - start, head_dim)
        factor = torch.as_tensor(factor, device=dev).float().expand(bsz, n_heads, end - start, 1)
        out[:, :, start:end] = (out[:, :, start:end].float() * factor + corr.float()).to(out.dtype)
        redo.append((factor.abs() > opts.column_max_factor).flatten(0, 1).any(0).flatten().nonzero().flatten() + start)
    redo = torch.cat(redo)
    if redo.numel():
        again = Roles([method], stats=False)  # the statistics are in already
        part, _ = reference(call, again, view, pos_all[redo], opts)
        out[:, :, redo] = part.transpose(1, 2)
    return out.transpose(1, 2)


def _column_blocks(call: Call, pos_all: torch.Tensor, all_rows: bool, per: int, stats, lse) -> torch.Tensor:
    """The column form's pass: unchanged attention (B, H, r, D) of ``pos_all``, each row's logsumexp into
    ``lse`` and the column statistics into ``stats``."""
    bsz, n_heads, _, head_dim, kv_heads, kv_len = call.shape
    dev = call.query.device
    n_rows = pos_all.numel()
    out = call.query.new_empty(bsz, n_heads, n_rows, head_dim)
    # plain causal attention over all rows: only each block's diagonal needs masking, no row is dead
    plain = call.causal and call.mask is None and all_rows
    tri = torch.ones(per, per, dtype=torch.bool, device=dev).triu_(1) if plain else None
    min_value = torch.finfo(call.query.dtype).min
    for start in range(0, n_rows, per):
        end = min(n_rows, start + per)
        sl = slice(start, end) if all_rows else None
        pos = pos_all[start:end]
        if plain:
            visible, kv_end = None, end
            scores, dead = block_scores(call, pos, sl, None, kv_end)
            scores[..., start:end].masked_fill_(tri[: end - start, : end - start], min_value)
        else:
            visible, kv_end = block_mask(call, pos, sl)
            scores, dead = block_scores(call, pos, sl, visible, kv_end)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        # the largest probability is exp(max - lse); a dead row gets lse = +inf (it sees nothing)
        lse[:, :, start:end] = scores.amax(-1).float().sub_(probs.amax(-1).log_())
        if dead is not None:
            probs.masked_fill_(dead, 0.0)
        if stats is not None:
            stats.sums[..., :kv_end] += probs.sum(2)
            if not plain:
                stats.add_counts(visible_counts(visible, end - start, kv_end, dev))
        part = torch.bmm(grouped(probs.to(call.query.dtype), kv_heads), flat(call.value[:, :, :kv_end]))
        out[:, :, start:end] = part.view(bsz, n_heads, end - start, head_dim)
    if stats is not None and plain:
        stats.counts[0, 0] = (n_rows - torch.arange(kv_len, device=dev)).clamp_min_(0)
    return out
