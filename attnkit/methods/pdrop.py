"""PyramidDrop: drop image tokens in stages, ranked by the last instruction token's attention.

Xing, Chen, Dong, Zang, Ding, Wang, Lin, Wang, Lin. "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction." CVPR 2025.
Official code: github.com/Cooperx521/PyramidDrop (llava/model/modeling_llama_pdrop.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import MethodArgumentError
from ..hooks.context import View
from .base import MethodConfig, check_int, check_range
from .pruning import PruningMethod, check_mode, check_positions, keep_top
from .registry import register

#: The depth the layer indices are given for (LLaMA-2-7B / Vicuna-7B of LLaVA-1.5 and -NeXT).
REFERENCE_DEPTH = 32


@dataclasses.dataclass
class PyramidDropConfig(MethodConfig):
    """layers: the stage boundaries for a 32-layer model (scaled to the model's depth); ratio: fraction of
    the image tokens each stage keeps; mode: "drop" or "mask"; positions: "original" (kept tokens keep
    their positions) or "official" (renumbered after each drop, as the official code; drop mode)."""

    layers: tuple[int, ...] = MethodConfig.option(
        (8, 16, 24), help="stage boundaries for a 32-layer model (scaled to the depth), increasing", lo=1)
    ratio: float = MethodConfig.option(0.5, help="fraction of the image tokens each stage keeps, > 0", lo=0.0, hi=1.0)
    mode: str = MethodConfig.option("drop", help="drop: remove the tokens; mask: mask them as keys", choices=("drop", "mask"))
    positions: str = MethodConfig.option(
        "original", help="kept tokens keep their positions, or official: renumbered (drop mode)",
        choices=("original", "official"))

    def validate(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise MethodArgumentError(f"pdrop: layers={self.layers!r} must be a list of layer indices")
        self.layers = tuple(self.layers)
        if not self.layers:
            raise MethodArgumentError("pdrop: layers must name at least one layer")
        for layer in self.layers:
            check_int("pdrop", "layers entry", layer, 1, None)
        if list(self.layers) != sorted(set(self.layers)):
            raise MethodArgumentError(f"pdrop: layers={list(self.layers)} must be strictly increasing")
        check_range("pdrop", "ratio", self.ratio, 0.0, 1.0)
        if self.ratio <= 0:
            raise MethodArgumentError(f"pdrop: ratio={self.ratio!r} is out of range (0, 1]")
        check_mode("pdrop", self.mode)
        check_positions("pdrop", self.positions, self.mode)


@register
class PyramidDrop(PruningMethod):
    """PyramidDrop (Xing et al., CVPR 2025).

    Before each stage layer l_s, the last prompt token's attention at l_s itself (softmax of that layer's
    Q and K over every visible key, mean over heads; computed from the layer's own projections, so no
    layer needs eager attention) ranks the image tokens still present, and the top
    int(n_image * ratio^(s+1)) stay from l_s on (n_image: the prompt's image tokens per row).

    Defaults (official LLaVA-1.5 setting): layers=(8, 16, 24), ratio=0.5, so 576 image tokens become
    288, 144 and 72. Layer indices are for 32-layer models; a model of depth L uses round(l * L / 32)
    (e.g. 7, 14, 21 for 28 layers); scaled indices must stay distinct and inside [1, L - 1].

    Positions (``positions``): by default every kept token keeps its original position, as for all
    pruning methods, so drop mode equals mask mode. The official code renumbers instead: after each
    drop the sequence takes contiguous positions 0..n-1, and at a decode step each layer's new token
    takes the position that follows that layer's own length (its prefill positions shifted down by
    the tokens dropped before it). ``positions="official"`` (drop mode, 1-D RoPE models) reproduces
    that layout, the ranking at later stages included (it uses the renumbered positions, as the
    official code does).
    """

    name = "pdrop"
    Config = PyramidDropConfig
    neutral = {"ratio": 1.0}
    cache_exact = False

    def __init__(self, config: PyramidDropConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.stage_layers: tuple[int, ...] = ()

    def attach(self, handle: Any) -> None:
        super().attach(handle)
        depth = handle.adapter.num_layers
        scaled = tuple(int(round(l * depth / REFERENCE_DEPTH)) for l in self.config.layers)
        if len(set(scaled)) != len(scaled):
            raise MethodArgumentError(
                f"pdrop: layers={list(self.config.layers)} scale to {list(scaled)} for this {depth}-layer model "
                "(not distinct); pass fewer stages"
            )
        for s in scaled:
            self.check_layer("layers", s, depth)
        self.stage_layers = scaled

    def select(self, view: View, hidden: torch.Tensor) -> torch.Tensor | None:
        layer = view.layer
        if layer not in self.stage_layers or self.config.ratio >= 1:
            return None
        image = view.live_image_mask()
        if image is None or not bool(image.any()):
            return None
        stage = self.stage_layers.index(layer)
        full = view.prompt_image_mask.sum(1)  # image tokens per row in the prompt
        n_keep = (full.double() * self.config.ratio ** (stage + 1)).long()
        probs = view.attention(hidden, torch.tensor([view.q_len - 1]))
        att = probs[:, :, 0].mean(1)[:, : image.shape[1]]
        keep = keep_top(att, image, n_keep)
        return self.record(layer, keep, image)
