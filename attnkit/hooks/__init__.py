"""The one place that talks to transformers' attention internals."""

from __future__ import annotations

from .context import View
from .dispatch import NAME
from .kernel import KernelOptions
from .manager import Handle

__all__ = ["NAME", "Handle", "KernelOptions", "View"]
