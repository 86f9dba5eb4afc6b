"""VAR: the redistribution by hand, planted sinks are found (explicit dims, table, input rule), a model
without sinks is left unchanged, and only image-centric (head, row) pairs of the chosen layers change."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2VLConfig

import attnkit
from attnkit.hooks.context import ForwardState, View
from attnkit.methods import VAR

from .conftest import logits, valid_positions
from .test_methods_common import SINK_DIM, TAU, Recorder, deep, plant_sinks


def _fake_handle(layers=4, hidden=8, **text):
    text_config = SimpleNamespace(hidden_size=hidden, model_type="toy", num_hidden_layers=layers, intermediate_size=16)
    for k, v in text.items():
        setattr(text_config, k, v)
    ctx = ForwardState(num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=4)
    return SimpleNamespace(adapter=SimpleNamespace(num_layers=layers, text_config=text_config), ctx=ctx)


def _view(state, layer=-1, rows=None, visible=None):
    state.begin()
    return View(state, layer).at(rows, visible) if rows is not None else View(state, layer)


def _six_tokens():
    """VAR (p=0.6, rho=0.5, summ=0.2) attached to a fake 4-layer model at the prefill of 6 tokens: 0 BOS and
    2 (an image token) are sinks at layer 1, 1-4 image tokens, 5 text. Returns (var, ctx)."""
    var = VAR(p=0.6, tau=2.0, rho=0.5, summ=0.2, start_layer=1, skip_last=1, sink_dims=[3])
    handle = _fake_handle()
    var._states = handle.ctx.states
    var.attach(handle)
    ctx = handle.ctx
    ctx.batch_size, ctx.q_len, ctx.past_len, ctx.is_prefill = 1, 6, 0, True
    ctx.image_mask = torch.tensor([[False, True, True, True, True, False]])
    ctx.attention_mask = torch.ones(1, 6, dtype=torch.bool)
    var.begin_forward(_view(ctx))
    hidden = torch.ones(1, 6, 8)
    hidden[0, [0, 2], 3] = 50.0  # |RMSNorm| = 50 / sqrt((7 + 2500) / 8) = 2.82 > tau; others 1
    var.select(_view(ctx, 1), hidden)
    assert var.sink_report()["sinks"] == {1: [[0, 2]]}
    return var, ctx


def test_redistribution_by_hand():
    """Tokens: 0 BOS (text sink), 1-4 image (2 a visual sink), 5 text. Row 5 is the query."""
    var, ctx = _six_tokens()
    assert var.rows(_view(ctx, 1)).tolist() == [5], "only the text after the image is a query row at prefill"

    probs = torch.tensor(
        [
            [0.30, 0.10, 0.15, 0.20, 0.15, 0.10],  # image 0.60, visual sink share 0.25: chosen
            [0.50, 0.02, 0.30, 0.05, 0.03, 0.10],  # image 0.40, share 0.75 > rho: left alone
        ]
    )[None, :, None, :]
    five = _view(ctx, 1, torch.tensor([5]))
    out = var.probs(five, probs.clone())
    # sinks keep 0.6 of 0.30 and 0.15; the freed 0.4 * 0.45 = 0.18 goes to image tokens 1, 3, 4 (0.45 in all)
    expected_head0 = torch.tensor([0.18, 0.10 + 0.18 * 0.10 / 0.45, 0.09, 0.20 + 0.18 * 0.20 / 0.45,
                                   0.15 + 0.18 * 0.15 / 0.45, 0.10])
    torch.testing.assert_close(out[0, 0, 0], expected_head0)
    torch.testing.assert_close(out[0, 1, 0], probs[0, 1, 0])
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 2, 1))

    low = torch.tensor([0.70, 0.03, 0.02, 0.05, 0.05, 0.15])[None, None, None, :]  # image 0.15 < summ
    torch.testing.assert_close(var.probs(five, low.clone()), low)

    # layer 2: only BOS is a sink (no visual sink): the layer is left alone, as in the official code
    only_text = torch.ones(1, 6, 8)
    only_text[0, 0, 3] = 50.0
    var.select(_view(ctx, 2), only_text)
    assert var.sink_report()["sinks"][2] == [[0]]
    torch.testing.assert_close(var.probs(_view(ctx, 2, torch.tensor([5])), probs.clone()), probs)


def test_visual_sink_share_takes_the_official_denominator():
    """The share is vis / sum(image attention + 1e-6): with 4 image tokens a row whose visual sink has
    0.2000015 of image attention 0.4 (vis / img = 0.50000375 > rho) is chosen, as in the official code,
    since 0.2000015 / (0.4 + 4e-6) = 0.49999875 <= 0.5; 0.2000025 (share 0.50000125) is not."""
    var, ctx = _six_tokens()
    inside = [0.5, 0.1, 0.2000015, 0.05, 0.0499985, 0.1]
    beyond = [0.5, 0.1, 0.2000025, 0.05, 0.0499975, 0.1]
    assert 0.2000015 > 0.5 * 0.4, "the rule without the 1e-6 terms would leave this row alone"
    probs = torch.tensor([inside, beyond], dtype=torch.float32)[None, :, None, :]
    out = var.probs(_view(ctx, 1, torch.tensor([5])), probs.clone())
    freed = 0.4 * (0.5 + 0.2000015)  # sinks keep p = 0.6 of theirs
    rest = 0.1 + 0.05 + 0.0499985  # the non-sink image tokens, in proportion
    expected = torch.tensor([0.3, 0.1 + freed * 0.1 / rest, 0.6 * 0.2000015, 0.05 + freed * 0.05 / rest,
                             0.0499985 + freed * 0.0499985 / rest, 0.1])
    torch.testing.assert_close(out[0, 0, 0], expected, atol=1e-7, rtol=0)
    assert torch.equal(out[0, 1, 0], probs[0, 1, 0])


def test_sink_dims_sources():
    cases = [
        (dict(model_type="llama", hidden=4096, layers=32, intermediate_size=11008), "table: LLaMA-2-7B / Vicuna-7B", [2533, 1415]),
        (dict(model_type="llama", hidden=5120, layers=40, intermediate_size=13824), "table: LLaMA-2-13B / Vicuna-13B", [2100, 4743]),
        (dict(model_type="qwen2_vl_text", hidden=3584, layers=28, intermediate_size=18944), "table: Qwen2-7B (Qwen2-VL-7B)", [458, 2570]),
        (dict(model_type="internlm2", hidden=4096, layers=32, intermediate_size=14336), "table: InternLM2-7B (InternVL2-8B)", [3584]),
        (dict(model_type="llama", hidden=4096, layers=32, intermediate_size=14336), "input", None),  # LLaMA-3-8B
        (dict(model_type="mistral", hidden=4096, layers=32, intermediate_size=14336), "input", None),
    ]
    for spec, source, dims in cases:
        var = VAR()
        var.attach(_fake_handle(layers=spec.pop("layers"), hidden=spec.pop("hidden"), **spec))
        assert var.sink_dims_source == source
        assert var.sink_report()["sink_dims"] == dims
    explicit = VAR(sink_dims=[7, 1])
    explicit.attach(_fake_handle(layers=32, hidden=4096, model_type="llama", intermediate_size=11008))
    assert explicit.sink_dims_source == "explicit" and explicit.sink_report()["sink_dims"] == [7, 1]
    # the keys match what transformers' configs of those models say
    assert LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32).model_type == "llama"
    assert Qwen2VLConfig().text_config.model_type == "qwen2_vl_text"
    assert MistralConfig().model_type == "mistral"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
@pytest.mark.parametrize("dims", [[SINK_DIM], None], ids=["explicit", "input"])
def test_finds_planted_sinks(family, dims):
    model, inputs = deep(family)
    hooks, planted = plant_sinks(model)
    try:
        with attnkit.wrap(model, VAR(tau=TAU, sink_dims=dims, start_layer=1, skip_last=1)) as h:
            logits(model, inputs)
            report = h.methods[0].sink_report()
        expected = [row.nonzero().flatten().tolist() for row in planted["mask"]]
    finally:
        for hk in hooks:
            hk.remove()
    assert all(len(row) >= 3 for row in expected)
    assert report["source"] == ("explicit" if dims else "input")
    assert report["sinks"] == {1: expected, 2: expected}, "sinks in layers 1..L-2 exactly where planted"
    if dims is None:
        assert report["input_dims"] == {1: [[SINK_DIM]] * 2, 2: [[SINK_DIM]] * 2}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_model_without_sinks_is_unchanged(family):
    model, inputs = deep(family)
    ref = logits(model, inputs)
    spec = dict(p=0.1, tau=TAU, summ=0.0, rho=1.0, start_layer=0, skip_last=0)
    with attnkit.wrap(model, VAR(**spec)) as h:  # input rule: no massive dimension, no sink
        got = logits(model, inputs)
        report = h.methods[0].sink_report()
    assert report["source"] == "input"
    assert all(not any(row) for row in report["sinks"].values()) and len(report["sinks"]) == 4
    keep = valid_positions(inputs)
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)
    hooks, _ = plant_sinks(model)  # the same setting does act once the model has sinks
    try:
        planted_ref = logits(model, inputs)
        with attnkit.wrap(model, VAR(**spec)):
            planted_got = logits(model, inputs)
    finally:
        for hk in hooks:
            hk.remove()
    assert (planted_got[keep] - planted_ref[keep]).abs().max() > 1e-3


def _check_pairs(rec, var, ctx_image, eligible, layers_on, cfg, by_layer=None):
    """Every layer: pre == post outside the chosen pairs; chosen pairs follow the rule; rows sum to 1.
    ``by_layer`` (a dict) receives the number of changed pairs per layer."""
    changed_pairs = unchanged_eligible = 0
    for layer in range(4):
        pre, post = Recorder.assemble(rec.pre, layer), Recorder.assemble(rec.post, layer)
        live = post.sum(-1) > 0
        torch.testing.assert_close(post.sum(-1)[live], torch.ones_like(post.sum(-1)[live]))
        if layer not in layers_on:
            assert torch.equal(pre, post), f"layer {layer} is outside [start_layer, L - skip_last)"
            continue
        width = pre.shape[-1]
        sink = torch.zeros(pre.shape[0], width, dtype=torch.bool)
        for b, pos in enumerate(var.sink_report()["sinks"][layer]):
            sink[b, pos] = True
        image = torch.zeros_like(sink)
        image[:, : ctx_image.shape[1]] = ctx_image
        for b in range(pre.shape[0]):
            for hd in range(pre.shape[1]):
                for q in range(pre.shape[2]):
                    row, new = pre[b, hd, q], post[b, hd, q]
                    img = float(row[image[b]].sum())
                    vis = float(row[image[b] & sink[b]].sum())
                    share = vis / (img + 1e-6 * int(image[b].sum()))  # official: vis / sum(img + 1e-6)
                    chosen = (
                        bool(eligible[b, q]) and bool((image[b] & sink[b]).any())
                        and img >= cfg["summ"] and share <= cfg["rho"]
                    )
                    if not chosen:
                        assert torch.equal(row, new), (layer, b, hd, q)
                        unchanged_eligible += bool(eligible[b, q])
                        continue
                    changed_pairs += 1
                    if by_layer is not None:
                        by_layer[layer] = by_layer.get(layer, 0) + 1
                    torch.testing.assert_close(new[sink[b]], cfg["p"] * row[sink[b]])
                    other = ~image[b] & ~sink[b]
                    torch.testing.assert_close(new[other], row[other])
                    gain = new[image[b] & ~sink[b]] / row[image[b] & ~sink[b]]
                    torch.testing.assert_close(gain, gain[:1].expand_as(gain))  # proportional
    return changed_pairs, unchanged_eligible


@pytest.mark.parametrize(
    "family,skip_last", [("llava", 1), ("internvl", 1), ("llava", 0)], ids=["llava", "internvl", "llava-last-layer"]
)
def test_only_image_centric_pairs_of_chosen_layers_change(family, skip_last):
    """skip_last=0 (the released code, which redistributes in the last layer too) changes layer 3 of 4."""
    model, inputs = deep(family)
    cfg = dict(p=0.3, summ=0.15, rho=0.4)
    layers_on = {1, 2} if skip_last else {1, 2, 3}
    hooks, _ = plant_sinks(model)
    try:
        rec = Recorder()
        var = VAR(tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=skip_last, **cfg)
        with attnkit.wrap(model, [rec, var]) as h, torch.no_grad():
            model(**inputs)
            ctx = h.ctx
            image = ctx.image_mask.clone()
            first = image.float().argmax(1)
            pos = torch.arange(ctx.q_len)
            eligible = (pos[None] > first[:, None]) & ~image & ctx.attention_mask
            by_layer = {}
            changed, unchanged = _check_pairs(rec, var, image, eligible, layers_on, cfg, by_layer)
            assert changed > 0 and unchanged > 0, "the fixture must give chosen and rejected pairs"
            assert (by_layer.get(3, 0) > 0) == (skip_last == 0), "the last layer changes only with skip_last=0"
            # a decode step: the new token is the only query row
            gen = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            assert gen.shape[1] == inputs["input_ids"].shape[1] + 2
            assert not h.ctx.is_prefill
            eligible = image.any(1)[:, None]
            changed, _ = _check_pairs(rec, var, image, eligible, layers_on, cfg)
            assert changed > 0
    finally:
        for hk in hooks:
            hk.remove()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cached_decode_equals_recomputation_with_planted_sinks(family):
    """VAR declares cache_exact = False because a recomputation may find sinks among generated tokens,
    which cached decoding never takes. With sinks only where they are planted (the prompt: the first
    token and image tokens), nothing differs: every cached step gives the recomputation's logits."""
    from attnkit import testing

    model, _ = testing.check_model(family)
    hooks, _ = plant_sinks(model)
    try:
        testing.check_cached_equals_recomputed(
            "var", family, dict(p=0.2, tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=0, summ=0.0, rho=1.0)
        )
    finally:
        for hk in hooks:
            hk.remove()
