"""CARVE (Ge et al., "Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning"): a pipeline,
not an attention rewrite.

1. Probe: greedy-generate ``probe_tokens`` tokens for the task question and for a general instruction
   ("Write a general description of the image."), as one left-padded batch of two rows with the same
   image. At every step and every layer of ``layers``, an internal observer (a Method with an ``observe``
   role, never registered) reads the head-mean attention of the newest query row to the image tokens of
   the image's global view.
2. Contrast: per step and layer A_task / (A_general + 1e-8); mean over the layers; weighted mean over the
   steps with weight step + 1 (later steps count more), over the steps both rows produced (up to and
   including each row's EOS; the official code runs each prompt until its EOS and fuses the shorter
   length). The grid map is upsampled bilinearly onto the part of the image that the global view shows
   (the whole image except for centre-cropping processors, see attnkit.eval.grounding.view_region);
   pixels outside that part get 0.
3. Regions: the pixels at or above the (1 - top_ratio) quantile, connected components with 4-connectivity
   (scipy.ndimage.label's default, as the official code uses; own numpy labelling), ranked by their
   attention sum (the official "attention_sum" strategy, version v4), the best
   max(min_regions, int(n * top_ratio)) kept (all when fewer exist).
4. Refined view: every pixel outside the kept regions set to black (the official code multiplies by the
   mask), cropped to the union box of the kept regions, magnified with the aspect ratio kept by
   max(W / w, H / h) so that it covers the original size (LANCZOS, as the official code).
5. Answer: one prompt with the original image then the refined view (every family with an image grid
   takes several images per prompt; InstructBLIP has no grid and is refused).

Default layers: the official 20..25 of Qwen2.5-VL-7B's 28 layers, scaled by depth:
round(20/28 * L) .. round(25/28 * L), clamped to [0, L - 1] (``default_layers``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError, MethodArgumentError, UnsupportedModelError
from .base import Method, MethodConfig, check_int, check_range
from .registry import register_pipeline

GENERAL_PROMPT = "Write a general description of the image."
#: The official layers (20..25 inclusive) and the depth they belong to (Qwen2.5-VL-7B).
OFFICIAL_LAYERS = (20, 25)
OFFICIAL_DEPTH = 28
EPS = 1e-8
#: generate() arguments that the greedy probes set themselves.
_PROBE_OWN = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The official 20..25 of 28 layers scaled to ``num_layers``, clamped to valid layer indices."""
    lo = round(OFFICIAL_LAYERS[0] / OFFICIAL_DEPTH * num_layers)
    hi = round(OFFICIAL_LAYERS[1] / OFFICIAL_DEPTH * num_layers)
    lo, hi = min(lo, num_layers - 1), min(hi, num_layers - 1)
    return tuple(range(lo, hi + 1))


