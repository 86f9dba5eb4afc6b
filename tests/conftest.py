"""Shared fixtures: one tiny random model per family, built once per session."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import attnkit  # noqa: E402
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


extend_inputs = testing.extend_inputs  # inputs with new tokens appended, as generate() extends them


PADDED_PROMPTS = ["Is there a dog in the image?", "Please describe this image in detail and answer yes or no."]


def check_batch_equals_rows(model, family: str, method, n_new: int = 4) -> None:
    """Under ``method``, a left-padded batch of two prompts (PADDED_PROMPTS, one image each) gives
    each row the last-token logits (atol 1e-4) and greedy tokens it gets alone."""
    images = testing.sample_images(2)
    batch = testing.tiny_inputs(family, prompts=PADDED_PROMPTS, images=images)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad(), attnkit.wrap(model, method):
        last = model(**batch).logits[:, -1]
        gen = model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        for row in range(2):
            alone = testing.tiny_inputs(family, prompts=[PADDED_PROMPTS[row]], images=[images[row]])
            torch.testing.assert_close(model(**alone).logits[0, -1], last[row], atol=1e-4, rtol=0)
            one = model.generate(**alone, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            width = alone["input_ids"].shape[1]
            assert torch.equal(one[0, width:], gen[row, batch["input_ids"].shape[1] :]), f"row {row}"


def forward_state(methods=(), **fields):
    """A ForwardState for calling method roles by hand (unit tests), with ``methods`` bound to its state."""
    from attnkit.hooks.context import ForwardState

    state = ForwardState(**fields)
    for m in methods:
        m._states = state.states
    return state


def apply_roles(method, state, layer: int, rows, visible, probs: torch.Tensor) -> torch.Tensor:
    """What the reference kernel does with ``method``'s probability roles on one block that holds every
    requested row: column statistics from ``probs``, then the rewrite (a column form in full-row form)."""
    from attnkit.hooks.context import View
    from attnkit.hooks.kernel import Roles, Stats, apply_probs, layer_columns

    state.begin()  # the test may have changed the state's fields
    view = View(state, layer).at(rows, visible)
    roles = Roles([method])
    if roles.stats:
        stats = Stats(probs.shape[0], probs.shape[1], probs.shape[-1], probs.device)
        stats.add(probs, visible, None)
        stats.give(roles, view)
    return apply_probs(roles, view, probs, None, layer_columns(roles, view))


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models run far faster on one thread: two threads spin against each other on a loaded
    2-core machine (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
