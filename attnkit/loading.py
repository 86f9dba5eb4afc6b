"""Load a model and its processor from a model spec: a hub id, a local path, ``testbed`` or ``tiny:FAMILY``.

``testbed`` is the trained toy VLM that ships with attnkit (``attnkit.testbed``; a local directory
of that name is reached as ``./testbed``). ``tiny:FAMILY`` builds the offline tiny random model and processor of attnkit.testing, so the
whole toolkit runs with no download. Everything else goes through transformers'
AutoModelForImageTextToText / AutoProcessor (``trust_remote_code`` only when asked for); the
processor's tokenizer is set to pad on the left, as batched generation needs.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import AttnkitError

_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(AttnkitError):
    """A model spec that cannot be loaded (unknown tiny family, missing path, bad dtype)."""


def _dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r} (valid: {', '.join(_DTYPES)})")
    return _DTYPES[name]


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, processor) for ``spec``."""
    if spec == "testbed":
        from . import testbed

        if isinstance(dtype, str):
            dtype = _dtype(dtype)
        return testbed.load(None if dtype == "auto" else dtype)
    if spec.startswith("tiny:"):
        from . import testing

        family = spec.split(":", 1)[1]
        if family not in testing.FAMILIES:
            raise ModelLoadError(f"unknown tiny family {family!r} (valid: {', '.join(testing.FAMILIES)})")
        model, _ = testing.tiny_model(family, seed=seed)
        return model, testing.tiny_processor(family)

    if isinstance(dtype, str):
        dtype = _dtype(dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs)
        processor = AutoProcessor.from_pretrained(spec, **({"trust_remote_code": True} if trust_remote_code else {}))
    except OSError as e:  # missing path / not on the hub cache / offline
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {spec!r}: {first}") from e
    tokenizer = getattr(processor, "tokenizer", processor)
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"  # batched generation needs left padding
    return model.eval(), processor
