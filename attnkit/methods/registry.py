"""Method registry: lower-case class name -> Method class; third parties via the
``attnkit.methods`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ..errors import MethodArgumentError, UnknownMethodError
from .base import Method, MethodConfig

_REGISTRY: dict[str, type[Method]] = {}
_entry_points_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name`` (defaults to the lower-case class name)."""
    if not cls.name:
        cls.name = cls.__name__.lower()
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group="attnkit.methods"):
        register(ep.load())


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _load_entry_points()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r} (valid: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[key]


def make_method(spec: Any, **kwargs: Any) -> Method:
    """A Method from a name (kwargs go to its config), a config object or a Method instance."""
    if isinstance(spec, Method):
        if kwargs:
            raise MethodArgumentError(f"{spec.name}: keyword arguments only go with a method name")
        return spec
    if isinstance(spec, str):
        return get_method_class(spec)(**kwargs)
    if isinstance(spec, MethodConfig):
        if kwargs:
            raise MethodArgumentError("keyword arguments only go with a method name")
        _load_entry_points()
        for cls in _REGISTRY.values():
            if type(spec) is cls.Config:
                return cls(spec)
        raise UnknownMethodError(f"no registered method takes a {type(spec).__name__}")
    if isinstance(spec, type) and issubclass(spec, Method):
        return spec(**kwargs)
    raise MethodArgumentError(f"cannot make a method from {type(spec).__name__}; pass a name, a config or a Method")
