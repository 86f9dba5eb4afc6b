"""Pluggable attention methods. Each lives in its own module and registers by name."""

from __future__ import annotations

from .act import ACT, ACTConfig
from .base import Contrast, Method, MethodConfig, check_int, check_range
from .fastv import FastV, FastVConfig
from .hiprune import HiPrune, HiPruneConfig
from .icd import ICD, ICDConfig
from .identity import Identity, IdentityConfig
from .pai import PAI, PAIConfig
from .pdrop import PyramidDrop, PyramidDropConfig
from .sparsevlm import SparseVLM, SparseVLMConfig
from .var import VAR, VARConfig
from .vcd import VCD, VCDConfig
from .visionzip import VisionZip, VisionZipConfig
from .vhr import VHR, VHRConfig
from .registry import get_method_class, list_methods, list_pipelines, make_method, register, register_pipeline
from . import carve  # noqa: E402,F401 (registers the carve pipeline)

__all__ = [
    "Contrast",
    "ACT",
    "ACTConfig",
    "FastV",
    "FastVConfig",
    "HiPrune",
    "HiPruneConfig",
    "ICD",
    "ICDConfig",
    "Identity",
    "IdentityConfig",
    "Method",
    "MethodConfig",
    "PAI",
    "PAIConfig",
    "PyramidDrop",
    "PyramidDropConfig",
    "SparseVLM",
    "SparseVLMConfig",
    "VAR",
    "VARConfig",
    "VCD",
    "VCDConfig",
    "VHR",
    "VHRConfig",
    "VisionZip",
    "VisionZipConfig",
    "check_int",
    "check_range",
    "get_method_class",
    "list_methods",
    "list_pipelines",
    "make_method",
    "register",
    "register_pipeline",
]
