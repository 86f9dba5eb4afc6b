"""Adapters: one per VLM family. ``get_adapter(model)`` picks the right one."""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .base import Adapter, AnyresImage, Grid, VisionFeatures, compact_left, gather_left
from .families import ADAPTERS

_BY_TYPE = {mt: cls for cls in ADAPTERS for mt in cls.model_types}


def list_models() -> list[str]:
    """Supported family names."""
    return [cls.family for cls in ADAPTERS]


def adapter_class(family: str) -> type[Adapter]:
    """The adapter class of a family name (see ``list_models``)."""
    for cls in ADAPTERS:
        if cls.family == family:
            return cls
    raise UnsupportedModelError(f"unknown model family {family!r}; supported families: {', '.join(list_models())}")


def get_adapter(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``; UnsupportedModelError names the class and lists the families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _BY_TYPE.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported; "
            f"supported families: {', '.join(list_models())}"
        )
    return cls(model)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "AnyresImage",
    "Grid",
    "VisionFeatures",
    "adapter_class",
    "compact_left",
    "gather_left",
    "get_adapter",
    "list_models",
]
