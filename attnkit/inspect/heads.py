"""Which attention heads look at the image: VHR's vision-aware head divergence (VHD), measured and drawn.

``head_divergence(model, inputs)`` runs one prefill of the model wrapped with ``attnkit.methods.VHR`` and
returns the VHD of every head of every layer: the Euclidean distance between the head's output (the
attention output before ``o_proj``) for the last prompt token with the image and without it.
``head_report`` returns the same scores with the heads VHR selects; ``save_heads_json`` writes them as a
file that ``VHR(heads=path)`` reads back, ``render_heatmap`` draws them as a PNG (Pillow only).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, OutputError

__all__ = ["HeadReport", "head_divergence", "head_report", "render_heatmap", "save_heads_json"]


@dataclasses.dataclass(frozen=True)
class HeadReport:
    """VHR's measurement of one prefill, every tensor (B, layers, heads) on the CPU, one row per prompt.

    ``vhd``: the vision-aware head divergence (fp32), after the outlier filter when it is on;
    ``vhd_raw``: before it; ``norm``: the norm of each head's image-free output; ``heads`` (bool): the heads
    VHR selects (VHD above the median of its layer, in layers ``first_layer`` and later), which it
    reinforces when ``alpha != 1``; ``last_layers``: the number of selecting layers (resolved: the
    family's default when none was given)."""

    vhd: torch.Tensor
    vhd_raw: torch.Tensor
    norm: torch.Tensor
    heads: torch.Tensor
    first_layer: int
    alpha: float
    last_layers: int
    outlier_filter: bool

    @property
    def batch_size(self) -> int:
        return int(self.vhd.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.vhd.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.vhd.shape[2])

    def row(self, index: int) -> HeadReport:
        """The report of prompt ``index`` alone (a batch of one)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"row {index} is out of range for a report of {self.batch_size} prompts")
        index %= self.batch_size
        pick = slice(index, index + 1)
        return dataclasses.replace(
            self, vhd=self.vhd[pick], vhd_raw=self.vhd_raw[pick], norm=self.norm[pick], heads=self.heads[pick]
        )

    def selected(self, index: int = 0) -> dict[int, list[int]]:
        """``{layer: [heads]}`` of the heads selected for prompt ``index`` (layers without any left out)."""
        from attnkit.methods.vhr import head_set

        return head_set(self.heads[index])


def head_report(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    *,
    alpha: float = 1.0,
    last_layers: int | None = None,
    outlier_filter: bool = True,
) -> HeadReport:
    """VHD of every head for each prompt of ``inputs`` (a left-padded batch, one image per prompt as the
    processor gives it), with the heads VHR selects; see ``head_divergence`` for the measurement and
    ``HeadReport`` for the fields. Every row of the report is its prompt's (a batch of B gives B rows)."""
    import attnkit
    from attnkit.methods import VHR

    method = VHR(alpha=alpha, last_layers=last_layers, outlier_filter=outlier_filter, measure_all=True)
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None  # a dict or a processor's BatchFeature
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("head divergence: the inputs need input_ids of shape (batch, tokens)")
    adapter = attnkit.get_adapter(model)
    no_image = [r for r, row in enumerate(adapter.image_mask(ids)) if not bool(row.any())]
    if no_image:
        raise InputError(f"head divergence: prompt {no_image[0]} of the batch holds no image tokens")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    batch["use_cache"] = False  # a prefill only: no KV cache to keep
    with attnkit.wrap(model, method), torch.no_grad():  # AlreadyWrappedError when it is wrapped already
        model(**batch)
        state = method.state()
        if "vhd" not in state:
            raise InputError("head divergence: the forward did not reach VHR (is the model's forward its own?)")
        out = {k: state[k].detach().cpu() for k in ("vhd", "vhd_raw", "norm", "heads")}
    layers = out["vhd"].shape[1]
    return HeadReport(
        vhd=out["vhd"].float(),
        vhd_raw=out["vhd_raw"].float(),
        norm=out["norm"].float(),
        heads=out["heads"].bool(),
        first_layer=method.first_layer,
        alpha=float(alpha),
        last_layers=layers - method.first_layer,
        outlier_filter=bool(outlier_filter),
    )


def head_divergence(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    *,
    alpha: float = 1.0,
    last_layers: int | None = None,
    outlier_filter: bool = True,
) -> torch.Tensor:
    """VHD scores, fp32 on the CPU: (layers, heads) for a batch of one prompt, (B, layers, heads) for a batch.

    One forward of the model (a prefill, no generation), under ``torch.no_grad()``, wrapped with
    ``VHR(alpha, last_layers, outlier_filter)``; the wrap is removed afterwards, also when the forward
    raises. A model that is already wrapped by attnkit raises AlreadyWrappedError. The VHD of head h in
    layer l is the Euclidean distance between the head's output slice before ``o_proj`` for the last
    prompt token with the image and without it (the same prompt with its image tokens removed); with
    ``outlier_filter`` a head whose VHD and image-free output norm both exceed mean + std of its layer
    gets 0 (VHR's filter).

    ``alpha=1`` (the default) gives the model's own VHD: nothing is reinforced. With ``alpha != 1`` VHR
    reinforces its selected heads while measuring, so the scores of the layers after the first reinforced
    one (``last_layers`` from the end) carry the reinforcement of the layers before them, as VHR sees
    them. ``head_report`` gives the selected heads and the unfiltered scores too.
    """
    report = head_report(model, inputs, alpha=alpha, last_layers=last_layers, outlier_filter=outlier_filter)
    return report.vhd[0] if report.batch_size == 1 else report.vhd


# --------------------------------------------------------------------------------------------------
# The head-set file
# --------------------------------------------------------------------------------------------------


def _round(x: float) -> float | None:
    """Six significant digits (None for a value that is not finite; JSON has no NaN)."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _matrix(t: torch.Tensor) -> str:
    """A (layers, heads) tensor as a JSON array, one layer per line."""
    rows = [json.dumps([_round(float(v)) for v in row]) for row in t.tolist()]
    return "[\n    " + ",\n    ".join(rows) + "\n  ]"


def _one_row(report: HeadReport, row: int | None) -> HeadReport:
    if row is not None:
        return report.row(row)
    if report.batch_size != 1:
        raise InputError(f"the report holds {report.batch_size} prompts: pick one with row=INDEX")
    return report


def _atomic_write(path: Path, write: Any, what: str) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path``, then rename it; OutputError naming ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_heads_json(
    report: HeadReport,
    path: str | os.PathLike,
    *,
    row: int | None = None,
    model: str | None = None,
    image: str | None = None,
    prompt: str | None = None,
) -> Path:
    """Write one prompt's report as JSON (atomically: a temporary file, then a rename); returns the path.

    Keys: ``vhd``, ``vhd_raw``, ``norm`` (lists of lists, layers x heads, 6 significant digits),
    ``heads`` (``{"layer": [heads]}`` of the selected heads, so that ``VHR(heads=path)`` reinforces
    exactly them), ``alpha``, ``last_layers``, ``first_layer``, ``outlier_filter``, ``num_layers``,
    ``num_heads`` and, when given, ``model``, ``image`` and ``prompt``. ``row``: the prompt of a batched
    report (a report of one prompt needs none)."""
    one = _one_row(report, row)
    settings: dict[str, Any] = {
        "alpha": one.alpha,
        "last_layers": one.last_layers,
        "first_layer": one.first_layer,
        "outlier_filter": one.outlier_filter,
        "num_layers": one.num_layers,
        "num_heads": one.num_heads,
    }
    for key, value in (("model", model), ("image", image), ("prompt", prompt)):
        if value is not None:
            settings[key] = str(value)
    heads = {str(layer): hs for layer, hs in one.selected(0).items()}
    parts = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in settings.items()]
    parts.append(f'  "heads": {json.dumps(heads)}')
    for key in ("vhd", "vhd_raw", "norm"):
        parts.append(f"  {json.dumps(key)}: {_matrix(getattr(one, key)[0])}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(Path(path), write, "heads file")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# The heat map
# --------------------------------------------------------------------------------------------------

#: viridis at 9 evenly spaced points (matplotlib's / viridisLite's values), interpolated linearly.
VIRIDIS: tuple[tuple[int, int, int], ...] = (
    (0x44, 0x01, 0x54), (0x47, 0x2D, 0x7B), (0x3B, 0x52, 0x8B), (0x2C, 0x72, 0x8E), (0x21, 0x90, 0x8C),
    (0x27, 0xAD, 0x81), (0x5D, 0xC8, 0x63), (0xAA, 0xDC, 0x32), (0xFD, 0xE7, 0x25),
)  # fmt: skip
#: Side of one cell (one head of one layer) in pixels.
CELL = 14
#: Margins around the grid: the layer labels (left), the head labels (top), the colour bar and its
#: values (right), the legend (bottom).
LEFT, TOP, RIGHT, BOTTOM = 40, 30, 84, 20
#: The grid area is at least this tall, so that the colour bar has room for its two values.
MIN_HEIGHT = 64
BAR_GAP, BAR_WIDTH = 10, 12
BACKGROUND, INK, MISSING = (255, 255, 255), (0, 0, 0), (160, 160, 160)
#: The border of a selected (reinforced) head: white outside, black inside, visible on any viridis colour.
OUTLINE_OUTER, OUTLINE_INNER = (255, 255, 255), (0, 0, 0)


def colormap(t: float) -> tuple[int, int, int]:
    """The viridis colour of ``t`` in [0, 1] (clamped)."""
    t = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    return tuple(int(round(a[c] + (b[c] - a[c]) * f)) for c in range(3))  # type: ignore[return-value]


def heatmap_size(layers: int, heads: int) -> tuple[int, int]:
    """(width, height) in pixels of ``render_heatmap``'s image for a (layers, heads) score table."""
    return LEFT + heads * CELL + RIGHT, TOP + max(layers * CELL, MIN_HEIGHT) + BOTTOM


def _label_step(count: int, extent: float) -> int:
    """Label every ``step``-th cell: the smallest round step whose span holds a label and some space."""
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100):
        if step * CELL >= extent + 6 or step >= count:
            return step
    return 100


