"""ACT: the calibration by hand (prefill and a decode step), only the chosen heads and layers change,
rows sum to 1, decode steps use the running column means, and row chunking changes nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attnkit
from attnkit.hooks.context import View
from attnkit.hooks import fast
from attnkit.hooks.kernel import KernelOptions
from attnkit.methods import ACT, PAI, VAR

from .conftest import apply_roles, forward_state, greedy, logits, valid_positions
from .test_methods_common import SINK_DIM, TAU, Recorder, deep, plant_sinks


def _attached(**kwargs):
    act = ACT(**kwargs)
    act.attach(SimpleNamespace(adapter=SimpleNamespace(num_layers=1, num_heads=2)))
    return act


def test_calibration_by_hand():
    act = _attached(beta=0.5, threshold=0.35, heads={0: [0]})
    ctx = forward_state([act], num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, batch_size=1, q_len=4, past_len=0)
    ctx.attention_mask = torch.ones(1, 4, dtype=torch.bool)
    head = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.4, 0.4, 0.2, 0.0],
            [0.3, 0.3, 0.1, 0.3],
        ]
    )
    probs = torch.stack([head, head.flip(-1).tril().softmax(-1)])[None]  # head 1 is not selected
    visible = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    out = apply_roles(act, ctx, 0, torch.arange(4), visible, probs.clone())
    # column means over the rows that see them: 0.55 (first token, exempt), 0.4, 0.15, 0.3 -> column 1 is the sink
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # sees no sink mass
            [0.75, 0.25, 0.0, 0.0],
            [0.4 + 0.2 * 0.4 / 0.6, 0.2, 0.2 + 0.2 * 0.2 / 0.6, 0.0],
            [0.3 + 0.15 * 0.3 / 0.7, 0.15, 0.1 + 0.15 * 0.1 / 0.7, 0.3 + 0.15 * 0.3 / 0.7],
        ]
    )
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], probs[0, 1])

    # a decode step: its row joins the running means (column 1: (1.2 + 0.3) / 4 = 0.375 stays a sink;
    # the new column 4: 0.3 / 1 is not one)
    ctx.q_len, ctx.past_len, ctx.is_prefill = 1, 4, False
    ctx.attention_mask = torch.ones(1, 5, dtype=torch.bool)
    row = torch.tensor([0.2, 0.3, 0.1, 0.1, 0.3])
    step = torch.stack([row, row])[None, :, None]
    out = apply_roles(act, ctx, 0, torch.tensor([0]), None, step.clone())
    expected = torch.tensor([0.2 + 0.15 * 0.2 / 0.7, 0.15, 0.1 + 0.15 * 0.1 / 0.7, 0.1 + 0.15 * 0.1 / 0.7,
                             0.3 + 0.15 * 0.3 / 0.7])
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out[0, 1, 0], row)


ALL_HEADS = [0, 1, 2, 3]


# one head, 4 causal rows: column means 1.3/4 = 0.325 (first token), 1.7/3, 0.8/2, 0.2
SPARE_HEAD = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.1, 0.9, 0.0, 0.0],
        [0.1, 0.5, 0.4, 0.0],
        [0.1, 0.3, 0.4, 0.2],
    ]
)


@pytest.mark.parametrize(
    "spare,expected",
    [
        # attnkit: the first token is spared; columns 1 and 2 (means 0.567 and 0.4 > 0.35) are sinks
        ("first_token", [
            [1.0, 0.0, 0.0, 0.0],
            [0.55, 0.45, 0.0, 0.0],  # sink mass 0.9 -> 0.45; the rest (0.1) takes 0.55
            [0.55, 0.25, 0.2, 0.0],
            [0.1 * 0.65 / 0.3, 0.15, 0.2, 0.2 * 0.65 / 0.3],  # sinks 0.7 -> 0.35; the rest 0.3 takes 0.65
        ]),
        # official indices[1:]: the first column above the threshold (column 1, the first token's column
        # 0 being below it) is spared, so only column 2 is calibrated
        ("first_sink", [
            [1.0, 0.0, 0.0, 0.0],
            [0.1, 0.9, 0.0, 0.0],
            [0.1 * 0.8 / 0.6, 0.5 * 0.8 / 0.6, 0.2, 0.0],  # sink 0.4 -> 0.2; the rest 0.6 takes 0.8
            [0.1 * 0.8 / 0.6, 0.3 * 0.8 / 0.6, 0.2, 0.2 * 0.8 / 0.6],
        ]),
    ],
)
def test_spared_column_by_hand(spare, expected):
    """The two rules differ when the first token's column is below the threshold (a hidden sink after it)."""
    act = _attached(beta=0.5, threshold=0.35, heads={0: [0, 1]}, spare=spare)
    ctx = forward_state([act], num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, batch_size=1, q_len=4, past_len=0)
    ctx.attention_mask = torch.ones(1, 4, dtype=torch.bool)
    # head 1: the first token's column is a sink (mean 0.7): spared by both rules, column 1 (0.4) calibrated
    head1 = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.4, 0, 0], [0.6, 0.4, 0.0, 0], [0.6, 0.4, 0.0, 0.0]])
    probs = torch.stack([SPARE_HEAD, head1])[None]
    visible = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    out = apply_roles(act, ctx, 0, torch.arange(4), visible, probs.clone())
    torch.testing.assert_close(out[0, 0], torch.tensor(expected))
    head1_expected = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.2, 0, 0], [0.8, 0.2, 0, 0], [0.8, 0.2, 0, 0]])
    torch.testing.assert_close(out[0, 1], head1_expected)
    # the column path declares the same sinks (the union over heads is columns 1 and 2 under both rules)
    assert act.columns(View(ctx, 0).at(torch.arange(4), visible)).tolist() == [1, 2]
    assert act._sinks(act.state()[0], 4)[0].tolist() == (
        [[False, True, True, False], [False, True, False, False]]
        if spare == "first_token"
        else [[False, False, True, False], [False, True, False, False]]
    )


