"""Identity: a no-op that routes every layer through attnkit's reference kernel.

Used by tests (reference kernel == fused sdpa) and benchmarks (cost of the reference kernel). It
rewrites nothing, so its output equals the unwrapped model up to float rounding.
"""

from __future__ import annotations

import dataclasses

import torch

from ..hooks.context import View
from .base import Method, MethodConfig
from .registry import register


@dataclasses.dataclass
class IdentityConfig(MethodConfig):
    """No fields: identity has no strength to set."""


@register
class Identity(Method):
    """Eager path on every layer, every query row; probabilities pass through unchanged."""

    name = "identity"
    Config = IdentityConfig
    neutral = {}

    def probs(self, view: View, probs: torch.Tensor) -> torch.Tensor:
        return probs