def _selection(heads: Any, shape: tuple[int, int]) -> torch.Tensor:
    """A (layers, heads) bool mask from a bool table or a ``{layer: [heads]}`` dict."""
    if heads is None:
        return torch.zeros(shape, dtype=torch.bool)
    if isinstance(heads, dict):
        mask = torch.zeros(shape, dtype=torch.bool)
        for layer, hs in heads.items():
            for h in [hs] if isinstance(hs, int) else hs:
                if not (0 <= int(layer) < shape[0] and 0 <= int(h) < shape[1]):
                    raise ValueError(f"heads names head {h} of layer {layer}, outside the {shape[0]}x{shape[1]} table")
                mask[int(layer), int(h)] = True
        return mask
    mask = torch.as_tensor(heads).bool().cpu()
    if tuple(mask.shape) != shape:
        raise ValueError(f"heads has shape {tuple(mask.shape)}, the scores {shape}")
    return mask


def _number(x: float) -> str:
    return f"{x:.4g}"


def render_heatmap(vhd: Any, heads: Any = None, path: str | os.PathLike | None = None, *, label: str = "VHD") -> Any:
    """A PIL image of a (layers, heads) score table: one row per layer (layer 0 at the top), one column per
    head, ``CELL`` pixels each, coloured by viridis from the table's minimum to its maximum (a value that is
    not finite: grey); the heads in ``heads`` (a bool table of the same shape or ``{layer: [heads]}``)
    outlined white and black; layer and head indices every few cells, a colour bar with the minimum and
    maximum on the right, titled ``label`` (a few characters). Size: ``heatmap_size(layers, heads)``. Saved as PNG to ``path`` when given
    (atomically). The same input gives the same pixels."""
    from PIL import Image, ImageDraw, ImageFont

    table = torch.as_tensor(vhd).detach().float().cpu()
    if table.dim() == 3 and table.shape[0] == 1:
        table = table[0]
    if table.dim() != 2 or table.numel() == 0:
        raise ValueError(f"expected a (layers, heads) table of scores, got shape {tuple(table.shape)}")
    layers, nheads = table.shape
    mask = _selection(heads[0] if isinstance(heads, torch.Tensor) and heads.dim() == 3 else heads, (layers, nheads))
    finite = table[torch.isfinite(table)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
    span = hi - lo

    width, height = heatmap_size(layers, nheads)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    values = table.tolist()
    for layer in range(layers):
        for head in range(nheads):
            v = values[layer][head]
            color = colormap((v - lo) / span if span > 0 else 0.5) if math.isfinite(v) else MISSING
            x0, y0 = LEFT + head * CELL, TOP + layer * CELL
            draw.rectangle((x0, y0, x0 + CELL - 1, y0 + CELL - 1), fill=color)
            if mask[layer, head]:
                draw.rectangle((x0, y0, x0 + CELL - 1, y0 + CELL - 1), outline=OUTLINE_OUTER, width=1)
                draw.rectangle((x0 + 1, y0 + 1, x0 + CELL - 2, y0 + CELL - 2), outline=OUTLINE_INNER, width=1)

    def text_size(text: str) -> tuple[float, float]:
        box = draw.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    # axis titles and labels
    draw.text((LEFT, 2), "head", fill=INK, font=font)
    draw.text((2, TOP - 14), "layer", fill=INK, font=font)
    label_h = text_size("0")[1]
    step = _label_step(layers, label_h)
    for layer in range(0, layers, step):
        text = str(layer)
        w, h = text_size(text)
        draw.text((LEFT - 4 - w, TOP + layer * CELL + (CELL - h) / 2 - 1), text, fill=INK, font=font)
    step = _label_step(nheads, text_size(str(nheads - 1))[0])
    for head in range(0, nheads, step):
        text = str(head)
        w, _ = text_size(text)
        draw.text((LEFT + head * CELL + (CELL - w) / 2, TOP - 14), text, fill=INK, font=font)

    # colour bar: the maximum at the top, the minimum at the bottom
    bar_x = LEFT + nheads * CELL + BAR_GAP
    bar_h = max(layers * CELL, MIN_HEIGHT)
    for y in range(bar_h):
        t = 1.0 - y / (bar_h - 1)
        draw.line((bar_x, TOP + y, bar_x + BAR_WIDTH - 1, TOP + y), fill=colormap(t))
    draw.rectangle((bar_x - 1, TOP - 1, bar_x + BAR_WIDTH, TOP + bar_h), outline=INK)
    top_text, bottom_text = _number(hi), _number(lo)
    draw.text((bar_x + BAR_WIDTH + 4, TOP - 1), top_text, fill=INK, font=font)
    draw.text((bar_x + BAR_WIDTH + 4, TOP + bar_h - text_size(bottom_text)[1] - 2), bottom_text, fill=INK, font=font)
    draw.text((bar_x, 2), label, fill=INK, font=font)
    if bool(mask.any()):
        draw.text((4, TOP + bar_h + 4), f"outlined: selected heads ({int(mask.sum())})", fill=INK, font=font)

    if path is not None:
        _atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"), "heat map")
    return image
