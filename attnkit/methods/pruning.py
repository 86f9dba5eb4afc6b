"""What every visual-token pruning method reports: tokens kept per LM layer and prefill FLOPs.

The FLOPs are those of the language model's decoder layers at prefill (attention and MLP), counted
with the formula of the FastV paper extended to GQA and gated MLPs: for n tokens at one layer,

    projections   2 n d (H + 2 KVH) hd  +  2 n H hd d          (q, k, v and o)
    attention     2 H hd n^2  +  2 H hd n^2                    (Q K^T and P V, the full n x n square)
    MLP           2 n d m * (3 if gated else 2)

with d the hidden size, H / KVH the query / key-value heads, hd the head dimension and m the MLP
width. Norms, softmax, embeddings, the vision tower and the LM head are left out (the same for
pruned and unpruned runs, or negligible). The ratio is sum over layers of flops(n_l) divided by
layers x flops(n_full), where n_l is the number of prompt tokens layer l processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MethodArgumentError, UnsupportedModelError
from .base import Method


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one decoder layer that its FLOPs depend on."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    gated: bool = True

    @classmethod
    def from_adapter(cls, adapter: Any) -> LayerShape:
        cfg = adapter.text_config
        mlp = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        # LLaMA/Vicuna, Qwen, Gemma, InternLM2 MLPs are gated (gate, up, down); OPT's has two matrices
        gated = getattr(cfg, "model_type", "") not in ("opt", "gpt2")
        return cls(cfg.hidden_size, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim, mlp, gated)


def layer_flops(n: int, shape: LayerShape) -> int:
    """Prefill FLOPs of one decoder layer over n tokens (formula in the module docstring)."""
    d, h, kvh, hd, m = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.mlp
    proj = 2 * n * d * (h + 2 * kvh) * hd + 2 * n * h * hd * d
    attn = 4 * h * hd * n * n
    mlp = 2 * n * d * m * (3 if shape.gated else 2)
    return proj + attn + mlp


def flops_ratio(tokens_per_layer: list[int], full_tokens: int, shape: LayerShape) -> float:
    """Prefill FLOPs of the decoder layers with ``tokens_per_layer`` relative to ``full_tokens`` everywhere."""
    if not tokens_per_layer:
        return 1.0
    full = len(tokens_per_layer) * layer_flops(full_tokens, shape)
    return sum(layer_flops(n, shape) for n in tokens_per_layer) / full


@dataclass
class PruneReport:
    """Filled at each prefill by a pruning method: what the last prompt went through.

    ``tokens_per_layer[l]``: prompt tokens (per batch row; rows keep equal counts, padding included)
    that decoder layer l processed; ``full_tokens``: the unpruned prompt length the model would have
    had; ``image_tokens``: image tokens per row before pruning, and ``image_kept_per_layer`` after.
    """

    method: str
    full_tokens: int = 0
    image_tokens: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    image_kept_per_layer: list[int] = field(default_factory=list)
    flops_ratio: float = 1.0

    def finish(self, shape: LayerShape) -> PruneReport:
        self.flops_ratio = flops_ratio(self.tokens_per_layer, self.full_tokens, shape)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "full_tokens": self.full_tokens,
            "image_tokens": self.image_tokens,
            "tokens_per_layer": list(self.tokens_per_layer),
            "image_kept_per_layer": list(self.image_kept_per_layer),
            "flops_ratio": self.flops_ratio,
        }


# -- LLM-side pruning methods: the part FastV, PyramidDrop and SparseVLM share ------------------------
MODES = ("drop", "mask")


def check_mode(method: str, mode: Any) -> None:
    if mode not in MODES:
        raise MethodArgumentError(f"{method}: mode={mode!r} must be one of {', '.join(MODES)}")


#: Positions of the tokens a drop keeps: "original" (each keeps its own) or "official" (renumbered
#: 0..n-1 after each drop, decode positions following each layer's length, as the official code).
POSITIONS = ("original", "official")


def check_positions(method: str, positions: Any, mode: str) -> None:
    if positions not in POSITIONS:
        raise MethodArgumentError(f"{method}: positions={positions!r} must be one of {', '.join(POSITIONS)}")
    if positions == "official" and mode != "drop":
        raise MethodArgumentError(f"{method}: positions='official' renumbers the tokens a drop keeps; it needs mode='drop'")


def keep_top(scores: torch.Tensor, candidates: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """(B, q) keep mask: every non-candidate position, and per row the ``n_keep[b]`` candidates with
    the highest ``scores`` (B, q). Rows drop the same number of candidates, the smallest any row would
    drop, so that they keep equal counts (rows with equal candidate counts are unaffected)."""
    counts = candidates.sum(1)
    n_drop = int((counts - n_keep.to(counts.device)).clamp_min(0).min())
    keep = torch.ones_like(candidates)
    if n_drop == 0:
        return keep
    low = scores.float().masked_fill(~candidates, float("inf"))
    drop = low.topk(n_drop, dim=1, largest=False).indices
    return keep.scatter(1, drop, False)


class PruningMethod(Method):
    """Base of the LLM-side pruning methods: ``mode`` ("drop" removes tokens, "mask" masks them as keys;
    both give the same logits on the kept positions) and a ``report`` of the last prefill."""

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._adapter: Any = None
        self._shape: LayerShape | None = None
        self._stages: list[tuple[int, int, int]] = []  # (layer, tokens dropped, image tokens kept) per row
        self._prompt = self._image = self._depth = 0

    @property
    def drops_tokens(self) -> bool:  # type: ignore[override]
        return self.config.mode == "drop"

    @property
    def renumbers_positions(self) -> bool:  # type: ignore[override]
        return self.drops_tokens and getattr(self.config, "positions", "original") == "official"

    def attach(self, handle: Any) -> None:
        adapter = handle.adapter
        if self.renumbers_positions and (not adapter.positions_1d or adapter.rotary_module() is None):
            what = "3-D mRoPE positions" if not adapter.positions_1d else "no rotary-embedding module"
            raise UnsupportedModelError(
                f"{self.name}: positions='official' renumbers 1-D rotary positions and {adapter.family} has {what}; "
                "use positions='original'"
            )
        self._adapter = adapter
        self._shape = LayerShape.from_adapter(adapter)
        self._depth = adapter.num_layers

    def detach(self) -> None:
        self._adapter = None

    def check_layer(self, field_name: str, layer: int, n_layers: int, first: int = 1) -> None:
        """MethodArgumentError unless tokens can be dropped before ``layer`` of this model."""
        if not first <= layer < n_layers:
            raise MethodArgumentError(
                f"{self.name}: {field_name} gives layer {layer}, out of range [{first}, {n_layers - 1}] for this "
                f"{n_layers}-layer model"
            )
        adapter = self._adapter
        if self.drops_tokens and layer < adapter.first_droppable_layer:
            raise MethodArgumentError(
                f"{self.name}: {field_name} gives layer {layer}, but {adapter.family} adds image features to the "
                f"hidden states up to layer {adapter.first_droppable_layer - 1}; use a later layer or mode='mask'"
            )

    def begin_forward(self, view: Any) -> None:
        if view.is_prefill:
            self._stages = []
            self._prompt = view.q_len
            image = view.image_mask
            self._image = int(image.sum(1).max()) if image is not None and image.numel() else 0

    def record(self, layer: int, keep: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Note a stage's selection for the report; returns ``keep``."""
        self._stages.append((layer, int((~keep[0]).sum()), int((keep & image)[0].sum())))
        return keep

    @property
    def report(self) -> PruneReport:
        """What the last prompt went through (tokens per layer, per row, and the FLOPs ratio)."""
        rep = PruneReport(method=self.name, full_tokens=self._prompt, image_tokens=self._image)
        tokens, image = self._prompt, self._image
        stages = {layer: (t, i) for layer, t, i in self._stages}
        for layer in range(self._depth):
            if layer in stages:
                tokens -= stages[layer][0]
                image = stages[layer][1]
            rep.tokens_per_layer.append(tokens)
            rep.image_kept_per_layer.append(image)
        return rep.finish(self._shape) if self._shape is not None else rep
