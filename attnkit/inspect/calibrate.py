"""Calibration: a model's sink dimensions (VAR) and a per-head table (image attention, visual-sink share, VHD).

Both run prefills only (no generation) of the model wrapped with a read-only probe (``select`` reads each
decoder layer's input hidden states, ``observe`` the attention probabilities; nothing is rewritten), on a
few images with one prompt, and write files the methods read back:

- ``calibrate_sinks`` -> ``save_sinks_json``: ``VAR(sink_dims=path)``, ``--var.sink-dims path``;
- ``calibrate_heads`` -> ``save_calibration_heads_json``: ``VHR(heads=path)``, ``ACT(heads=path)``.

The sink rule is VAR's (Kang et al., ICLR 2025): a token is a sink where, after RMS normalisation without the
learned scale (``attnkit.methods.var.rms_normed``), its hidden state exceeds ``tau`` at a sink dimension;
sink dimensions are where a few tokens carry massive activations (Sun et al., "Massive Activations in Large
Language Models", 2024), layer after layer. See ``calibrate_sinks`` for how they are picked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, InputError
from ..eval.inputs import open_rgb
from ..methods.base import Method
from ..methods.files import load_sink_dims
from ..methods.var import find_sinks, rms_normed, table_sink_dims
from .heads import _atomic_write, _matrix, _round, head_report, render_heatmap

__all__ = [
    "DEFAULT_PROMPT", "HeadCalibration", "SinkCalibration", "calibrate_heads", "calibrate_sinks", "default_tau",
    "list_images", "save_calibration_heads_json", "save_sinks_json",
]

#: The prompt of the calibration prefills unless one is given (CHAIR's captioning instruction).
DEFAULT_PROMPT = "Please describe this image in detail."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: VAR's default threshold on |normed hidden| (the official configuration's tau).
VAR_TAU = 20.0


def default_tau(hidden_size: int) -> float:
    """VAR's tau=20, lowered to 0.7 x sqrt(hidden_size) for language models narrower than 817: an entry of
    the parameter-free RMS norm is at most sqrt(hidden_size), so 20 is out of reach there (a tiny model)."""
    return min(VAR_TAU, 0.7 * math.sqrt(hidden_size))


# ------------------------------------------------------------------------------------------- inputs


def list_images(directory: str | os.PathLike, n: int | None = None) -> list[Path]:
    """The first ``n`` image files of ``directory`` (by name; every one for None); DataError naming it."""
    path = Path(directory)
    if not path.exists():
        raise DataError(f"image dir not found: {path}")
    if not path.is_dir():
        raise DataError(f"image dir {path} is not a directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image dir {path} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return files if n is None else files[:n]


def _open(image: Any) -> Any:
    return open_rgb(image)


def _batches(model: torch.nn.Module, processor: Any, images: Any, inputs: Any, prompt: str,
             n: int | None) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    """(names, batches): one batch of one prompt per image, or the caller's ``inputs`` (batches) as given."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise InputError(f"calibration: n={n!r} must be an integer >= 1")
    if inputs is not None:
        batches = [inputs] if isinstance(inputs, Mapping) else list(inputs)
        batches = batches if n is None else batches[:n]
        if not batches:
            raise InputError("calibration: no inputs given")
        return [f"batch {i}" for i in range(len(batches))], iter(batches)
    if processor is None or images is None:
        raise InputError("calibration needs a processor and images (or inputs=[batch, ...])")
    if isinstance(images, (str, os.PathLike)):
        images = list_images(images, n)
    else:
        images = list(images) if n is None else list(images)[:n]
    if not images:
        raise InputError("calibration: no images given")
    names = [Path(im).name if isinstance(im, (str, os.PathLike)) else f"image {i}" for i, im in enumerate(images)]

    def gen() -> Iterator[Mapping[str, Any]]:
        import attnkit

        from ..eval.inputs import make_batch

        adapter = attnkit.get_adapter(model)
        for image in images:
            yield make_batch(processor, adapter, [prompt], [_open(image)])

    return names, gen()


def _prefill(model: torch.nn.Module, batch: Mapping[str, Any]) -> None:
    device = next(model.parameters()).device
    feed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    feed["use_cache"] = False
    with torch.no_grad():
        model(**feed)


# ------------------------------------------------------------------------------------------- the probes