# -- pure array helpers -------------------------------------------------------------------------
def label_regions(mask: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D bool mask: (labels int32 (H, W), 0 off the mask and 1..n in raster
    order of each component's first pixel, n). ``connectivity`` 4 (edges) or 8 (edges and corners).

    Works on runs: each row's runs of True are joined (union-find) with the runs of the row above that
    touch them, so the Python loops go over runs, not pixels."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    height, width = mask.shape
    reach = 1 if connectivity == 8 else 0
    parent: list[int] = []

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    runs: list[tuple[int, int, int, int]] = []  # (row, start, end, run id)
    prev: list[tuple[int, int, int]] = []  # the row above: (start, end, run id)
    padded = np.zeros(width + 2, dtype=np.int8)
    for y in range(height):
        padded[1:-1] = mask[y]
        edges = np.flatnonzero(np.diff(padded))
        cur = []
        for start, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
            rid = len(parent)
            parent.append(rid)
            for ps, pe, pid in prev:
                if ps < end + reach and start < pe + reach:  # the runs touch
                    a, b = find(rid), find(pid)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
            cur.append((start, end, rid))
            runs.append((y, start, end, rid))
        prev = cur
    labels = np.zeros((height, width), dtype=np.int32)
    names: dict[int, int] = {}
    for y, start, end, rid in runs:  # raster order: a component is named at its first run
        root = find(rid)
        if root not in names:
            names[root] = len(names) + 1
        labels[y, start:end] = names[root]
    return labels, len(names)


def region_boxes(labels: np.ndarray, n: int) -> list[tuple[int, int, int, int]]:
    """Per label 1..n, its box (x0, y0, x1, y1), end-exclusive."""
    boxes = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return boxes


@dataclass
class Regions:
    """What ``select_regions`` kept: ``mask`` (H, W) bool of the kept regions' pixels, ``boxes`` their
    boxes (x0, y0, x1, y1) end-exclusive, best first, ``box`` their union box, ``found`` how many
    regions the threshold gave."""

    mask: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    box: tuple[int, int, int, int]
    found: int


def select_regions(
    contrast: np.ndarray, top_ratio: float = 0.2, min_regions: int = 3, *, rank: str = "attention",
    connectivity: int = 4,
) -> Regions:
    """The top ``top_ratio`` pixels of ``contrast`` (those at or above its (1 - top_ratio) quantile, so ties
    may add more), split into connected regions, of which the best max(min_regions, int(n * top_ratio))
    are kept (all n when fewer): ranked by their summed contrast (``rank="attention"``, the official
    default) or by their pixel count (``rank="size"``), ties by raster order."""
    if not 0 < top_ratio <= 1:
        raise ValueError(f"top_ratio must be in (0, 1], got {top_ratio}")
    if min_regions < 1:
        raise ValueError(f"min_regions must be >= 1, got {min_regions}")
    if rank not in ("attention", "size"):
        raise ValueError(f"rank must be 'attention' or 'size', got {rank!r}")
    contrast = np.asarray(contrast, dtype=np.float64)
    threshold = np.quantile(contrast, 1.0 - top_ratio)
    labels, n = label_regions(contrast >= threshold, connectivity)
    flat = labels.ravel()
    weights = contrast.ravel() if rank == "attention" else None
    scores = np.bincount(flat, weights=weights, minlength=n + 1)[1:]
    order = sorted(range(n), key=lambda k: (-scores[k], k))
    keep = [k + 1 for k in order[: min(n, max(min_regions, int(n * top_ratio)))]]
    boxes_all = region_boxes(labels, n)
    boxes = [boxes_all[k - 1] for k in keep]
    mask = np.isin(labels, keep)
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return Regions(mask=mask, boxes=boxes, box=box, found=n)


def refine_image(image: Any, mask: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int] | None = None):
    """The refined view: ``image`` (PIL) black outside ``mask``, cropped to ``box`` (x0, y0, x1, y1), then
    resized to ``size`` (width, height), or (None) magnified with its aspect ratio kept by
    max(W / w, H / h) of the original size W x H (the official code's choice)."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB")).copy()
    if mask.shape != arr.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image's {arr.shape[:2]}")
    arr[~mask] = 0
    x0, y0, x1, y1 = box
    crop = Image.fromarray(arr).crop((x0, y0, x1, y1))
    if size is None:
        width, height = image.size
        scale = max(width / crop.width, height / crop.height)
        size = (max(1, int(crop.width * scale)), max(1, int(crop.height * scale)))
    return crop.resize(size, Image.LANCZOS)


def grid_to_pixels(
    cells: np.ndarray, image_size: tuple[int, int], region: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """A (rows, cols) grid map upsampled bilinearly (half-pixel centres) onto ``region`` (x0, y0, x1, y1)
    of an image of ``image_size`` (width, height); the (H, W) float64 map is 0 outside the region."""
    width, height = image_size
    x0, y0, x1, y1 = region if region is not None else (0.0, 0.0, float(width), float(height))
    ix0, iy0 = max(0, int(round(x0))), max(0, int(round(y0)))
    ix1, iy1 = min(width, max(ix0 + 1, int(round(x1)))), min(height, max(iy0 + 1, int(round(y1))))
    out = np.zeros((height, width), dtype=np.float64)
    grid = torch.as_tensor(np.asarray(cells, dtype=np.float64))[None, None]
    up = torch.nn.functional.interpolate(grid, size=(iy1 - iy0, ix1 - ix0), mode="bilinear", align_corners=False)
    out[iy0:iy1, ix0:ix1] = up[0, 0].numpy()
    return out


def fuse_contrast(task: np.ndarray, general: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Per-step, per-layer attention of the task row and the general row, (T, L, ...) each -> the contrast
    task / (general + eps), mean over layers, then mean over steps weighted by step + 1."""
    task, general = np.asarray(task, dtype=np.float64), np.asarray(general, dtype=np.float64)
    if task.shape != general.shape or task.ndim < 2 or task.shape[0] == 0:
        raise ValueError(f"task and general maps must share a (steps, layers, ...) shape, got {task.shape} / {general.shape}")
    per_step = (task / (general + eps)).mean(axis=1)
    weights = np.arange(1, task.shape[0] + 1, dtype=np.float64)
    return np.tensordot(weights, per_step, axes=1) / weights.sum()


# -- the observer ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _ProbeConfig(MethodConfig):
    layers: tuple[int, ...] = ()


class _ImageAttentionProbe(Method):
    """Internal, never registered: per forward (prefill, then each decode step) and per layer of
    ``layers``, the head-mean attention of the forward's last query row to given key columns."""

    name = "carve_probe"
    Config = _ProbeConfig

    def __init__(self, layers: Sequence[int], columns: torch.Tensor) -> None:
        super().__init__(layers=tuple(layers))
        self.slot = {layer: i for i, layer in enumerate(self.config.layers)}
        self.image_columns = columns  # (B, N) long: each row's image-token positions
        self.steps: list[torch.Tensor] = []  # per forward: (L, B, N) float32

    def begin_forward(self, view: Any) -> None:
        if view.is_prefill:
            self.steps = []
        self.steps.append(torch.zeros(len(self.slot), *self.image_columns.shape))

    def layers(self, view: Any) -> set[int]:
        return set(self.config.layers)

    def rows(self, view: Any) -> torch.Tensor | None:
        return torch.tensor([view.q_len - 1]) if view.q_len > 1 else None

    def observe(self, view: Any, probs: torch.Tensor) -> None:
        index = view.row_index(view.q_len - 1)  # the kernel may hand the rows over in blocks: the last counts
        if index is None:
            return
        row = probs[:, :, index, :].float().mean(1)  # (B, K')
        cols = self.image_columns.to(row.device)
        self.steps[-1][self.slot[view.layer]] = row.gather(1, cols).cpu()


# -- the pipeline ---------------------------------------------------------------------------------
@dataclass
class Probe:
    """The contrast of one image: ``cells`` the (rows, cols) grid map, ``contrast`` the (H, W) pixel map,
    ``steps`` how many generated steps were fused, ``layers`` the layers read, ``texts`` the probes'
    answers (task, general)."""

    cells: np.ndarray
    contrast: np.ndarray
    steps: int
    layers: tuple[int, ...]
    texts: tuple[str, str]


@dataclass
class CarveResult:
    """``answer`` the final answer; ``refined`` the refined view (PIL); ``contrast`` the (H, W) contrast
    map over the original image; ``boxes`` the kept regions' boxes (x0, y0, x1, y1), best first; ``box``
    their union (the crop); ``probe`` the probing details."""

    answer: str
    refined: Any
    contrast: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    box: tuple[int, int, int, int]
    probe: Probe


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _decode(processor: Any, tokens: torch.Tensor) -> list[str]:
    return [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]


def probe_contrast(
    model: Any,
    processor: Any,
    image: Any,
    question: str,
    general_prompt: str = GENERAL_PROMPT,
    layers: Sequence[int] | None = None,
    probe_tokens: int = 32,
    *,
    methods: Sequence[Method] = (),
    **generate_kwargs: Any,
) -> Probe:
    """Steps 1-2 of CARVE (see the module docstring): the contrast map of ``image`` for ``question``.
    ``methods``: further attnkit methods wrapped together with the observer (applied before it; they must
    keep every token, e.g. not a pruning method). The model is unwrapped again on return or error."""
    import attnkit

    from ..eval.grounding import _answer_lengths, view_region
    from ..eval.inputs import make_batch

    adapter = attnkit.get_adapter(model)
    if not adapter.has_image_grid:
        raise UnsupportedModelError(f"carve needs image tokens on a grid; {adapter.family} has none")
    if probe_tokens < 1:
        raise InputError(f"carve: probe_tokens must be >= 1, got {probe_tokens}")
    layers = tuple(default_layers(adapter.num_layers) if layers is None else layers)
    bad = [layer for layer in layers if not 0 <= layer < adapter.num_layers]
    if not layers or bad:
        raise InputError(f"carve: layers {list(layers)} must be non-empty indices in [0, {adapter.num_layers - 1}]")
    image = image.convert("RGB")
    batch = make_batch(processor, adapter, [question, general_prompt], [image, image])
    grids = adapter.image_grids(batch)
    if any(not g for g in grids):
        raise InputError("carve: the processor's batch holds no image tokens")
    grid = grids[0][adapter.global_view]
    other = grids[1][adapter.global_view]
    if (grid.rows, grid.cols) != (other.rows, other.cols):
        raise InputError("carve: the two probes' image grids differ")
    columns = torch.stack([grid.positions().flatten(), other.positions().flatten()])
    probe = _ImageAttentionProbe(layers, columns)
    kwargs = {k: v for k, v in generate_kwargs.items() if k not in _PROBE_OWN}
    batch = _to(batch, _device(model))
    with torch.no_grad(), attnkit.wrap(model, [*methods, probe]):
        out = model.generate(**batch, max_new_tokens=probe_tokens, do_sample=False, **kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    lengths = _answer_lengths(new, model)
    steps = max(1, min(min(lengths), len(probe.steps)))
    maps = torch.stack(probe.steps[:steps])  # (T, L, B, N)
    cells = fuse_contrast(maps[:, :, 0].numpy(), maps[:, :, 1].numpy()).reshape(grid.rows, grid.cols)
    image_processor = getattr(processor, "image_processor", None)
    region = view_region(image_processor, image.width, image.height, adapter.global_view_cropped)
    contrast = grid_to_pixels(cells, image.size, region)
    texts = _decode(processor, new)
    return Probe(cells=cells, contrast=contrast, steps=steps, layers=layers, texts=(texts[0], texts[1]))


def _answer_batch(processor: Any, adapter: Any, question: str, images: list[Any]) -> dict[str, Any]:
    """One prompt: the images in order, then the question, through the processor's chat template."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = dict(processor(text=[text], images=[images], padding=True, return_tensors="pt"))
    tokenizer = getattr(processor, "tokenizer", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return type(adapter).left_pad_batch(batch, 0 if pad_id is None else int(pad_id))


def answer(
    model: Any,
    processor: Any,
    image: Any,
    question: str,
    general_prompt: str = GENERAL_PROMPT,
    layers: Sequence[int] | None = None,
    top_ratio: float = 0.2,
    min_regions: int = 3,
    probe_tokens: int = 32,
    **generate_kwargs: Any,
) -> CarveResult:
    """Answer ``question`` about ``image`` (PIL) with CARVE (module docstring): probe, contrast, refine, then
    generate on the original image followed by the refined view. ``generate_kwargs`` go to the final
    generate() (``max_new_tokens`` defaults to 32, the official setting) and, less the decoding settings,
    to the greedy probes. The model is left unwrapped, also when an error is raised."""
    import attnkit

    if not 0 < top_ratio <= 1:
        raise InputError(f"carve: top_ratio must be in (0, 1], got {top_ratio}")
    if min_regions < 1:
        raise InputError(f"carve: min_regions must be >= 1, got {min_regions}")
    image = image.convert("RGB")
    probe = probe_contrast(model, processor, image, question, general_prompt, layers, probe_tokens, **generate_kwargs)
    regions = select_regions(probe.contrast, top_ratio, min_regions)
    refined = refine_image(image, regions.mask, regions.box)
    adapter = attnkit.get_adapter(model)
    batch = _to(_answer_batch(processor, adapter, question, [image, refined]), _device(model))
    kwargs = {"max_new_tokens": 32, "do_sample": False, **generate_kwargs}
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    text = _decode(processor, out[:, batch["input_ids"].shape[1] :])[0]
    return CarveResult(answer=text, refined=refined, contrast=probe.contrast, boxes=regions.boxes, box=regions.box,
                       probe=probe)


# -- the pipeline entry of attnkit eval --------------------------------------------------------
@dataclasses.dataclass
class CARVEConfig(MethodConfig):
    general_prompt: str = MethodConfig.option(GENERAL_PROMPT, help="the general instruction contrasted with the question")
    layers: list[int] | None = MethodConfig.option(
        None, help="layers whose attention is contrasted, e.g. 20-25 (default: the official 20..25 of 28 scaled "
                   "to the model's depth)", lo=0, aliases={"default": None})
    top_ratio: float = MethodConfig.option(0.2, help="share of the pixels kept before region selection", lo=0.0, hi=1.0)
    min_regions: int = MethodConfig.option(3, help="keep at least this many connected regions", lo=1)
    probe_tokens: int = MethodConfig.option(32, help="greedy tokens generated per probe", lo=1)

    def validate(self) -> None:
        check_range("carve", "top_ratio", self.top_ratio, 0.0, 1.0)
        if self.top_ratio == 0:
            raise MethodArgumentError("carve: top_ratio=0 keeps no pixel (range (0, 1])")
        check_int("carve", "min_regions", self.min_regions, 1)
        check_int("carve", "probe_tokens", self.probe_tokens, 1)
        if self.layers is not None:
            self.layers = list(self.layers)
            for layer in self.layers:
                check_int("carve", "layers", layer, 0)


@register_pipeline
class CARVE:
    """CARVE (Ge et al.): contrast task/general attention, mask and crop the image, answer on both views."""

    name = "carve"
    Config = CARVEConfig
    #: Marks a pipeline for the eval runner: it calls ``run`` per sample instead of a wrapped generate().
    pipeline = True

    def __init__(self, config: CARVEConfig | None = None, **kwargs: Any) -> None:
        from .config import build_config

        self.config = config if config is not None else build_config(CARVEConfig, self.name, kwargs)

    def run(self, model: Any, processor: Any, image: Any, question: str, **generate_kwargs: Any) -> str:
        c = self.config
        return answer(model, processor, image, question, c.general_prompt, c.layers, c.top_ratio, c.min_regions,
                      c.probe_tokens, **generate_kwargs).answer

    def __repr__(self) -> str:
        return f"CARVE({', '.join(f'{k}={v!r}' for k, v in self.config.to_dict().items())})"


__all__ = [
    "CARVE",
    "CARVEConfig",
    "CarveResult", "GENERAL_PROMPT", "Probe", "Regions", "answer", "default_layers", "fuse_contrast",
    "grid_to_pixels", "label_regions", "probe_contrast", "refine_image", "region_boxes", "select_regions",
]
