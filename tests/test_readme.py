"""The README's method-writing example runs as printed, on a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import attnkit
from attnkit.methods import registry

from .conftest import _tiny, logits


def test_readme_method_example_runs(monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class Damp" in b)
    model, inputs = _tiny("llava")
    ref = logits(model, inputs)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the registry clean
    namespace = {"model": model}
    exec(compile(block, "README.md", "exec"), namespace)
    handle = namespace["handle"]
    try:
        got = logits(model, inputs)
    finally:
        handle.remove()
    assert "damp" in attnkit.list_methods()
    assert (got - ref).abs().max() > 1e-3, "beta=0.3 must change the model"
    assert torch.equal(logits(model, inputs), ref)
