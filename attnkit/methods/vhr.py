"""VHR: reinforce the attention heads whose output depends most on the image (vision-aware head divergence).

He, Li, Zhu, et al. "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence." ACL 2025.
Official code: github.com/jinghan1he/VHR (a replacement of LLaMA's sdpa attention class of transformers 4.45).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import InputError, MethodArgumentError
from ..hooks.context import View
from .base import Contrast, Method, MethodConfig, check_int, check_range
from .files import load_head_set  # noqa: F401 (re-exported: its home was here)
from .registry import register


def head_set(chosen: torch.Tensor) -> dict[int, list[int]]:
    """``{layer: [heads]}`` of a (layers, heads) bool selection, layers without any left out."""
    return {layer: row.nonzero().flatten().tolist() for layer, row in enumerate(chosen.cpu()) if bool(row.any())}


@dataclasses.dataclass
class VHRConfig(MethodConfig):
    """alpha: scale of the chosen heads' outputs (1 = off); last_layers: reinforce in the last N layers (None =
    the family's default); outlier_filter: the official filter of VHD outliers; measure_all: the VHD of every
    layer, not only the reinforced ones; heads: a fixed head set ({layer: [heads]} or a JSON file) instead
    of the VHD selection."""

    alpha: float = MethodConfig.option(2.0, help="scale of the reinforced heads' outputs before o_proj (1 = off)", lo=0.0)
    last_layers: int | None = MethodConfig.option(
        None, help="reinforce heads in the last N layers (none = the family's default, 14 of 32 for LLaVA)", lo=1
    )
    outlier_filter: bool = MethodConfig.option(
        True, help="zero the VHD of heads whose VHD and image-free output norm both exceed their layer's mean + std"
    )
    measure_all: bool = MethodConfig.option(
        False, help="also measure the VHD of the layers before the reinforced ones (for inspection; costs prefill time)"
    )
    heads: dict[int, list[int]] | str | None = MethodConfig.option(
        None, help="a fixed head set instead of the VHD selection: layer:heads pairs (3:0,1;5:2) or a JSON file"
    )

    def validate(self) -> None:
        check_range("vhr", "alpha", self.alpha, 0.0, None)
        if self.last_layers is not None:
            check_int("vhr", "last_layers", self.last_layers, 1, None)
        for name in ("outlier_filter", "measure_all"):
            if not isinstance(getattr(self, name), bool):
                raise MethodArgumentError(f"vhr: {name}={getattr(self, name)!r} must be True or False")
        if self.heads is not None:
            self.heads = load_head_set(self.heads)


@register
class VHR(Method):
    """Vision-aware Head Reinforcement (He et al., ACL 2025).

    VHD of head h in layer l: the Euclidean distance between the head's output slice (the attention output
    before o_proj) for the last prompt token with the image and without it (the same prompt with its image
    tokens removed). The image-free prompts run as contrast rows of the prefill forward
    (``Contrast("no_image", decode=False)``), which the manager drops from the KV cache after it: decode
    steps cost only the reinforcement. The head outputs come from fused sdpa (no eager attention).

    Order, layer by layer in that one forward: at layer l the VHD is measured on the layer's own head
    outputs (the image rows already carry the reinforcement of the earlier layers; the image-free rows are
    never reinforced); with ``outlier_filter`` a head whose VHD and image-free output norm both exceed
    mean + std of its layer gets VHD 0; in each of the last ``last_layers`` layers the heads whose VHD is
    above the layer's median are chosen, and their output slices are multiplied by ``alpha`` before
    o_proj, so the first generated token is already affected. The selection is made per prompt (each row
    of a batch has its own), once, at prefill, and kept for every decode step (consistent with the KV
    cache); the chosen heads are reinforced at every prompt position and every new token.

    ``heads`` replaces the selection by a fixed set (the same for every row; no image-free rows run).

    After a forward, ``state()`` holds ``vhd`` (B, layers, heads) fp32 (the reinforced layers; every layer
    with ``measure_all``, as ``attnkit.inspect.head_divergence`` asks; 0 where not measured), ``vhd_raw``
    (before the outlier filter), ``norm`` (the image-free outputs' norms) and ``heads`` (B, layers, heads)
    bool, the reinforced heads.

    Defaults (official): alpha=2.0; last_layers 14 for LLaVA-1.5/NeXT-7B (32 layers) and 18 for
    InstructBLIP-7B, chosen by the adapter (``Adapter.vhr_layer_share``: 14/32, InstructBLIP 18/32) and
    scaled with depth for other models (round(share x layers): 12 of Qwen2-VL-7B's 28); outlier filter on.

    Choices where the official code could not be read (written down here and in the README): the standard
    deviation of the filter is the sample one (n - 1, torch's default); the median is the midpoint of
    the two middle values for an even head count (numpy's); "above" is strict. cache_exact is False: a
    full recomputation selects heads again at every step from a longer prompt (with ``heads`` given,
    cached decoding equals recomputation; tested).
    """

    name = "vhr"
    Config = VHRConfig
    neutral = {"alpha": 1.0}
    cache_exact = False

    def __init__(self, config: VHRConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._fixed = self.config.heads
        self.contrast = Contrast("no_image", decode=False) if self._fixed is None else None
        self._layers = 0
        self._first = 0

    def attach(self, handle) -> None:
        adapter = handle.adapter
        n, heads = adapter.num_layers, adapter.num_heads
        last = self.config.last_layers if self.config.last_layers is not None else adapter.vhr_last_layers
        if last > n:
            raise MethodArgumentError(f"vhr: last_layers={last} is out of range [1, {n}] for this {n}-layer model")
        self._layers, self._first = n, n - last
        if self._fixed is not None:
            for layer, hs in self._fixed.items():
                if layer >= n:
                    raise MethodArgumentError(f"vhr: heads names layer {layer}; this model has layers 0..{n - 1}")
                if hs[-1] >= heads:
                    raise MethodArgumentError(
                        f"vhr: heads names head {hs[-1]} of layer {layer}; this model has heads 0..{heads - 1}"
                    )

    @property
    def first_layer(self) -> int:
        """The first reinforced layer of the VHD selection (after attach)."""
        return self._first

    def layers(self, view: View) -> set[int]:
        if self._fixed is not None:
            return set(self._fixed) if self.config.alpha != 1.0 else set()
        if view.is_prefill:
            first = 0 if self.config.measure_all else self._first
            return set(range(first, self._layers)) if view.contrast_rows else set()
        return set(range(self._first, self._layers)) if self.config.alpha != 1.0 else set()

    def head_output(self, view: View, out: torch.Tensor) -> torch.Tensor:
        alpha = self.config.alpha
        main = view.main_batch
        if self._fixed is not None:
            heads = self._fixed.get(view.layer)
            if heads and alpha != 1.0:
                out[:main, :, heads] *= alpha
            return out
        st = self.state(view)
        if view.is_prefill:
            factor = self._measure(view, out, st)
        else:
            factors = st.get("factor")
            if factors is None:
                raise InputError("vhr: a decode step without a prefill through this wrap (start from the whole prompt)")
            factor = factors.get(view.layer)
        if factor is not None and alpha != 1.0:
            out[:main].mul_(factor.to(out.dtype))
        return out

    def _measure(self, view: View, out: torch.Tensor, st: dict) -> torch.Tensor | None:
        """VHD of the layer's heads from the last prompt token's outputs; the reinforcement factors (B, 1, H, 1)
        of the chosen heads where the layer is reinforced (else None)."""
        main, layer = view.main_batch, view.layer
        if view.contrast_rows != main:
            raise InputError("vhr: the prefill carries no image-free rows (was the model called through its forward?)")
        if "vhd" not in st:
            mask = view.attention_mask
            if mask is not None and not bool(mask[:, -1].all()):
                raise InputError("vhr: every prompt must end at the last position (left padding, as generate() uses)")
            shape = (main, view.num_layers, view.num_heads)
            st["vhd"] = torch.zeros(shape, device=out.device)
            st["vhd_raw"] = torch.zeros(shape, device=out.device)
            st["norm"] = torch.zeros(shape, device=out.device)
            st["heads"] = torch.zeros(shape, dtype=torch.bool, device=out.device)
            st["factor"] = {}
        last = out[:, -1].float()  # (2B, H, D): the last prompt token of each row and of its image-free twin
        image, free = last[:main], last[main : 2 * main]
        vhd = (image - free).norm(dim=-1)  # (B, H)
        norm = free.norm(dim=-1)
        st["vhd_raw"][:, layer] = vhd
        st["norm"][:, layer] = norm
        if self.config.outlier_filter and vhd.shape[-1] > 1:
            high = (vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)) & (
                norm > norm.mean(-1, keepdim=True) + norm.std(-1, keepdim=True)
            )
            vhd = vhd.masked_fill(high, 0.0)
        st["vhd"][:, layer] = vhd
        if layer < self._first:
            return None
        chosen = vhd > vhd.quantile(0.5, dim=-1, keepdim=True)
        st["heads"][:, layer] = chosen
        alpha = torch.tensor(self.config.alpha, device=out.device)
        factor = torch.where(chosen, alpha, torch.ones_like(alpha))[:, None, :, None]
        st["factor"][layer] = factor
        return factor

    def selected(self) -> dict[int, list[int]] | list[dict[int, list[int]]] | None:
        """The heads the last prefill chose, ``{layer: [heads]}`` (a list of them, one per row, for a batch),
        or the fixed set."""
        if self._fixed is not None:
            return dict(self._fixed)
        heads = self.state().get("heads")
        if heads is None:
            return None
        rows = [head_set(row) for row in heads]
        return rows[0] if len(rows) == 1 else rows
