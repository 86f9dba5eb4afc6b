"""The common suite: every registered method goes through the checks of attnkit.testing by being
registered: exact restore, its neutral setting == unwrapped, batch == rows alone, cached generate ==
recomputation, drop == mask (methods with a ``mode``), on a few representative families, and a run on
every other family it supports (refused with UnsupportedModelError on the ones it does not). A check
that does not apply to a method (``testing.applicable_checks``: no neutral setting, ``cache_exact =
False``, no ``mode``) is not collected; test_applicability lists the reasons. The last tests register
deliberately broken methods and show that the check functions fail on them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.methods import Method, MethodConfig, check_range, registry
from attnkit.methods.registry import get_method_class

#: Settings of the checks (a method not listed runs with its defaults); ``(name, family)`` entries override
#: per family. The checks themselves require that these settings change the model (else a check would pass
#: vacuously).
SETTINGS: dict[Any, dict[str, Any]] = {
    # tau 20 finds no sink in a hidden-32 model (|RMSNorm(h)| <= sqrt(32)); the tiny models' dimension 5
    # crosses 1.5 on a few tokens per layer
    "var": dict(tau=1.5, sink_dims=[5], start_layer=0, skip_last=0, p=0.2),
    # PAI and ACT act with their defaults too; these are the settings of the cases taken over from
    # test_methods_common.py (every layer from 0, not only 2..3)
    "pai": dict(alpha=1.0, start_layer=0),
    # ICD needs its instruction's ids without a processor: four plain text tokens of every tiny vocabulary
    "icd": dict(disturbance_ids=[150, 151, 152, 153]),
    "act": dict(beta=0.3, threshold=0.05, start_layer=0),
    # budgets below the tiny models' 16 image tokens per image (LLaVA-NeXT: per crop of 3 or 5)
    "visionzip": dict(dominant=3, contextual=2),
    "hiprune": dict(budget=6, alpha=0.5),
    ("hiprune", "llava_next"): dict(budget=20, alpha=0.5),
}
#: Drop mode needs the whole sequence inside a sliding window (README, Visual-token pruning); the checks'
#: Gemma3 batch (39 tokens) exceeds the tiny model's window (32), so methods with a ``mode`` run masked
#: there (check_drop_equals_mask shortens the prompts instead).
MASK_ONLY_FAMILIES = ("gemma3",)


def settings_for(name: str, family: str) -> dict[str, Any] | None:
    out = {**SETTINGS.get(name, {}), **SETTINGS.get((name, family), {})}
    fields = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
    if family in MASK_ONLY_FAMILIES and "mode" in fields:
        out.setdefault("mode", "mask")
    return out or None


#: Checks that fail today, each with its reason: reported as xfail (strict, so a fix turns them red).
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


CHECK_FUNCTIONS = {
    "restore": testing.check_restore,
    "neutral": testing.check_neutral,
    "batch_equals_rows": testing.check_batch_equals_rows,
    "cached_equals_recomputed": testing.check_cached_equals_recomputed,
    "drop_equals_mask": testing.check_drop_equals_mask,
    "runs": testing.check_runs,
    "unsupported": testing.check_unsupported,
}


def cases() -> list[tuple[str, str, str]]:
    """(method, check, family) for every registered method: the applicable checks on its check families,
    ``runs`` on its other supported families, ``unsupported`` on the rest."""
    out = []
    for name in attnkit.list_methods():
        families = testing.check_families(name)
        for check, reason in testing.applicable_checks(name).items():
            if reason is None:
                out += [(name, check, family) for family in families]
        for family in testing.FAMILIES:
            if family not in families:
                supported = family in testing.supported_families(name)
                out.append((name, "runs" if supported else "unsupported", family))
    return out


def _param(case: tuple[str, str, str]):
    reason = KNOWN_FAILURES.get(case)
    marks = [pytest.mark.xfail(reason=reason, strict=True, raises=Exception)] if reason else []
    return pytest.param(*case, id="-".join(case), marks=marks)


@pytest.mark.parametrize("name,check,family", [_param(c) for c in cases()])
def test_common(name, check, family):
    CHECK_FUNCTIONS[check](name, family, settings_for(name, family))


def test_applicability():
    """Which checks each shipped method skips, and why (the methods' declarations decide)."""
    skipped = {
        name: sorted(check for check, reason in testing.applicable_checks(name).items() if reason)
        for name in attnkit.list_methods()
    }
    expected = {
        "identity": ["drop_equals_mask"],
        "var": ["cached_equals_recomputed", "drop_equals_mask"],  # generated tokens are never sinks
        "pai": ["cached_equals_recomputed", "drop_equals_mask"],  # lifts the last row of each forward
        "act": ["cached_equals_recomputed", "drop_equals_mask"],  # prefill column means over every row
        "fastv": ["cached_equals_recomputed"],  # ranks once, at prefill
        "pdrop": ["cached_equals_recomputed"],
        "sparsevlm": ["cached_equals_recomputed"],
        "visionzip": ["drop_equals_mask", "neutral"],  # no-op budget depends on the image
        "hiprune": ["drop_equals_mask", "neutral"],
        "vhr": ["cached_equals_recomputed", "drop_equals_mask"],  # selects heads once, at prefill
        "vcd": ["drop_equals_mask"],
        "icd": ["drop_equals_mask"],
    }
    assert {k: v for k, v in skipped.items() if k in expected} == expected
    for name in attnkit.list_methods():
        for check, reason in testing.applicable_checks(name).items():
            assert reason is None or reason.startswith(name), (name, check, reason)
    every = {(name, check) for name, check, _ in cases()}
    assert all((name, "restore") in every for name in attnkit.list_methods())
    # every family is covered for every method: checked, run, or refused
    for name in attnkit.list_methods():
        assert {f for n, _, f in cases() if n == name} == set(testing.FAMILIES)


# -- the suite can fail: broken methods, registered ------------------------------------------------------
@dataclasses.dataclass
class StrengthConfig(MethodConfig):
    beta: float = 0.5

    def validate(self) -> None:
        check_range("broken", "beta", self.beta, 0.0, 1.0)


class NeutralLeaks(Method):
    """Claims beta=1 changes nothing, but always damps the first key column a little."""

    name, Config, neutral = "broken_neutral", StrengthConfig, {"beta": 1.0}

    def probs(self, view, probs):
        probs[..., 0] *= min(self.config.beta, 0.9)
        return probs / probs.sum(-1, keepdim=True)


class RowsLeak(Method):
    """Mixes the batch's rows: every row's probabilities take a share of the batch mean."""

    name, Config, neutral = "broken_rows", StrengthConfig, {"beta": 0.0}

    def probs(self, view, probs):
        probs = probs + self.config.beta * probs.mean(0, keepdim=True)
        return probs / probs.sum(-1, keepdim=True)


class DecodeOnly(Method):
    """Rewrites the logits at decode steps only, so cached decoding differs from a recomputation."""

    name, Config = "broken_cache", StrengthConfig

    def logits(self, ctx, logits):
        return logits if ctx.is_prefill else logits * (1 + self.config.beta)


class DoesNothing(Method):
    """Changes nothing with any setting and declares no neutral setting: the checks refuse to pass vacuously."""

    name, Config = "broken_idle", StrengthConfig


@pytest.fixture
def clean_registry(monkeypatch):
    """The test's registrations go into a copy of the registry, dropped after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield
    monkeypatch.undo()
    assert not [name for name in attnkit.list_methods() if name.startswith("broken_")]


def test_registering_puts_a_method_through_the_suite(clean_registry):
    registry.register(RowsLeak)
    got = {(check, family) for name, check, family in cases() if name == "broken_rows"}
    checks = ("restore", "neutral", "batch_equals_rows", "cached_equals_recomputed")  # no mode field
    runs = {("runs", f) for f in testing.FAMILIES if f not in testing.CHECK_FAMILIES}
    assert got == {(c, f) for c in checks for f in testing.CHECK_FAMILIES} | runs


@pytest.mark.parametrize(
    "cls,check,pattern",
    [
        (NeutralLeaks, testing.check_neutral, r"logits differ from the unwrapped model's by"),
        (RowsLeak, testing.check_batch_equals_rows, r"row \d's last-token logits differ"),
        (DecodeOnly, testing.check_cached_equals_recomputed, r"step 1: cached logits differ from the recomputation"),
        (DoesNothing, testing.check_batch_equals_rows, r"would pass without testing anything"),
    ],
    ids=["neutral", "batch_equals_rows", "cached_equals_recomputed", "vacuous"],
)
def test_the_checks_catch_a_broken_method(clean_registry, cls, check, pattern):
    registry.register(cls)
    with pytest.raises(AssertionError, match=pattern):
        check(cls.name, "llava")


def test_check_restore_catches_a_leftover_hook(clean_registry):
    """A method whose attach() adds a hook that remove() leaves: check_restore fails (and drops the shared
    tiny model it left hooked, so later checks get a fresh one)."""
    model, _ = testing.check_model("llava")

    class LeavesHook(Method):
        name, Config = "broken_restore", StrengthConfig

        def attach(self, handle):
            model.lm_head.register_forward_hook(lambda module, args, out: None)

    registry.register(LeavesHook)
    with pytest.raises(AssertionError, match=r"module lm_head: attributes or hooks replaced: \['_forward_hooks'\]"):
        testing.check_restore("broken_restore", "llava")
    assert testing.check_model("llava")[0] is not model
