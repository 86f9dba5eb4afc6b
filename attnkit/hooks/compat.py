"""What attnkit reads of transformers by a name it may change, in one place, each read guarded.

transformers is free to rename a forward keyword (5.24 renamed ``past_key_values`` to ``cache``),
to stop passing an all-ones attention mask (5.24 does), or to move a private attribute. attnkit
therefore reads a forward's state by type and by shape where it can, cross-checks what it reads
against what the attention layers actually receive, and raises a one-line error naming the
installed transformers where the two disagree, instead of computing on silently:

- the KV cache is found by type (a ``transformers.cache_utils.Cache`` among the arguments), never by
  keyword; its length comes from ``get_seq_length()`` (an int; a tensor means a static cache);
- the past length is cross-checked against the 2-D padding mask when one is passed, and every
  attention call checks that its key length is the past length plus the query length
  (``check_keys``), so a decode step taken for a prefill cannot go unnoticed;
- ``check_model`` runs at wrap(): the private attributes and methods attnkit relies on exist.

README "What attnkit relies on in transformers" lists every such read and how it is guarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers

from ..errors import TransformersCompatError, UnsupportedCacheError

VERSION: str = transformers.__version__

try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as err:  # pragma: no cover - depends on the installed release
    raise TransformersCompatError(
        f"attnkit cannot use transformers {VERSION}: {err} (see README, 'What attnkit relies on in transformers')"
    ) from None

__all__ = [
    "AttentionInterface",
    "AttentionMaskInterface",
    "Cache",
    "ForwardInputs",
    "PreTrainedModel",
    "VERSION",
    "cache_keyword",
    "check_keys",
    "check_model",
    "find_cache",
    "output_cache",
    "read_forward",
    "sdpa_attention_forward",
    "sdpa_mask",
    "wants_attentions",
]

STATIC_HINT = "use the default dynamic cache (no cache_implementation='static', no torch.compile of the forward)"


def where() -> str:
    return f"transformers {VERSION}"


def find_cache(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's arguments, found by type (its keyword has changed between releases)."""
    for value in kwargs.values():
        if isinstance(value, Cache):
            return value
    for value in args:
        if isinstance(value, Cache):
            return value
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a model returned (``past_key_values`` up to 5.23, ``cache`` from 5.24), found by type,
    also inside nested outputs (InstructBLIP's ``language_model_outputs``); None if there is none."""
    values = list(output.values()) if hasattr(output, "values") else list(output)
    for value in values:
        if isinstance(value, Cache):
            return value
    for value in values:
        if hasattr(value, "values") and not isinstance(value, torch.Tensor):
            found = output_cache(value)
            if found is not None:
                return found
    return None


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword ``module.forward`` takes its KV cache by: ``cache`` (5.24 on) or ``past_key_values``
    (for callers that feed a cache by hand, e.g. a decode loop in a benchmark)."""
    import inspect

    params = inspect.signature(type(module).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TransformersCompatError(f"{type(module).__name__}.forward takes no KV cache argument attnkit knows ({where()})")


def cache_length(cache: Any) -> int:
    """Tokens already in ``cache`` (its first layer); a static cache, whose length is a tensor, is refused."""
    try:
        n = cache.get_seq_length()
    except Exception as err:  # noqa: BLE001 - any failure here is a changed cache API
        raise TransformersCompatError(
            f"cannot read the length of a {type(cache).__name__} ({where()}): {type(err).__name__}: {err}"
        ) from None
    if isinstance(n, torch.Tensor):
        raise UnsupportedCacheError(f"attnkit's methods cannot run on a {type(cache).__name__}; {STATIC_HINT}")
    return int(n)


@dataclass
class ForwardInputs:
    """What the manager needs to know about one forward of the model (a prefill or a decode step)."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    #: The 2-D padding mask (B, past + q), or None: every token is real (transformers >= 5.24 drops an
    #: all-ones mask) or the caller passed a 4-D mask of its own.
    attention_mask: torch.Tensor | None
    cache: Any
    batch: int
    q_len: int
    #: Tokens in the cache before this forward, as the cache counts them (see ``read_forward``).
    cache_len: int


def read_forward(args: tuple, kwargs: dict[str, Any]) -> ForwardInputs:
    """Read a top-level forward's inputs by type and shape, and check that they add up.

    ``input_ids`` is taken by keyword or as the first positional argument, ``inputs_embeds`` and
    ``attention_mask`` by keyword (public names of every VLM's forward); the cache by type."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
        raise TransformersCompatError(
            f"attnkit found neither input_ids nor inputs_embeds among the model's forward arguments ({where()}; "
            f"got {sorted(kwargs)})"
        )
    mask = kwargs.get("attention_mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise UnsupportedCacheError(
            f"the model received a precomputed attention mask ({type(mask).__name__}, as transformers builds it for "
            f"a static cache or a compiled forward); attnkit's methods need a 2-D padding mask: {STATIC_HINT}"
        )
    if mask is not None and mask.dim() != 2:
        mask = None  # a caller's own 4-D mask: the padding is not known, every token counts as real
    cache = find_cache(args, kwargs)
    batch, q_len = ref.shape[0], ref.shape[1]
    cache_len = cache_length(cache) if cache is not None else 0
    if mask is not None and mask.shape[0] != batch:
        raise TransformersCompatError(
            f"the attention mask has {mask.shape[0]} rows for a batch of {batch} ({where()})"
        )
    if cache is None and mask is not None and mask.shape[1] != q_len:
        raise TransformersCompatError(
            f"the attention mask covers {mask.shape[1]} tokens for {q_len} new ones but attnkit finds no KV cache "
            f"among the forward's arguments ({where()}): the cache may be passed in a way attnkit does not know"
        )
    return ForwardInputs(ids, embeds, mask, cache, batch, q_len, cache_len)


def check_past(inputs: ForwardInputs, past_len: int) -> None:
    """The past length attnkit settled on must agree with the 2-D mask, when one is passed."""
    mask = inputs.attention_mask
    if mask is not None and mask.shape[1] != past_len + inputs.q_len:
        raise TransformersCompatError(
            f"the attention mask covers {mask.shape[1]} tokens but the KV cache holds {past_len} and "
            f"{inputs.q_len} are new ({where()}); attnkit cannot tell a prefill from a decode step"
        )


def check_keys(ctx: Any, layer: int, key_len: int, windowed: bool) -> None:
    """An attention call must see the keys attnkit expects: the past length plus the new tokens (fewer on
    a sliding-window layer, whose cache keeps only the window). Anything else means attnkit misread the
    forward (a decode step taken for a prefill, a static cache) and would rewrite the wrong columns."""
    expected = ctx.kv_len
    if key_len == expected or (windowed and key_len < expected):
        return
    if key_len > expected:
        what = (
            "the cache holds more slots than tokens (a static or pre-allocated cache), or transformers passed "
            "the cache in a way attnkit does not know"
        )
    else:
        what = "fewer keys than the past and new tokens"
    raise TransformersCompatError(
        f"layer {layer} attends to {key_len} keys, attnkit expected {ctx.past_len} cached + {ctx.q_len} new = "
        f"{expected}: {what} ({where()}; {STATIC_HINT})"
    )


def wants_attentions(kwargs: dict[str, Any], configs: list[Any]) -> bool:
    """Whether this forward returns attention weights: ``output_attentions`` given to it, else set in a
    config (transformers' own rule; generous across the top-level and language configs)."""
    flag = kwargs.get("output_attentions")
    if flag is not None:
        return bool(flag)
    return any(bool(getattr(cfg, "output_attentions", False)) for cfg in configs)


IMPL_ATTR = "_attn_implementation_internal"


def check_model(model: torch.nn.Module, configs: list[Any]) -> None:
    """At wrap(): the model has what attnkit relies on (set_attn_implementation, each config's stored
    attention implementation); a one-line error otherwise."""
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise TransformersCompatError(
            f"{type(model).__name__} has no set_attn_implementation() ({where()}); attnkit cannot route its attention"
        )
    for cfg in configs:
        if IMPL_ATTR not in vars(cfg):
            raise TransformersCompatError(
                f"{type(cfg).__name__} has no {IMPL_ATTR} ({where()}); attnkit cannot save and restore the "
                "attention implementation"
            )


def get_impl(cfg: Any) -> Any:
    return vars(cfg)[IMPL_ATTR]


def set_impl(cfg: Any, value: Any) -> None:
    setattr(cfg, IMPL_ATTR, value)
