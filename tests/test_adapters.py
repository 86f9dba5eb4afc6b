"""Adapters find exactly the image positions the model itself fills with image features."""

from __future__ import annotations

import torch

import attnkit
from attnkit import testing
from attnkit.models import get_adapter


def _feature_positions(model, inputs) -> torch.Tensor:
    """(B, S) bool: where the model's own merge put image features into the language-model input.

    Independent of the adapter: compares the embeddings the decoder receives with the plain token
    embeddings of input_ids (random image features never coincide with them).
    """
    captured = {}

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    h = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    with torch.no_grad():
        plain = model.get_input_embeddings()(inputs["input_ids"])
    return (captured["embeds"] - plain).abs().amax(-1) > 1e-6


def test_image_positions_match_the_models_merge(tiny, family):
    model, inputs = tiny
    adapter = get_adapter(model)
    assert adapter.family == family
    expected = _feature_positions(model, inputs)
    got = adapter.image_mask(inputs["input_ids"])
    assert torch.equal(got, expected)
    for r, pos in enumerate(adapter.image_positions(inputs["input_ids"])):
        assert pos.numel() > 0
        assert torch.equal(pos, expected[r].nonzero().flatten())
        assert torch.equal(pos, (inputs["input_ids"][r] == model.config.image_token_id).nonzero().flatten())


def test_wrapper_tokens_around_each_image(tiny, family):
    """Families with start/end tokens: they sit right before/after every image run."""
    model, inputs = tiny
    adapter = get_adapter(model)
    ids = testing.multimodal_token_ids(family)
    start_key = {"qwen2_vl": "vision_start", "qwen2_5_vl": "vision_start", "qwen3_vl": "vision_start",
                 "internvl": "image_start", "gemma3": "boi", "idefics3": "global_image"}.get(family)
    end_key = {"qwen2_vl": "vision_end", "qwen2_5_vl": "vision_end", "qwen3_vl": "vision_end",
               "internvl": "image_end", "gemma3": "eoi", "idefics3": "fake_image"}.get(family)
    for r, runs in enumerate(adapter.image_spans(inputs["input_ids"])):
        row = inputs["input_ids"][r]
        for start, end in runs:
            if start_key is None:
                assert adapter.wrap_before == adapter.wrap_after == 0
                continue
            before = int(row[start - 1])
            if family == "idefics3":  # a split image's tiles start with <row_i_col_j> instead
                tile_ids = {v for k, v in ids.items() if k.startswith("row_")}
                assert before == ids[start_key] or before in tile_ids
                assert int(row[start - 2]) == ids["fake_image"]
            else:
                assert before == ids[start_key]
            assert int(row[end]) == ids[end_key]


def test_text_only_inputs_drop_every_image_token(tiny, family):
    model, inputs = tiny
    adapter = get_adapter(model)
    text = adapter.text_only_inputs(inputs)
    special = set(testing.multimodal_token_ids(family).values())
    valid = text["attention_mask"].bool()
    assert not any(int(t) in special for t in text["input_ids"][valid])
    assert not (text["attention_mask"][:, -1] == 0).any(), "left padding"
    for r in range(inputs["input_ids"].shape[0]):
        before = [int(t) for t in inputs["input_ids"][r][inputs["attention_mask"][r].bool()] if int(t) not in special]
        assert [int(t) for t in text["input_ids"][r][valid[r]]] == before
    with torch.no_grad():
        out = adapter.text_only_model()(**text)
    assert out.logits.shape[:2] == text["input_ids"].shape


def test_image_grids_cover_image_positions(tiny, family):
    model, inputs = tiny
    adapter = get_adapter(model)
    grids = adapter.image_grids(inputs)
    if family == "instructblip":
        assert grids is None
        return
    for r, row_grids in enumerate(grids):
        covered = torch.cat([g.positions().flatten() for g in row_grids])
        pos = adapter.image_positions(inputs["input_ids"])[r]
        assert set(covered.tolist()) <= set(pos.tolist())
        if family not in ("llava_next", "llava_onevision"):  # newline tokens are image tokens without a cell
            assert sorted(covered.tolist()) == pos.tolist()
        for g in row_grids:
            assert g.rows > 0 and g.cols > 0


def test_geometry_and_vision_tower(tiny):
    model, _ = tiny
    adapter = get_adapter(model)
    cfg = model.config.get_text_config()
    assert adapter.num_layers == cfg.num_hidden_layers
    assert adapter.num_heads == cfg.num_attention_heads
    assert [a.layer_idx for a in adapter.attention_modules()] == list(range(adapter.num_layers))
    tower = adapter.vision_tower()
    assert any(p is next(iter(tower.parameters())) for p in model.parameters())
    assert len(adapter.vision_attention_modules()) >= 1
    with attnkit.wrap(model, []) as h:
        assert h.ctx.num_kv_heads == adapter.num_kv_heads


def test_multi_image_rows(family):
    """Two images in one row, one in the other: one run (or tile runs) per image, positions exact."""
    if family == "instructblip":
        return  # one image per prompt by design (Q-Former queries)
    model, _ = testing.tiny_model(family)
    processor = testing.tiny_processor(family)
    a, b, c = testing.sample_images(3)
    rows = [[{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What differs between these?"}],
            [{"type": "image"}, {"type": "text", "text": "Is there a cat?"}]]
    texts = [processor.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True,
                                           tokenize=False) for r in rows]
    inputs = dict(processor(text=texts, images=[[a, b], [c]], padding=True, return_tensors="pt"))
    adapter = get_adapter(model)
    assert torch.equal(adapter.image_mask(inputs["input_ids"]), _feature_positions(model, inputs))
    spans = adapter.image_spans(inputs["input_ids"], inputs)
    assert len(spans[0]) >= 2 and len(spans[0]) == 2 * len(spans[1])
    grids = adapter.image_grids(inputs)
    # OneVision gives a multi-image row base grids only, a single image its high-res grid too
    assert len(grids[0]) == 2 * len(grids[1]) or (family == "llava_onevision" and len(grids[0]) == 2)
    for r, row_grids in enumerate(grids):
        covered = torch.cat([g.positions().flatten() for g in row_grids]).tolist()
        assert len(set(covered)) == len(covered)
        assert set(covered) <= set(adapter.image_positions(inputs["input_ids"])[r].tolist())


def test_rotary_embeddings_are_what_each_layer_receives(tiny, family):
    """For 1-D RoPE families, adapter.rotary_embeddings(layer, ...) gives back the (cos, sin) each decoder
    layer receives (what pruning's positions="official" recomputes at shifted positions); Gemma3's
    sliding and full-attention layers differ."""
    model, inputs = tiny
    adapter = get_adapter(model)
    if not adapter.positions_1d:
        assert family.startswith("qwen")
        return
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden, kwargs["position_ids"], kwargs["position_embeddings"]))

    hooks = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in adapter.decoder_layers()]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == adapter.num_layers
    for layer, (hidden, ids, (cos, sin)) in enumerate(seen):
        got_cos, got_sin = adapter.rotary_embeddings(layer, hidden, ids)
        assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin), f"layer {layer}"
        shifted = adapter.rotary_embeddings(layer, hidden, ids + 3)[0]
        assert not torch.equal(shifted, cos)
