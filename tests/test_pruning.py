"""Token dropping machinery (pruning in drop mode) on every family: drop == mask, pruned KV cache,
batch == rows, positions kept, per-layer views for the methods of later layers, errors."""

from __future__ import annotations

import functools

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.methods import Method
from attnkit.methods.pruning import LayerShape, flops_ratio, layer_flops
from attnkit.hooks.compat import output_cache
from attnkit.models import get_adapter

from .conftest import FAMILIES, check_batch_equals_rows, extend_inputs


@functools.lru_cache(maxsize=None)
def _deep(family: str):
    return testing.tiny_model(family, num_layers=4, seed=1)


def _stages(model) -> tuple[int, ...]:
    first = max(1, get_adapter(model).first_droppable_layer)
    return tuple(sorted({first, 3}))


class EveryOther(Method):
    """Test double: at each layer of ``at``, drop (or mask) every other image token still present."""

    name = "every_other"

    def __init__(self, at, drop: bool = True):
        super().__init__()
        self.at, self.drops_tokens = set(at), drop
        self.seen: list[tuple[int, int, int]] = []

    def select(self, ctx, hidden):
        layer = ctx.layer
        if layer not in self.at:
            return None
        image = ctx.live_image_mask()
        order = image.long().cumsum(1) - 1
        self.seen.append((layer, hidden.shape[1], int(image[0].sum())))
        return ~(image & (order % 2 == 0))


def _forward(model, inputs, method):
    with torch.no_grad(), attnkit.wrap(model, method) as handle:
        out = model(**inputs, use_cache=True)
        drops = list(handle.state.drops)
    return out, drops


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_equals_mask_on_kept_positions(family):
    model, inputs = _deep(family)
    if family == "gemma3":  # its sliding window (32) must hold the whole prompt
        inputs = testing.tiny_inputs(family, prompts=["Dog?"], images=testing.sample_images(1, size=(32, 32)))
    at = _stages(model)
    masked, _ = _forward(model, inputs, EveryOther(at, drop=False))
    dropper = EveryOther(at, drop=True)
    dropped, drops = _forward(model, inputs, dropper)
    assert [layer for layer, _ in drops] == list(at)
    kept = drops[-1][1]
    n_image = int(get_adapter(model).image_mask(inputs["input_ids"])[0].sum())
    assert dropper.seen[0][2] == n_image
    if len(at) == 2:
        assert dropper.seen[1][2] == n_image // 2  # the second stage ranks only what the first kept
    assert dropped.logits.shape[1] == kept.shape[1] < inputs["input_ids"].shape[1]
    ref = masked.logits.gather(1, kept[..., None].expand(-1, -1, masked.logits.shape[-1]))
    real = inputs["attention_mask"].bool().gather(1, kept)
    torch.testing.assert_close(dropped.logits[real], ref[real], atol=1e-4, rtol=0)
    # the KV cache of the layers from the first stage on holds only the kept prompt tokens
    cache = output_cache(dropped)
    stage_of = {layer: pos.shape[1] for layer, pos in drops}
    lengths, want, n = [], [], inputs["input_ids"].shape[1]
    for i, layer in enumerate(cache.layers):
        n = stage_of.get(i, n)
        if not layer.is_sliding:  # a sliding-window layer keeps only its window
            lengths.append(layer.keys.shape[2])
            want.append(n)
    assert lengths == want


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl", "instructblip"])
def test_cached_generate_equals_full_recomputation(family):
    model, inputs = _deep(family)
    at = _stages(model)
    n_new = 5
    with torch.no_grad(), attnkit.wrap(model, EveryOther(at)):
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        for t in range(n_new):
            full = model(**extend_inputs(inputs, new[:, :t]), use_cache=False).logits
            assert torch.equal(full[:, -1].argmax(-1), new[:, t]), f"step {t}"
    with torch.no_grad(), attnkit.wrap(model, EveryOther(at, drop=False)):
        masked = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    assert torch.equal(masked, out)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_batch_equals_rows_alone(family):
    model, _ = _deep(family)
    check_batch_equals_rows(model, family, EveryOther(_stages(model)))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_positions_after_drop_are_the_original_positions_of_kept_tokens(family):
    """A layer after a drop gets the rotary embeddings of the kept tokens' original positions (3-D
    mRoPE positions for Qwen2/2.5-VL), recomputed here from the language model's own position ids."""
    model, inputs = _deep(family)
    at = _stages(model)
    lm = model.get_decoder()
    layer = get_adapter(model).decoder_layers()[3]
    seen: dict[str, list] = {"lm": [], "layer": []}

    def on_lm(module, args, kwargs):
        seen["lm"].append(kwargs.get("position_ids"))

    def on_layer(module, args, kwargs):
        seen["layer"].append((args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]))

    hooks = [lm.register_forward_pre_hook(on_lm, with_kwargs=True)]
    try:
        with torch.no_grad(), attnkit.wrap(model, EveryOther(at)) as handle:
            hooks.append(layer.register_forward_pre_hook(on_layer, with_kwargs=True))  # after attnkit's hook
            model(**inputs)
            kept = handle.state.drops[-1][1]
    finally:
        for h in hooks:
            h.remove()
    positions = seen["lm"][-1]
    if positions is None:  # LLaVA: generate-free forward, positions 0..S-1
        positions = torch.arange(inputs["input_ids"].shape[1])[None]
    if family.startswith("qwen"):
        assert positions.dim() == 3  # (3, B, S): temporal, height, width
    lead = positions.shape[:-2]
    positions = positions.expand(*lead, kept.shape[0], positions.shape[-1])
    original = positions.gather(-1, kept.expand(*lead, *kept.shape))
    hidden, (cos, sin) = seen["layer"][-1]
    assert hidden.shape[1] == kept.shape[1]
    want_cos, want_sin = lm.rotary_emb(hidden, position_ids=original)
    torch.testing.assert_close(cos, want_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, want_sin, atol=1e-6, rtol=0)
    if family.startswith("qwen"):  # the image's 2-D layout survives: kept image tokens keep distinct (h, w)
        image = get_adapter(model).image_mask(inputs["input_ids"]).gather(1, kept)
        hw = original[1:, 0][:, image[0]]
        assert len({tuple(x) for x in hw.T.tolist()}) == hw.shape[1]


