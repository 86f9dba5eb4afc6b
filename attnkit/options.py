"""Declared options: dataclass fields carrying help, range and choices, parsed from text by their type.

Method configs and task options declare their fields with ``option(default, help=..., lo=..., hi=...,
choices=...)``; the CLI builds its flags and parses their values from these declarations. Text
syntax (also accepted: JSON): bool ``true/false/yes/no/1/0``; ``none`` for an optional field; a list
or tuple of ints ``2533,1415`` (``8-11`` is a range); a dict ``3:0,1;4:2`` (``key:value`` pairs
separated by ``;``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any, Union

_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str = "",
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[Any, ...] | list[Any] | None = None,
    aliases: dict[str, Any] | None = None,
    default_factory: Any = _NO_DEFAULT,
) -> Any:
    """A dataclass field with CLI metadata: ``help``; inclusive range ``[lo, hi]`` (for a list or dict:
    of each entry); ``choices``; ``aliases``: words the CLI reads as a value (e.g. ``{"all": None}``)."""
    meta: dict[str, Any] = {"help": help}
    if lo is not None:
        meta["lo"] = lo
    if hi is not None:
        meta["hi"] = hi
    if choices is not None:
        meta["choices"] = tuple(choices)
    if aliases:
        meta["aliases"] = dict(aliases)
    if default_factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One declared field: name, resolved type, default and its metadata."""

    name: str
    type: Any
    default: Any
    help: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[Any, ...] | None = None
    aliases: dict[str, Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_flag(self) -> bool:
        """A bool field defaulting to False: a CLI switch taking no value."""
        return self.type is bool and self.default is False

    def describe(self) -> str:
        """What the field takes, e.g. ``a list of int, >= 0, or none``."""
        text = describe_type(self.type)
        if self.choices:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        rng = range_text(self.lo, self.hi)
        return f"{text}, {rng}" if rng else text

    def help_line(self) -> str:
        """The help text with what the field takes and its default (plain text and switches: less said)."""
        parts = []
        if not self.is_flag:
            desc = self.describe()
            if desc not in ("str", "str or none"):
                parts.append(desc)
            if self.default is not _NO_DEFAULT and self.default is not None:
                parts.append(f"default {_show(self.default)}")
        extra = f" ({'; '.join(parts)})" if parts else ""
        return f"{self.help or self.name}{extra}"

    def parse(self, text: str) -> Any:
        """The field's value from CLI text; ValueError with a short reason on bad input."""
        if self.aliases and text.strip().lower() in self.aliases:
            return self.aliases[text.strip().lower()]
        return parse_text(self.type, text)

    def check(self, value: Any) -> str | None:
        """None if ``value`` satisfies the declared range and choices, else why not (one line)."""
        if self.choices and value not in self.choices:
            return f"{self.name}={value!r} must be one of {', '.join(str(c) for c in self.choices)}"
        if self.lo is None and self.hi is None:
            return None
        for v in _leaves(value):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
                    lo = "-inf" if self.lo is None else self.lo
                    hi = "inf" if self.hi is None else self.hi
                    return f"{self.name}={_show(value)} is out of range [{lo}, {hi}]"
        return None


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in (*_leaves(k), *_leaves(v))]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _leaves(v)]
    return [value]


