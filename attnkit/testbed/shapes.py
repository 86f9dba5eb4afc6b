"""The "shapes" set: a synthetic COCO-format dataset with a built-in co-occurrence prior.

Each 64x64 image holds 1-3 coloured shapes (10 shapes x 8 colours, varied size and position) on
a lightly noisy grey background. Five fixed partner pairs (``PARTNERS``) appear together most of
the time, as fork and dining table do in COCO, so a model trained on the set learns to name an
absent partner: what POPE-adversarial and CHAIR are built to catch.

``make_shapes`` writes, per split, ``images/{split}/*.png``, ``annotations/instances_{split}.json``
(boxes, areas, segmentation polygons), ``annotations/captions_{split}.json`` (five templated
captions per image, with synonyms) and ``vocab.json`` (the CHAIR vocabulary: each category with
its synonyms). Same arguments, same bytes.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "arrow",
                           "moon", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
#: other words captions use for a shape (CHAIR counts them as mentions of the shape)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("ball", "disc"), "square": ("box", "block"), "triangle": ("wedge",), "star": (),
    "cross": ("plus sign",), "heart": (), "diamond": ("rhombus",), "arrow": ("pointer",),
    "moon": ("crescent",), "hexagon": (),
}
#: partner pairs and how often the second is drawn when the first is drawn first (an image with one
#: member holds the other 69-82% of the time: extra shapes come without their partner when 3 are drawn)
PARTNERS: tuple[tuple[str, str, float], ...] = (
    ("star", "moon", 0.88), ("square", "triangle", 0.84), ("heart", "arrow", 0.80),
    ("circle", "cross", 0.76), ("diamond", "hexagon", 0.72),
)
EXTRA_OBJECT = 0.45  # chance of one more group (a shape, maybe with its partner) while there is room


def partner_of(shape: str) -> str:
    """The shape that usually comes with ``shape``."""
    for a, b, _ in PARTNERS:
        if shape == a:
            return b
        if shape == b:
            return a
    raise KeyError(shape)


def _pair_rate(shape: str) -> float:
    return next(p for a, b, p in PARTNERS if shape in (a, b))


# ----------------------------------------------------------------------------- geometry


def _polygon(shape: str, cx: float, cy: float, r: float, rng: random.Random) -> list[tuple[float, float]]:
    """The outline of ``shape`` centred at (cx, cy) with radius ``r``, as (x, y) points."""

    def ring(n: int, radius: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "circle":
        return ring(28, r)
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = r, r * 0.34
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "heart":
        pts = []
        for k in range(32):
            t = 2 * math.pi * k / 32
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * (y + 2) / 17))
        return pts
    if shape == "arrow":  # pointing right, left, up or down
        pts = [(-r, -0.3 * r), (0.1 * r, -0.3 * r), (0.1 * r, -0.8 * r), (r, 0), (0.1 * r, 0.8 * r), (0.1 * r, 0.3 * r),
               (-r, 0.3 * r)]
        angle = rng.choice((0.0, math.pi / 2, math.pi, 3 * math.pi / 2))
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    if shape == "moon":  # a crescent: the big disc minus a shifted one, outer arc then inner arc back
        shift, r2 = 0.55 * r, 0.9 * r
        angles = [2 * math.pi * k / 48 for k in range(48)]
        outer = [(math.cos(t) * r, math.sin(t) * r) for t in angles]
        outer = [p for p in outer if (p[0] - shift) ** 2 + p[1] ** 2 > r2 * r2]
        outer.sort(key=lambda p: math.atan2(p[1], p[0]) % (2 * math.pi))
        inner = [(shift + math.cos(t) * r2, math.sin(t) * r2) for t in angles]
        inner = [p for p in inner if p[0] ** 2 + p[1] ** 2 < r * r]
        inner.sort(key=lambda p: -(math.atan2(p[1], p[0]) % (2 * math.pi)))
        return [(cx + x, cy + y) for x, y in outer + inner]
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class Obj:
    shape: str
    colour: str
    polygon: list[tuple[float, float]]

    @property
    def bbox(self) -> list[float]:
        xs, ys = [p[0] for p in self.polygon], [p[1] for p in self.polygon]
        x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
        x1, y1 = min(float(IMAGE_SIZE), max(xs)), min(float(IMAGE_SIZE), max(ys))
        return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]

    @property
    def area(self) -> float:
        pts = self.polygon
        return abs(sum(pts[i][0] * pts[i - 1][1] - pts[i - 1][0] * pts[i][1] for i in range(len(pts)))) / 2


def _choose_shapes(rng: random.Random) -> list[str]:
    """1-3 distinct shapes: a first shape, its partner with the pair's rate, maybe one more group."""
    shapes = [rng.choice(SHAPES)]
    if rng.random() < _pair_rate(shapes[0]):
        shapes.append(partner_of(shapes[0]))
    if len(shapes) < 3 and rng.random() < EXTRA_OBJECT:
        more = rng.choice([s for s in SHAPES if s not in shapes and partner_of(s) not in shapes])
        shapes.append(more)
        if len(shapes) < 3 and rng.random() < _pair_rate(more):
            shapes.append(partner_of(more))
    rng.shuffle(shapes)
    return shapes