class _SinkProbe(Method):
    """Read-only: per prefill and layer, statistics of the normed input hidden states of each row's real tokens."""

    name = "calibration_probe"

    def __init__(self, tau: float, dims: torch.Tensor | None = None) -> None:
        super().__init__()
        self.tau = float(tau)
        self.dims = dims  # sink dims: the sink tokens of each layer (for the heads' visual-sink share)
        self.layer_stats: dict[int, dict[str, torch.Tensor]] = {}
        self.sinks: dict[int, torch.Tensor] = {}

    def layers(self, view: Any) -> set[int] | None:
        return set()  # attention untouched (fused sdpa)

    def begin_forward(self, view: Any) -> None:
        if view.is_prefill:
            self.layer_stats, self.sinks = {}, {}

    def select(self, view: Any, hidden: torch.Tensor) -> None:
        if not view.is_prefill:
            return None
        q = hidden.shape[1]
        real = (view.attention_mask[:, -q:].bool() if view.attention_mask is not None
                else torch.ones(hidden.shape[:2], dtype=torch.bool)).to(hidden.device)
        image = view.image_mask
        image = (image[:, -q:].to(hidden.device) if image is not None
                 else torch.zeros_like(real)) & real
        normed = rms_normed(hidden) * real[..., None]  # (B, q, D) fp32, padding 0
        over = normed > self.tau
        self.layer_stats[view.layer] = {
            "max_abs": normed.amax(1).cpu(),  # (B, D)
            "over": over.sum(1).cpu(),  # (B, D)
            "image_over": (over & image[..., None]).sum(1).cpu(),
            "tokens": real.sum(1).cpu(),  # (B,)
        }
        if self.dims is not None:
            self.sinks[view.layer] = find_sinks(hidden, self.dims, self.tau, real)[0]  # VAR's rule
        return None


class _HeadProbe(_SinkProbe):
    """Read-only: also, per layer and head, the attention of the text rows after the image to the image tokens
    and to the visual sinks (image tokens that are sinks at that layer)."""

    def begin_forward(self, view: Any) -> None:
        super().begin_forward(view)
        if not view.is_prefill:
            return
        image = view.image_mask
        if image is None or not bool(image.any()):
            raise InputError("head calibration: the prompt holds no image tokens")
        has_image = image.any(1)
        first = torch.where(has_image, image.float().argmax(1), image.shape[1])
        pos = torch.arange(view.q_len, device=image.device)
        eligible = (pos[None, :] > first[:, None]) & ~image  # VAR's query rows: the text after the image
        if view.attention_mask is not None:
            eligible &= view.attention_mask[:, -view.q_len:].bool().to(eligible.device)
        self.eligible = eligible
        self.sums: dict[int, torch.Tensor] = {}  # layer -> (B, 3, H): image attention, visual-sink attention, rows

    def layers(self, view: Any) -> set[int] | None:
        return None if view.is_prefill else set()

    def rows(self, view: Any) -> torch.Tensor | None:
        return self.eligible.any(0).nonzero().flatten()

    def observe(self, view: Any, probs: torch.Tensor) -> None:
        layer, width = view.layer, probs.shape[-1]
        rows = view.rows if view.rows is not None else torch.arange(probs.shape[2])
        ok = self.eligible[:, rows.to(self.eligible.device)].to(probs.device).float()  # (B, r)
        image = view.image_mask_kv()[:, :width].to(probs.device)
        sink = self.sinks.get(layer)
        visual = image & sink[:, :width].to(probs.device) if sink is not None else torch.zeros_like(image)
        cols = torch.stack([image, visual], -1).float()  # (B, K', 2)
        p = probs.float()
        got = torch.einsum("bhrk,bkc->bhrc", p, cols) * ok[:, None, :, None]  # (B, H, r, 2)
        per = got.sum(2).transpose(1, 2)  # (B, 2, H)
        count = ok.sum(1)[:, None, None].expand(-1, 1, p.shape[1])
        add = torch.cat([per, count], 1).cpu()
        self.sums[layer] = self.sums[layer] + add if layer in self.sums else add


def _probe_run(model: torch.nn.Module, probe: _SinkProbe, batch: Mapping[str, Any]) -> None:
    import attnkit

    with attnkit.wrap(model, probe):  # AlreadyWrappedError when it is wrapped already
        _prefill(model, batch)
    if not probe.layer_stats:
        raise InputError("calibration: the forward did not reach the probe (is the model's forward its own?)")