@pytest.mark.parametrize(
    "family,spec,heads",
    [
        ("llava", dict(heads={1: [0, 3], 2: [1]}), {1: [0, 3], 2: [1]}),
        ("internvl", dict(heads={1: [0, 3], 2: [1]}), {1: [0, 3], 2: [1]}),
        # the default range stops before the last layer (official range(2, 31) of 32 layers): 1..2 of 4
        ("llava", dict(start_layer=1), {1: ALL_HEADS, 2: ALL_HEADS}),
        ("llava", dict(start_layer=1, skip_last=0), {1: ALL_HEADS, 2: ALL_HEADS, 3: ALL_HEADS}),
    ],
    ids=["heads-llava", "heads-internvl", "range", "range-last-layer"],
)
def test_only_chosen_heads_and_layers_change(family, spec, heads):
    model, inputs = deep(family)
    beta, threshold = 0.3, 0.08
    rec = Recorder()
    with attnkit.wrap(model, [rec, ACT(beta=beta, threshold=threshold, **spec)]) as h, torch.no_grad():
        model(**inputs)
        real = h.ctx.attention_mask
        assert h.methods[1].layers(h.ctx) == set(heads)
    changed = 0
    changed_last = 0
    for layer in range(4):
        pre, post = Recorder.assemble(rec.pre, layer), Recorder.assemble(rec.post, layer)
        live = post.sum(-1) > 0
        torch.testing.assert_close(post.sum(-1)[live], torch.ones_like(post.sum(-1)[live]))
        for hd in range(pre.shape[1]):
            if hd not in heads.get(layer, []):
                assert torch.equal(pre[:, hd], post[:, hd]), (layer, hd)
                continue
            for b in range(pre.shape[0]):
                n = pre.shape[-1]
                visible = torch.ones(n, n, dtype=torch.bool).tril() & real[b][None, :] & real[b][:, None]
                mean = pre[b, hd].sum(0) / visible.sum(0).clamp_min(1)
                sink = (mean > threshold) & (visible.sum(0) > 0)
                sink[int(real[b].float().argmax())] = False
                for q in range(n):
                    if not real[b, q]:
                        continue
                    row, new = pre[b, hd, q], post[b, hd, q]
                    if float(row[sink].sum()) == 0:
                        torch.testing.assert_close(new, row)
                        continue
                    changed += 1
                    changed_last += layer == 3
                    torch.testing.assert_close(new[sink], beta * row[sink])
                    rest = ~sink & (row > 0)
                    gain = new[rest] / row[rest]
                    torch.testing.assert_close(gain, gain[:1].expand_as(gain))
    assert changed > 20, "the fixture must calibrate some rows"
    assert (changed_last > 0) == (3 in heads), "the last layer changes only when it is in the range"


class History(Recorder):
    """Recorder that keeps every forward: the pre-rewrite rows of prefill and of each decode step."""

    name = "history_double"

    def begin_forward(self, ctx):
        self.forwards = getattr(self, "forwards", [])
        self.pre, self.post = {}, {}
        self.forwards.append((self.pre, self.post))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_decode_steps_use_running_means(family):
    """At the last decode step the sinks come from the means over every row so far (independent sums)."""
    model, inputs = deep(family)
    beta, threshold = 0.3, 0.06
    rec = History()
    with attnkit.wrap(model, [rec, ACT(beta=beta, threshold=threshold, start_layer=1, skip_last=0)]) as h, torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        real = h.ctx.attention_mask
    assert len(rec.forwards) == 4
    checked = 0
    for layer in (1, 3):
        rows = [Recorder.assemble(pre, layer) for pre, _ in rec.forwards]
        width = rows[-1].shape[-1]
        rows = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows], dim=2)
        n = width
        visible = torch.ones(n, n, dtype=torch.bool).tril()[None] & real[:, None, :] & real[:, :, None]
        mean = rows.sum(2) / visible.sum(1, keepdim=True).clamp_min(1)  # (B, H, K)
        sink = (mean > threshold) & (visible.sum(1, keepdim=True) > 0)
        for b in range(sink.shape[0]):
            sink[b, :, int(real[b].float().argmax())] = False
        pre, post = rows[:, :, -1], Recorder.assemble(rec.forwards[-1][1], layer)[:, :, 0]
        for b in range(pre.shape[0]):
            for hd in range(pre.shape[1]):
                s = sink[b, hd]
                if float(pre[b, hd][s].sum()) == 0:
                    torch.testing.assert_close(post[b, hd], pre[b, hd])
                    continue
                checked += 1
                torch.testing.assert_close(post[b, hd][s], beta * pre[b, hd][s])
                rest = ~s & (pre[b, hd] > 0)
                gain = post[b, hd][rest] / pre[b, hd][rest]
                torch.testing.assert_close(gain, gain[:1].expand_as(gain))
    assert checked > 0


