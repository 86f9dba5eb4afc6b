"""PNG rendering of ``attnkit.inspect.maps`` measurements, with Pillow only (no plotting library).

``render_maps``: the attention map over the image, one panel per chosen layer (or one aggregated panel),
before and after a method side by side; each grid cell drawn over the original-image pixels it covers
(``AttentionMaps.region``, grounding's geometry), visual sinks outlined, pruned tokens greyed.
``render_shares``: a line plot, per layer, of the share of attention on image / text / sink tokens (before
solid, after dashed). ``maps_layout`` / ``shares_layout`` give the pictures' sizes and panel boxes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .heads import OUTLINE_INNER, OUTLINE_OUTER, _atomic_write, colormap
from .maps import AttentionMaps, AttentionShares

__all__ = ["maps_layout", "render_maps", "render_shares", "shares_layout"]

#: Longest side of one panel's image, in pixels.
PANEL = 192
#: Space between panels and around the picture; height of a panel's title; height of the legend.
GAP, MARGIN, TITLE, LEGEND = 8, 10, 16, 18
#: Panels per line (a before/after pair counts as two).
PER_ROW = 8
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
#: Pruned image tokens are covered with this grey (opaque).
PRUNED = (128, 128, 128)
#: Opacity of the heat colours over the image.
HEAT_ALPHA = 150


def _panel_size(image_size: tuple[int, int], panel: int) -> tuple[int, int]:
    w, h = image_size
    scale = panel / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def maps_layout(
    maps: AttentionMaps, image_size: tuple[int, int], after: AttentionMaps | None = None, *,
    aggregate: bool = False, panel: int = PANEL,
) -> tuple[tuple[int, int], list[tuple[str, tuple[int, int, int, int]]]]:
    """((width, height) of ``render_maps``'s picture, [(title, (x0, y0, x1, y1)) of each panel's image]).
    Panels in order: per chosen layer (or the mean), before then after; wrapped after ``PER_ROW`` panels."""
    pw, ph = _panel_size(image_size, panel)
    names = ["mean of layers " + _span(maps.layers)] if aggregate else [f"layer {layer}" for layer in maps.layers]
    titles = []
    for name in names:
        titles.append(name if after is None else f"{name}: before")
        if after is not None:
            titles.append(f"{name}: {'+'.join(after.methods) or 'after'}")
    per_row = PER_ROW if after is None else PER_ROW - PER_ROW % 2
    cols = min(len(titles), per_row)
    rows = (len(titles) + per_row - 1) // per_row
    width = 2 * MARGIN + cols * pw + (cols - 1) * GAP
    height = 2 * MARGIN + rows * (TITLE + ph) + (rows - 1) * GAP + LEGEND
    boxes = []
    for k, title in enumerate(titles):
        r, c = divmod(k, per_row)
        x0 = MARGIN + c * (pw + GAP)
        y0 = MARGIN + r * (TITLE + ph + GAP) + TITLE
        boxes.append((title, (x0, y0, x0 + pw, y0 + ph)))
    return (width, height), boxes


def _span(layers: tuple[int, ...]) -> str:
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _panel(base: Any, size: tuple[int, int], cells: torch.Tensor, sinks: torch.Tensor, pruned: torch.Tensor,
           region: tuple[float, float, float, float], scale: float, top: float) -> Any:
    """One panel: ``base`` (grey RGB, panel size) with each cell's colour (value / top) over the pixels it
    covers, sinks outlined, pruned cells grey."""
    from PIL import Image, ImageDraw

    rows, cols = cells.shape
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    x0, y0, x1, y1 = (v * scale for v in region)
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows

    def box(i: int, j: int, inset: int = 0) -> tuple[int, int, int, int]:
        return (round(x0 + j * cw) + inset, round(y0 + i * ch) + inset,
                round(x0 + (j + 1) * cw) - 1 - inset, round(y0 + (i + 1) * ch) - 1 - inset)

    values = cells.tolist()
    for i in range(rows):
        for j in range(cols):
            if pruned[i, j]:
                draw.rectangle(box(i, j), fill=(*PRUNED, 255))
            else:
                t = values[i][j] / top if top > 0 else 0.0
                draw.rectangle(box(i, j), fill=(*colormap(t), HEAT_ALPHA))
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(out)
    for i, j in sinks.nonzero().tolist():
        draw.rectangle(box(i, j), outline=OUTLINE_OUTER, width=1)
        if cw > 4 and ch > 4:
            draw.rectangle(box(i, j, 1), outline=OUTLINE_INNER, width=1)
    return out


def render_maps(
    maps: AttentionMaps,
    image: Any,
    after: AttentionMaps | None = None,
    *,
    aggregate: bool = False,
    panel: int = PANEL,
    path: str | os.PathLike | None = None,
) -> Any:
    """A PIL picture of ``maps`` over ``image`` (the original PIL image the inputs were made from).

    One panel per chosen layer (``aggregate``: one panel, the mean over the chosen layers); with ``after``
    (the same prompt measured under methods, the same layers) each panel is followed by its "after" twin.
    A panel is the image (grey) scaled to ``panel`` pixels on its longest side, each grid cell coloured
    (viridis) over the original-image pixels it covers (``maps.region``; the whole image when None), from 0
    to the largest cell of the panel and its twin (one scale per before/after pair); visual sinks outlined
    white and black; image tokens pruned before that layer covered grey. Titles name the layer and the
    method; the legend gives each pair's largest value. Saved as PNG to ``path`` when given (atomically).
    Size and panel boxes: ``maps_layout``."""
    from PIL import Image, ImageDraw, ImageFont

    if after is not None and tuple(after.layers) != tuple(maps.layers):
        raise ValueError(f"after holds layers {list(after.layers)}, maps {list(maps.layers)}: measure the same layers")
    image = image.convert("RGB")
    (width, height), boxes = maps_layout(maps, image.size, after, aggregate=aggregate, panel=panel)
    pw, ph = _panel_size(image.size, panel)
    scale = pw / image.size[0]
    base = image.convert("L").convert("RGB").resize((pw, ph), Image.BILINEAR)
    variants = [maps] if after is None else [maps, after]

    def content(m: AttentionMaps, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if aggregate:
            return m.mean, m.sinks_any, m.pruned_any
        return m.grid[k], m.sinks[k], m.pruned[k]

    picture = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    count = 1 if aggregate else len(maps.layers)
    tops = []
    for k in range(count):
        top = max(float(content(m, k)[0].max()) for m in variants)
        tops.append(top)
        for v, m in enumerate(variants):
            title, (x0, y0, _, _) = boxes[k * len(variants) + v]
            cells, sinks, pruned = content(m, k)
            region = m.region or (0.0, 0.0, float(image.size[0]), float(image.size[1]))
            picture.paste(_panel(base, (pw, ph), cells, sinks, pruned, region, scale, top), (x0, y0))
            draw.text((x0, y0 - TITLE + 2), title, fill=INK, font=font)
    legend = (f"colour: attention to each image token, 0 to the panel's max ({', '.join(f'{t:.3g}' for t in tops[:6])}"
              f"{', ...' if len(tops) > 6 else ''}); outlined: visual sinks; grey: pruned")
    draw.text((MARGIN, height - LEGEND), legend, fill=INK, font=font)
    if path is not None:
        _atomic_write(Path(path), lambda tmp: picture.save(tmp, format="PNG"), "attention map")
    return picture


# -- the line plot ------------------------------------------------------------------------------------
PLOT_W, PLOT_H = 360, 200
PLOT_LEFT, PLOT_TOP, PLOT_RIGHT, PLOT_BOTTOM = 44, 24, 150, 36
#: Line colours of the three shares.
COLOURS = {"image": (31, 119, 180), "text": (255, 127, 14), "sink": (214, 39, 40)}


def shares_layout() -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """((width, height) of ``render_shares``'s picture, (x0, y0, x1, y1) of its plot area)."""
    width = PLOT_LEFT + PLOT_W + PLOT_RIGHT
    height = PLOT_TOP + PLOT_H + PLOT_BOTTOM
    return (width, height), (PLOT_LEFT, PLOT_TOP, PLOT_LEFT + PLOT_W, PLOT_TOP + PLOT_H)


def share_point(layer: int, value: float, num_layers: int) -> tuple[int, int]:
    """Pixel of (layer, share in [0, 1]) in ``render_shares``'s plot."""
    _, (x0, y0, x1, y1) = shares_layout()
    x = x0 + (x1 - x0) * (layer + 0.5) / num_layers
    y = y1 - (y1 - y0) * min(1.0, max(0.0, value))
    return round(x), round(y)


def _dashed(draw: Any, a: tuple[int, int], b: tuple[int, int], fill: tuple[int, int, int], on: int = 5,
            off: int = 4) -> None:
    (xa, ya), (xb, yb) = a, b
    length = max(1.0, ((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5)
    t = 0.0
    while t < length:
        e = min(length, t + on)
        draw.line((xa + (xb - xa) * t / length, ya + (yb - ya) * t / length,
                   xa + (xb - xa) * e / length, ya + (yb - ya) * e / length), fill=fill, width=2)
        t += on + off


def render_shares(
    shares: AttentionShares,
    after: AttentionShares | None = None,
    *,
    label: str = "after",
    path: str | os.PathLike | None = None,
) -> Any:
    """A PIL line plot: per layer (x), the share (y, 0 to 1) of the answer's attention on image, text and sink
    tokens, averaged over the answer steps (``AttentionShares.mean()``); ``after`` (e.g. under a method,
    named ``label``) dashed with square markers. Size: ``shares_layout()``. Saved as PNG to ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    (width, height), (x0, y0, x1, y1) = shares_layout()
    n = shares.num_layers
    if after is not None and after.num_layers != n:
        raise ValueError(f"after has {after.num_layers} layers, shares {n}")
    picture = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = share_point(0, v, n)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 30, y - 6), f"{v:.2f}", fill=INK, font=font)
    draw.rectangle((x0, y0, x1, y1), outline=INK)
    step = max(1, n // 16)
    for layer in range(0, n, step):
        x, _ = share_point(layer, 0.0, n)
        draw.line((x, y1, x, y1 + 3), fill=INK)
        draw.text((x - 3, y1 + 5), str(layer), fill=INK, font=font)
    draw.text(((x0 + x1) // 2 - 12, y1 + 20), "layer", fill=INK, font=font)
    draw.text((x0, 6), "share of the answer's attention", fill=INK, font=font)
    series = [(shares.mean(), False)] + ([(after.mean(), True)] if after is not None else [])
    for means, dashed in series:
        for key, colour in COLOURS.items():
            points = [share_point(layer, float(means[key][layer]), n) for layer in range(n)]
            for a, b in zip(points, points[1:]):
                if dashed:
                    _dashed(draw, a, b, colour)
                else:
                    draw.line((*a, *b), fill=colour, width=2)
            for x, y in points:
                if dashed:
                    draw.rectangle((x - 3, y - 3, x + 3, y + 3), fill=colour)
                else:
                    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    lx = x1 + 12
    for k, (key, colour) in enumerate(COLOURS.items()):
        y = y0 + 6 + 16 * k
        draw.line((lx, y, lx + 18, y), fill=colour, width=2)
        draw.text((lx + 24, y - 6), key, fill=INK, font=font)
    y = y0 + 6 + 16 * len(COLOURS) + 8
    draw.text((lx, y), "solid: before", fill=INK, font=font)
    if after is not None:
        draw.text((lx, y + 14), f"dashed: {label}"[:22], fill=INK, font=font)
    draw.text((lx, y + 34), "image + text = 1;", fill=INK, font=font)
    draw.text((lx, y + 48), "sink overlaps both", fill=INK, font=font)
    if path is not None:
        _atomic_write(Path(path), lambda tmp: picture.save(tmp, format="PNG"), "share plot")
    return picture
