"""The README's method-writing example runs as printed, on a tiny model, and is what the README claims:
one file of under 40 lines that needs nothing but attnkit.methods (the contract in methods/base.py)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import attnkit
from attnkit.methods import registry

from .conftest import _tiny, logits


def _block() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class Look" in b)


def test_readme_method_example_is_one_short_file_on_the_contract():
    block = _block()
    assert len(block.splitlines()) < 40
    imports = re.findall(r"^(?:from (\S+) import|import (\S+))", block, re.M)
    assert {a or b for a, b in imports} == {"dataclasses", "torch", "attnkit", "attnkit.methods"}


def test_readme_method_example_runs(monkeypatch):
    model, inputs = _tiny("llava")
    ref = logits(model, inputs)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the registry clean
    namespace = {"model": model}
    exec(compile(_block(), "README.md", "exec"), namespace)
    handle = namespace["handle"]
    try:
        got = logits(model, inputs)
    finally:
        handle.remove()
    assert "look" in attnkit.list_methods()
    assert (got - ref).abs().max() > 1e-3, "alpha=1 must change the model"
    assert torch.equal(logits(model, inputs), ref)
    with attnkit.wrap(model, "look", **namespace["Look"].neutral):
        torch.testing.assert_close(logits(model, inputs), ref, atol=1e-5, rtol=0)
    with attnkit.wrap(model, [namespace["Look"](alpha=1.0), "identity"]):  # identity asks for every row
        torch.testing.assert_close(logits(model, inputs), got, atol=1e-5, rtol=0)


def test_readme_method_example_passes_the_common_checks(monkeypatch):
    """What the README says an out-of-tree method gets: the common checks, called directly."""
    from attnkit import testing

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    namespace = {"model": _tiny("llava")[0]}
    exec(compile(_block(), "README.md", "exec"), namespace)
    namespace["handle"].remove()
    look = namespace["Look"]
    testing.check_neutral(look, "llava", {"alpha": 1.0})
    testing.check_batch_equals_rows(look, "llava", {"alpha": 1.0})
    testing.check_restore(look, "qwen2_vl", {"alpha": 1.0})
