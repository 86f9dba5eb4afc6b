"""Task registry: name -> Task class, like the method registry; third parties via the
``attnkit.tasks`` entry-point group. Each task class declares its CLI options as a dataclass,
``Task.Options`` (fields made with ``attnkit.options.option``)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ..errors import AttnkitError
from .base import Task

_REGISTRY: dict[str, type[Task]] = {}
_loaded = False
_BUILTIN = ("pope", "chair", "grounding", "mme")  # listed first, in this order


class UnknownTaskError(AttnkitError, KeyError):
    """A task name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register ``cls`` under ``cls.name`` (defaults to the lower-case class name)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise AttnkitError(f"register_task: {cls!r} is not a subclass of attnkit.eval.Task")
    if not cls.__dict__.get("name"):
        cls.name = cls.__name__.lower()
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    """The built-in tasks (registered on import), then the ``attnkit.tasks`` entry points, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import chair, grounding, mme, pope  # they register themselves on first import

    for cls in (pope.PopeTask, chair.ChairTask, grounding.GroundingTask, mme.MmeTask):
        _REGISTRY.setdefault(cls.name, cls)  # (again, if the registry was replaced since)

    for ep in entry_points(group="attnkit.tasks"):
        try:
            cls = ep.load()
        except Exception as e:  # a broken third-party package must not hide the others' tasks
            raise AttnkitError(f"task entry point {ep.name!r} ({ep.value}) failed to load: "
                               f"{type(e).__name__}: {e}") from None
        register_task(cls)


def list_tasks() -> list[str]:
    """Names of every registered task, built-ins first (pope, chair, grounding, mme), then in registration order."""
    _load()
    names = list(_REGISTRY)
    return sorted(names, key=lambda n: (_BUILTIN.index(n) if n in _BUILTIN else len(_BUILTIN), names.index(n)))


def get_task_class(name: str) -> type[Task]:
    _load()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise UnknownTaskError(f"unknown task {name!r} (valid: {', '.join(list_tasks())})")
    return _REGISTRY[key]


def make_task(name: str, options: Any = None, *, seed: int = 0, **kwargs: Any) -> Task:
    """A task from its name and its ``Options`` (or keyword arguments for them), as ``attnkit eval`` builds it."""
    cls = get_task_class(name)
    if options is None:
        options = cls.Options(**kwargs)
    elif kwargs:
        raise AttnkitError("make_task: give options or keyword arguments, not both")
    return cls.from_options(options, seed=seed)


__all__ = ["UnknownTaskError", "get_task_class", "list_tasks", "make_task", "register_task"]
