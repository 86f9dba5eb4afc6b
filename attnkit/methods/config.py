"""Method configs: the dataclass base, range checks and keyword-argument parsing."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import MethodArgumentError
from ..options import OptionSpec, option, option_specs


@dataclasses.dataclass
class MethodConfig:
    """Base of method configs. Subclasses are dataclasses and validate in ``__post_init__``.

    Declare each field with ``option(default, help=..., lo=..., hi=..., choices=...)`` (also reachable as
    ``MethodConfig.option``): the CLI builds the method's options, their parsing and help from it.
    """

    option = staticmethod(option)

    @classmethod
    def options(cls) -> list[OptionSpec]:
        """The declared fields: name, type, default, help, range."""
        return option_specs(cls)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MethodArgumentError naming the field and its valid range."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_range(method: str, name: str, value: Any, lo: float | None = None, hi: float | None = None) -> None:
    """One-line MethodArgumentError if ``value`` is outside [lo, hi]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise MethodArgumentError(f"{method}: {name}={value!r} must be a number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise MethodArgumentError(f"{method}: {name}={value!r} is out of range {rng}")


def check_int(method: str, name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """One-line MethodArgumentError unless ``value`` is an int in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise MethodArgumentError(f"{method}: {name}={value!r} must be an integer")
    check_range(method, name, value, lo, hi)


def build_config(cls: type[MethodConfig], method: str, kwargs: dict[str, Any]) -> MethodConfig:
    """Instantiate a config, turning unknown keyword arguments into a one-line MethodArgumentError."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        valid = ", ".join(fields) if fields else "none"
        raise MethodArgumentError(f"{method}: unknown argument {unknown[0]!r} (valid: {valid})")
    return cls(**kwargs)


__all__ = ["MethodConfig", "OptionSpec", "build_config", "check_int", "check_range", "option"]
