"""HiPrune: no-op at full budget, exact per-image counts through generate with left padding, batch ==
rows alone, KV-cached generate == full recomputation, anchors/buffers/registers by hand on a small grid
and against eager vision attentions, object-layer defaults, remove() restores."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import errors
from attnkit.methods import HiPrune
from attnkit.methods.hiprune import default_object_layer, hiprune_select

from .conftest import greedy, logits
from .test_methods_visionzip import (
    FAMILIES,
    N_IMAGE,
    ProjectorInput,
    check_cached_generate,
    hook_counts,
    image_id,
    independent_stats,
    recorded_greedy,
    row_alone,
    tiny,
)


def test_bad_arguments_one_line():
    cases = ({"budget": 0}, {"budget": 1.5}, {"alpha": -0.1}, {"alpha": 1.5}, {"object_layer": 0},
             {"budget": 3, "alpha": 1.0}, {"keep": 3})  # fmt: skip
    for kwargs in cases:
        with pytest.raises(errors.MethodArgumentError) as err:
            HiPrune(**kwargs)
        assert "\n" not in str(err.value) and str(err.value).startswith("hiprune:")


def test_object_layer_beyond_the_tower_is_refused_at_wrap():
    model, _ = tiny("llava")  # 2 vision layers
    with pytest.raises(errors.MethodArgumentError) as err:
        attnkit.wrap(model, "hiprune", object_layer=3)
    assert "object_layer=3" in str(err.value) and "\n" not in str(err.value)
    with attnkit.wrap(model, []):  # the failed wrap left nothing behind
        pass


def test_default_object_layer():
    assert default_object_layer(24) == 9  # official, CLIP ViT-L/14
    assert default_object_layer(27) == 10  # SigLIP-So400m: 9/24 rescaled
    assert default_object_layer(2) == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "idefics3"])
def test_unsupported_family(family):
    model, _ = tiny(family)
    with pytest.raises(errors.UnsupportedModelError) as err:
        attnkit.wrap(model, HiPrune(budget=4))
    msg = str(err.value)
    assert "\n" not in msg and "hiprune" in msg and family in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_unwrapped(family):
    model, inputs = tiny(family)
    ref_logits, ref_tokens = logits(model, inputs), greedy(model, inputs)
    for budget in (N_IMAGE, 40):
        with attnkit.wrap(model, HiPrune(budget=budget)):
            torch.testing.assert_close(logits(model, inputs), ref_logits, atol=1e-5, rtol=0)
            assert torch.equal(greedy(model, inputs), ref_tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget,alpha", [(5, 0.1), (10, 0.5), (8, 0.6)])
def test_counts_through_generate_and_batch_equals_rows(family, budget, alpha):
    model, inputs = tiny(family)
    method = HiPrune(budget=budget, alpha=alpha)
    seq = inputs["input_ids"].shape[1]
    with attnkit.wrap(model, method):
        rec, tokens = recorded_greedy(model, inputs, n=6)
        assert (rec.ids[0] == image_id(model)).sum(1).tolist() == [budget, budget]
        for step, mask in enumerate(rec.masks):
            assert mask.shape[1] == seq - (N_IMAGE - budget) + step
        assert method.report.image_kept_per_layer == [budget] * len(method.report.tokens_per_layer)
        batch_logits = logits(model, inputs)
        for r in range(2):
            alone = row_alone(inputs, r)
            assert torch.equal(greedy(model, alone, n=6)[0], tokens[r])
            torch.testing.assert_close(logits(model, alone)[0, -1], batch_logits[r, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_equals_full_recomputation(family):
    model, inputs = tiny(family)
    check_cached_generate(model, inputs, HiPrune(budget=6, alpha=0.5))


def test_anchors_buffers_registers_by_hand():
    # 4x4 grid (width 4), budget 8, alpha 0.7: round(8 * 0.7 / 5) = 1 anchor
    obj = torch.zeros(2, 16)
    obj[0, 5] = 1.0  # interior anchor: buffers 4, 6, 1, 9
    obj[1, 3] = 1.0  # row-end anchor: +1 wraps to 4 (the official code does not special-case row ends), -4 clamps to 0
    out_attn = torch.arange(16, dtype=torch.float32).flip(0)[None].repeat(2, 1)  # registers prefer low indices
    idx = hiprune_select(obj, out_attn, budget=8, alpha=0.7, width=4)
    # row 0: {1, 4, 5, 6, 9} + 3 registers by output attention among the rest: 0, 2, 3
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 9]
    # row 1: {3, 2, 4, 0 (clamped from -1), 7} + 3 registers: 1, 5, 6
    assert idx[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # two anchors whose buffers overlap: duplicates count once, registers fill the budget
    obj = torch.zeros(1, 16)
    obj[0, 5], obj[0, 6] = 1.0, 0.9  # budget 10, alpha 1.0: 2 anchors -> {1,2,4,5,6,7,9,10}
    out_attn = torch.zeros(1, 16)
    out_attn[0, 15], out_attn[0, 12] = 0.5, 0.4
    idx = hiprune_select(obj, out_attn, budget=10, alpha=1.0, width=4)
    assert idx[0].tolist() == [1, 2, 4, 5, 6, 7, 9, 10, 12, 15]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("object_layer", [None, 1, 2])
def test_selection_against_eager_attention(family, object_layer):
    model, inputs = tiny(family)
    budget, alpha = 6, 0.9  # 1 anchor
    with attnkit.wrap(model, HiPrune(budget=budget, alpha=alpha, object_layer=object_layer)):
        rec = ProjectorInput(model, family)
        try:
            logits(model, inputs)
        finally:
            rec.remove()
    out_layer = 0 if family == "llava" else 1
    obj_layer = 0 if object_layer is None else object_layer - 1  # default: round(9 * 2 / 24) = 1 (1-based)
    tokens, _, _, out_attn, _ = independent_stats(family, inputs, out_layer)
    _, _, _, obj_attn, _ = independent_stats(family, inputs, obj_layer)
    idx = hiprune_select(obj_attn, out_attn, budget, alpha, width=4)
    expected = tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    assert rec.seen[0].shape == (2, budget, tokens.shape[-1])
    torch.testing.assert_close(rec.seen[0], expected, atol=1e-5, rtol=0)
    # the anchor is the top object-layer token, and it is kept with its in-grid neighbours
    anchor = obj_attn.argmax(1)
    for b in range(2):
        a = int(anchor[b])
        for j in {max(0, a - 1), min(15, a + 1), max(0, a - 4), min(15, a + 4), a}:
            assert j in idx[b].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_exact_original(family):
    model, inputs = tiny(family)
    before_logits, before_tokens, before_hooks = logits(model, inputs), greedy(model, inputs), hook_counts(model)
    handle = attnkit.wrap(model, HiPrune(budget=4, alpha=0.0))
    greedy(model, inputs)
    handle.remove()
    assert hook_counts(model) == before_hooks
    assert torch.equal(logits(model, inputs), before_logits)
    assert torch.equal(greedy(model, inputs), before_tokens)