def range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def option_specs(cls: type) -> list[OptionSpec]:
    """The declared fields of dataclass ``cls``, types resolved (unresolvable annotations become Any)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something not importable here: parse values by guessing
        hints = {}
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        tp = hints.get(f.name, f.type if not isinstance(f.type, str) else Any)
        m = f.metadata or {}
        out.append(OptionSpec(f.name, tp, default, m.get("help", ""), m.get("lo"), m.get("hi"),
                              m.get("choices"), m.get("aliases")))
    return out


# ------------------------------------------------------------------------------------- types


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def describe_type(tp: Any) -> str:
    """A short human name of a type: ``int``, ``list of int``, ``dict int -> list of int``, ``... or none``."""
    if tp is Any:
        return "a value"
    if _is_union(tp):
        parts = [describe_type(a) for a in _args(tp) if a is not type(None)]
        none = type(None) in _args(tp)
        return " or ".join(parts) + (" or none" if none else "")
    origin = typing.get_origin(tp)
    if origin in (list, tuple) or _is_sequence(origin):
        args = [a for a in _args(tp) if a is not Ellipsis]
        if origin is tuple and args and len(_args(tp)) == len(args) and len(set(args)) == 1 and len(args) > 1:
            return f"{len(args)} x {describe_type(args[0])}"
        elem = describe_type(args[0]) if args else "value"
        return f"list of {elem}"
    if origin is dict:
        k, v = _args(tp) or (Any, Any)
        return f"dict {describe_type(k)} -> {describe_type(v)}"
    if tp is bool:
        return "true/false"
    if tp is float:
        return "number"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


def guess_value(text: str) -> Any:
    """Untyped text -> int, float, bool, None or the string itself (for fields of unknown type)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in _NONE:
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_text(tp: Any, text: str) -> Any:
    """CLI text -> a value of type ``tp`` (see the module docstring); ValueError on bad input."""
    stripped = text.strip()
    if tp is Any:
        return guess_value(text)
    if _is_union(tp):
        arms = [a for a in _args(tp) if a is not type(None)]
        if type(None) in _args(tp) and stripped.lower() in _NONE:
            return None
        for arm in arms:
            try:
                return parse_text(arm, text)
            except ValueError:
                continue
        raise ValueError(text)
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        if stripped.startswith("{"):
            return coerce(tp, _json(stripped))
        key_tp, val_tp = _args(tp) or (Any, Any)
        out = {}
        for entry in filter(None, (e.strip() for e in stripped.split(";"))):
            if ":" not in entry:
                raise ValueError(entry)
            k, v = entry.split(":", 1)
            out[parse_text(key_tp, k)] = parse_text(val_tp, v)
        return out
    if origin in (list, tuple) or tp in (list, tuple) or _is_sequence(origin):
        if stripped.startswith("["):
            return coerce(tp, _json(stripped))
        elem = _elem_type(tp)
        items: list[Any] = []
        for part in filter(None, (p.strip() for p in stripped.split(","))):
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m and elem is int:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError(part)
                items.extend(range(lo, hi + 1))
            else:
                items.append(parse_text(elem, part))
        return _as_sequence(tp, items)
    if tp is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ValueError(text)
    if tp is int:
        return int(stripped)
    if tp is float:  # an integer literal stays an int (a valid float field value; messages show it as typed)
        try:
            return int(stripped)
        except ValueError:
            return float(stripped)
    if tp is str:
        return text
    if isinstance(tp, type):
        return tp(text)
    return guess_value(text)


def _is_sequence(origin: Any) -> bool:
    import collections.abc

    return origin in (collections.abc.Sequence, typing.Sequence)


def _elem_type(tp: Any) -> Any:
    args = [a for a in _args(tp) if a is not Ellipsis]
    return args[0] if args else Any


def _as_sequence(tp: Any, items: list[Any]) -> Any:
    origin = typing.get_origin(tp) or tp
    if origin is tuple:
        args = _args(tp)
        if args and Ellipsis not in args and len(args) != len(items):
            raise ValueError(f"{len(items)} items, expected {len(args)}")
        return tuple(items)
    return list(items)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(text) from None


def coerce(tp: Any, value: Any) -> Any:
    """A JSON-decoded value checked and converted to type ``tp`` (dict keys may be strings)."""
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in _args(tp):
            return None
        for arm in (a for a in _args(tp) if a is not type(None)):
            try:
                return coerce(arm, value)
            except ValueError:
                continue
        raise ValueError(value)
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(value)
        key_tp, val_tp = _args(tp) or (Any, Any)
        return {coerce(key_tp, k): coerce(val_tp, v) for k, v in value.items()}
    if origin in (list, tuple) or tp in (list, tuple) or _is_sequence(origin):
        if not isinstance(value, list):
            raise ValueError(value)
        elem = _elem_type(tp)
        return _as_sequence(tp, [coerce(elem, v) for v in value])
    if isinstance(value, str) and tp is not str:
        return parse_text(tp, value)  # JSON object keys
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    return value


def example(tp: Any) -> str:
    """An example of the text syntax for ``tp``, for error messages."""
    if _is_union(tp):
        arms = [a for a in _args(tp) if a is not type(None)]
        return example(arms[0]) if arms else "none"
    origin = typing.get_origin(tp)
    if origin is dict:
        return "3:0,1;4:2"
    if origin in (list, tuple) or _is_sequence(origin):
        elem = _elem_type(tp)
        return {int: "2,4,8-10", float: "0.5,1.0"}.get(elem, "a,b")
    return {bool: "true", int: "3", float: "0.5", str: "text"}.get(tp, "")


def bad_value(owner: str, spec: OptionSpec, text: str) -> str:
    """The one-line message for text that does not parse as the field's type."""
    ex = example(spec.type)
    hint = f" (e.g. {ex} or JSON)" if any(c in ex for c in ",:") else ""
    return f"{owner}: {spec.name}={text!r}: expected {describe_type(spec.type)}{hint}"