@pytest.mark.parametrize(
    "spec",
    [
        lambda: [ACT(beta=0.3, threshold=0.05, start_layer=1)],
        lambda: [VAR(p=0.2, tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=0, summ=0.0, rho=1.0),
                 ACT(beta=0.5, threshold=0.05, start_layer=0), PAI(alpha=0.5, start_layer=1)],
    ],
    ids=["act", "var+act+pai"],
)
@pytest.mark.parametrize("keep_chunks", [True, False], ids=["kept", "recomputed"])
def test_row_chunks_change_nothing(spec, keep_chunks, monkeypatch):
    """Blocks of 1-3 rows, kept from the statistics pass or computed again, give the one-block result."""
    model, inputs = deep("qwen2_vl")
    hooks, _ = plant_sinks(model)
    try:
        ref = logits(model, inputs)
        with attnkit.wrap(model, spec()):
            one = logits(model, inputs)
        opts = KernelOptions(chunk_elements=2 * 4 * inputs["input_ids"].shape[1] + 1,
                             stats_cache_elements=2**22 if keep_chunks else 0)
        with attnkit.wrap(model, spec(), options=opts):
            many = logits(model, inputs)
    finally:
        for hk in hooks:
            hk.remove()
    keep = valid_positions(inputs)
    torch.testing.assert_close(many[keep], one[keep], atol=1e-4, rtol=0)  # summation order differs
    assert (one[keep] - ref[keep]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_column_path_equals_plain_path(family, monkeypatch):
    """At prefill ACT alone takes the column path (one pass, output corrected on the sink columns); it
    gives the logits and greedy tokens of the plain path (full-row rewrite), left-padded batch, GQA."""
    model, inputs = deep(family)
    taken = []
    column_path = fast.column_form
    monkeypatch.setattr(fast, "column_form", lambda *a, **kw: taken.append(1) or column_path(*a, **kw))
    spec = dict(beta=0.3, threshold=0.05, start_layer=0, skip_last=0)
    with attnkit.wrap(model, ACT(**spec)):
        column = logits(model, inputs)
        column_tokens = greedy(model, inputs, n=4)
    assert len(taken) == 8, "4 layers at the prefill of logits() and of generate()"
    with attnkit.wrap(model, ACT(**spec), options=KernelOptions(column_min_rows=10**9)):
        plain = logits(model, inputs)
        plain_tokens = greedy(model, inputs, n=4)
    assert len(taken) == 8
    keep = valid_positions(inputs)
    torch.testing.assert_close(column[keep], plain[keep], atol=1e-4, rtol=0)
    assert torch.equal(column_tokens, plain_tokens)
    assert (column[keep] - logits(model, inputs)[keep]).abs().max() > 1e-3


def test_column_path_falls_back_with_an_observer(monkeypatch):
    """A method that reads the final probabilities (observe) keeps the plain path in its layers."""
    model, inputs = deep("llava")
    taken = []
    column_path = fast.column_form
    monkeypatch.setattr(fast, "column_form", lambda *a, **kw: taken.append(a[2].layer) or column_path(*a, **kw))
    with attnkit.wrap(model, [Recorder(), ACT(beta=0.3, threshold=0.05, heads={2: [0]})]), torch.no_grad():
        model(**inputs)
    assert taken == []
    with attnkit.wrap(model, [ACT(beta=0.3, threshold=0.05, heads={2: [0]})]), torch.no_grad():
        model(**inputs)
    assert taken == [2]


def test_column_path_redoes_rows_with_a_large_factor(monkeypatch):
    """Rows whose factor exceeds COLUMN_MAX_FACTOR are computed again from full rows: with the bound at 0
    every row is, and the result is the plain path's."""
    model, inputs = deep("qwen2_vl")
    spec = dict(beta=0.3, threshold=0.05, start_layer=0, skip_last=0)
    redone = []
    plain_rows = fast.reference
    monkeypatch.setattr(fast, "reference", lambda *a, **kw: redone.append(a[3].numel()) or plain_rows(*a, **kw))
    with attnkit.wrap(model, ACT(**spec)):
        column = logits(model, inputs)
    with attnkit.wrap(model, ACT(**spec), options=KernelOptions(column_max_factor=0.0)):
        redo = logits(model, inputs)
    assert redone and all(n == inputs["input_ids"].shape[1] for n in redone[-4:])
    keep = valid_positions(inputs)
    torch.testing.assert_close(redo[keep], column[keep], atol=1e-4, rtol=0)