def _place(shapes: list[str], rng: random.Random) -> list[Obj]:
    """Non-overlapping objects of radius 8-14 px (smaller when three do not fit)."""
    for attempt in range(200):
        scale = 1.0 if attempt < 100 else 0.75
        boxes: list[tuple[float, float, float]] = []
        for _ in shapes:
            for _ in range(60):
                r = rng.uniform(8.0, 14.0) * scale
                cx, cy = rng.uniform(r + 1, IMAGE_SIZE - r - 1), rng.uniform(r + 1, IMAGE_SIZE - r - 1)
                if all(max(abs(cx - x), abs(cy - y)) > r + q + 2 for x, y, q in boxes):
                    boxes.append((cx, cy, r))
                    break
            else:
                break
        if len(boxes) == len(shapes):
            colours = list(COLOURS)
            return [Obj(s, rng.choice(colours), _polygon(s, cx, cy, r, rng)) for s, (cx, cy, r) in zip(shapes, boxes)]
    raise RuntimeError("could not place the shapes")  # pragma: no cover - 3 small shapes always fit


def _draw(objs: list[Obj], rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    base = rng.randint(105, 150)
    tint = [base + rng.randint(-8, 8) for _ in range(3)]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(tint))
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw.polygon(o.polygon, fill=COLOURS[o.colour])
    arr = np.asarray(img, dtype=np.int16) + nrng.normal(0, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).round().astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- text


def mention(shape: str, rng: random.Random | None = None) -> str:
    """A word for ``shape``: its name, or (with ``rng``, 35% of the time) one of its synonyms."""
    if rng is not None and SYNONYMS[shape] and rng.random() < 0.35:
        return rng.choice(SYNONYMS[shape])
    return shape


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _listing(objs: list[Obj], rng: random.Random | None, colour: bool = True) -> str:
    parts = []
    for o in objs:
        noun = mention(o.shape, rng)
        phrase = f"{o.colour} {noun}" if colour else noun
        parts.append(f"{_article(phrase)} {phrase}")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


_TEMPLATES = (
    "{list}.",
    "there is {list}.",
    "an image of {list}.",
    "{list} on a grey background.",
    "this picture shows {list}.",
    "a grey picture with {list}.",
)


def captions_for(objs: list[Obj], rng: random.Random, n: int = 5) -> list[str]:
    """``n`` templated captions of the objects (random order and templates, synonyms now and then)."""
    out = []
    for _ in range(n):
        order = objs[:]
        rng.shuffle(order)
        text = rng.choice(_TEMPLATES).format(list=_listing(order, rng, colour=rng.random() < 0.8))
        out.append(text[0].upper() + text[1:])
    return out


def describe(objs: list[Obj]) -> str:
    """The answer the testbed model is trained to give to a request for a description."""
    text = _listing(objs, None)
    return f"{text[0].upper()}{text[1:]}."


def vocabulary() -> dict[str, Any]:
    """The CHAIR vocabulary of the set: each category with the synonyms that count as mentioning it."""
    return {"name": "shapes", "categories": {s: list(SYNONYMS[s]) for s in SHAPES}}


# ----------------------------------------------------------------------------- writing


def generate(split: str, n: int, seed: int = 0) -> Iterator[tuple[list[Obj], Image.Image]]:
    """The first ``n`` (objects, image) pairs of ``split`` for ``seed``: what ``make_shapes`` writes, in memory."""
    rng = random.Random(f"shapes/{seed}/{split}")
    nrng = np.random.default_rng([seed, 1 if split == "train" else 2])
    for _ in range(n):
        objs = _place(_choose_shapes(rng), rng)
        yield objs, _draw(objs, rng, nrng)


def _write_split(root: Path, split: str, n: int, seed: int, first_id: int) -> dict[str, Any]:
    rng = random.Random(f"shapes/{seed}/{split}/captions")
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, anns, caps = [], [], []
    for k, (objs, img) in enumerate(generate(split, n, seed)):
        image_id = first_id + k
        name = f"shapes_{split}_{image_id:06d}.png"
        img.save(image_dir / name, optimize=True)
        images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for o in objs:
            anns.append({"id": len(anns) + 1 + first_id * 4, "image_id": image_id, "category_id": cat_id[o.shape],
                         "bbox": o.bbox, "area": round(o.area, 2), "iscrowd": 0,
                         "segmentation": [[round(c, 2) for p in o.polygon for c in p]],
                         "attributes": {"colour": o.colour}})
        for text in captions_for(objs, rng):
            caps.append({"id": len(caps) + 1 + first_id * 5, "image_id": image_id, "caption": text})
    info = {"description": f"attnkit shapes testbed, {split} split", "version": "1", "seed": seed}
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    _dump(ann_dir / f"instances_{split}.json", {"info": info, "images": images, "annotations": anns, "categories": cats})
    _dump(ann_dir / f"captions_{split}.json", {"info": info, "images": images, "annotations": caps})
    return {"images": len(images), "objects": len(anns)}


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")


def make_shapes(out_dir: str | Path, n_train: int = 30000, n_val: int = 500, seed: int = 0) -> Path:
    """Write the shapes set (train and val splits, COCO format) under ``out_dir``; returns ``out_dir``.

    Deterministic: the same arguments give byte-identical files. ``n_train=0`` writes only val.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"make_shapes: {name} must be a non-negative integer, got {value!r}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    if n_train:
        _write_split(root, "train", n_train, seed, first_id=1)
    if n_val:
        _write_split(root, "val", n_val, seed, first_id=1_000_001)
    _dump(root / "vocab.json", vocabulary())
    return root


def read_split(root: str | Path, split: str) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(image record, its annotations with a ``shape`` name) per image of a written split."""
    data = json.loads((Path(root) / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    per: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        per[a["image_id"]].append({**a, "shape": names[a["category_id"]]})
    return [(im, per[im["id"]]) for im in data["images"]]
