"""HiPrune: keep anchor, buffer and register tokens chosen by the vision encoder's hierarchical attention.

Liu, Du, Zhu, Lian, Li, Chen. "HiPrune: Training-Free Visual Token Pruning via Hierarchical
Attention in Vision-Language Models." arXiv:2508.00553, 2025. Official code:
github.com/Danielement321/HiPrune.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import MethodArgumentError
from .base import MethodConfig, check_int, check_range
from .registry import register
from .vision_side import Reduction, VisionPlan, VisionPruner, VisionStats

#: Official object layer (1-based) and the encoder depth it was set for: HIPRUNE_OBJECT_LAYER=9 for the CLIP
#: ViT-L/14-336 (24 layers) of LLaVA-1.5 and LLaVA-NeXT (official README's hyper-parameter table,
#: bench_llava.sh, bench_llava_next.sh; 16 of 32 for Qwen2.5-VL's ViT, a family this toolkit does not
#: prune). Every other tower takes it rescaled to its depth (Gemma3's SigLIP has no official value;
#: SigLIP-So400m, 27 layers: 10).
OBJECT_LAYER: tuple[int, int] = (9, 24)

#: Default token budget per image, by how the vision encoder sees an image (``VisionFeatures.anyres``):
#: "one view" (LLaVA-1.5, and Gemma3, which has no official value) takes the official HIPRUNE_RETENTION
#: of bench_llava.sh, 192; "anyres" (a base view plus high-res crops, LLaVA-NeXT) that of
#: bench_llava_next.sh, 640 (the README lists 640/320/160 of at most 2880 = 5 crops x 576).
DEFAULT_BUDGET: dict[str, int] = {"one view": 192, "anyres": 640}


def default_budget(plan: VisionPlan) -> int:
    """The default token budget per image for a vision encoder described by ``plan`` (see DEFAULT_BUDGET)."""
    return DEFAULT_BUDGET["anyres" if plan.anyres else "one view"]


def default_object_layer(depth: int) -> int:
    """The official object layer (OBJECT_LAYER), rescaled to an encoder of ``depth`` layers (1-based)."""
    layer, of = OBJECT_LAYER
    return layer if depth == of else min(depth, max(1, round(layer * depth / of)))


def anchor_count(budget: int, alpha: float) -> int:
    """Anchors per image: round(budget * alpha / 5) (each anchor brings up to 4 buffers)."""
    return round(budget * alpha / 5)


def hiprune_select(
    object_attn: torch.Tensor, output_attn: torch.Tensor, budget: int, alpha: float, width: int
) -> torch.Tensor:
    """(B, budget) sorted indices of the kept tokens, from (B, N) attention at the object and output layers.

    As the official ``llava_arch.py`` ``encode_images``: anchors = the top ``round(budget*alpha/5)``
    tokens by object-layer attention; buffers = each anchor's index -1, +1, -width, +width, clamped
    to [0, N-1] (row ends are not special-cased); registers = the top remaining tokens by output-layer
    attention, as many as fill the budget.
    """
    bsz, n = object_attn.shape
    k = anchor_count(budget, alpha)
    out = []
    for b in range(bsz):
        anchors = object_attn[b].topk(k).indices
        near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
        chosen = torch.zeros(n, dtype=torch.bool, device=object_attn.device)
        chosen[near] = True
        rest = budget - int(chosen.sum())
        registers = output_attn[b].masked_fill(chosen, float("-inf")).topk(rest).indices
        chosen[registers] = True
        out.append(chosen.nonzero().flatten())
    return torch.stack(out)


def check_anchors(budget: int, alpha: float, what: str = "budget") -> None:
    """MethodArgumentError when the anchors and their buffers could exceed ``budget`` tokens."""
    if 5 * anchor_count(budget, alpha) > budget:
        raise MethodArgumentError(
            f"hiprune: alpha={alpha!r} gives {anchor_count(budget, alpha)} anchors, whose "
            f"buffers could exceed {what}={budget}; lower alpha"
        )


@dataclasses.dataclass
class HiPruneConfig(MethodConfig):
    """budget: tokens kept per image (None: the vision encoder's default, one view or anyres, see
    DEFAULT_BUDGET); alpha: share of the budget for anchors and their buffers; object_layer: 1-based vision
    layer of the anchors (None: the official layer rescaled to the encoder's depth)."""

    budget: int | None = MethodConfig.option(None, help="tokens kept per image (none = 192, anyres 640)", lo=1)
    alpha: float = MethodConfig.option(0.1, help="share of the budget for anchors and their buffers", lo=0.0, hi=1.0)
    object_layer: int | None = MethodConfig.option(None, help="1-based vision layer of the anchors (none = official, rescaled)", lo=1)

    def validate(self) -> None:
        if self.budget is not None:
            check_int("hiprune", "budget", self.budget, 1, None)
        check_range("hiprune", "alpha", self.alpha, 0.0, 1.0)
        if self.object_layer is not None:
            check_int("hiprune", "object_layer", self.object_layer, 1, None)
        if self.budget is not None:
            check_anchors(self.budget, self.alpha)


@register
class HiPrune(VisionPruner):
    """HiPrune (Liu et al., 2025): each image reaches the LLM as ``budget`` tokens, in their original order.

    Attention is the "global" attention of the official code: probabilities averaged over heads and
    over every query ([CLS] row included), [CLS] column left out; computed from the layers' q/k
    projections. Anchors: the top ``round(budget * alpha / 5)`` tokens at the object-centric middle
    layer ``object_layer`` (1-based, i.e. encoder layer index ``object_layer - 1``); buffers: each
    anchor's neighbours at +-1 and +-grid width (clamped to the image, duplicates counted once);
    registers: the rest of the budget, by attention at the output layer, the layer whose features
    the projector takes (LLaVA-1.5: ``vision_feature_layer`` -2; Gemma3: the last layer). Tokens
    keep their grid order. A budget >= the image's token count leaves the model unchanged.

    Families: ``llava`` (LLaVA-1.5, CLIP, "default" strategy), ``llava_next`` (LLaVA-NeXT: the
    image's budget is split evenly over its crops, base view included, ``budget // crops`` each, as
    the official ``encode_images`` divides HIPRUNE_RETENTION by the crops it encodes; each crop
    selects on its own grid; the base crop's tokens come first, then the high-res crops' read
    row-major across the whole high-res grid, with no unpadding and no newline tokens, as the
    official code forces the 'spatial' merge; see ``vision_side``) and ``gemma3`` (SigLIP; selection
    on the projector's pooled cells, a cell's attention the mean over its patches as the official
    Qwen2.5-VL code averages over each 2x2 merge group, the grid width that of the pooled grid).
    Other families raise UnsupportedModelError at wrap().

    Defaults (official README table, bench_llava.sh, bench_llava_next.sh): ``budget`` 192 per image
    for LLaVA-1.5 (the README's settings are 192/128/64) and Gemma3, 640 per image for LLaVA-NeXT
    (README: 640/320/160), see ``DEFAULT_BUDGET``; ``alpha=0.1``; ``object_layer`` 9 for CLIP
    ViT-L/14 (24 layers); see ``OBJECT_LAYER``. For towers of another depth the default is rescaled,
    ``round(9 * depth / 24)`` (at least 1); an explicit ``object_layer`` is used as given and must
    be within the tower. ``self.report`` (a PruneReport) describes the last prompt.

    Deviations (not options): the budget is per image. The official ``encode_images`` divides it by
    the number of images encoded together, ``int(HIPRUNE_RETENTION / B)`` (for LLaVA-1.5, B images of
    a batch; for LLaVA-NeXT, the crops of every image of the batch), so a batch of B images gets
    ``budget / B`` tokens each there; its benchmarks run one image per batch, where the two agree
    (attnkit splits LLaVA-NeXT's budget over the crops of each image alone). The attention that ranks
    the tokens is computed in float32, the official code's in the model's precision: in fp32 the two
    agree, in bf16 near-ties may rank differently.
    """

    name = "hiprune"
    Config = HiPruneConfig
    #: the budget in use: ``config.budget``, or the default for the model's vision encoder (``DEFAULT_BUDGET``)
    #: once wrapped
    budget: int | None = None

    def check_plan(self, plan: VisionPlan) -> None:
        depth = len(plan.layers)
        if self.config.object_layer is not None and self.config.object_layer > depth:
            raise MethodArgumentError(
                f"hiprune: object_layer={self.config.object_layer} is out of range [1, {depth}] "
                f"for this {depth}-layer vision encoder"
            )
        self.budget = self.config.budget if self.config.budget is not None else default_budget(plan)
        check_anchors(self.budget, self.config.alpha)
        n = plan.tokens
        for crops in plan.crop_counts:  # anyres (LLaVA-NeXT): every crop count an image can have
            keep = self.budget // crops
            if keep == 0:
                raise MethodArgumentError(
                    f"hiprune: budget={self.budget} leaves no token to each crop of an image of {crops} crops "
                    f"(an anyres image's budget is split evenly over its crops); raise budget to >= {crops}"
                )
            if keep < n:
                check_anchors(keep, self.config.alpha, what=f"per-crop budget ({crops} crops)")

    def object_index(self, plan: VisionPlan) -> int:
        """0-based encoder layer of the anchors."""
        layer = self.config.object_layer
        if layer is None:
            layer = default_object_layer(len(plan.layers))
        return layer - 1

    def keep_count(self, n: int) -> int:
        return self.budget

    def crop_keep(self, n: int, crops: int) -> int:
        return self.budget // crops

    def stat_layers(self, plan: VisionPlan) -> list[int]:
        return [self.object_index(plan), plan.feature_layer]

    def reduce_crops(
        self, tokens: torch.Tensor, cls: torch.Tensor | None, stats: dict[int, VisionStats], plan: VisionPlan, keep: int
    ) -> Reduction:
        idx = hiprune_select(
            stats[self.object_index(plan)].mean_attn,
            stats[plan.feature_layer].mean_attn,
            keep,
            self.config.alpha,
            plan.side,
        )
        kept = tokens.gather(1, idx.to(tokens.device)[..., None].expand(-1, -1, tokens.shape[-1]))
        return Reduction(kept, idx, lead=0)
