"""The adapters' public API for what others need (padding id, left-pad compaction, the processor's batch,
the vision encoder -> image tokens path, anyres packing), and the vision-side pruners' hooks owned by the
handle: listed under handle.hooks() with the method as owner, all gone after remove()."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.eval.inputs import make_batch
from attnkit.methods import HiPrune, VisionZip
from attnkit.methods.vision_side import SUPPORTED_FAMILIES
from attnkit.models import ADAPTERS, Adapter, AnyresImage, adapter_class, compact_left, gather_left, get_adapter

from .conftest import logits
from .test_methods_visionzip import tiny


# -- padding id and left-pad compaction ----------------------------------------------------------


def test_pad_id_order_of_configs():
    model, _ = tiny("llava")
    adapter = get_adapter(model)
    gen, text = model.generation_config, adapter.text_config
    saved = gen.pad_token_id, text.pad_token_id
    assert getattr(model.config, "pad_token_id", None) is None
    try:
        gen.pad_token_id, text.pad_token_id = 5, 7
        assert adapter.pad_id == 5  # the generation config first
        gen.pad_token_id = None
        assert adapter.pad_id == 7  # then the text config
        text.pad_token_id = None
        assert adapter.pad_id == 0  # none anywhere
    finally:
        gen.pad_token_id, text.pad_token_id = saved
    assert not hasattr(Adapter, "_pad_id")


def test_compact_left_by_hand():
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    index = compact_left(keep)
    assert index.tolist() == [[0, 2, 3], [-1, -1, 1], [-1, -1, -1]]
    assert compact_left(keep, width=4).tolist() == [[-1, 0, 2, 3], [-1, -1, -1, 1], [-1, -1, -1, -1]]
    with pytest.raises(ValueError):
        compact_left(keep, width=2)
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    assert gather_left(ids, index, 0).tolist() == [[10, 12, 13], [0, 0, 21], [0, 0, 0]]
    # extra dimensions (embeddings) are carried along, filled whole
    emb = torch.arange(24.0).view(3, 4, 2)
    out = gather_left(emb, index, -1.0)
    assert out.shape == (3, 3, 2)
    assert out[0].tolist() == [[0.0, 1.0], [4.0, 5.0], [6.0, 7.0]]
    assert out[1].tolist() == [[-1.0, -1.0], [-1.0, -1.0], [10.0, 11.0]]


def test_instructblip_left_pad_batch_by_hand():
    cls = adapter_class("instructblip")
    # [query][pad][text] -> [pad][query][text]
    batch = {
        "input_ids": torch.tensor([[9, 9, 0, 0, 5, 6], [9, 9, 4, 5, 6, 7]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]]),
        "qformer_input_ids": torch.tensor([[3, 0], [3, 4]]),
    }
    out = cls.left_pad_batch(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 0, 9, 9, 5, 6], [9, 9, 4, 5, 6, 7]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert out["qformer_input_ids"] is batch["qformer_input_ids"]  # the Q-Former's text stays right-padded
    assert adapter_class("llava").left_pad_batch(batch, pad_id=0) is batch  # other processors pad on the left


def test_make_batch_takes_adapter_class_or_family():
    processor = testing.tiny_processor("instructblip")
    images = testing.sample_images(2)
    questions = ["Is there a dog?", "What colour is the large shape in the picture?"]
    by_name = make_batch(processor, "instructblip", questions, images)
    by_class = make_batch(processor, adapter_class("instructblip"), questions, images)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(by_name[key], by_class[key])
    mask = by_name["attention_mask"]
    assert torch.equal(mask, mask.sort(dim=1).values)  # truly left-padded
    with pytest.raises(errors.UnsupportedModelError):
        adapter_class("no_such_family")


# -- vision features -----------------------------------------------------------------------------


def test_supported_families_come_from_the_adapters():
    assert SUPPORTED_FAMILIES == tuple(a.family for a in ADAPTERS if a.describes_vision_features)
    assert set(SUPPORTED_FAMILIES) == {"llava", "llava_next", "gemma3"}
    assert VisionZip.families == HiPrune.families == SUPPORTED_FAMILIES


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "instructblip"])
def test_vision_features_undescribed_family_raises(family):
    model, _ = tiny(family)
    adapter = get_adapter(model)
    assert not adapter.describes_vision_features
    for call in (adapter.vision_features, lambda: adapter.anyres_images([[32, 32]])):
        with pytest.raises(errors.UnsupportedModelError) as err:
            call()
        assert family in str(err.value) and "\n" not in str(err.value)
    assert adapter.projector_input() is None


def test_vision_features_llava():
    model, _ = tiny("llava")
    adapter = get_adapter(model)
    vf = adapter.vision_features()
    (tower_layers,) = [m for n, m in model.model.vision_tower.named_modules() if n.endswith("encoder.layers")]
    assert list(vf.layers) == list(tower_layers) and len(vf.layers) == 2
    # vision_feature_layer -2 of 2 layers: the output of layer 0; CLIP [CLS]; 32 px / patch 8 = 4 x 4
    assert (vf.feature_layer, vf.has_cls, vf.side, vf.pool, vf.tokens, vf.anyres) == (0, True, 4, 1, 16, False)
    assert adapter.projector_input() is model.model.multi_modal_projector
    pixels = testing.tiny_inputs("llava")["pixel_values"]
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True)
    states = adapter.vision_feature_states(out)
    assert torch.equal(states, out.hidden_states[-2]) and states.shape[1] == 1 + vf.tokens


def test_vision_features_gemma3():
    model, _ = tiny("gemma3")
    adapter = get_adapter(model)
    vf = adapter.vision_features()
    vcfg = model.config.vision_config
    assert vf.feature_layer == len(vf.layers) - 1 and not vf.has_cls and not vf.anyres
    assert vf.tokens == model.config.mm_tokens_per_image
    assert vf.side * vf.pool == vcfg.image_size // vcfg.patch_size
    assert adapter.projector_input() is model.model.multi_modal_projector.mm_soft_emb_norm
    assert adapter.vision_feature_states(object()) is None


def test_vision_attention_matches_eager():
    model, inputs = testing.tiny_model("llava", seed=0)
    adapter = get_adapter(model)
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    layer = adapter.vision_encoder_layers()[0]
    seen = {}
    def hook(module, args, kwargs):
        seen["pk"] = adapter.vision_attention(module, args, kwargs)

    h = layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_attentions=True)
    finally:
        h.remove()
    probs, keys = seen["pk"]
    torch.testing.assert_close(probs, out.attentions[0].float(), atol=1e-5, rtol=0)
    assert keys.shape[:3] == probs.shape[:3]


def test_vision_features_llava_next_and_anyres_images():
    model, _ = tiny("llava_next")
    adapter = get_adapter(model)
    vf = adapter.vision_features()
    tile = model.config.vision_config.image_size
    expected = sorted({1 + (h // tile) * (w // tile) for h, w in model.config.image_grid_pinpoints})
    assert vf.anyres and list(vf.crop_counts) == expected and vf.has_cls and vf.tokens == 16
    assert adapter.projector_input() is None
    # a 64x48 image: base + 2x2 crops, 70 placeholders; a 64x32 image: base + 1x2 crops, 52 placeholders
    images = testing.sample_images(1, size=(64, 48)) + testing.sample_images(1, size=(64, 32), seed=3)
    inputs = testing.tiny_inputs("llava_next", images=images)
    got = adapter.anyres_images(inputs["image_sizes"])
    assert got == [AnyresImage(5, 2, 2, 70), AnyresImage(3, 1, 2, 52)]
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [im.tokens for im in got]
    assert adapter.anyres_images(inputs["image_sizes"].tolist()) == got  # a list of sizes works too


def test_pack_crops_by_hand():
    model, _ = tiny("llava_next")
    adapter = get_adapter(model)
    side = adapter.vision_features().side  # 4
    # an image of base + 1x2 crops, each crop reduced to [lead] + 2 grid patches + 1 trailing token
    image = AnyresImage(3, 1, 2, 0)
    dim = 2
    tokens = torch.arange(3 * 4 * dim, dtype=torch.float).view(3, 4, dim)
    grid = torch.tensor([[0, 5], [1, 4], [0, 7]])  # crop 1: (0,1),(1,0); crop 2: (0,0)->(0,4), (1,3)->(1,7)
    out = adapter.pack_crops(tokens, grid, 1, image)
    t = lambda c, k: tokens[c, k].tolist()  # noqa: E731
    expected = [t(0, 0), t(0, 1), t(0, 2), t(0, 3)]  # the base crop as it is
    expected += [t(1, 1), t(2, 1), t(1, 2), t(2, 2)]  # grid patches row-major: (0,1) (0,4) (1,0) (1,7)
    expected += [t(1, 0), t(2, 0)]  # the high-res crops' lead tokens
    expected += [t(1, 3), t(2, 3)]  # then their trailing tokens
    assert side == 4 and out.tolist() == expected


def test_anyres_packing_stand_in_defers_to_the_model():
    model, _ = tiny("llava_next")
    adapter = get_adapter(model)
    images = testing.sample_images(1, size=(64, 48)) + testing.sample_images(1, size=(64, 32), seed=3)
    inputs = testing.tiny_inputs("llava_next", images=images)
    ref = logits(model, inputs)
    calls = []

    def pack_images(imgs, feats):
        calls.append(([im.crops for im in imgs], [tuple(f.shape[:2]) for f in feats]))
        return [None] * len(imgs)

    obj, name, fn = adapter.anyres_packing(pack_images)
    assert obj is model.model and name == "pack_image_features"
    setattr(obj, name, fn)
    try:
        with pytest.raises(errors.UnsupportedModelError):  # one replacement at a time
            adapter.anyres_packing(pack_images)
        got = logits(model, inputs)
    finally:
        delattr(obj, name)
    assert calls and calls[0] == ([5, 3], [(5, 16), (3, 16)])
    assert torch.equal(got, ref)


# -- hooks owned by the handle -------------------------------------------------------------------


def _hook_dicts(model) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_visionzip_hooks_are_the_handles(family):
    model, inputs = tiny(family)
    logits(model, inputs)  # transformers adds its own output-recording hooks on a first forward
    before = _hook_dicts(model)
    method = VisionZip(dominant=2, contextual=1)
    handle = attnkit.wrap(model, method)
    try:
        mine = [(mod, kind) for owner, mod, kind in handle.hooks() if owner is method]
        adapter = handle.adapter
        plan = adapter.vision_features()
        expected = [(plan.layers[plan.feature_layer].self_attn, "pre")]
        if plan.has_cls:
            expected.append((adapter.vision_tower(), "post"))
        expected += [(adapter.projector_input(), "pre"), (model, "pre")]
        assert [(id(m), k) for m, k in mine] == [(id(m), k) for m, k in expected]
        # the method's pre-hook on the model comes before the handle's own (it rewrites the inputs first)
        on_model = [owner for owner, mod, kind in handle.hooks() if mod is model and kind == "pre"]
        assert on_model[0] is method and None in on_model[1:]
        # every hook the handle lists is really on its module, and nothing else was added
        added = sum(sum(v) for v in _hook_dicts(model).values()) - sum(sum(v) for v in before.values())
        assert added == len(handle.hooks())
        logits(model, inputs)
    finally:
        handle.remove()
    assert handle.hooks() == []
    assert _hook_dicts(model) == before
    for name, mod in model.named_modules():
        if before[name] == (0, 0):
            assert not mod._forward_pre_hooks and not mod._forward_hooks, name


@pytest.mark.parametrize("make", [lambda: VisionZip(dominant=3, contextual=2), lambda: HiPrune(budget=20)])
def test_anyres_stand_in_is_a_handle_attribute(make):
    model, inputs = tiny("llava_next")
    logits(model, inputs)  # transformers adds its own output-recording hooks on a first forward
    before = _hook_dicts(model)
    method = make()
    with attnkit.wrap(model, method) as handle:
        assert "pack_image_features" in vars(model.model)
        assert all(owner is method for owner, _, _ in handle.hooks() if owner is not None)
        assert any(owner is method for owner, _, _ in handle.hooks())
        method.detach()  # detach() no longer removes anything: the handle does
        assert "pack_image_features" in vars(model.model)
    assert "pack_image_features" not in vars(model.model)
    assert _hook_dicts(model) == before
