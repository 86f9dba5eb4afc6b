"""VisionZip: keep the dominant image tokens, merge the rest into a few contextual tokens.

Yang, Chen, Tian, Zhong, Jia. "VisionZip: Longer is Better but Not Necessary in Vision Language
Models." CVPR 2025. Official code: github.com/dvlab-research/VisionZip.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import MethodConfig, check_int
from .registry import register
from .vision_side import Reduction, VisionPlan, VisionPruner, VisionStats


@dataclasses.dataclass
class VisionZipConfig(MethodConfig):
    """dominant: tokens kept by attention per image ([CLS] included when the encoder has one);
    contextual: tokens the remaining ones are merged into, per image."""

    dominant: int = MethodConfig.option(54, help="tokens kept by attention per image ([CLS] included)", lo=1)
    contextual: int = MethodConfig.option(10, help="tokens the remaining ones are merged into, per image", lo=0)

    def validate(self) -> None:
        check_int("visionzip", "dominant", self.dominant, 1, None)
        check_int("visionzip", "contextual", self.contextual, 0, None)


def visionzip_merge(
    tokens: torch.Tensor,
    score: torch.Tensor,
    keys: torch.Tensor,
    n_dominant: int,
    n_contextual: int,
    cls: torch.Tensor | None = None,
) -> torch.Tensor:
    """VisionZip's token reduction for a batch of images.

    tokens (B, N, D) hidden states, score (B, N) attention used to rank them, keys (B, N, d) the
    similarity metric (head-averaged keys); returns (B, [1 +] n_dominant + n_contextual, D): the
    optional ``cls`` first, then the ``n_dominant`` top-scored tokens in their original order, then the
    contextual tokens. Contextual step (official ``clip_encoder.py``): the remaining R tokens, in
    original order, are L2-normalised on their keys; targets are every ``max(1, R // C)``-th of them
    (the first C); each other token goes to the target of highest cosine similarity; a contextual
    token is its target's hidden state plus the mean of the hidden states assigned to it.
    """
    return _merge(tokens, score, keys, n_dominant, n_contextual, cls)[0]


def _merge(
    tokens: torch.Tensor,
    score: torch.Tensor,
    keys: torch.Tensor,
    n_dominant: int,
    n_contextual: int,
    cls: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``visionzip_merge`` and the (B, n_dominant) sorted indices of the dominant tokens."""
    bsz, n, dim = tokens.shape
    top = score.topk(n_dominant, dim=1).indices
    is_dom = torch.zeros(bsz, n, dtype=torch.bool, device=tokens.device).scatter_(1, top, True)
    dominant = tokens[is_dom].view(bsz, n_dominant, dim)
    parts = [] if cls is None else [cls[:, None, :]]
    parts.append(dominant)
    if n_contextual > 0:
        rest = n - n_dominant
        hidden = tokens[~is_dom].view(bsz, rest, dim)
        metric = keys[~is_dom].view(bsz, rest, keys.shape[-1])
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, rest // n_contextual)
        targets = torch.arange(0, rest, step, device=tokens.device)[:n_contextual]
        others = torch.ones(rest, dtype=torch.bool, device=tokens.device)
        others[targets] = False
        sim = torch.bmm(metric[:, others], metric[:, targets].transpose(1, 2))  # (B, R - C, C)
        assign = torch.zeros_like(sim, dtype=hidden.dtype).scatter_(2, sim.argmax(dim=2, keepdim=True), 1.0)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (B, C, 1)
        merged = torch.bmm(assign.transpose(1, 2), hidden[:, others]) / counts
        parts.append(hidden[:, targets] + merged)
    return torch.cat(parts, dim=1), top.sort(dim=1).values


@register
class VisionZip(VisionPruner):
    """VisionZip (Yang et al., CVPR 2025): each image reaches the LLM as ``dominant + contextual`` tokens.

    At the vision-encoder layer whose output the projector takes (LLaVA-1.5: ``vision_feature_layer``
    -2, the penultimate layer; Gemma3: the last layer), the attention probabilities are computed from
    that layer's q/k projections. Dominant tokens: with a [CLS] token (CLIP), [CLS] itself plus the
    ``dominant - 1`` patches with the highest [CLS] attention summed over heads, as the official code
    does (``visionzip(model, dominant=54)`` keeps [CLS] + 53 patches, and the LLM sees [CLS] although
    LLaVA's "default" strategy otherwise drops it); without [CLS] (SigLIP) the ``dominant`` tokens
    that receive the most attention averaged over all queries. The remaining tokens are merged into
    ``contextual`` tokens by key similarity (see ``visionzip_merge``). The LLM sees dominant tokens
    (original order) then contextual tokens, per image; each image's placeholder run in input_ids is
    shortened to that count and the shortened prompt has contiguous positions.

    Families: ``llava`` (LLaVA-1.5, CLIP, "default" strategy), ``llava_next`` (LLaVA-NeXT: every
    crop, the base view included, keeps ``dominant + contextual`` tokens; the high-res crops' dominant
    patches are read row-major across the whole high-res grid, then their [CLS] tokens, then their
    contextual tokens; no unpadding and no newline tokens, as the official ``visionzip/llava_arch.py``
    ``restore_image_features_sorted``; details and differences in ``vision_side``) and ``gemma3``
    (SigLIP; ranking and merging run on the projector's pooled cells: a cell's score and key are the
    mean over its patches, its hidden state is the pooled feature entering the projector's norm; not
    in the official code, which covers LLaVA-family CLIP towers). Other families raise
    UnsupportedModelError at wrap().

    Defaults: ``dominant=54, contextual=10`` (64 tokens per image), the official README's example
    (``visionzip(model, dominant=54, contextual=10)``); the paper's other LLaVA-1.5 settings are
    108+20 (128 tokens) and 162+30 (192); on LLaVA-NeXT the same numbers count per crop (54+10 gives
    320 tokens to an image of 5 crops, as the official code, which applies them to every crop).
    ``dominant + contextual >=`` the image's (crop's) token count leaves the model unchanged.
    ``self.report`` (a PruneReport) describes the last prompt.

    Precision (a deviation, not an option): the attention that ranks the tokens and the key cosine
    similarities that assign each remaining token to a contextual target are computed in float32
    (the averaging of the hidden states runs in the features' dtype); the official code computes
    them in the model's precision. In fp32 the two agree; in bf16 the official code's near-ties can
    resolve otherwise, so some tokens merge into another contextual target than here.
    """

    name = "visionzip"
    Config = VisionZipConfig

    def keep_count(self, n: int) -> int:
        return self.config.dominant + self.config.contextual

    def stat_layers(self, plan: VisionPlan) -> list[int]:
        return [plan.feature_layer]

    def reduce_crops(
        self, tokens: torch.Tensor, cls: torch.Tensor | None, stats: dict[int, VisionStats], plan: VisionPlan, keep: int
    ) -> Reduction:
        # keep is always dominant + contextual: every image (LLaVA-NeXT: every crop) keeps that many
        st = stats[plan.feature_layer]
        if cls is not None:
            out, dom = _merge(tokens, st.cls_attn, st.keys, self.config.dominant - 1, self.config.contextual, cls)
            return Reduction(out, dom, lead=1)
        out, dom = _merge(tokens, st.mean_attn, st.keys, self.config.dominant, self.config.contextual, None)
        return Reduction(out, dom, lead=0)
