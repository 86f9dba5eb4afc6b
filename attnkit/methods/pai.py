"""PAI: amplify the attention the answering token pays to the image, optionally with image-free CFG.

Liu, Zheng, Chen. "Paying More Attention to Image: A Training-Free Method for Alleviating
Hallucination in LVLMs." ECCV 2024. Official code: github.com/LALBJ/PAI.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import MethodArgumentError
from ..hooks.context import View
from .base import Contrast, Method, MethodConfig, check_int, check_range
from .registry import register


@dataclasses.dataclass
class PAIConfig(MethodConfig):
    """alpha: amplification of the image scores (0 = off); layers [start_layer, end_layer) (end None =
    the last layer included); cfg_gamma: guidance scale of the image-free contrast (None = off)."""

    alpha: float = MethodConfig.option(0.2, help="amplification of the image attention scores (0 = off)", lo=0.0)
    start_layer: int = MethodConfig.option(2, help="first layer amplified", lo=0)
    end_layer: int | None = MethodConfig.option(None, help="layer after the last amplified, > start_layer (none = all)", lo=1)
    cfg_gamma: float | None = MethodConfig.option(None, help="guidance scale of the image-free contrast (none = off)", lo=0.0)

    def validate(self) -> None:
        check_range("pai", "alpha", self.alpha, 0.0, None)
        check_int("pai", "start_layer", self.start_layer, 0, None)
        if self.end_layer is not None:
            check_int("pai", "end_layer", self.end_layer, self.start_layer + 1, None)
        if self.cfg_gamma is not None:
            check_range("pai", "cfg_gamma", self.cfg_gamma, 0.0, None)


#: Tokens whose image-conditioned probability is below this fraction of the top token's are excluded
#: from the CFG step (the official plausibility cutoff, log(0.1) below the maximum log-probability).
PLAUSIBILITY = 0.1


@register
class PAI(Method):
    """Paying More Attention to Image (Liu et al., ECCV 2024).

    In layers [start_layer, end_layer), for the last query row only (the last prompt token at
    prefill, the new token at each decode step), before the softmax, every image-token column gets
    ``score + alpha * |score|``. Other rows go through fused sdpa untouched.

    With ``cfg_gamma`` set, the same prompts without their images run as extra rows of the same
    forward (their own KV cache rows; see attnkit.hooks.branch) and the next-token log-probabilities
    become ``gamma * (logp - logp_noimg) + logp_noimg``, with every token whose image-conditioned
    probability is below 0.1 x the top token's set to -inf (plausibility cutoff). The image-free rows
    have no image columns, so alpha never touches them (the official code switches it off there).
    Only the last position of the returned logits carries these log-probabilities; earlier positions
    keep the image-conditioned logits. Greedy and sampling are supported, beam search is not.

    Defaults (the official README's POPE/CHAIR command for LLaVA-1.5-7B, 32 layers): alpha=0.2,
    start_layer=2, end_layer=None (= 32, every remaining layer); cfg off (the README uses
    cfg_gamma=1.1). Layer indices are absolute and not scaled with depth: layers 0-1 are skipped in
    every model, as in the official code; ``cfg_gamma=1`` is the official no-op and skips the branch.
    """

    name = "pai"
    Config = PAIConfig
    neutral = {"alpha": 0.0}
    cache_exact = False

    def __init__(self, config: PAIConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        gamma = self.config.cfg_gamma
        self.contrast = Contrast("no_image") if gamma is not None and gamma != 1.0 else None
        self._end = self.config.end_layer

    def attach(self, handle) -> None:
        n = handle.adapter.num_layers
        if self.config.start_layer >= n:
            raise MethodArgumentError(
                f"pai: start_layer={self.config.start_layer} is out of range [0, {n - 1}] for this {n}-layer model"
            )
        if self.config.end_layer is not None and self.config.end_layer > n:
            raise MethodArgumentError(
                f"pai: end_layer={self.config.end_layer} is out of range [{self.config.start_layer + 1}, {n}] "
                f"for this {n}-layer model"
            )
        self._end = n if self.config.end_layer is None else self.config.end_layer

    def layers(self, view: View) -> set[int]:
        if view.image_mask is None or not bool(view.image_mask.any()):
            return set()
        return set(range(self.config.start_layer, self._end))

    def rows(self, view: View) -> torch.Tensor:
        return torch.tensor([view.q_len - 1])

    def scores(self, view: View, scores: torch.Tensor) -> torch.Tensor:
        rows = view.rows
        if rows is None or int(rows[-1]) != view.q_len - 1:
            return scores  # this block does not hold the last row
        weight = self._weight(view, scores)
        if weight is None:
            return scores
        if view.visible is not None:
            weight = weight * view.visible[:, :, -1, :]  # never lift a masked column
        last = scores[:, :, -1, :]
        last.addcmul_(last.abs(), weight)  # score + alpha * |score| on image columns, in place
        return scores

    def _weight(self, view: View, scores: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, K') alpha on the image columns, 0 elsewhere; cached per forward and width."""
        image = view.image_mask_kv()
        if image is None:
            return None
        cache = self.state(view)
        if cache.get("image") is not image or cache.get("like") != (scores.shape[-1], scores.dtype):
            cache["image"], cache["like"] = image, (scores.shape[-1], scores.dtype)
            cache["weight"] = self.config.alpha * image[:, None, : scores.shape[-1]].to(scores.device, scores.dtype)
        return cache["weight"]

    def logits(self, view: View, logits: torch.Tensor, contrast: torch.Tensor | None = None) -> torch.Tensor:
        """The CFG step: the user's rows' last logits guided away from the image-free contrast rows'."""
        if contrast is None:
            return logits
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        logp_noimg = torch.log_softmax(contrast[:, -1].float(), dim=-1)
        guided = self.config.cfg_gamma * (logp - logp_noimg) + logp_noimg
        cutoff = logp.max(dim=-1, keepdim=True).values + math.log(PLAUSIBILITY)
        guided = guided.masked_fill(logp < cutoff, float("-inf"))
        logits = logits.clone()
        logits[:, -1] = guided.to(logits.dtype)
        return logits
