"""VCD: contrast the next-token logits with those of the same prompt on a noised image.

Leng, Zhang, Chen, Li, Lu, Miao, Bing. "Mitigating Object Hallucinations in Large Vision-Language Models
through Visual Contrastive Decoding." CVPR 2024. Official code: github.com/DAMO-NLP-SG/VCD.

Also home of the contrastive step VCD and ICD share (``contrastive_logits``, ``ContrastiveDecoding``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import MethodArgumentError
from ..hooks.context import View
from .base import Contrast, Method, MethodConfig, check_int, check_range
from .registry import register

#: Length of the forward diffusion schedule VCD's noise follows (the official 1000 steps).
DIFFUSION_STEPS = 1000


def contrastive_logits(logits: torch.Tensor, contrast: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The contrastive step of VCD and ICD on raw logits (..., V): ``(1 + alpha) * l - alpha * l_contrast``,
    with every token whose own logit is below ``log(beta)`` + the top logit set to -inf (the adaptive
    plausibility cutoff; ``beta=0`` keeps every token). Computed in fp32, returned in ``logits``' dtype."""
    own = logits.float()
    out = (1.0 + alpha) * own - alpha * contrast.float()
    if beta > 0:
        cutoff = own.max(dim=-1, keepdim=True).values + math.log(beta)
        out = out.masked_fill(own < cutoff, float("-inf"))
    return out.to(logits.dtype)


class ContrastiveDecoding(Method):
    """The logits role VCD and ICD share: the last position's logits of the user's rows become
    ``contrastive_logits`` of them and of the contrast rows'. Subclasses set ``self.contrast`` (None at
    ``alpha=0``: no contrast rows, no cutoff, the model's own logits) and have ``alpha`` and ``beta``."""

    neutral = {"alpha": 0.0}

    def _contrast_or_none(self, contrast: Contrast) -> Contrast | None:
        return None if self.config.alpha == 0 else contrast

    def logits(self, view: View, logits: torch.Tensor, contrast: torch.Tensor | None = None) -> torch.Tensor:
        if contrast is None:
            return logits
        logits = logits.clone()
        logits[:, -1] = contrastive_logits(logits[:, -1], contrast[:, -1], self.config.alpha, self.config.beta)
        return logits


def _check_contrastive(name: str, alpha: Any, beta: Any) -> None:
    check_range(name, "alpha", alpha, 0.0, None)
    check_range(name, "beta", beta, 0.0, 1.0)


def alpha_bar(step: int, steps: int = DIFFUSION_STEPS) -> float:
    """The official schedule's cumulative product of (1 - beta_t) up to ``step`` (0-based):
    beta_t = sigmoid(linspace(-6, 6, steps)) * (5e-3 - 1e-5) + 1e-5."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, dim=0)[step])


def diffusion_noise(pixel_values: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """Forward diffusion of ``pixel_values`` to ``step``: sqrt(abar) x + sqrt(1 - abar) eps, eps ~ N(0, 1) drawn
    on the CPU from ``generator`` (the same noise on every device), in the input's dtype and device.

    One draw of eps per image, shared by every image of the batch (the leading dimension: images, or
    Idefics3's rows), so that a row's noise does not depend on the rows batched with it; Qwen-VL's
    flattened patches (N, d) arrive one image at a time (``Adapter.alter_pixels``), each with its own call."""
    abar = alpha_bar(step)
    shape = pixel_values.shape if pixel_values.dim() <= 2 else pixel_values.shape[1:]
    eps = torch.randn(shape, generator=generator, dtype=torch.float32).to(pixel_values.device)
    out = math.sqrt(abar) * pixel_values.float() + math.sqrt(1.0 - abar) * eps
    return out.to(pixel_values.dtype)


@dataclasses.dataclass
class VCDConfig(MethodConfig):
    """alpha: contrast strength (0 = off); beta: plausibility cutoff; noise_step: diffusion step of the
    noised image; seed: of the noise's generator (reset at every call). The Python-only ``distort`` callable
    is an argument of VCD itself, not of its config (the CLI sets every config field)."""

    alpha: float = MethodConfig.option(1.0, help="contrast strength: (1 + alpha) l - alpha l_noised (0 = off)", lo=0.0)
    beta: float = MethodConfig.option(0.1, help="plausibility cutoff: keep tokens with p >= beta x the top p", lo=0.0, hi=1.0)
    noise_step: int = MethodConfig.option(500, help="diffusion step of the noise, in [0, 999]", lo=0, hi=DIFFUSION_STEPS - 1)
    seed: int = MethodConfig.option(0, help="seed of the noise (the same noise at every call)")

    def validate(self) -> None:
        _check_contrastive("vcd", self.alpha, self.beta)
        check_int("vcd", "noise_step", self.noise_step, 0, DIFFUSION_STEPS - 1)
        check_int("vcd", "seed", self.seed, None, None)


@register
class VCD(ContrastiveDecoding):
    """Visual Contrastive Decoding (Leng et al., CVPR 2024).

    The same prompts with a distorted copy of each image run as contrast rows of the same forward
    (``Contrast("pixels")``, their own KV cache rows, fed the user's token at every decode step). The
    distortion is forward diffusion noise at step ``noise_step`` of the official 1000-step schedule
    (``diffusion_noise``), applied to the processed ``pixel_values`` (the family's layout; Qwen-VL's
    flattened patches too), drawn from a generator seeded with ``seed`` at every call, so that a
    generation and its recomputation see the same noise; ``distort=fn`` replaces it with
    ``fn(pixel_values, generator)``.

    Next-token logits: ``(1 + alpha) * l - alpha * l_noised`` on the raw logits, every token whose
    logit under the original image is below ``log(beta)`` + its top logit set to -inf. Only the last
    position of the returned logits is rewritten (what generate() picks from); earlier positions keep the
    user's logits, as with PAI. The rewrite is in the model's output, so greedy decoding and sampling
    both see it (the official code patches sampling only); beam search raises InputError.

    ``alpha=0`` is the neutral setting: no contrast rows and no cutoff at all (the cutoff alone would
    change sampling), so the model is the unwrapped one. Defaults: the official scripts' cd_alpha=1,
    cd_beta=0.1, noise_step=500. Families: those whose images the contrast rows can repeat: not InstructBLIP.
    """

    name = "vcd"
    Config = VCDConfig
    families = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3",
                "idefics3")

    def __init__(self, config: VCDConfig | None = None, *, distort: Any = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if distort is not None and not callable(distort):
            raise MethodArgumentError(f"vcd: distort must be a callable (pixel_values, generator), got {type(distort).__name__}")
        self.distort = distort
        self.contrast = self._contrast_or_none(Contrast("pixels", pixels=self._distort))

    def _distort(self, pixel_values: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed)
        if self.distort is not None:
            return self.distort(pixel_values, generator)
        return diffusion_noise(pixel_values, self.config.noise_step, generator)