class Probe(Method):
    """Records what a method of a later layer is told about its layer."""

    name = "probe"

    def __init__(self, layer):
        super().__init__()
        self.layer, self.seen = layer, []

    def layers(self, ctx):
        return {self.layer}

    def observe(self, ctx, probs):
        self.seen.append((ctx.q_len, ctx.past_len, ctx.kv_len, int(ctx.image_mask_kv().sum()), probs.shape[-1]))


def test_methods_of_later_layers_see_the_compacted_sequence():
    model, inputs = _deep("llava")
    probe = Probe(3)
    with torch.no_grad(), attnkit.wrap(model, [EveryOther({2}), probe]) as handle:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        kept = handle.state.drops[-1][1].shape[1]
    n_image = int(get_adapter(model).image_mask(inputs["input_ids"]).sum())
    image_left = n_image - n_image // 2  # both rows: every other image token dropped
    assert probe.seen[0] == (kept, 0, kept, image_left, kept)
    assert probe.seen[1] == (1, kept, kept + 1, image_left, kept + 1)
    assert probe.seen[2] == (1, kept + 1, kept + 2, image_left, kept + 2)


def test_drop_errors():
    model, inputs = _deep("llava")

    class Uneven(EveryOther):
        def select(self, ctx, hidden):
            keep = super().select(ctx, hidden)
            if keep is not None:
                keep[0, -1] = False  # row 0 loses one more token
            return keep

    with pytest.raises(errors.MethodArgumentError, match="rows keep different numbers"), torch.no_grad():
        with attnkit.wrap(model, Uneven({2})):
            model(**inputs)
    qwen3, q_inputs = _deep("qwen3_vl")
    first = get_adapter(qwen3).first_droppable_layer
    assert first >= 1
    with pytest.raises(errors.MethodArgumentError, match="cannot drop tokens before layer"), torch.no_grad():
        with attnkit.wrap(qwen3, EveryOther({first - 1})):
            qwen3(**q_inputs)
    gemma, g_inputs = _deep("gemma3")  # sliding window 32 < this prompt
    window = gemma.config.text_config.sliding_window
    assert g_inputs["input_ids"].shape[1] >= window
    with pytest.raises(errors.UnsupportedModelError, match=f"sliding window \\({window} tokens"), torch.no_grad():
        with attnkit.wrap(gemma, EveryOther({1})):
            gemma.generate(**g_inputs, max_new_tokens=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        # the failed runs left the model clean
        with attnkit.wrap(model, EveryOther({2}, drop=False)):
            pass
        torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)


def test_flops_formula_by_hand():
    shape = LayerShape(hidden=8, heads=2, kv_heads=1, head_dim=4, mlp=16, gated=True)
    n = 10
    proj = 2 * n * 8 * (2 * 4) + 2 * 2 * n * 8 * 1 * 4 + 2 * n * (2 * 4) * 8  # q, k+v, o
    attn = 2 * (2 * 2 * 4 * n * n)
    mlp = 3 * 2 * n * 8 * 16
    assert layer_flops(n, shape) == proj + attn + mlp
    assert flops_ratio([10, 10, 5, 5], 10, shape) == pytest.approx(
        (2 * layer_flops(10, shape) + 2 * layer_flops(5, shape)) / (4 * layer_flops(10, shape))
    )
    assert flops_ratio([10, 10], 10, shape) == 1.0
