"""Shared fixtures: one tiny random model per family, built once per session."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from attnkit import testing  # noqa: E402

FAMILIES = testing.FAMILIES


@functools.lru_cache(maxsize=None)
def _tiny(family: str):
    return testing.tiny_model(family, seed=0)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family):
    """(model, inputs) for the family; the model is shared, so tests must leave it unwrapped."""
    model, inputs = _tiny(family)
    return model, inputs


def valid_positions(inputs) -> torch.Tensor:
    """(B, S) bool of non-padding positions."""
    return inputs["attention_mask"].bool()


def greedy(model, inputs, n: int = 8) -> torch.Tensor:
    """The n new tokens of a greedy generate."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[:, inputs["input_ids"].shape[1] :]


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def extend_inputs(inputs: dict, new: torch.Tensor) -> dict:
    """Inputs with ``new`` (B, n) tokens appended, per-token tensors extended as generate does."""
    out = dict(inputs)
    ids = inputs["input_ids"]
    out["input_ids"] = torch.cat([ids, new], dim=1)
    for key, value in inputs.items():
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.shape[:2] == ids.shape:
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([value, value.new_full((ids.shape[0], new.shape[1]), fill)], dim=1)
    return out
