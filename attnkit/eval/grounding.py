"""Attention grounding (pointing game): does the answer-time attention to the image land on the object?

For each image of a COCO-format set with boxes, one object is asked about ("Is there a {object} in the
image?"; or a RefCOCO-style referring expression). While the model answers, an observer (an attnkit
Method with only an ``observe`` callback) records the attention that the answer-producing query rows
pay to the prompt: the last prompt token at prefill and every generated token up to and including the
first EOS, averaged over the chosen layers and over heads. The attention to the image tokens of the
whole-image view is laid on the adapter's grid, each cell mapped back to original-image pixels through
the processor's resize / centre-crop geometry, and scored:

- hit: the argmax cell's centre lies inside the object's box (pointing game);
- mass: the share of the grid's attention on cells whose centre lies inside the box;
- chance: the share of cells whose centre lies inside the box (what uniform attention would give).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, UnsupportedModelError
from ..methods.base import Method, MethodConfig
from ..options import option
from .base import Sample, Task, coco_image_dir
from .registry import register_task

DEFAULT_QUESTION = "Is there a {object} in the image?"
DEFAULT_SUFFIX = " Please answer yes or no."


# -- the observer ---------------------------------------------------------------------------------
@dataclasses.dataclass
class AnswerAttentionConfig(MethodConfig):
    layers: tuple[int, ...] | None = None  # None: every layer


class AnswerAttention(Method):
    """Read-only: per step, the head- and layer-mean attention of the answer-producing row to the prompt."""

    name = "answer_attention"
    Config = AnswerAttentionConfig

    def begin_forward(self, view: Any) -> None:
        if view.is_prefill:
            self.prompt_len = view.kv_len
            self.steps: list[torch.Tensor] = []
            self.layer_counts: list[int] = []
        self.steps.append(torch.zeros(view.batch_size, self.prompt_len))
        self.layer_counts.append(0)

    def layers(self, view: Any) -> set[int] | None:
        return None if self.config.layers is None else set(self.config.layers)

    def rows(self, view: Any) -> torch.Tensor | None:
        return torch.tensor([view.q_len - 1]) if view.q_len > 1 else None

    def observe(self, view: Any, probs: torch.Tensor) -> None:
        # The kernel may hand over the rows in several blocks (when another method asks for
        # every row): only the block holding the answering row (the forward's last) counts.
        index = view.row_index(view.q_len - 1)
        if index is None:
            return
        row = probs[:, :, index, : self.prompt_len].float().mean(1)  # (B, <= prompt_len)
        self.steps[-1][:, : row.shape[1]] += row.cpu()
        self.layer_counts[-1] += 1

    def maps(self, lengths: list[int]) -> list[torch.Tensor]:
        """Per batch row, the mean over its first ``lengths[b]`` steps of the layer-mean attention."""
        out = []
        for b, n in enumerate(lengths):
            n = max(1, min(n, len(self.steps)))
            acc = sum(self.steps[t][b] / max(1, self.layer_counts[t]) for t in range(n))
            out.append(acc / n)
        return out


# -- geometry -------------------------------------------------------------------------------------
def view_region(
    image_processor: Any, width: int, height: int, cropped: bool = True
) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the original image that the processed whole-image view shows.

    A view that goes through a resize-then-centre-crop processor (CLIP's, used by LLaVA-1.5:
    ``cropped``) shows a central part; other views (LLaVA-NeXT's base view, Qwen, InternVL's
    thumbnail, ...) are the whole image resized.
    """
    if not cropped or not getattr(image_processor, "do_center_crop", False):
        return 0.0, 0.0, float(width), float(height)
    crop = getattr(image_processor, "crop_size", None) or {}
    size = getattr(image_processor, "size", None) or {}
    crop_h, crop_w = crop.get("height"), crop.get("width")
    if crop_h is None or crop_w is None:
        return 0.0, 0.0, float(width), float(height)
    if "shortest_edge" in size:
        sx = sy = size["shortest_edge"] / min(width, height)
    elif "height" in size and "width" in size:
        sx, sy = size["width"] / width, size["height"] / height
    else:
        sx = sy = 1.0
    rw, rh = width * sx, height * sy
    x0, y0 = max(0.0, (rw - crop_w) / 2), max(0.0, (rh - crop_h) / 2)
    return x0 / sx, y0 / sy, min(rw, x0 + crop_w) / sx, min(rh, y0 + crop_h) / sy


