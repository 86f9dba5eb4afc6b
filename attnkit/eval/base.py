"""What a task is: a loader of samples, a prompt, an answer parser and a metric, as plain Python.

The runner (``attnkit.eval.runner``) knows tasks only through this interface: it batches
``Sample`` objects through a model, writes one JSON line per sample and hands the records
back to ``Task.score``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Sample:
    """One question to the model.

    ``id`` is unique within a run (it keys resume); ``image`` is the image file's path, or a
    PIL image, or a zero-argument callable returning one (lazy, e.g. a datasets row);
    ``question`` is the user text before the chat template; ``label`` and ``meta`` are
    JSON-serialisable and copied into ``samples.jsonl``.
    """

    id: str
    image: Path | Any
    question: str
    label: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def coco_image_dir(annotations_dir: Path, split: str) -> Path:
    """Where COCO images usually sit next to ``annotations/``: ``../{split}``, else ``../images``, else the dir itself."""
    parent = annotations_dir.parent
    return next((d for d in (parent / split, parent / "images") if d.is_dir()), annotations_dir)


@dataclass
class NoOptions:
    """The options of a task that has none."""


class Task:
    """Base class of evaluation tasks. Subclasses set ``name`` and implement the methods below.

    Register one with ``attnkit.eval.register_task`` (or the ``attnkit.tasks`` entry-point group);
    ``Options`` is the dataclass of its command-line options (fields made with
    ``attnkit.options.option(default, help=..., lo=..., hi=..., choices=...)``, each one becoming an
    ``attnkit eval`` flag: ``data_dir`` -> ``--data-dir``) and ``from_options`` builds the task from it.
    """

    name: str = ""
    #: one line for ``attnkit list``
    description: str = ""
    #: the task's options (a dataclass); ``attnkit eval --task NAME`` takes each field as a flag
    Options: type = NoOptions
    #: max_new_tokens when the user does not give one
    default_max_new_tokens: int = 16

    @classmethod
    def from_options(cls, options: Any, *, seed: int = 0) -> Task:
        """The task built from its ``Options`` (how ``attnkit eval`` makes it); ``seed`` is the run's
        ``--seed``. The default passes every field to the constructor as a keyword argument."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(options)})

    def load(self) -> list[Sample]:
        """All samples of the run, in a fixed order. Raise ``attnkit.errors.DataError`` naming the culprit."""
        raise NotImplementedError

    def parse(self, output: str) -> Any:
        """The model's decoded reply -> the parsed answer stored in ``samples.jsonl``."""
        return output

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics from the records (dicts with id, prompt, output, parsed, label, meta); JSON-serialisable."""
        raise NotImplementedError

    def summary(self, metrics: dict[str, Any]) -> str:
        """A short markdown table of the metrics, printed at the end of a run."""
        rows = [f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, (int, float, str))]
        return "\n".join(["| metric | value |", "|---|---|", *rows])

    def observer(self, adapter: Any, processor: Any) -> Any:
        """A Method to wrap the model with during the run (e.g. an attention observer), or None.

        Raise ``attnkit.errors.UnsupportedModelError`` if the task cannot run on this model."""
        return None

    def collect(
        self, observer: Any, samples: list[Sample], batch: dict[str, Any], new_tokens: Any, adapter: Any
    ) -> list[dict[str, Any]]:
        """After each batch, per-row extra fields for the records, read from ``observer``."""
        return [{} for _ in samples]

    def extra_outputs(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra files for the output dir, ``{file name: JSON-serialisable object}`` (``.jsonl`` names take a list)."""
        return {}

    def config(self) -> dict[str, Any]:
        """The task's resolved settings, recorded in results.json."""
        return {"task": self.name}
