"""VisionZip and HiPrune on LLaVA-NeXT (anyres): per-crop counts through generate with left padding
(images of 5 and 3 crops, several images per row), the official layout (no unpadding, no newline
tokens; high-res patches read row-major across crops) against an independent computation from eager
vision attentions, no-op at full count, batch == rows alone, KV-cached generate == full
recomputation, one-line errors for unsupported configurations, remove() restores."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.methods import HiPrune, VisionZip
from attnkit.methods.hiprune import default_object_layer, hiprune_select
from attnkit.methods.vision_side import anyres_order
from attnkit.methods.visionzip import visionzip_merge

from .conftest import extend_inputs, greedy, logits
from .test_methods_visionzip import (
    LMInputs,
    check_cached_generate,
    hook_counts,
    recorded_greedy,
    suppressed_argmax,
    tiny,
)

N_CROP = 16  # tokens per crop in the tiny model (CLIP 32 px, patch 8: 4x4)
SIDE = 4



def image_features(out) -> torch.Tensor:
    """The projected image features a forward delivered, (N, D): ``image_hidden_states`` up to
    transformers 5.23, the per-image ``image_outputs.pooler_output`` from 5.24."""
    pooled = getattr(getattr(out, "image_outputs", None), "pooler_output", None)
    feats = pooled if pooled is not None else out.image_hidden_states
    return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats

def image_id(model) -> int:
    return int(model.config.image_token_id)


def mixed_inputs() -> dict:
    """Row 0: a 64x48 image (2x2 high-res crops + base = 5 crops, 70 placeholders); row 1: a 64x32 image
    (1x2 crops + base = 3 crops, 52 placeholders); left-padded."""
    images = testing.sample_images(1, size=(64, 48)) + testing.sample_images(1, size=(64, 32), seed=3)
    return testing.tiny_inputs("llava_next", images=images)


def multi_image_inputs() -> dict:
    """Row 0: two images (5 and 3 crops) back to back; row 1: one 5-crop image."""
    processor = testing.tiny_processor("llava_next")
    texts = ["USER: <image><image>\nAre they the same? ASSISTANT:", "USER: <image>\nIs there a dog? ASSISTANT:"]
    images = [
        testing.sample_images(1, size=(64, 48))[0],
        testing.sample_images(1, size=(64, 32), seed=3)[0],
        testing.sample_images(1, size=(48, 64), seed=5)[0],
    ]
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def crops_per_image(model, inputs) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pinpoints, tile = model.config.image_grid_pinpoints, model.config.vision_config.image_size
    return [image_size_to_num_patches(s, pinpoints, tile) for s in inputs["image_sizes"].tolist()]


def per_image_kept(method, crops: list[int]) -> list[int]:
    if isinstance(method, VisionZip):
        return [c * (method.config.dominant + method.config.contextual) for c in crops]
    return [c * (method.config.budget // c) for c in crops]  # HiPrune: budget // crops per crop


def row_images(inputs, r: int, image_rows: list[int]) -> dict:
    """Row r of a left-padded llava_next batch alone: its real tokens, its images and their sizes."""
    real = inputs["attention_mask"][r].bool()
    mine = [i for i, row in enumerate(image_rows) if row == r]
    out = {}
    for key, value in inputs.items():
        if key in ("pixel_values", "image_sizes"):
            out[key] = value[mine]
        elif isinstance(value, torch.Tensor) and value.shape[:2] == inputs["input_ids"].shape:
            out[key] = value[r][real][None]
        else:
            out[key] = value
    return out


METHODS = [
    lambda: VisionZip(dominant=3, contextual=2),
    lambda: VisionZip(dominant=6, contextual=0),
    lambda: HiPrune(budget=20, alpha=0.5),  # 4 per crop at 5 crops, 6 per crop at 3 crops
    lambda: HiPrune(budget=45, alpha=0.1),  # 9 / 15
]
METHOD_IDS = ["vz3+2", "vz6+0", "hp20", "hp45"]


# -- errors --------------------------------------------------------------------------------------


def _refused(model, method, error):
    with pytest.raises(error) as err:
        attnkit.wrap(model, method)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(method.name + ":")
    assert "pack_image_features" not in vars(model.model)
    with attnkit.wrap(model, []):  # left unwrapped: wrapping again works
        pass
    return msg


@pytest.mark.parametrize("make", [lambda: VisionZip(dominant=3, contextual=2), lambda: HiPrune(budget=20)])
def test_unsupported_configurations_one_line(make):
    model, _ = tiny("llava_next")
    cfg = model.config
    for attr, value, needle in (
        ("vision_feature_select_strategy", "full", "vision_feature_select_strategy='full'"),
        ("vision_feature_layer", [-2, -1], "several vision_feature_layer"),
    ):
        before = getattr(cfg, attr)
        setattr(cfg, attr, value)
        try:
            msg = _refused(model, make(), errors.UnsupportedModelError)
        finally:
            setattr(cfg, attr, before)
        assert "llava_next" in msg and needle in msg


def test_hiprune_budget_per_crop_refused_at_wrap():
    model, _ = tiny("llava_next")  # pinpoints give images of 3 or 5 crops
    msg = _refused(model, HiPrune(budget=4), errors.MethodArgumentError)
    assert "budget=4" in msg and "5 crops" in msg
    # budget 15, alpha 1: 3 anchors fit 15 tokens, but at 5 crops each crop gets 3 tokens and 1 anchor (+4 buffers)
    msg = _refused(model, HiPrune(budget=15, alpha=1.0), errors.MethodArgumentError)
    assert "per-crop budget (5 crops)=3" in msg


def test_defaults_for_llava_next():
    assert default_object_layer(24) == 9  # official bench_llava_next.sh
    model, inputs = tiny("llava_next")
    method = HiPrune()
    with attnkit.wrap(model, method):
        assert method.budget == 640  # official HIPRUNE_RETENTION for LLaVA-NeXT: 128 per crop at 5 crops
        logits(model, inputs)
    assert method.report.flops_ratio == 1.0  # 128 >= 16 tokens per tiny crop: nothing pruned
    llava, _ = tiny("llava")
    method = HiPrune()
    with attnkit.wrap(llava, method):
        assert method.budget == 192  # LLaVA-1.5's default is unchanged


def test_inputs_the_method_cannot_follow():
    model, inputs = tiny("llava_next")
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with attnkit.wrap(model, VisionZip(dominant=3, contextual=2)):
        with pytest.raises(errors.InputError) as err:  # features packed before the wrap: full counts
            model(**text, mm_encoder_outputs={"image": encoded})
        assert "\n" not in str(err.value) and "mm_encoder_outputs" in str(err.value)
        with pytest.raises(errors.InputError) as err:
            model(**text, pixel_values=inputs["pixel_values"])
        assert "\n" not in str(err.value) and "image_sizes" in str(err.value)


# -- no-op at full count --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: VisionZip(dominant=N_CROP, contextual=0), lambda: VisionZip(dominant=10, contextual=9),
     lambda: HiPrune(budget=80), lambda: HiPrune(budget=60)],  # fmt: skip
    ids=["vz16+0", "vz10+9", "hp80", "hp60"],
)
def test_full_count_equals_unwrapped(make):
    """Every crop keeps all its tokens: the model is unchanged (transformers' own unpadding and newlines).
    HiPrune(budget=60) prunes 5-crop images (12 per crop) but not 3-crop ones (20 per crop): on a batch of
    3-crop images the shadowed pack_image_features hands them to the model's own packing."""
    model, _ = tiny("llava_next")
    images = testing.sample_images(2, size=(64, 32))  # 3 crops each
    inputs = testing.tiny_inputs("llava_next", images=images)
    assert crops_per_image(model, inputs) == [3, 3]
    ref_logits, ref_tokens = logits(model, inputs), greedy(model, inputs)
    method = make()
    with attnkit.wrap(model, method):
        assert ("pack_image_features" in vars(model.model)) == (isinstance(method, HiPrune) and method.budget == 60)
        torch.testing.assert_close(logits(model, inputs), ref_logits, atol=1e-5, rtol=0)
        assert torch.equal(greedy(model, inputs), ref_tokens)
        assert method.report.flops_ratio == 1.0


# -- counts, batch == rows, cached == recomputed -------------------------------------------------------


@pytest.mark.parametrize("make", METHODS, ids=METHOD_IDS)
def test_counts_through_generate_and_batch_equals_rows(make):
    model, _ = tiny("llava_next")
    inputs = mixed_inputs()
    crops = crops_per_image(model, inputs)
    assert crops == [5, 3]
    method = make()
    kept = per_image_kept(method, crops)
    full = (inputs["input_ids"] == image_id(model)).sum(1)
    assert full.tolist() == [70, 52]
    seq = inputs["input_ids"].shape[1]
    with attnkit.wrap(model, method):
        rec = LMInputs(model)
        try:
            out = model(**inputs)
            tokens = greedy(model, inputs, n=6)
        finally:
            rec.remove()
        assert image_features(out).shape[0] == sum(kept)  # features delivered == placeholders kept
        # forward and generate's prefill: exactly the kept placeholders per row, left padding kept
        for ids in (rec.ids[0], rec.ids[1]):
            assert (ids == image_id(model)).sum(1).tolist() == kept
        width = max(seq - int(f) + k for f, k in zip(full, kept))  # the row that drops least sets the width
        assert rec.ids[1].shape[1] == width
        real = [int(n) - int(f) + k for n, f, k in zip(inputs["attention_mask"].sum(1), full, kept)]
        pads = [width - n for n in real]  # the pruned batch is left-padded again
        for r in range(2):
            assert rec.masks[1][r, : pads[r]].sum() == 0 and bool(rec.masks[1][r, pads[r] :].all())
        for step, mask in enumerate(rec.masks[2:], start=1):  # every decode step: a mask over the pruned prompt
            assert mask.shape[1] == width + step
        rep = method.report
        assert rep.image_tokens == 70 and rep.full_tokens == seq and rep.image_kept_per_layer[0] == max(kept)
        batch_logits = logits(model, inputs)
        for r in range(2):
            alone = row_images(inputs, r, [0, 1])
            assert torch.equal(greedy(model, alone, n=6)[0], tokens[r])
            torch.testing.assert_close(logits(model, alone)[0, -1], batch_logits[r, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("make", METHODS[::2], ids=METHOD_IDS[::2])
def test_cached_generate_equals_full_recomputation(make):
    model, _ = tiny("llava_next")
    check_cached_generate(model, mixed_inputs(), make())


@pytest.mark.parametrize("make", [METHODS[0], METHODS[2]], ids=[METHOD_IDS[0], METHOD_IDS[2]])
def test_several_images_per_row(make):
    """Back-to-back images of 5 and 3 crops in row 0, one image in row 1: the placeholder run is cut per
    image, each keeps its own count; batch == rows alone, cached == recomputed."""
    model, _ = tiny("llava_next")
    inputs = multi_image_inputs()
    crops = crops_per_image(model, inputs)
    assert crops == [5, 3, 5]
    method = make()
    kept = per_image_kept(method, crops)
    with attnkit.wrap(model, method):
        rec, tokens = recorded_greedy(model, inputs, n=5)
        assert (rec.ids[0] == image_id(model)).sum(1).tolist() == [kept[0] + kept[1], kept[2]]
        batch_logits = logits(model, inputs)
        for r in range(2):
            alone = row_images(inputs, r, [0, 0, 1])
            assert torch.equal(greedy(model, alone, n=5)[0], tokens[r])
            torch.testing.assert_close(logits(model, alone)[0, -1], batch_logits[r, -1], atol=1e-4, rtol=0)
        for i in range(5):
            full = logits(model, extend_inputs(inputs, tokens[:, :i]))
            assert torch.equal(suppressed_argmax(model, full[:, -1]), tokens[:, i]), i


# -- the layout and the selection ----------------------------------------------------------------------


def test_anyres_order_by_hand():
    # 1 x 2 crops of 2 x 2 patches: the high-res grid is 2 rows x 4 columns
    #   crop 0 keeps patches 1 (row 0, col 1) and 2 (row 1, col 0)
    #   crop 1 keeps patches 0 (row 0, col 2) and 3 (row 1, col 3)
    grid = torch.tensor([[1, 2], [0, 3]])
    # row-major: (0,1)=crop0 slot0, (0,2)=crop1 slot0, (1,0)=crop0 slot1, (1,3)=crop1 slot1
    assert anyres_order(grid, rows=1, cols=2, side=2).tolist() == [0, 2, 1, 3]
    # 2 x 2 crops of 2 x 2 patches (4 x 4 grid), one kept patch per crop
    #   crop 0: patch 3 -> (1,1); crop 1: patch 0 -> (0,2); crop 2: patch 1 -> (2,1); crop 3: patch 2 -> (3,2)
    grid = torch.tensor([[3], [0], [1], [2]])
    assert anyres_order(grid, rows=2, cols=2, side=2).tolist() == [1, 0, 2, 3]


def reference_model():
    model, _ = testing.tiny_model("llava_next", seed=0)
    model.model.vision_tower.set_attn_implementation("eager")
    return model


def eager_crops(ref, inputs, crops: list[int], layers: list[int]):
    """Feature-layer states (C, 1+N, D) and, per layer, attentions (C, H, S, S) and head-mean keys of every crop."""
    tower = ref.model.vision_tower
    pixels = torch.cat([pv[:c] for pv, c in zip(inputs["pixel_values"], crops)])
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
        keys = {}
        for layer in layers:
            enc = tower.encoder.layers[layer]
            normed = enc.layer_norm1(out.hidden_states[layer])
            keys[layer] = enc.self_attn.k_proj(normed).view(*normed.shape[:2], enc.self_attn.num_heads, -1).mean(2)
    return out.hidden_states[-2], out.attentions, keys


def hand_layout(projected, grid, rows, cols, lead):
    """Base crop as is; then each high-res crop's grid tokens placed on the (rows*SIDE) x (cols*SIDE) grid
    and read row by row; then every high-res crop's first `lead` tokens; then the rest, crop by crop."""
    g = grid.shape[1]
    placed = {}
    for crop in range(1, projected.shape[0]):
        cr, cc = divmod(crop - 1, cols)
        for slot, p in enumerate(grid[crop].tolist()):
            pr, pc = divmod(p, SIDE)
            placed[(cr * SIDE + pr, cc * SIDE + pc)] = projected[crop, lead + slot]
    parts = [projected[0]] + [placed[key][None] for key in sorted(placed)]
    parts += [projected[crop, :lead] for crop in range(1, projected.shape[0])]
    parts += [projected[crop, lead + g :] for crop in range(1, projected.shape[0])]
    return torch.cat(parts)


@pytest.mark.parametrize("dominant,contextual", [(4, 3), (5, 0)])
def test_visionzip_selection_against_eager_attention(dominant, contextual):
    model, _ = tiny("llava_next")
    inputs = mixed_inputs()
    crops = crops_per_image(model, inputs)
    with attnkit.wrap(model, VisionZip(dominant=dominant, contextual=contextual)):
        with torch.no_grad():
            got = image_features(model(**inputs))
    ref = reference_model()
    states, attn, keys = eager_crops(ref, inputs, crops, [0])  # hidden_states[-2] = output of layer 0 of 2
    cls_attn = attn[0][:, :, 0, 1:].sum(1)  # [CLS] row, summed over heads (official clip_encoder.py)
    expected, start = [], 0
    for c, size in zip(crops, inputs["image_sizes"].tolist()):
        sl = slice(start, start + c)
        start += c
        top = cls_attn[sl].topk(dominant - 1, dim=1).indices.sort(1).values
        merged = visionzip_merge(
            states[sl, 1:], cls_attn[sl], keys[0][sl, 1:], dominant - 1, contextual, cls=states[sl, 0]
        )
        with torch.no_grad():
            projected = ref.model.multi_modal_projector(merged)
        rows, cols = {5: (2, 2), 3: (1, 2)}[c]  # 64x48 -> 64x64 pinpoint (2x2 crops); 64x32 -> 32x64 (1x2)
        assert projected.shape == (c, dominant + contextual, 32)
        expected.append(hand_layout(projected, top, rows, cols, lead=1))
    expected = torch.cat(expected)
    assert got.shape == expected.shape == (sum(crops) * (dominant + contextual), 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget,alpha,object_layer", [(30, 0.9, None), (45, 0.5, 2)])
def test_hiprune_selection_against_eager_attention(budget, alpha, object_layer):
    model, _ = tiny("llava_next")
    inputs = mixed_inputs()
    crops = crops_per_image(model, inputs)
    with attnkit.wrap(model, HiPrune(budget=budget, alpha=alpha, object_layer=object_layer)):
        with torch.no_grad():
            got = image_features(model(**inputs))
    ref = reference_model()
    obj = 0 if object_layer is None else object_layer - 1  # default: round(9 * 2 / 24) = 1 (1-based)
    states, attn, _ = eager_crops(ref, inputs, crops, [0])
    glob = lambda a: a.mean(1).mean(1)[:, 1:]  # noqa: E731  "global" attention, [CLS] column left out
    expected, start = [], 0
    for c in crops:
        sl = slice(start, start + c)
        start += c
        keep = budget // c  # the official int(HIPRUNE_RETENTION / crops)
        idx = hiprune_select(glob(attn[obj][sl]), glob(attn[0][sl]), keep, alpha, width=SIDE)
        assert idx.shape == (c, keep)
        # the top object-layer token of every crop is kept with its in-crop neighbours (+-1, +-4, clamped)
        for crop in range(c):
            a = int(glob(attn[obj][sl])[crop].argmax())
            if keep >= 5:
                assert {max(0, a - 1), min(15, a + 1), max(0, a - 4), min(15, a + 4), a} <= set(idx[crop].tolist())
        with torch.no_grad():
            projected = ref.model.multi_modal_projector(states[sl, 1:].gather(1, idx[..., None].expand(-1, -1, 32)))
        rows, cols = {5: (2, 2), 3: (1, 2)}[c]
        expected.append(hand_layout(projected, idx, rows, cols, lead=0))
    expected = torch.cat(expected)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# -- remove() --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [METHODS[0], METHODS[2]], ids=[METHOD_IDS[0], METHOD_IDS[2]])
def test_remove_restores_exact_original(make):
    model, inputs = tiny("llava_next")
    before_logits, before_tokens, before_hooks = logits(model, inputs), greedy(model, inputs), hook_counts(model)
    handle = attnkit.wrap(model, make())
    assert "pack_image_features" in vars(model.model)
    greedy(model, inputs)
    handle.remove()
    assert "pack_image_features" not in vars(model.model)
    assert hook_counts(model) == before_hooks
    assert torch.equal(logits(model, inputs), before_logits)
    assert torch.equal(greedy(model, inputs), before_tokens)