def cell_centres(rows: int, cols: int, region: tuple[float, float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) x and y pixel coordinates of the grid cells' centres in the original image."""
    x0, y0, x1, y1 = region
    xs = x0 + (torch.arange(cols, dtype=torch.float64) + 0.5) * (x1 - x0) / cols
    ys = y0 + (torch.arange(rows, dtype=torch.float64) + 0.5) * (y1 - y0) / rows
    return xs[None, :].expand(rows, cols), ys[:, None].expand(rows, cols)


def score_map(
    cells: torch.Tensor, region: tuple[float, float, float, float], bbox: list[float]
) -> dict[str, Any]:
    """Pointing-game scores of one (rows, cols) attention map against a COCO box [x, y, w, h]."""
    rows, cols = cells.shape
    xs, ys = cell_centres(rows, cols, region)
    bx, by, bw, bh = bbox
    inside = (xs >= bx) & (xs <= bx + bw) & (ys >= by) & (ys <= by + bh)
    cells = cells.double()
    total = float(cells.sum())
    k = int(torch.argmax(cells))
    r, c = divmod(k, cols)
    return {
        "hit": bool(inside[r, c]),
        "mass": float(cells[inside].sum()) / total if total > 0 else 0.0,
        "chance": float(inside.double().mean()),
        "point": [round(float(xs[r, c]), 2), round(float(ys[r, c]), 2)],
        "grid": [rows, cols],
    }


# -- the task -------------------------------------------------------------------------------------
def _instances_path(annotations: Path, split: str) -> Path:
    if annotations.is_file():
        return annotations
    path = annotations / f"instances_{split}.json"
    if not path.is_file():
        raise DataError(f"grounding: annotations file not found: {path}")
    return path


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"grounding: file not found: {path}") from None
    except ValueError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


@dataclasses.dataclass
class GroundingOptions:
    """``attnkit eval --task grounding`` options."""

    annotations: str | None = option(None, help="COCO-format annotations dir or instances file (with boxes)")
    data_dir: str | None = option(None, help="same as --annotations")
    image_dir: str | None = option(None, help="images (default: SPLIT/ or images/ next to the annotations)")
    split: str | None = option(None, help="COCO split (default val2014)")
    refs: str | None = option(None, help="RefCOCO-style refs JSON (image_id, ann_id, sentences)")
    layers: list[int] | None = option(None, help="layers whose attention is averaged, e.g. 8-15 or 2,4,6 "
                                                 "(all or none: every layer)", lo=0, aliases={"all": None})
    suffix: str = option(DEFAULT_SUFFIX, help="text appended to each question")


