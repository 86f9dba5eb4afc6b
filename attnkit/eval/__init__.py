"""Evaluation layer: tasks (POPE, CHAIR, attention grounding, MME), the runner, and the run's files.

Tasks are registered by name (``register_task``; third parties via the ``attnkit.tasks``
entry-point group); ``TASKS`` is a read-only view name -> one-line description.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .base import NoOptions, Sample, Task
from .registry import UnknownTaskError, get_task_class, list_tasks, make_task, register_task


class _TaskDescriptions(Mapping):
    """Read-only, live view of the registry: task name -> one-line description."""

    def __getitem__(self, name: str) -> str:
        if name not in list_tasks():
            raise KeyError(name)
        cls = get_task_class(name)
        return cls.description or (cls.__doc__ or "").strip().split("\n")[0]

    def __iter__(self) -> Iterator[str]:
        return iter(list_tasks())

    def __len__(self) -> int:
        return len(list_tasks())

    def __repr__(self) -> str:
        return f"TASKS({dict(self)!r})"


TASKS: Mapping[str, str] = _TaskDescriptions()

__all__ = ["NoOptions", "Sample", "TASKS", "Task", "UnknownTaskError", "get_task_class", "list_tasks", "make_task",
           "register_task"]
