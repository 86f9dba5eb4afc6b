"""Property tests of the attention function itself, on random tensors (no model).

The eager path with a pass-through method must equal transformers' fused sdpa for any batch,
GQA ratio, prefill or decode shape, padding, and any subset of query rows."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from attnkit.hooks import dispatch
from attnkit.hooks.context import ForwardContext
from attnkit.methods import Method


class FakeAttention(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.layer_idx = 0
        self.num_key_value_groups = groups
        self.is_causal = True


class PassThrough(Method):
    name = "passthrough_double"

    def __init__(self, rows=None):
        super().__init__()
        self._rows = rows
        self.seen_rows = None

    def rows(self, ctx, layer):
        return self._rows

    def probs(self, ctx, layer, probs):
        assert probs.shape[2] == ctx.query_rows.numel()
        self.seen_rows = (self.seen_rows or 0) + probs.shape[2]  # rows over all chunks of one call
        return probs


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 3]),
    past=st.integers(0, 5),
    q_len=st.integers(1, 6),
    pad=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    row_subset=st.booleans(),
    causal=st.booleans(),
    chunk=st.sampled_from([None, 1, 40]),
    seed=st.integers(0, 10_000),
)
def test_eager_path_equals_sdpa(batch, kv_heads, groups, past, q_len, pad, row_subset, causal, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    heads, dim = kv_heads * groups, 4
    kv_len = past + q_len
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    attn2d = torch.ones(batch, kv_len, dtype=torch.bool)
    for b in range(batch):
        attn2d[b, : min(pad[b], kv_len - 1)] = False  # left padding, at least one real token
    mask = sdpa_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=past,
                     mask_function=causal_mask_function, attention_mask=attn2d, allow_is_causal_skip=True)
    module = FakeAttention(groups)
    if not causal:  # a bidirectional call: no mask, module not causal
        mask, module.is_causal = None, False
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=dim**-0.5)

    rows = torch.tensor([q_len - 1]) if row_subset else None
    method = PassThrough(rows)
    ctx = ForwardContext(num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
                         batch_size=batch, q_len=q_len, past_len=past)
    module.__dict__[dispatch.HANDLE_ATTR] = SimpleNamespace(ctx=ctx, methods_for_layer=lambda layer: [method])
    saved = dispatch.CHUNK_ELEMENTS
    dispatch.CHUNK_ELEMENTS = chunk or saved  # 1: one row per chunk; 40: a few rows
    try:
        out, _ = dispatch.attention(module, q, k, v, mask, scaling=dim**-0.5)
    finally:
        dispatch.CHUNK_ELEMENTS = saved
    assert out.shape == ref.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert method.seen_rows == (1 if row_subset else q_len)


def test_keep_mask_hides_keys_on_fused_and_eager_paths():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 4, generator=g)
    k = torch.randn(1, 2, 5, 4, generator=g)
    v = torch.randn(1, 2, 5, 4, generator=g)
    keep = torch.tensor([[True, False, True, False, True]])
    ref, _ = sdpa_attention_forward(FakeAttention(1), q, k[:, :, keep[0]], v[:, :, keep[0]], None, scaling=0.5)
    for methods in ([], [PassThrough()]):
        module = FakeAttention(1)
        ctx = ForwardContext(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, batch_size=1, q_len=1,
                             past_len=4, keep=[(0, keep)])
        module.__dict__[dispatch.HANDLE_ATTR] = SimpleNamespace(ctx=ctx, methods_for_layer=lambda layer: methods)
        out, _ = dispatch.attention(module, q, k, v, None, scaling=0.5)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_keep_for_layer_combines_and_extends():
    ctx = ForwardContext(num_layers=4, num_heads=1, num_kv_heads=1, head_dim=1, batch_size=1, q_len=1, past_len=4)
    ctx.keep = [(1, torch.tensor([[True, False, True, True]])), (2, torch.tensor([[True, True, False, True]]))]
    assert ctx.keep_for_layer(0) is None
    assert ctx.keep_for_layer(1).tolist() == [[True, False, True, True, True]]
    assert ctx.keep_for_layer(3).tolist() == [[True, False, False, True, True]]