# ------------------------------------------------------------------------------------------- sinks


@dataclasses.dataclass(frozen=True)
class SinkCalibration:
    """What ``calibrate_sinks`` measured; every table (layers, hidden_size), fp32 on the CPU, over the samples.

    ``max_abs``: mean over the samples of the largest |normed activation| of any real token;
    ``tokens_over``: mean number of tokens per sample above ``tau`` (``image_tokens_over``: of them, image
    tokens); ``hit_rate``: share of the samples where between 1 and ``max_token_share`` of the tokens are above
    ``tau`` (a few tokens carry a massive activation); ``ratio``: ``max_abs`` over the layer's median
    dimension's; ``layers_hit`` (hidden_size,): the layers where ``hit_rate >= 0.5``; ``dims``: the sink
    dimensions, ``layers_hit >= min_layers x layers``, sorted."""

    dims: list[int]
    max_abs: torch.Tensor
    tokens_over: torch.Tensor
    image_tokens_over: torch.Tensor
    hit_rate: torch.Tensor
    ratio: torch.Tensor
    layers_hit: torch.Tensor
    tau: float
    min_layers: float
    max_token_share: float
    samples: int
    tokens: float
    hidden_size: int
    model_type: str
    images: tuple[str, ...] = ()
    prompt: str | None = None

    @property
    def num_layers(self) -> int:
        return int(self.max_abs.shape[0])

    def candidates(self, top: int = 10) -> list[int]:
        """The sink dims and the ``top`` dimensions of highest peak ratio (over layers), by that ratio."""
        peak = self.ratio.amax(0)
        order = [int(d) for d in peak.argsort(descending=True)[:top]]
        return sorted(set(order) | set(self.dims), key=lambda d: -float(peak[d]))


def calibrate_sinks(
    model: torch.nn.Module,
    processor: Any = None,
    images: Any = None,
    *,
    inputs: Any = None,
    prompt: str = DEFAULT_PROMPT,
    n: int | None = 20,
    tau: float | None = None,
    min_layers: float = 0.5,
    max_token_share: float = 0.1,
) -> SinkCalibration:
    """The sink dimensions of the model's language model, with the evidence (``SinkCalibration``).

    One prefill per image (``images``: a directory, paths or PIL images; the first ``n``), with ``prompt``
    through the processor's chat template; or the given ``inputs`` (a model batch or a list of them). At the
    input of every decoder layer each real token's hidden state is RMS-normalised without the learned scale
    (VAR's rule) and compared with ``tau`` (default ``default_tau(hidden_size)``: VAR's 20 where reachable).
    Rule: a dimension counts at a layer when, in at least half of the samples, at least one token and at most
    ``max_token_share`` of the tokens exceed ``tau`` there (massive activations sit on a few tokens: BOS and
    some image tokens); it is a sink dimension when it counts in at least ``min_layers`` of the layers. The
    model is only read: nothing it computes changes."""
    import attnkit

    if not 0.0 < min_layers <= 1.0:
        raise InputError(f"calibrate sinks: min_layers={min_layers!r} must be in (0, 1]")
    if not 0.0 < max_token_share <= 1.0:
        raise InputError(f"calibrate sinks: max_token_share={max_token_share!r} must be in (0, 1]")
    adapter = attnkit.get_adapter(model)
    hidden = int(adapter.text_config.hidden_size)
    tau = default_tau(hidden) if tau is None else float(tau)
    if not tau > 0:
        raise InputError(f"calibrate sinks: tau={tau!r} must be > 0")
    names, batches = _batches(model, processor, images, inputs, prompt, n)
    rows: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        probe = _SinkProbe(tau)
        _probe_run(model, probe, batch)
        layers = sorted(probe.layer_stats)
        st = {k: torch.stack([probe.layer_stats[l][k] for l in layers], 1) for k in ("max_abs", "over", "image_over")}
        st["tokens"] = probe.layer_stats[layers[0]]["tokens"]
        rows.append(st)
    max_abs = torch.cat([r["max_abs"] for r in rows]).float()  # (S, L, D)
    over = torch.cat([r["over"] for r in rows]).float()
    image_over = torch.cat([r["image_over"] for r in rows]).float()
    tokens = torch.cat([r["tokens"] for r in rows]).float()  # (S,)
    hit = (over >= 1) & (over <= max_token_share * tokens[:, None, None])
    hit_rate = hit.float().mean(0)
    layers_hit = (hit_rate >= 0.5).sum(0)
    need = max(1, math.ceil(min_layers * max_abs.shape[1] - 1e-9))
    dims = (layers_hit >= need).nonzero().flatten().tolist()
    mean_max = max_abs.mean(0)
    median = mean_max.median(-1, keepdim=True).values.clamp_min(1e-12)
    return SinkCalibration(
        dims=dims, max_abs=mean_max, tokens_over=over.mean(0), image_tokens_over=image_over.mean(0),
        hit_rate=hit_rate, ratio=mean_max / median, layers_hit=layers_hit, tau=tau, min_layers=float(min_layers),
        max_token_share=float(max_token_share), samples=int(max_abs.shape[0]), tokens=float(tokens.mean()),
        hidden_size=hidden, model_type=str(getattr(adapter.text_config, "model_type", "")),
        images=tuple(names) if inputs is None else (), prompt=prompt if inputs is None else None,
    )


