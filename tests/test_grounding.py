"""Attention grounding: geometry, scoring, and the whole task on tiny models with engineered attention."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attnkit import testing
from attnkit.errors import DataError, UnsupportedModelError
from attnkit.eval.grounding import GroundingTask, score_map, view_region
from attnkit.eval.runner import RunSettings, run_task
from attnkit.methods.base import Method, MethodConfig

from .conftest import _tiny


def test_view_region_centre_crop_and_stretch():
    clip = SimpleNamespace(do_center_crop=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    # 640x480 -> 448x336 -> central 336x336 = original x in [80, 560], all of y
    assert view_region(clip, 640, 480) == pytest.approx((80.0, 0.0, 560.0, 480.0))
    assert view_region(clip, 300, 600) == pytest.approx((0.0, 150.0, 300.0, 450.0))
    assert view_region(SimpleNamespace(do_center_crop=False), 640, 480) == (0.0, 0.0, 640.0, 480.0)
    assert view_region(None, 10, 20) == (0.0, 0.0, 10.0, 20.0)


def test_score_map_by_hand():
    # 2x4 grid over a 40x20 image: cell centres x = 5, 15, 25, 35; y = 5, 15
    cells = torch.tensor([[0.1, 0.0, 0.0, 0.0], [0.2, 0.5, 0.1, 0.1]])
    box = [0, 8, 20, 12]  # x 0..20, y 8..20: the cells (1, 0) and (1, 1)
    s = score_map(cells, (0, 0, 40, 20), box)
    assert s["hit"] is True and s["point"] == [15.0, 15.0] and s["grid"] == [2, 4]
    assert s["mass"] == pytest.approx(0.7 / 1.0) and s["chance"] == pytest.approx(2 / 8)
    s = score_map(cells, (0, 0, 40, 20), [20, 0, 20, 20])  # right half
    assert s["hit"] is False and s["mass"] == pytest.approx(0.2 / 1.0) and s["chance"] == pytest.approx(0.5)


@dataclasses.dataclass
class PointAtConfig(MethodConfig):
    which: str = "first"  # the first or the last image token of each row


class PointAt(Method):
    """Test double: every query attends (almost) only to one image token."""

    name = "point_at"
    Config = PointAtConfig

    def begin_forward(self, ctx):
        if ctx.is_prefill:
            idx = 0 if self.config.which == "first" else -1
            self.target = [int(p[idx]) for p in ctx.image_positions]

    def scores(self, ctx, scores):
        for b, pos in enumerate(self.target):
            scores[b, :, :, pos] += 50.0
        return scores


def _coco(tmp_path: Path, boxes: list[list[float]], size=(64, 48)) -> Path:
    """instances_val2014.json with one image per box (one 'dog' each), images drawn in tmp_path/val2014."""
    (tmp_path / "val2014").mkdir(exist_ok=True)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i, (image, box) in enumerate(zip(testing.sample_images(len(boxes), size=size, seed=5), boxes), start=1):
        name = f"COCO_val2014_{i:012d}.jpg"
        image.save(tmp_path / "val2014" / name)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        anns.append({"id": 100 + i, "image_id": i, "category_id": 18, "bbox": box, "area": box[2] * box[3],
                     "iscrowd": 0})
    # a second, smaller object of a repeated category is never chosen (ambiguous)
    anns.append({"id": 900, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0})
    anns.append({"id": 901, "image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5], "area": 25, "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]}
    path = tmp_path / "annotations" / "instances_val2014.json"
    path.write_text(json.dumps(data))
    return tmp_path / "annotations"


def test_loader_picks_one_unambiguous_object_per_image(tmp_path):
    ann = _coco(tmp_path, [[0, 0, 32, 24], [30, 20, 34, 28]])
    samples = GroundingTask(ann).load()
    assert [s.id for s in samples] == ["1/101", "2/102"]
    assert samples[0].question == "Is there a dog in the image? Please answer yes or no."
    assert samples[0].image == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"
    assert samples[1].meta["bbox"] == [30, 20, 34, 28] and samples[1].meta["image_size"] == [64, 48]


def test_refs_and_bad_annotations(tmp_path):
    ann = _coco(tmp_path, [[0, 0, 32, 24]])
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"ref_id": 7, "image_id": 1, "ann_id": 101, "sentences": [{"sent": "brown dog"}]}]))
    (s,) = GroundingTask(ann, refs=refs).load()
    assert s.id == "ref/7" and s.question.startswith("Is there a brown dog in the image?")
    refs.write_text(json.dumps([{"ref_id": 7, "image_id": 1}]))
    with pytest.raises(DataError, match=r"refs.json item 1: missing field 'ann_id'"):
        GroundingTask(ann, refs=refs).load()
    with pytest.raises(DataError, match=r"annotations file not found: .*instances_train2014.json"):
        GroundingTask(ann, split="train2014").load()
    (ann / "instances_val2014.json").write_text("{not json")
    with pytest.raises(DataError, match=r"instances_val2014.json: invalid JSON"):
        GroundingTask(ann).load()


GRID_FAMILIES = ["llava", "llava_next", "qwen2_vl", "gemma3", "internvl", "idefics3"]


@pytest.mark.parametrize("family", GRID_FAMILIES)
def test_engineered_attention_is_found_in_the_box(tmp_path, family):
    """Attention forced onto the global view's first (or last) cell: hit in that corner's box, miss in the other."""
    model, _ = _tiny(family)
    processor = testing.tiny_processor(family)
    adapter_last = family in ("internvl", "idefics3")  # their whole-image view comes last
    near, far = [[0, 0, 20, 15], [44, 33, 20, 15]]
    if adapter_last:
        near, far = far, near
    ann = _coco(tmp_path, [near, far])
    method = PointAt(which="last" if adapter_last else "first")
    results = run_task(GroundingTask(ann, layers=[1]), model, processor, [method], tmp_path / "out",
                       RunSettings(progress=False, batch_size=2, max_new_tokens=3), print_summary=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    hit, miss = records[0]["grounding"], records[1]["grounding"]
    assert hit["hit"] is True and hit["mass"] > 0.9
    assert miss["hit"] is False and miss["mass"] < 0.1
    assert results["metrics"]["pointing_accuracy"] == 50.0
    assert 0 < results["metrics"]["chance_mass"] < 50


def test_unwrapped_attention_is_not_the_engineered_one(tmp_path):
    """Without the engineered method the same run does not put ~all mass on one cell."""
    model, _ = _tiny("llava")
    ann = _coco(tmp_path, [[0, 0, 20, 15]])
    run_task(GroundingTask(ann), model, testing.tiny_processor("llava"), [], tmp_path / "out",
             RunSettings(progress=False, max_new_tokens=3), print_summary=False)
    record = json.loads((tmp_path / "out" / "samples.jsonl").read_text())
    assert record["grounding"]["mass"] < 0.9


def test_grounding_refuses_a_model_without_grid(tmp_path):
    model, _ = _tiny("instructblip")
    ann = _coco(tmp_path, [[0, 0, 20, 15]])
    with pytest.raises(UnsupportedModelError, match="instructblip"):
        run_task(GroundingTask(ann), model, testing.tiny_processor("instructblip"), [], tmp_path / "out",
                 RunSettings(progress=False), print_summary=False)
    assert not hasattr(model, "_attnkit_handle")


@pytest.mark.parametrize("family, region", [("llava", (8, 0, 56, 48)), ("llava_next", (0, 0, 64, 48))])
def test_first_cell_maps_through_the_view_geometry(tmp_path, family, region):
    """LLaVA-1.5's view is the centre crop of a 64x48 image (x 8..56); LLaVA-NeXT's base view is all of it."""
    model, _ = _tiny(family)
    ann = _coco(tmp_path, [[0, 0, 64, 48]])
    run_task(GroundingTask(ann), model, testing.tiny_processor(family), [PointAt(which="first")],
             tmp_path / "out", RunSettings(progress=False, max_new_tokens=2), print_summary=False)
    g = json.loads((tmp_path / "out" / "samples.jsonl").read_text())["grounding"]
    rows, cols = g["grid"]
    x0, y0, x1, y1 = region
    assert g["point"] == pytest.approx([x0 + (x1 - x0) / cols / 2, y0 + (y1 - y0) / rows / 2], abs=0.01)


def test_observer_reads_the_answering_row_when_rows_come_in_chunks(tmp_path, monkeypatch):
    """PointAt asks for every row; with 8-row blocks the prompt spans several blocks, yet the map
    (and the hit) must be the same as with one block."""
    from attnkit.hooks import manager
    from attnkit.hooks.kernel import KernelOptions

    model, _ = _tiny("llava")
    ann = _coco(tmp_path, [[0, 0, 20, 15], [44, 33, 20, 15]])

    def run(out):
        run_task(GroundingTask(ann, layers=[1]), model, testing.tiny_processor("llava"), [PointAt(which="first")],
                 tmp_path / out, RunSettings(progress=False, batch_size=2, max_new_tokens=3), print_summary=False)
        return [json.loads(x)["grounding"] for x in (tmp_path / out / "samples.jsonl").read_text().splitlines()]

    whole = run("whole")
    monkeypatch.setattr(manager, "KernelOptions", lambda: KernelOptions(chunk_rows=8))  # the runner's wrap()
    chunked = run("chunked")
    assert chunked[0]["hit"] is True and chunked[1]["hit"] is False
    for a, b in zip(whole, chunked):
        assert a["point"] == b["point"] and a["mass"] == pytest.approx(b["mass"], abs=1e-5)
