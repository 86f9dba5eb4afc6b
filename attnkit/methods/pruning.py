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