def _floats(values: Any) -> list[float | None]:
    return [_round(float(v)) for v in values]


def save_sinks_json(calib: SinkCalibration, path: str | os.PathLike, *, model: str | None = None,
                    top: int = 10) -> Path:
    """Write ``calib`` as JSON (atomically); ``VAR(sink_dims=path)`` reads its ``sink_dims``.

    Keys: ``sink_dims``; ``model`` (when given), ``model_type``, ``hidden_size``, ``num_layers``; the settings
    ``tau``, ``min_layers``, ``max_token_share``, ``rule``; ``samples``, ``tokens_per_sample``, ``prompt``,
    ``images``; ``median_max_abs`` (per layer: the median dimension's ``max_abs``); ``evidence``: one object
    per candidate dimension (the sink dims and the ``top`` of highest peak ratio), each with ``dim``,
    ``sink``, ``layers_hit`` and per layer ``max_abs``, ``ratio``, ``tokens_over``, ``image_tokens_over``,
    ``hit_rate`` (see ``SinkCalibration``)."""
    head: dict[str, Any] = {"kind": "attnkit calibrate sinks", "version": 1}
    if model is not None:
        head["model"] = str(model)
    head.update({
        "model_type": calib.model_type, "hidden_size": calib.hidden_size, "num_layers": calib.num_layers,
        "tau": _round(calib.tau), "min_layers": calib.min_layers, "max_token_share": calib.max_token_share,
        "rule": (f"a dimension counts at a layer when, in >= half of the samples, between 1 token and "
                 f"{calib.max_token_share:g} of the tokens have |RMS-normed hidden| > tau there; a sink "
                 f"dimension counts in >= {calib.min_layers:g} of the layers"),
        "samples": calib.samples, "tokens_per_sample": _round(calib.tokens), "prompt": calib.prompt,
        "images": list(calib.images),
    })
    parts = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in head.items()]
    parts.insert(2, f'  "sink_dims": {json.dumps(calib.dims)}')
    median = calib.max_abs.median(-1).values
    parts.append(f'  "median_max_abs": {json.dumps(_floats(median))}')
    evidence = []
    for d in calib.candidates(top):
        item = {"dim": d, "sink": d in calib.dims, "layers_hit": int(calib.layers_hit[d])}
        for key in ("max_abs", "ratio", "tokens_over", "image_tokens_over", "hit_rate"):
            item[key] = _floats(getattr(calib, key)[:, d])
        evidence.append("    " + json.dumps(item))
    parts.append('  "evidence": [\n' + ",\n".join(evidence) + "\n  ]")
    text = "{\n" + ",\n".join(parts) + "\n}\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(Path(path), write, "sinks file")
    return Path(path)


# ------------------------------------------------------------------------------------------- heads


