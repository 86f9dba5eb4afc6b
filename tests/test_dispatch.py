"""Property tests of the attention function itself, on random tensors (no model).

The reference kernel with a pass-through method must equal transformers' fused sdpa for any batch,
GQA ratio, prefill or decode shape, padding, and any subset of query rows; each fast path must equal
the reference kernel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from attnkit.hooks import dispatch, fast
from attnkit.hooks.context import ForwardState
from attnkit.hooks.kernel import KernelOptions, Roles
from attnkit.methods import ACT, Method


class _EachCallANewForward(set):
    """A fake handle's record of the layers run in the current forward: every dispatch call counts as a
    forward of its own (the tests call attention directly, without a model forward pre-hook)."""

    def add(self, layer) -> None:
        pass


def fake_handle(state, methods, options=None):
    """What dispatch.attention reads of a Handle with some method active: the forward state, the roles of a
    layer (``methods``, maybe none), the kernel options, the output_attentions flag and the windowed layers."""
    for m in methods:
        m._states = state.states
    roles = Roles(methods) if methods else None
    return SimpleNamespace(
        state=state, methods=list(methods) or [PassThrough()], roles_for_layer=lambda layer: roles,
        options=options or KernelOptions(), want_weights=False, windowed=frozenset(), ran=_EachCallANewForward(),
    )


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

    def rows(self, ctx):
        return self._rows

    def probs(self, ctx, probs):
        assert probs.shape[2] == ctx.rows.numel()
        self.seen_rows = (self.seen_rows or 0) + probs.shape[2]  # rows over all blocks of one call
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
def test_reference_kernel_equals_sdpa(batch, kv_heads, groups, past, q_len, pad, row_subset, causal, chunk, seed):
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
    ctx = ForwardState(num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
                       batch_size=batch, q_len=q_len, past_len=past)
    opts = KernelOptions(chunk_elements=chunk) if chunk else None  # 1: one row per block; 40: a few rows
    module.__dict__[dispatch.HANDLE_ATTR] = fake_handle(ctx, [method], opts)
    out, _ = dispatch.attention(module, q, k, v, mask, scaling=dim**-0.5)
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
        ctx = ForwardState(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, batch_size=1, q_len=1,
                           past_len=4, keep=[(0, keep)])
        module.__dict__[dispatch.HANDLE_ATTR] = fake_handle(ctx, methods)
        out, _ = dispatch.attention(module, q, k, v, None, scaling=0.5)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_keep_for_layer_combines_and_extends():
    ctx = ForwardState(num_layers=4, num_heads=1, num_kv_heads=1, head_dim=1, batch_size=1, q_len=1, past_len=4)
    ctx.keep = [(1, torch.tensor([[True, False, True, True]])), (2, torch.tensor([[True, True, False, True]]))]
    assert ctx.keep_for_layer(0) is None
    assert ctx.keep_for_layer(1).tolist() == [[True, False, True, True, True]]
    assert ctx.keep_for_layer(3).tolist() == [[True, False, False, True, True]]


# -- the column form (Method.columns / reweight / column_stats) --------------------------------------
class Stats(Method):
    """Records the column statistics it is given (once per layer and forward)."""

    def __init__(self, rows=None):
        super().__init__()
        self._rows = rows
        self.sums = self.counts = None
        self.calls = 0

    def rows(self, ctx):
        return self._rows

    def column_stats(self, ctx, sums, counts):
        self.sums, self.counts = sums.clone(), counts.clone()
        self.calls += 1


class ColumnDouble(Stats):
    """A column rewrite that is not row-normalised: columns ``cols`` get ``w`` per column, every other
    column 1 + 0.5 * (the row's mass on ``cols``)."""

    name = "column_double"

    def __init__(self, cols, rows=None):
        super().__init__(rows)
        self.cols = cols
        self.w = torch.linspace(0.2, 1.5, len(cols))

    def columns(self, ctx):
        return torch.tensor([c for c in self.cols if c < ctx.kv_len], dtype=torch.long)

    def reweight(self, ctx, probs, cols):
        assert probs.dtype == torch.float32 and probs.shape[-1] == cols.numel()
        assert probs.shape[2] == ctx.rows.numel()
        return 1.0 + 0.5 * probs.sum(-1, keepdim=True), probs * self.w[: cols.numel()]


class FullDouble(Stats):
    """ColumnDouble's rewrite written by hand on full rows (``probs``)."""

    name = "full_double"

    def __init__(self, cols, rows=None):
        super().__init__(rows)
        self.cols = cols
        self.w = torch.linspace(0.2, 1.5, len(cols))

    def probs(self, ctx, probs):
        width = probs.shape[-1]
        keep = [i for i, c in enumerate(self.cols) if c < min(width, ctx.kv_len)]
        cols = torch.tensor([self.cols[i] for i in keep], dtype=torch.long)
        p = probs.float()
        factor = 1.0 + 0.5 * p[..., cols].sum(-1, keepdim=True)
        new = p * factor
        new[..., cols] = p[..., cols] * self.w[keep]
        return new.to(probs.dtype)


def _attend(methods, q, k, v, mask, module, ctx, plain: bool, chunk=None):
    opts = KernelOptions(column_min_rows=10**9 if plain else 1)
    if chunk:
        opts.chunk_elements = chunk
    module.__dict__[dispatch.HANDLE_ATTR] = fake_handle(ctx, methods, opts)
    out, _ = dispatch.attention(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    return out


def _problem(batch, kv_heads, groups, past, q_len, pad, causal, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    heads, dim = kv_heads * groups, 4
    kv_len = past + q_len
    q = (torch.randn(batch, heads, q_len, dim, generator=g) * 2).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype)
    attn2d = torch.ones(batch, kv_len, dtype=torch.bool)
    for b in range(batch):
        attn2d[b, : pad[b]] = False  # left padding (a row may be all padding: it sees nothing)
    mask = sdpa_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=past,
                     mask_function=causal_mask_function, attention_mask=attn2d, allow_is_causal_skip=True)
    module = FakeAttention(groups)
    if not causal:
        mask, module.is_causal = None, False
    ctx = lambda: ForwardState(num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,  # noqa: E731
                               batch_size=batch, q_len=q_len, past_len=past, attention_mask=attn2d)
    return q, k, v, mask, module, ctx


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 3]),
    past=st.integers(0, 5),
    q_len=st.integers(1, 7),
    pad=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    row_subset=st.booleans(),
    causal=st.booleans(),
    chunk=st.sampled_from([None, 1, 40]),
    seed=st.integers(0, 10_000),
)
def test_column_form_equals_full_rows(batch, kv_heads, groups, past, q_len, pad, row_subset, causal, chunk, seed):
    """A column rewrite gives, on the column form and on the reference kernel (full-row form derived from
    it), the output of the same rewrite written by hand on full rows, with the same column statistics:
    padded batches (rows that see nothing included), GQA, decode shapes, row subsets, blocks."""
    q, k, v, mask, module, ctx = _problem(batch, kv_heads, groups, past, q_len, pad, causal, seed)
    kv_len = past + q_len
    cols = sorted({0, kv_len // 2, kv_len - 1, 2})
    rows = torch.tensor([0, q_len - 1]).unique() if row_subset else None
    by_hand, derived, column = FullDouble(cols, rows), ColumnDouble(cols, rows), ColumnDouble(cols, rows)
    ref = _attend([by_hand], q, k, v, mask, module, ctx(), plain=True, chunk=chunk)
    plain = _attend([derived], q, k, v, mask, module, ctx(), plain=True, chunk=chunk)
    got = _attend([column], q, k, v, mask, module, ctx(), plain=False, chunk=chunk)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for m in (derived, column):
        assert m.calls == 1, "column_stats is called once per layer and forward"
        torch.testing.assert_close(m.sums, by_hand.sums, atol=1e-5, rtol=1e-5)
        assert torch.equal(m.counts.expand_as(by_hand.counts), by_hand.counts.expand_as(m.counts))
    base, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    if rows is not None:  # rows nobody asked for are sdpa's
        other = torch.ones(q_len, dtype=torch.bool)
        other[rows] = False
        torch.testing.assert_close(got[:, other], base[:, other], atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    past=st.integers(0, 4),
    q_len=st.integers(2, 9),
    pad=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    causal=st.booleans(),
    chunk=st.sampled_from([None, 1, 40]),
    seed=st.integers(0, 10_000),
)
@example(batch=2, groups=2, past=0, q_len=8, pad=[1, 0, 0], causal=True, chunk=None, seed=1026)  # 2.5e-5 apart
def test_act_column_form_equals_full_rows(batch, groups, past, q_len, pad, causal, chunk, seed):
    """ACT's one rewrite on the column form against the reference kernel's full rows (fp32: the column form
    adds a correction scaled by the row's factor to sdpa-order sums, so they differ by rounding, up to a
    few 1e-5 on outputs of order 1)."""
    q, k, v, mask, module, ctx = _problem(batch, 2, groups, past, q_len, pad, causal, seed)
    outs, sinks = [], []
    for plain in (True, False):
        act = ACT(beta=0.3, threshold=0.15, start_layer=0, skip_last=0)
        act.attach(SimpleNamespace(adapter=SimpleNamespace(num_layers=1, num_heads=2 * groups)))
        c = ctx()
        outs.append(_attend([act], q, k, v, mask, module, c, plain=plain, chunk=chunk))
        sinks.append(act._sinks(act.state()[0], c.kv_len))
    assert torch.equal(sinks[0], sinks[1])
    torch.testing.assert_close(outs[1], outs[0], atol=5e-5, rtol=5e-5)


def test_column_form_bf16():
    q, k, v, mask, module, ctx = _problem(2, 2, 2, 3, 9, [0, 4, 0], True, 0, dtype=torch.bfloat16)
    cols = [0, 2, 5, 11]
    ref = _attend([FullDouble(cols)], q, k, v, mask, module, ctx(), plain=True)
    got = _attend([ColumnDouble(cols)], q, k, v, mask, module, ctx(), plain=False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


class Observer(Method):
    name = "observer_double"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def observe(self, ctx, probs):
        self.calls += 1


def test_column_form_fallbacks(monkeypatch):
    """A method that needs full probabilities (observe, scores, a plain probs, a second rewrite), softcap
    and output_attentions keep the reference kernel; so does a decode step (one row) by default."""
    q, k, v, mask, module, ctx = _problem(1, 2, 2, 0, 6, [0, 0, 0], True, 0)
    taken = []
    monkeypatch.setattr(fast, "column_form", lambda *a, **kw: taken.append(1) or q.transpose(1, 2))
    col = ColumnDouble([0, 3])
    assert Roles([col]).column is col
    for others in ([Observer()], [PassThrough()], [ColumnDouble([1])]):
        assert Roles([col, *others]).column is None
    assert Roles([PassThrough()]).column is None
    module.__dict__[dispatch.HANDLE_ATTR] = fake_handle(ctx(), [col])
    dispatch.attention(module, q, k, v, mask, scaling=0.5)
    assert taken == [1]
    dispatch.attention(module, q, k, v, mask, scaling=0.5, softcap=30.0)
    dispatch.attention(module, q, k, v, mask, scaling=0.5, output_attentions=True)
    dispatch.attention(module, q[:, :, -1:], k, v, None, scaling=0.5)  # decode: column_min_rows = 2
    assert taken == [1]


class Everything(Method):
    """Every attention role, logging the order; rewrites scores, probs and the head output."""

    name = "everything_double"

    def __init__(self):
        super().__init__()
        self.log = []

    def scores(self, ctx, scores):
        self.log.append(("scores", ctx.rows.tolist()))
        return scores * 0.9

    def column_stats(self, ctx, sums, counts):
        self.log.append(("column_stats", sums.sum().item()))

    def probs(self, ctx, probs):
        self.log.append(("probs", ctx.rows.tolist()))
        probs = probs.clone()
        probs[..., 0] *= 0.5
        return probs

    def observe(self, ctx, probs):
        self.log.append(("observe", round(probs[..., 0].sum().item(), 5)))

    def head_output(self, ctx, out):
        self.log.append(("head_output", ctx.rows.tolist()))
        return out * 2.0


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("padding", ["none", "all-true", "left", "dead-row"])
def test_single_row_path_equals_reference(softcap, padding, monkeypatch):
    """A decode step takes the short single-row path: same output, weights and role sequence as the
    reference kernel, with no mask, an all-True mask, left padding and a row that sees no key, softcap too."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    mask = None if padding == "none" else torch.ones(2, 1, 1, 7, dtype=torch.bool)
    if padding == "left":
        mask[1, ..., :3] = False
    elif padding == "dead-row":
        mask[1] = False
    results = []
    for single in (True, False):
        method = Everything()
        module = FakeAttention(2)
        ctx = ForwardState(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, batch_size=2, q_len=1, past_len=6)
        module.__dict__[dispatch.HANDLE_ATTR] = fake_handle(ctx, [method], KernelOptions(single_row=single))
        seen = []
        taken = fast.single_row
        monkeypatch.setattr(fast, "single_row", lambda *a, **kw: seen.append(1) or taken(*a, **kw))
        out, weights = dispatch.attention(module, q, k, v, mask, scaling=0.3, output_attentions=True, softcap=softcap)
        monkeypatch.setattr(fast, "single_row", taken)
        assert bool(seen) == single
        results.append((out, weights, method.log))
    (out1, w1, log1), (out2, w2, log2) = results
    torch.testing.assert_close(out1, out2, atol=1e-6, rtol=0)
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=0)
    assert [name for name, _ in log1] == ["scores", "column_stats", "probs", "observe", "head_output"]
    assert log1[0] == log2[0] and log1[2:] == log2[2:]
    assert log1[1][0] == log2[1][0] and abs(log1[1][1] - log2[1][1]) < 1e-5
    if padding == "dead-row":
        assert not out1[1].any()


# -- left-padded prefill through the fused kernel, per padding group --------------------------------


class _GQAModule(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2
    layer_idx = 0


@pytest.mark.parametrize("starts", [[0, 5, 30, 5], [7], [0, 0, 0]])
def test_padded_prefill_sdpa_equals_masked_sdpa(starts):
    """Rows grouped by their padding, each group on its real tokens with is_causal: the same output as
    sdpa with transformers' padded causal mask (pad query rows: zeros in both)."""
    torch.manual_seed(0)
    bsz, length, dim = len(starts), 37, 16
    pad = torch.ones(bsz, length, dtype=torch.bool)
    for b, s in enumerate(starts):
        pad[b, :s] = False
    mask = sdpa_mask(batch_size=bsz, q_length=length, kv_length=length, mask_function=causal_mask_function,
                     attention_mask=pad, allow_is_causal_skip=False)
    q, k, v = torch.randn(bsz, 4, length, dim), torch.randn(bsz, 2, length, dim), torch.randn(bsz, 2, length, dim)
    module = _GQAModule()
    ctx = ForwardState(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)
    assert fast.padded_starts(ctx, mask, length, length).tolist() == starts
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=dim**-0.5)
    call = dispatch._call(SimpleNamespace(want_weights=False), module, q, k, v, mask, 0.0, dim**-0.5)
    out = fast.sdpa(call, ctx, KernelOptions())
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for b, s in enumerate(starts):
        assert not out[b, :s].any()


def test_padded_prefill_sdpa_leaves_other_masks_to_sdpa():
    """A mask that is not left padding + causal (a bidirectional block, a decode row, a float mask) is
    not recognised, so those forwards keep transformers' sdpa with the mask."""
    length = 12
    pad = torch.ones(2, length, dtype=torch.bool)
    pad[1, :3] = False
    mask = sdpa_mask(batch_size=2, q_length=length, kv_length=length, mask_function=causal_mask_function,
                     attention_mask=pad, allow_is_causal_skip=False)
    ctx = ForwardState(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)
    assert fast.padded_starts(ctx, mask, length, length).tolist() == [0, 3]
    block = mask.clone()
    block[:, :, 4, 5] = True  # token 4 sees token 5: not causal
    assert fast.padded_starts(ctx, block, length, length) is None
    assert fast.padded_starts(ctx, mask[:, :, -1:], 1, length) is None
    assert fast.padded_starts(ctx, mask.float(), length, length) is None
