"""Errors a user can cause. Each carries a one-line message; the CLI prints it and exits 2."""

from __future__ import annotations


class AttnkitError(Exception):
    """Base class of every user-facing attnkit error (one-line message, no traceback in the CLI)."""


class UnsupportedModelError(AttnkitError, TypeError):
    """The model's class or family has no adapter."""


class UnknownMethodError(AttnkitError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MethodArgumentError(AttnkitError, ValueError):
    """An unknown or out-of-range method argument."""


class AlreadyWrappedError(AttnkitError, RuntimeError):
    """wrap() called on a model that is already wrapped."""


class InputError(AttnkitError, ValueError):
    """Model inputs the toolkit cannot interpret (e.g. no input_ids at prefill)."""


class DataError(AttnkitError, ValueError):
    """Bad or missing evaluation data: a file, a JSON line, an image, an annotation (message names it)."""


class OutputError(AttnkitError, OSError):
    """The output directory cannot be created or written."""


class TransformersCompatError(AttnkitError, RuntimeError):
    """The installed transformers passes a forward differently from what attnkit was built on (a renamed
    keyword, a cache it cannot read, a moved attribute): attnkit stops rather than compute on silently."""


class UnsupportedCacheError(AttnkitError, ValueError):
    """A KV cache (or a way of calling the model) that attnkit's methods do not support, e.g. a static cache."""


class BypassedError(AttnkitError, RuntimeError):
    """The wrapped model no longer routes its attention through attnkit (its attention implementation
    was changed after wrap())."""


class ConfigError(AttnkitError, ValueError):
    """A config file (``attnkit reproduce``) that cannot be read or does not validate; the message names the
    file and the key path (``configs/x.yaml: rows[2].methods[0].alpha: ...``)."""
