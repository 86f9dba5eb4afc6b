"""Pluggable attention methods. Each lives in its own module and registers by name."""

from __future__ import annotations

from .base import Method, MethodConfig, check_range
from .identity import Identity, IdentityConfig
from .registry import get_method_class, list_methods, make_method, register

__all__ = [
    "Identity",
    "IdentityConfig",
    "Method",
    "MethodConfig",
    "check_range",
    "get_method_class",
    "list_methods",
    "make_method",
    "register",
]
