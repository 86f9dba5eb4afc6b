"""Pluggable attention methods. Each lives in its own module and registers by name."""

from __future__ import annotations

from .act import ACT, ACTConfig
from .base import Method, MethodConfig, check_int, check_range
from .identity import Identity, IdentityConfig
from .pai import PAI, PAIConfig
from .var import VAR, VARConfig
from .registry import get_method_class, list_methods, make_method, register

__all__ = [
    "ACT",
    "ACTConfig",
    "Identity",
    "IdentityConfig",
    "Method",
    "MethodConfig",
    "PAI",
    "PAIConfig",
    "VAR",
    "VARConfig",
    "check_int",
    "check_range",
    "get_method_class",
    "list_methods",
    "make_method",
    "register",
]
