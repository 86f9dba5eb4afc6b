"""attnkit: training-free attention interventions for vision-language models.

    handle = attnkit.wrap(model, "identity")   # or a method object / config / list of them
    ...                                        # use the model as before
    handle.remove()                            # exact original back
"""

from __future__ import annotations

from typing import Any

from . import errors, methods
from .loading import load_model
from .methods.registry import list_methods, make_method
from .models import get_adapter, list_models

__version__ = "0.1.0"


def wrap(model: Any, methods: Any = (), *, options: Any = None, **kwargs: Any):
    """Wrap a loaded Hugging Face VLM with one or more attention methods; returns a Handle.

    ``methods``: a registered name (``kwargs`` go to its config), a Method or config object, or a
    list of them, applied in list order. An empty list wraps with nothing active. The Handle
    is a context manager; ``handle.remove()`` restores the exact original model.
    Wrapping a model that is already wrapped raises AlreadyWrappedError. ``options``: a
    ``attnkit.hooks.KernelOptions`` tuning the kernel (block sizes, fast-path switches).
    """
    from .hooks.manager import Handle

    if isinstance(methods, (list, tuple)):
        if kwargs:
            raise errors.MethodArgumentError("keyword arguments only go with a single method name")
        objs = [make_method(m) for m in methods]
    else:
        objs = [make_method(methods, **kwargs)]
    adapter = get_adapter(model)
    return Handle(model, objs, adapter, options=options)


__all__ = [
    "__version__",
    "errors",
    "get_adapter",
    "list_methods",
    "list_models",
    "load_model",
    "make_method",
    "methods",
    "wrap",
]
