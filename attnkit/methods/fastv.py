"""FastV: drop the image tokens that get the least attention after an early layer.

Chen, Zhao, Chen, Liu, Lin, Chang. "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
Inference Acceleration for Large Vision-Language Models." ECCV 2024.
Official code: github.com/pkunlp-icler/FastV.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..hooks.context import View
from .base import MethodConfig, check_int, check_range
from .pruning import PruningMethod, check_mode, keep_top
from .registry import register


@dataclasses.dataclass
class FastVConfig(MethodConfig):
    """k: the first layer without the dropped tokens (0-based; ranked at layer k-1); r: fraction of the
    image tokens dropped; mode: "drop" (remove them) or "mask" (mask them as keys)."""

    k: int = MethodConfig.option(2, help="first layer without the dropped tokens (ranked at layer k-1)", lo=1)
    r: float = MethodConfig.option(0.5, help="fraction of the image tokens dropped", lo=0.0, hi=1.0)
    mode: str = MethodConfig.option("drop", help="drop: remove the tokens; mask: mask them as keys", choices=("drop", "mask"))

    def validate(self) -> None:
        check_int("fastv", "k", self.k, 1, None)
        check_range("fastv", "r", self.r, 0.0, 1.0)
        check_mode("fastv", self.mode)


@register
class FastV(PruningMethod):
    """FastV (Chen et al., ECCV 2024).

    At prefill, layer k-1 computes (eager, for the last prompt row only) the attention the last prompt
    token pays every key; its head mean ranks the image tokens, and the top round((1 - r) * n_image)
    stay for layers >= k while the rest are dropped, for the prompt and every decode step (the
    ranking is made once and kept: the official KV-cache variant). Other layers keep fused sdpa.

    Defaults (the paper's and the official code's): k=2, r=0.5. k is absolute, not scaled with depth.
    Rows of a batch drop the same number of image tokens (the smallest any row would drop), so rows
    with different image-token counts keep slightly more than round((1 - r) * n) in the larger rows.
    """

    name = "fastv"
    Config = FastVConfig
    neutral = {"r": 0.0}
    cache_exact = False

    def attach(self, handle: Any) -> None:
        super().attach(handle)
        self.check_layer("k", self.config.k, handle.adapter.num_layers)

    def layers(self, view: View) -> set[int]:
        return {self.config.k - 1} if view.is_prefill and self.config.r > 0 else set()

    def rows(self, view: View) -> torch.Tensor:
        layer = view.layer
        return torch.tensor([view.q_len - 1])

    def observe(self, view: View, probs: torch.Tensor) -> None:
        layer = view.layer
        if int(view.rows[-1]) == view.q_len - 1:
            self.state(view)["att"] = probs[:, :, -1].float().mean(1)  # (B, K'): head mean, last row

    def select(self, view: View, hidden: torch.Tensor) -> torch.Tensor | None:
        layer = view.layer
        if layer != self.config.k or self.config.r <= 0:
            return None
        att = self.state(view).pop("att", None)
        image = view.live_image_mask()
        if att is None or image is None or not bool(image.any()):
            return None
        n_keep = torch.round((1 - self.config.r) * image.sum(1).double()).long()
        keep = keep_top(att[:, : image.shape[1]], image, n_keep)
        return self.record(layer, keep, image)