@dataclasses.dataclass(frozen=True)
class HeadCalibration:
    """What ``calibrate_heads`` measured; every table (layers, heads) on the CPU, over the samples.

    ``image_share``: mean attention of the text rows after the image to the image tokens; ``visual_sink_share``:
    of that image attention, the share on visual sinks (image tokens that are sinks at the layer, by ``tau``
    at ``sink_dims``), as a ratio of the sums over the samples (0 where a layer has none); ``vhd``: the mean
    VHD (``head_divergence``, alpha 1: the model's own); ``heads`` (bool): VHR's rule on the mean VHD, the
    heads above their layer's median in layers ``first_layer`` and later."""

    image_share: torch.Tensor
    visual_sink_share: torch.Tensor
    vhd: torch.Tensor
    heads: torch.Tensor
    first_layer: int
    last_layers: int
    outlier_filter: bool
    sink_dims: list[int]
    sink_dims_source: str
    tau: float
    samples: int
    images: tuple[str, ...] = ()
    prompt: str | None = None

    @property
    def num_layers(self) -> int:
        return int(self.vhd.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.vhd.shape[1])

    def selected(self) -> dict[int, list[int]]:
        """``{layer: [heads]}`` of the selected heads (what VHR and ACT reinforce / calibrate from the file)."""
        from attnkit.methods.vhr import head_set

        return head_set(self.heads)


def _resolve_dims(model: torch.nn.Module, sink_dims: Any, calibrate: Any) -> tuple[list[int], str, float | None]:
    """(dims, where from, tau recorded with them or None)."""
    import attnkit

    text = attnkit.get_adapter(model).text_config
    if isinstance(sink_dims, SinkCalibration):
        return list(sink_dims.dims), "calibration", sink_dims.tau
    if isinstance(sink_dims, (str, os.PathLike)):
        dims, info = load_sink_dims(sink_dims, "calibrate heads")
        if info.get("hidden_size", text.hidden_size) != text.hidden_size:
            raise InputError(f"calibrate heads: sink_dims file {sink_dims} was calibrated on hidden_size "
                             f"{info['hidden_size']}; this model's is {text.hidden_size}")
        return dims, f"file: {sink_dims}", info.get("tau")
    if sink_dims is not None:
        dims = sorted({int(d) for d in sink_dims})
        return dims, "explicit", None
    found = table_sink_dims(text)
    if found is not None:
        return list(found[1]), f"table: {found[0]}", None
    calib = calibrate()
    return list(calib.dims), "calibrated on the same images", calib.tau


def calibrate_heads(
    model: torch.nn.Module,
    processor: Any = None,
    images: Any = None,
    *,
    inputs: Any = None,
    prompt: str = DEFAULT_PROMPT,
    n: int | None = 20,
    sink_dims: Any = None,
    tau: float | None = None,
    last_layers: int | None = None,
    outlier_filter: bool = True,
) -> HeadCalibration:
    """Per (layer, head): image-attention share, visual-sink share and mean VHD over the samples
    (``HeadCalibration``), with the heads VHR's rule selects on the mean VHD.

    Inputs as ``calibrate_sinks``. Per sample two prefills: one under a read-only probe (the attention of the
    text tokens after the image; the sinks of each layer's input), one for ``head_divergence`` (VHR measuring
    every layer, ``alpha=1``: nothing reinforced; ``last_layers`` and ``outlier_filter`` VHR's). ``sink_dims``:
    a list, a sink-dimension file or a ``SinkCalibration``; None: VAR's table for a model it holds, else
    ``calibrate_sinks`` on the same samples first. ``tau``: the file's or calibration's, else
    ``default_tau(hidden_size)``."""
    import attnkit

    adapter = attnkit.get_adapter(model)
    hidden = int(adapter.text_config.hidden_size)
    names, batches = _batches(model, processor, images, inputs, prompt, n)
    batches = list(batches)

    def calibrate() -> SinkCalibration:
        return calibrate_sinks(model, inputs=batches, n=None, tau=tau)

    dims, source, dims_tau = _resolve_dims(model, sink_dims, calibrate)
    bad = [d for d in dims if not 0 <= d < hidden]
    if bad:
        raise InputError(f"calibrate heads: sink dimension {bad[0]} is out of range [0, {hidden - 1}]")
    tau = float(tau) if tau is not None else (float(dims_tau) if dims_tau is not None else default_tau(hidden))
    dims_t = torch.tensor(dims, dtype=torch.long) if dims else None
    image_sum = vis_sum = vhd_sum = None
    count = 0
    first_layer = last = 0
    for batch in batches:
        probe = _HeadProbe(tau, dims_t)
        _probe_run(model, probe, batch)
        layers = sorted(probe.sums)
        if not layers:
            raise InputError("head calibration: no text token follows the image in the prompt")
        sums = torch.stack([probe.sums[l] for l in layers], 1)  # (B, L, 3, H)
        rows = sums[:, :, 2].clamp_min(1)
        img, vis = sums[:, :, 0] / rows, sums[:, :, 1] / rows  # (B, L, H) per-sample means over rows
        report = head_report(model, batch, alpha=1.0, last_layers=last_layers, outlier_filter=outlier_filter)
        first_layer, last = report.first_layer, report.last_layers
        image_sum = img.sum(0) if image_sum is None else image_sum + img.sum(0)
        vis_sum = vis.sum(0) if vis_sum is None else vis_sum + vis.sum(0)
        vhd_sum = report.vhd.sum(0) if vhd_sum is None else vhd_sum + report.vhd.sum(0)
        count += img.shape[0]
    vhd = vhd_sum / count
    chosen = torch.zeros_like(vhd, dtype=torch.bool)
    tail = vhd[first_layer:]
    chosen[first_layer:] = tail > tail.quantile(0.5, dim=-1, keepdim=True)  # VHR's rule
    share = torch.where(image_sum > 0, vis_sum / image_sum.clamp_min(1e-12), torch.zeros_like(vis_sum))
    return HeadCalibration(
        image_share=image_sum / count, visual_sink_share=share, vhd=vhd, heads=chosen, first_layer=first_layer,
        last_layers=last, outlier_filter=bool(outlier_filter), sink_dims=dims, sink_dims_source=source, tau=tau,
        samples=count, images=tuple(names) if inputs is None else (), prompt=prompt if inputs is None else None,
    )


