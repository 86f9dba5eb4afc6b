"""The attention and mask functions attnkit registers with transformers, and the choice of path.

``attention`` is called by every language-model attention layer of a wrapped model. A layer that no
active method touches goes straight to transformers' fused sdpa function with its arguments
untouched. Otherwise the call is put in normal form (kernel.Call) and computed by the reference
kernel (kernel.reference) for the query rows the methods ask for, or by one of its fast paths
(fast.py: a single decode row, fused sdpa for the rows no method asks for, the column form of a
column rewrite, fused sdpa followed by the per-head output roles), picked here from the call and the
handle's KernelOptions. A packed prefill (branch.Packed) is unpacked here first (``_packed``).

With a method active, every call first runs ``_check_call``: not inside torch.compile, one call
per layer and forward, and the key length the forward state expects (compat.check_keys), so a
forward attnkit misread raises instead of being rewritten at the wrong columns. A forward that asks
for ``output_attentions`` takes the reference kernel on every layer, for every row.

``mask`` is transformers' ``sdpa_mask``: it returns a boolean mask, or None when the pattern is plain
causal, which keeps the fused path exactly as fast as unwrapped sdpa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import TransformersCompatError, UnsupportedCacheError
from . import fast
from .compat import check_keys, sdpa_attention_forward, sdpa_mask, where
from .context import View
from .kernel import Call, Roles, bool_mask, reference

if TYPE_CHECKING:
    from .manager import Handle

NAME = "attnkit"
HANDLE_ATTR = "_attnkit_handle"
_NO_ROLES = Roles([])


def mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask function registered under NAME: transformers' sdpa mask (bool, or None for plain causal)."""
    return sdpa_mask(*args, **kwargs)


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
    if not handle.methods:
        if handle.want_weights:  # output_attentions: the weights of every layer, from the reference kernel
            return _run(handle, _NO_ROLES, module, layer, query, key, value, attention_mask, *args, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    if handle.state.packed is not None:
        return _packed(handle, module, layer, query, key, value, attention_mask, *args, **kwargs)
    return _attend(handle, module, layer, query, key, value, attention_mask, *args, **kwargs)


def _attend(handle: Handle, module, layer: int, query, key, value, attention_mask, *args: Any, **kwargs: Any) -> tuple:
    """A wrapped layer's attention with the methods active: checks, pruning masks, then the path."""
    _check_call(handle, layer, key.shape[2])
    state = handle.state
    keep = state.keep_for_layer(layer) if state.keep else None
    roles = handle.roles_for_layer(layer)
    pad = state.seq(layer).kv_len - key.shape[2]  # > 0 only on a sliding-window layer past its window
    if pad > 0 and (roles is not None or keep is not None or handle.want_weights):
        key, value, attention_mask = _unwindow(key, value, attention_mask, pad, query.shape[2])
    if keep is not None:
        base = bool_mask(attention_mask, query.shape[2], key.shape[2], keep.device)
        keep4 = keep[:, None, None, : key.shape[2]]
        attention_mask = keep4 if base is None else base & keep4
    if roles is None and not handle.want_weights:
        if state.contrast_rows and not args:  # attnkit's contrast rows, left-padded to the prompt
            call = _call(handle, module, query, key, value, attention_mask, **kwargs)
            return fast.sdpa(call, state, handle.options), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    out, weights = _run(handle, roles or _NO_ROLES, module, layer, query, key, value, attention_mask, *args, **kwargs)
    if pad > 0 and weights is not None:
        weights = weights[..., pad:]  # the layer's own keys, as eager attention returns them
    return out, weights


def _packed(handle: Handle, module, layer: int, query, key, value, attention_mask, *args: Any, **kwargs: Any) -> tuple:
    """A packed prefill (branch.Packed): each user row holds its q prompt tokens, then its image-free twin's w
    tokens. transformers' mask lets the twin see the prompt, so the masks are rebuilt here: the prompt keeps
    its own block of the given mask, the twin is causal over its own tokens. A layer no method touches runs
    the two parts as two fused calls; a layer with roles presents them to the methods as 2B rows of q tokens
    (the twins left-padded, the layout of unpacked contrast rows), then packs the output again."""
    q_len, width = handle.state.packed
    total = q_len + width
    if query.shape[2] != total or key.shape[2] != total:
        raise TransformersCompatError(
            f"layer {layer} of a packed prefill got {query.shape[2]} queries and {key.shape[2]} keys, attnkit "
            f"expected {total} ({where()})"
        )
    bsz, dev = query.shape[0], query.device
    main_mask, main_starts, twin_mask, twin_starts = _packed_masks(handle, module, layer, attention_mask, dev, kwargs)
    roles = handle.roles_for_layer(layer)
    fused = roles is None or (
        roles.output_only and handle.options.fused_head_output and kwargs.get("softcap") is None
    )
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    if fused and not handle.want_weights and not dropout:
        _check_call(handle, layer, q_len)
        parts = (query[:, :, :q_len], key[:, :, :q_len], value[:, :, :q_len])
        if main_starts is not None:  # left padding and the causal rule only: fused causal per padding group
            main = fast.left_padded(_call(handle, module, *parts, main_mask, **kwargs), main_starts)
        else:
            main, _ = sdpa_attention_forward(module, *parts, main_mask, *args, **kwargs)
        call = _call(handle, module, query[:, :, q_len:], key[:, :, q_len:], value[:, :, q_len:], twin_mask, **kwargs)
        twin = fast.left_padded(call, twin_starts)
        if roles is None:
            return torch.cat([main, twin], dim=1), None
        # per-head output roles (fast.head_output): the output in rows, as the methods see contrast rows
        out = main.new_zeros(2 * bsz, q_len, *main.shape[2:])
        out[:bsz] = main
        out[bsz:, q_len - width :] = twin
        out = fast.apply_head_output(roles, View(handle.state, layer), out)
        return torch.cat([out[:bsz], out[bsz:, q_len - width :]], dim=1).contiguous(), None
    state = handle.state
    mask = state.packed_masks[-1] if state.packed_masks is not None and len(state.packed_masks) > 5 else None
    if mask is None:  # the rows' mask, built once per forward (fast.sdpa then checks its padding once)
        if main_mask is None:
            main_mask = torch.ones(q_len, q_len, dtype=torch.bool, device=dev).tril_()[None, None]
        mask = torch.zeros(2 * bsz, 1, q_len, q_len, dtype=torch.bool, device=dev)
        mask[:bsz] = main_mask
        mask[bsz:, :, q_len - width :, q_len - width :] = twin_mask
        state.packed_masks = (*state.packed_masks, mask)
    rows = [_as_rows(x, q_len, width) for x in (query, key, value)]
    out, weights = _attend(handle, module, layer, *rows, mask, *args, **kwargs)
    return torch.cat([out[:bsz], out[bsz:, q_len - width :]], dim=1), weights


def _packed_masks(handle: Handle, module, layer: int, attention_mask, dev, kwargs: dict) -> tuple:
    """(main mask or None (causal), main padding starts or None, twin mask (B, 1, w, w), twin starts) of a packed
    prefill, built once per forward (the layers share transformers' mask tensor)."""
    state = handle.state
    hit = state.packed_masks
    if hit is not None and hit[0] is attention_mask:
        return hit[1:5]
    q_len, width = state.packed
    total = q_len + width
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    full = bool_mask(attention_mask, total, total, dev, is_causal)
    if full is not None and tuple(full.shape[-2:]) != (total, total):
        raise TransformersCompatError(
            f"layer {layer} of a packed prefill got a mask of shape {tuple(full.shape)} for {total} tokens ({where()})"
        )
    main = None if full is None else full[..., :q_len, :q_len].contiguous()
    starts = None
    if main is not None and handle.options.padded_sdpa:
        starts = fast.padded_starts(state, main, q_len, q_len)
        starts = None if starts is None else starts.tolist()
    bsz = state.batch_size - state.contrast_rows
    twin_keys = state.attention_mask[bsz:, q_len - width :].to(dev)  # (B, w)
    twin = torch.ones(width, width, dtype=torch.bool, device=dev).tril_()[None, None] & twin_keys[:, None, None, :]
    out = (main, starts, twin, (width - twin_keys.sum(1)).tolist())
    state.packed_masks = (attention_mask, *out)  # holds the mask, so the identity check stays valid
    return out


def _as_rows(x: torch.Tensor, q_len: int, width: int) -> torch.Tensor:
    """(B, h, q + w, D) packed -> (2B, h, q, D): the prompts, then the twins left-padded with zeros."""
    bsz = x.shape[0]
    out = x.new_zeros(2 * bsz, x.shape[1], q_len, x.shape[3])
    out[:bsz] = x[:, :, :q_len]
    out[bsz:, :, q_len - width :] = x[:, :, q_len:]
    return out


def _call(handle, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs) -> Call:
    """The call in normal form: the boolean mask (or the causal rule), scaling, softcap, training dropout and
    whether the weights are returned (output_attentions by argument or config)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None:
        mask, causal = None, bool(is_causal) and q_len > 1
    else:
        mask, causal = bool_mask(attention_mask, q_len, kv_len, query.device, is_causal), False
    return Call(
        module, query, key, value, mask, causal,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        softcap=kwargs.get("softcap"),
        dropout=dropout if (dropout and module.training) else 0.0,
        want_weights=handle.want_weights or bool(kwargs.get("output_attentions")),
        attention_mask=attention_mask,
        kwargs=kwargs,
    )


def _run(handle, roles: Roles, module, layer: int, query, key, value, attention_mask, dropout=0.0, scaling=None,
         **kwargs) -> tuple:
    """The path for a layer with roles (or returned weights): single row, column form or reference kernel,
    with fused sdpa for the rows no method asks for."""
    call = _call(handle, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    opts, view = handle.options, View(handle.state, layer)
    q_len, kv_len = query.shape[2], key.shape[2]
    if roles.output_only and opts.fused_head_output and call.softcap is None and not call.want_weights:
        return fast.head_output(call, roles, view, handle.state, opts).contiguous(), None
    if not call.value.is_contiguous():
        # a prefill's values come straight from the projections, (B, S, KVH, D) transposed; the kernel's blocks
        # take value prefixes as (B * KVH, K, D) matrices, which would copy them once per block
        call.value = call.value.contiguous()
    if opts.single_row and q_len == 1 and not call.dropout:
        visible = bool_mask(attention_mask, 1, kv_len, query.device)
        if visible is None or (visible.dim() == 4 and visible.shape[1:3] == (1, 1) and visible.shape[3] == kv_len):
            return fast.single_row(call, roles, view, visible)
    rows = None if call.want_weights or q_len == 1 else _rows(roles, view, query.device)
    full = None
    if rows is not None and rows.numel() < q_len:
        full = fast.sdpa(call, handle.state, opts)
    else:
        rows = None
    n_req = q_len if rows is None else rows.numel()
    column = roles.column is not None and opts.column_form and n_req >= opts.column_min_rows
    if column and call.softcap is None and not call.dropout and not call.want_weights:
        out, weights = fast.column_form(call, roles, view, rows, opts), None
    else:
        out, weights = reference(call, roles, view, rows, opts)
    if full is not None:
        full[:, rows] = out.to(full.dtype)  # sdpa's output is a fresh tensor
        out = full
    return out.contiguous(), weights


def _rows(roles: Roles, view: View, device: torch.device) -> torch.Tensor | None:
    """The union of the query rows the methods ask for (None = all rows)."""
    rows, merged = None, 0
    for m in roles.methods:
        r = m.rows(view)
        if r is None:
            return None
        rows = r if rows is None else torch.cat([rows, r])
        merged += 1
    if rows is None:
        return None
    return (torch.unique(rows) if merged > 1 else rows).to(device)


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
        base = bool_mask(attention_mask, q_len, width, key.device)
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
    check_keys(handle.state.seq(layer), layer, key_len, layer in handle.windowed)