@register_task
class GroundingTask(Task):
    """Pointing game on a COCO-format set: one question per object, scored on answer-time attention."""

    name = "grounding"
    description = "attention pointing game on COCO-format boxes: hit rate and attention mass in the box"
    Options = GroundingOptions
    default_max_new_tokens = 8

    @classmethod
    def from_options(cls, options: GroundingOptions, *, seed: int = 0) -> GroundingTask:
        annotations = options.annotations or options.data_dir
        if annotations is None:
            raise DataError("--task grounding needs --annotations (the COCO annotations dir)")
        return cls(annotations, options.image_dir, split=options.split or "val2014", refs=options.refs,
                   layers=options.layers, suffix=options.suffix)

    def __init__(
        self,
        annotations: str | Path,
        image_dir: str | Path | None = None,
        *,
        refs: str | Path | None = None,
        split: str = "val2014",
        layers: tuple[int, ...] | list[int] | None = None,
        question: str = DEFAULT_QUESTION,
        suffix: str = DEFAULT_SUFFIX,
        min_area: float = 0.01,
    ) -> None:
        self.annotations = Path(annotations)
        self.split = split
        self.refs = Path(refs) if refs is not None else None
        self.layers = tuple(layers) if layers is not None else None
        self.question = question
        self.suffix = suffix
        self.min_area = min_area
        if image_dir is not None:
            self.image_dir = Path(image_dir)
        else:
            base = self.annotations.parent if self.annotations.is_file() else self.annotations
            self.image_dir = coco_image_dir(base, split)
        self._processor: Any = None

    def config(self) -> dict[str, Any]:
        return {"task": self.name, "annotations": str(self.annotations), "image_dir": str(self.image_dir),
                "refs": str(self.refs) if self.refs else None, "split": self.split,
                "layers": list(self.layers) if self.layers is not None else None,
                "question": self.question, "suffix": self.suffix, "min_area": self.min_area}

    def load(self) -> list[Sample]:
        path = _instances_path(self.annotations, self.split)
        data = _load_json(path)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DataError(f"{path}: missing field {key!r} (not a COCO instances file)")
        names = {c["id"]: c["name"] for c in data["categories"]}
        images = {im["id"]: im for im in data["images"]}
        anns = {a["id"]: a for a in data["annotations"]}
        if self.refs is not None:
            return self._from_refs(images, anns, names)
        per_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                per_image.setdefault(a["image_id"], []).append(a)
        samples = []
        for image_id in sorted(per_image):
            im = images.get(image_id)
            if im is None:
                raise DataError(f"{path}: annotation for image_id {image_id} that is not in 'images'")
            counts = Counter(a["category_id"] for a in per_image[image_id])
            area = im["width"] * im["height"]
            # one unambiguous object per image: the largest whose category occurs once
            unique = [a for a in per_image[image_id] if counts[a["category_id"]] == 1
                      and a["bbox"][2] * a["bbox"][3] >= self.min_area * area]
            if not unique:
                continue
            a = max(unique, key=lambda a: (a["bbox"][2] * a["bbox"][3], -a["id"]))
            samples.append(self._sample(im, a, names[a["category_id"]]))
        return samples

    def _from_refs(self, images: dict, anns: dict, names: dict) -> list[Sample]:
        refs = _load_json(self.refs)
        if not isinstance(refs, list):
            raise DataError(f"{self.refs}: expected a JSON list of refs")
        samples = []
        for n, ref in enumerate(refs, start=1):
            where = f"{self.refs} item {n}"
            for key in ("image_id", "ann_id"):
                if key not in ref:
                    raise DataError(f"{where}: missing field {key!r}")
            ann = anns.get(ref["ann_id"])
            im = images.get(ref["image_id"])
            if ann is None or im is None:
                raise DataError(f"{where}: image_id {ref['image_id']} / ann_id {ref['ann_id']} not in the annotations")
            sents = ref.get("sentences") or []
            text = ref.get("sentence") or (sents[0].get("sent") if sents and isinstance(sents[0], dict) else None)
            text = text or names[ann["category_id"]]
            samples.append(self._sample(im, ann, text, ref_id=ref.get("ref_id", n)))
        return samples

    def _sample(self, im: dict, ann: dict, obj: str, ref_id: Any = None) -> Sample:
        sid = f"{im['id']}/{ann['id']}" if ref_id is None else f"ref/{ref_id}"
        return Sample(
            id=sid,
            image=self.image_dir / im["file_name"],
            question=self.question.format(object=obj) + self.suffix,
            label="yes",
            meta={"image_id": im["id"], "ann_id": ann["id"], "object": obj, "bbox": list(ann["bbox"]),
                  "image_size": [im["width"], im["height"]]},
        )

    def observer(self, adapter: Any, processor: Any) -> AnswerAttention:
        if not adapter.has_image_grid:
            raise UnsupportedModelError(f"grounding needs image tokens on a grid; {adapter.family} has none")
        self._processor = processor
        return AnswerAttention(layers=self.layers)

    def collect(self, observer: AnswerAttention, samples: list[Sample], batch: dict[str, Any],
                new_tokens: torch.Tensor, adapter: Any) -> list[dict[str, Any]]:
        grids = adapter.image_grids(batch)
        if grids is None:
            raise UnsupportedModelError(f"grounding needs an image grid; {adapter.family} has none")
        maps = observer.maps(_answer_lengths(new_tokens, adapter.model))
        image_processor = getattr(self._processor, "image_processor", None)
        out = []
        for sample, grid_list, attention in zip(samples, grids, maps):
            if not grid_list:
                out.append({"grounding": None})
                continue
            grid = grid_list[adapter.global_view]
            cells = attention[grid.positions()]
            width, height = sample.meta["image_size"]
            region = view_region(image_processor, width, height, adapter.global_view_cropped)
            out.append({"grounding": score_map(cells, region, sample.meta["bbox"])})
        return out

    def parse(self, output: str) -> str:
        from .pope import parse_answer

        return parse_answer(output)

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r["grounding"] for r in records if r.get("grounding")]
        if not scored:
            raise DataError("grounding: no sample has an image grid to score")
        n = len(scored)
        return {
            "pointing_accuracy": 100.0 * sum(s["hit"] for s in scored) / n,
            "mass_in_box": 100.0 * sum(s["mass"] for s in scored) / n,
            "chance_mass": 100.0 * sum(s["chance"] for s in scored) / n,
            "answered_yes": 100.0 * sum(r.get("parsed") == "yes" for r in records) / len(records),
            "n": n,
        }


def _answer_lengths(new_tokens: torch.Tensor, model: Any) -> list[int]:
    """Per row, how many generate steps produced its answer: up to and including the first EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    lengths = []
    for row in new_tokens.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        lengths.append(max(1, n))
    return lengths


__all__ = ["AnswerAttention", "GroundingTask", "cell_centres", "score_map", "view_region"]
