"""Method registry: lower-case class name -> Method class; third parties via the
``attnkit.methods`` entry-point group.

Pipelines (``register_pipeline``) sit in a registry of their own: methods that run their own passes per
sample (CARVE: probe, refine the image, answer) instead of rewriting attention inside one generate().
They are not Methods: ``list_methods``/``get_method_class``/``attnkit.wrap`` never see them (so the common
suite does not either); ``attnkit eval --method NAME`` runs them per sample (see attnkit.eval.runner)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ..errors import MethodArgumentError, UnknownMethodError
from .base import Method, MethodConfig

_REGISTRY: dict[str, type[Method]] = {}
_PIPELINES: dict[str, type] = {}
_entry_points_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name`` (defaults to the lower-case class name)."""
    if not cls.name:
        cls.name = cls.__name__.lower()
    _REGISTRY[cls.name] = cls
    return cls


def register_pipeline(cls: type) -> type:
    """Class decorator: register a pipeline method under ``cls.name`` (it has ``name``, ``Config``, a
    ``config``, ``pipeline = True`` and ``run(model, processor, image, question, **generate_kwargs) -> str``)."""
    if not cls.name:
        cls.name = cls.__name__.lower()
    _PIPELINES[cls.name] = cls
    return cls


def list_pipelines() -> list[str]:
    """Names of every registered pipeline method, sorted."""
    return sorted(_PIPELINES)


def get_method_or_pipeline_class(name: str) -> type:
    """The Method class or the pipeline class registered under ``name`` (what ``attnkit eval --method`` takes)."""
    key = name.strip().lower()
    if key in _PIPELINES:
        return _PIPELINES[key]
    return get_method_class(name)


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
    if key not in _REGISTRY and key in _PIPELINES:
        raise UnknownMethodError(
            f"{key!r} is a pipeline (its own passes per sample), not an attention method to wrap a model with: "
            f"call {_PIPELINES[key].__module__}.answer(...) or run it with attnkit eval --method {key}"
        )
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