#: The heat maps ``save_calibration_heads_json`` draws next to the file: (key, suffix, colour-bar label).
HEATMAPS = (("vhd", "", "VHD"), ("image_share", ".image", "image"), ("visual_sink_share", ".sink", "vsink"))


def save_calibration_heads_json(calib: HeadCalibration, path: str | os.PathLike, *, model: str | None = None,
                                png: bool | str | os.PathLike = True) -> list[Path]:
    """Write ``calib`` as JSON (atomically) and, with ``png``, its heat maps; returns the paths written.

    Keys: ``heads`` (``{"layer": [heads]}``, the selection: VHR's rule on the mean VHD; ``VHR(heads=path)``
    and ``ACT(heads=path)`` read it), ``rule``; ``model`` (when given), ``num_layers``, ``num_heads``,
    ``first_layer``, ``last_layers``, ``outlier_filter``, ``sink_dims``, ``sink_dims_source``, ``tau``,
    ``samples``, ``prompt``, ``images``; the tables ``image_share``, ``visual_sink_share``, ``vhd`` (layers x
    heads). ``png``: True draws ``<stem>.png`` (mean VHD, selected heads outlined), ``<stem>.image.png``
    (image share) and ``<stem>.sink.png`` (visual-sink share) next to the file; a path names the VHD one."""
    path = Path(path)
    settings: dict[str, Any] = {"kind": "attnkit calibrate heads", "version": 1}
    if model is not None:
        settings["model"] = str(model)
    settings.update({
        "num_layers": calib.num_layers, "num_heads": calib.num_heads,
        "rule": (f"VHR's: in layers {calib.first_layer}..{calib.num_layers - 1} (the last {calib.last_layers}), "
                 "the heads whose mean VHD over the samples is above their layer's median"),
        "first_layer": calib.first_layer, "last_layers": calib.last_layers, "outlier_filter": calib.outlier_filter,
        "sink_dims": calib.sink_dims, "sink_dims_source": calib.sink_dims_source, "tau": _round(calib.tau),
        "samples": calib.samples, "prompt": calib.prompt, "images": list(calib.images),
    })
    heads = {str(layer): hs for layer, hs in calib.selected().items()}
    parts = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in settings.items()]
    parts.insert(2, f'  "heads": {json.dumps(heads)}')
    for key, _, _ in HEATMAPS:
        parts.append(f"  {json.dumps(key)}: {_matrix(getattr(calib, key))}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write, "heads file")
    written = [path]
    if png:
        base = Path(png) if not isinstance(png, bool) else path.with_suffix(".png")
        for key, suffix, label in HEATMAPS:
            target = base.with_name(base.stem + suffix + ".png") if suffix else base
            render_heatmap(getattr(calib, key), calib.heads, target, label=label)
            written.append(target)
    return written
