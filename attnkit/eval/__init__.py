"""Evaluation layer: tasks (POPE, CHAIR, attention grounding), the runner, and the run's files."""

from __future__ import annotations

from .base import Sample, Task

TASKS: dict[str, str] = {
    "pope": "POPE yes/no object probing (Li et al. 2023): accuracy, precision, recall, F1, yes-ratio",
    "chair": "CHAIR caption hallucination on COCO (Rohrbach et al. 2018): CHAIR_s, CHAIR_i, Recall, Len",
    "grounding": "attention pointing game on COCO-format boxes: hit rate and attention mass in the box",
}

__all__ = ["TASKS", "Sample", "Task"]
