"""The one place that talks to transformers' attention internals."""

from __future__ import annotations

from .context import ForwardContext
from .dispatch import NAME
from .manager import Handle

__all__ = ["NAME", "ForwardContext", "Handle"]
