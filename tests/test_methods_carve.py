"""CARVE (attnkit.methods.carve): the array helpers on hand-made arrays, the contrast on tiny models with an
attention pattern pinned by a test method, and answer() end to end (unwrapped afterwards, also on error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import attnkit
from attnkit import testing
from attnkit.eval.inputs import make_batch
from attnkit.hooks import dispatch
from attnkit.methods import Method, carve

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

FAMILIES = ("llava", "qwen2_vl")


# -- array helpers ----------------------------------------------------------------------------------
def test_default_layers_scale_the_official_range():
    assert carve.default_layers(28) == (20, 21, 22, 23, 24, 25)
    assert carve.default_layers(32) == tuple(range(23, 30))
    assert carve.default_layers(4) == (3,)
    assert carve.default_layers(2) == (1,)


def test_label_regions_known_blobs():
    mask = np.array(
        [
            [1, 0, 1, 0, 0, 0],
            [1, 0, 1, 0, 0, 1],
            [1, 1, 1, 0, 1, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 1],
        ],
        dtype=bool,
    )
    labels, n = carve.label_regions(mask, 4)
    expected = np.array(
        [
            [1, 0, 1, 0, 0, 0],  # a U: its two arms meet only in row 2 (the union of two runs)
            [1, 0, 1, 0, 0, 2],
            [1, 1, 1, 0, 3, 0],  # touches 2 by a corner only
            [0, 0, 0, 0, 0, 0],
            [0, 4, 4, 0, 0, 5],
        ]
    )
    assert n == 5
    np.testing.assert_array_equal(labels, expected)
    assert carve.region_boxes(labels, n) == [(0, 0, 3, 3), (5, 1, 6, 2), (4, 2, 5, 3), (1, 4, 3, 5), (5, 4, 6, 5)]
    labels8, n8 = carve.label_regions(mask, 8)
    assert n8 == 4 and labels8[1, 5] == labels8[2, 4] == 2
    empty, n0 = carve.label_regions(np.zeros((3, 4), bool))
    assert n0 == 0 and not empty.any()
    with pytest.raises(ValueError):
        carve.label_regions(mask, 6)


def _blobs(shape, blobs):
    """A float map holding each (x0, y0, x1, y1, value) blob on 0."""
    out = np.zeros(shape)
    for x0, y0, x1, y1, v in blobs:
        out[y0:y1, x0:x1] = v
    return out


def test_top_ratio_threshold_keeps_the_top_pixels():
    contrast = np.arange(100, dtype=float).reshape(10, 10)  # distinct values: rows 8..9 are the top 20 %
    r = carve.select_regions(contrast, top_ratio=0.2, min_regions=1)
    assert r.mask.sum() == 20 and r.mask[8:].all() and not r.mask[:8].any()
    assert r.found == 1 and r.boxes == [(0, 8, 10, 10)] and r.box == (0, 8, 10, 10)
    r = carve.select_regions(contrast, top_ratio=0.5, min_regions=1)
    assert r.mask.sum() == 50 and r.box == (0, 5, 10, 10)


def test_min_regions_keeps_the_largest():
    # five blobs of one value (20 % of the pixels are exactly the blobs' pixels)
    blobs = [(0, 0, 4, 4, 1.0), (10, 0, 13, 3, 1.0), (0, 10, 2, 12, 1.0), (10, 10, 15, 15, 1.0), (6, 6, 7, 7, 1.0)]
    contrast = _blobs((20, 20), blobs)
    assert (contrast > 0).sum() == 55
    r = carve.select_regions(contrast, top_ratio=55 / 400, min_regions=3, rank="size")
    assert r.found == 5
    assert r.boxes == [(10, 10, 15, 15), (0, 0, 4, 4), (10, 0, 13, 3)]  # 25, 16, 9 pixels; not 4 and 1
    assert r.mask.sum() == 50 and r.box == (0, 0, 15, 15)
    # ranked by summed contrast (the official default): the small bright blob beats the large dim one
    contrast = _blobs((20, 20), [(0, 0, 4, 4, 1.0), (10, 10, 15, 15, 0.5), (6, 6, 7, 7, 100.0), (0, 10, 2, 12, 0.1)])
    r = carve.select_regions(contrast, top_ratio=(16 + 25 + 1 + 4) / 400, min_regions=2)
    assert r.found == 4 and r.boxes == [(6, 6, 7, 7), (0, 0, 4, 4)] and r.box == (0, 0, 7, 7)
    # fewer regions than min_regions: all of them
    r = carve.select_regions(_blobs((20, 20), blobs[:2]), top_ratio=25 / 400, min_regions=3)
    assert r.found == 2 and len(r.boxes) == 2 and r.box == (0, 0, 13, 4)


def test_more_regions_than_min_keep_top_ratio_of_them():
    blobs = [(2 * k, 0, 2 * k + 1, 1, 1.0 + k) for k in range(10)]  # ten 1-pixel blobs in row 0
    contrast = _blobs((10, 20), blobs)
    r = carve.select_regions(contrast, top_ratio=0.05, min_regions=1)  # 10 of 200 pixels
    assert r.found == 10 and r.boxes == [(18, 0, 19, 1)]  # max(1, int(10 * 0.05)) = 1: the brightest
    r = carve.select_regions(contrast, top_ratio=0.05, min_regions=3)
    assert r.boxes == [(18, 0, 19, 1), (16, 0, 17, 1), (14, 0, 15, 1)] and r.box == (14, 0, 19, 1)


def test_refine_image_masks_crops_and_magnifies():
    from PIL import Image

    arr = np.full((40, 60, 3), 200, dtype=np.uint8)
    image = Image.fromarray(arr)
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:15] = True
    mask[25:30, 20:25] = True
    box = (5, 10, 25, 30)
    out = carve.refine_image(image, mask, box, size=(20, 20))  # no resampling at the crop's own size
    got = np.asarray(out)
    assert out.size == (20, 20)
    assert (got[0:10, 0:10] == 200).all() and (got[15:20, 15:20] == 200).all()  # the kept regions
    assert (got[10:15, 0:10] == 0).all() and (got[0:10, 10:20] == 0).all()  # the rest of the box: black
    big = carve.refine_image(image, mask, box)
    assert big.size == (60, 60)  # scale max(60 / 20, 40 / 20) = 3
    wide = carve.refine_image(image, mask, (5, 10, 25, 20))
    assert wide.size == (80, 40)  # scale max(3, 4) = 4: covers the original
    with pytest.raises(ValueError):
        carve.refine_image(image, mask[:, :10], box)


def test_fuse_contrast_weights_later_steps():
    task = np.array([[[2.0, 1.0], [4.0, 1.0]], [[1.0, 3.0], [1.0, 3.0]]])  # (T=2, L=2, N=2)
    general = np.ones_like(task)
    # step 0: mean over layers [3, 1]; step 1: [1, 3]; weights 1, 2
    np.testing.assert_allclose(carve.fuse_contrast(task, general, eps=0.0), [(3 + 2) / 3, (1 + 6) / 3])
    np.testing.assert_allclose(carve.fuse_contrast(task, 2 * general, eps=0.0), [5 / 6, 7 / 6])


def test_grid_to_pixels_fills_the_shown_region_only():
    cells = np.array([[1.0, 1.0], [1.0, 1.0]])
    out = carve.grid_to_pixels(cells, (10, 8), (2.0, 0.0, 8.0, 8.0))
    assert out.shape == (8, 10)
    assert (out[:, 2:8] == 1).all() and (out[:, :2] == 0).all() and (out[:, 8:] == 0).all()
    out = carve.grid_to_pixels(np.array([[0.0, 1.0]]), (8, 2))
    assert out[0, 0] == 0 and out[0, -1] == 1 and (np.diff(out[0]) >= 0).all()  # bilinear, monotone


# -- the contrast on tiny models ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return {f: (testing.tiny_model(f, num_layers=4)[0], testing.tiny_processor(f)) for f in FAMILIES}


def _image():
    return testing.sample_images(1, size=(64, 64))[0]


class _Pin(Method):
    """Test method: the task row's (batch row 0's) last query row attends almost only to ``columns``."""

    name = "pin"

    def __init__(self, columns: torch.Tensor) -> None:
        super().__init__()
        self.pinned = columns

    def scores(self, view, scores):
        rows, last = view.rows, view.q_len - 1
        if rows is None:
            index = scores.shape[2] - 1
        else:
            hit = (rows == last).nonzero()
            if hit.numel() == 0:
                return scores
            index = int(hit[0, 0])
        scores[0, :, index, self.pinned.to(scores.device)] += 50.0
        return scores


QUADRANTS = {"top_left": (slice(0, 2), slice(0, 2)), "bottom_right": (slice(2, 4), slice(2, 4))}


@pytest.mark.parametrize("quadrant", sorted(QUADRANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_contrast_finds_the_pinned_quadrant(models, family, quadrant):
    model, processor = models[family]
    image = _image()
    question = "Is there a dog in the image?"
    adapter = attnkit.get_adapter(model)
    grid = adapter.image_grids(make_batch(processor, adapter, [question, carve.GENERAL_PROMPT], [image, image]))[0][0]
    assert (grid.rows, grid.cols) == (4, 4)  # a 64 x 64 image: 16 px per cell
    rows, cols = QUADRANTS[quadrant]
    pin = _Pin(grid.positions()[rows, cols].flatten())
    probe = carve.probe_contrast(model, processor, image, question, probe_tokens=4, methods=[pin])
    assert probe.steps >= 1 and probe.layers == (3,)
    inside = np.zeros((4, 4), bool)
    inside[rows, cols] = True
    assert probe.cells[inside].min() > 10 * probe.cells[~inside].max()
    # the pixel map: the quadrant holds the highest values, and the kept regions lie in it
    y0, x0 = rows.start * 16, cols.start * 16
    quad = probe.contrast[y0 : y0 + 32, x0 : x0 + 32]
    assert quad.mean() > 3 * probe.contrast.mean()  # 4x: all of the contrast in the quadrant
    ay, ax = np.unravel_index(probe.contrast.argmax(), probe.contrast.shape)
    assert y0 <= ay < y0 + 32 and x0 <= ax < x0 + 32
    regions = carve.select_regions(probe.contrast)
    bx0, by0, bx1, by1 = regions.box
    assert x0 - 4 <= bx0 and bx1 <= x0 + 36 and y0 - 4 <= by0 and by1 <= y0 + 36
    kept = regions.mask[y0 : y0 + 32, x0 : x0 + 32].sum()
    assert kept >= 0.95 * regions.mask.sum() and kept >= 0.5 * 32 * 32  # most of the quadrant, little else
    # without the pin the same call finds no such quadrant (the test method does the work)
    plain = carve.probe_contrast(model, processor, image, question, probe_tokens=4)
    assert not plain.cells[inside].min() > 10 * plain.cells[~inside].max()
    assert getattr(model, dispatch.HANDLE_ATTR, None) is None


def test_probe_reads_the_answering_rows_attention(models):
    """The observer's prefill record equals the head-mean attention of the last prompt row at the image
    tokens, as the eager model reports it (output_attentions), for both probe rows."""
    model, processor = models["llava"]
    image = _image()
    question = "Is there a dog?"
    adapter = attnkit.get_adapter(model)
    batch = make_batch(processor, adapter, [question, carve.GENERAL_PROMPT], [image, image])
    grids = adapter.image_grids(batch)
    columns = torch.stack([grids[r][0].positions().flatten() for r in range(2)])
    probe = carve._ImageAttentionProbe((1, 3), columns)
    with torch.no_grad():
        with attnkit.wrap(model, probe):
            model(**batch)
        model.set_attn_implementation("eager")
        try:
            ref = model(**batch, output_attentions=True).attentions
        finally:
            model.set_attn_implementation("sdpa")
    assert len(probe.steps) == 1
    for slot, layer in enumerate((1, 3)):
        want = ref[layer][:, :, -1].mean(1).gather(1, columns)
        torch.testing.assert_close(probe.steps[0][slot], want, atol=1e-5, rtol=1e-4)


# -- end to end -------------------------------------------------------------------------------------------
def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_end_to_end(models, family):
    model, processor = models[family]
    image = _image().resize((64, 48))
    hooks, impl = _hooks(model), model.config._attn_implementation
    result = carve.answer(model, processor, image, "What is in the image?", probe_tokens=4, max_new_tokens=5)
    assert isinstance(result.answer, str) and result.answer
    assert result.contrast.shape == (48, 64)
    x0, y0, x1, y1 = result.box
    scale = max(64 / (x1 - x0), 48 / (y1 - y0))
    assert result.refined.size == (int((x1 - x0) * scale), int((y1 - y0) * scale))
    assert result.refined.width >= 63 and result.refined.height >= 47
    assert 1 <= len(result.boxes) and all(x0 <= b[0] and b[2] <= x1 for b in result.boxes)
    assert getattr(model, dispatch.HANDLE_ATTR, None) is None
    assert _hooks(model) == hooks and model.config._attn_implementation == impl
    attnkit.wrap(model, []).remove()  # not left wrapped


class _Boom(Exception):
    pass


class _RaiseLater(transformers.LogitsProcessor):
    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == 2:
            raise _Boom
        return scores


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_unwraps_after_an_error(models, family):
    model, processor = models[family]
    hooks = _hooks(model)
    with torch.no_grad():
        before = model(**testing.tiny_inputs(family, processor)).logits
    with pytest.raises(_Boom):  # raised inside the probes' generate, while wrapped
        carve.answer(model, processor, _image(), "Is there a dog?", probe_tokens=4, logits_processor=[_RaiseLater()])
    assert getattr(model, dispatch.HANDLE_ATTR, None) is None
    assert _hooks(model) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model(**testing.tiny_inputs(family, processor)).logits, before, atol=0, rtol=0)


def test_answer_refuses_bad_arguments(models):
    from attnkit.errors import InputError

    model, processor = models["llava"]
    with pytest.raises(InputError):
        carve.answer(model, processor, _image(), "q", top_ratio=0.0)
    with pytest.raises(InputError):
        carve.answer(model, processor, _image(), "q", layers=[4])
    with pytest.raises(InputError):
        carve.answer(model, processor, _image(), "q", probe_tokens=0)
    assert getattr(model, dispatch.HANDLE_ATTR, None) is None


# -- the pipeline in attnkit eval ---------------------------------------------------------------------------
def test_carve_is_a_pipeline_not_a_wrappable_method(models):
    from attnkit.errors import MethodArgumentError, UnknownMethodError
    from attnkit.methods import registry

    assert "carve" not in attnkit.list_methods() and "carve" in registry.list_pipelines()
    with pytest.raises(UnknownMethodError, match="pipeline"):
        attnkit.wrap(models["llava"][0], "carve")
    assert getattr(models["llava"][0], dispatch.HANDLE_ATTR, None) is None
    with pytest.raises(MethodArgumentError):
        carve.CARVE(top_ratio=0.0)
    assert carve.CARVE(layers=[1, 2]).config.to_dict()["layers"] == [1, 2]


def test_eval_cli_runs_carve_per_sample(tmp_path, capsys):
    import json

    from attnkit import cli
    from attnkit.eval.pope import build_pope
    from attnkit.eval.records import read_jsonl

    ann = testing.write_coco(tmp_path / "coco")
    build_pope(ann / "instances_val2014.json", tmp_path / "pope", num_images=2, seed=1)
    base = ["eval", "--model", "tiny:llava", "--max-new-tokens", "3", "--no-progress", "--method", "carve",
            "--carve.probe-tokens", "2", "--method-arg", "carve.top_ratio=0.3"]
    out = tmp_path / "run"
    assert cli.main([*base, "--task", "pope", "--split", "adversarial", "--data-dir", str(tmp_path / "pope"),
                     "--image-dir", str(tmp_path / "coco" / "val2014"), "--limit", "3", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == [{"name": "carve", "config": {
        "general_prompt": carve.GENERAL_PROMPT, "layers": None, "top_ratio": 0.3, "min_regions": 3, "probe_tokens": 2}}]
    records = read_jsonl(out / "samples.jsonl")
    assert len(records) == 3 and all(isinstance(r["output"], str) for r in records)
    capsys.readouterr()
    assert cli.main([*base, "--task", "grounding", "--annotations", str(ann), "--output", str(tmp_path / "g")]) != 0
    assert "cannot run with task grounding (it observes the attention)" in capsys.readouterr().err
    assert cli.main([*base, "--method", "carve,identity", "--task", "grounding", "--annotations", str(ann),
                     "--output", str(tmp_path / "g2")]) != 0
    assert "cannot run with other methods" in capsys.readouterr().err
