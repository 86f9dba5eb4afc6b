"""The calibration files methods read: head sets (VHR, ACT) and sink dimensions (VAR).

Parsed here, in the methods package, so that a method never imports attnkit.inspect (which writes them):

- a head set, ``{"layer": [heads], ...}``, or a JSON object holding it under ``"heads"`` (what ``attnkit heads``
  and ``attnkit calibrate heads`` write);
- sink dimensions, a JSON list of dimension indices, or an object holding it under ``"sink_dims"`` (what
  ``attnkit calibrate sinks`` writes, with ``hidden_size`` when known).

Every error is a one-line MethodArgumentError naming the method, the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MethodArgumentError


def _read(path: Path, where: str, missing: str | None = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MethodArgumentError(missing or f"{where} does not exist") from None
    except IsADirectoryError:
        raise MethodArgumentError(f"{where} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MethodArgumentError(f"{where} cannot be read ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise MethodArgumentError(f"{where}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_head_set(source: Any, method: str = "vhr") -> dict[int, list[int]]:
    """A fixed head set ``{layer: [heads]}`` from a dict or a JSON file (an object ``{"layer": [heads], ...}``,
    or one holding it under ``"heads"``, as ``attnkit heads`` and ``attnkit calibrate heads`` write it);
    one-line MethodArgumentError."""
    where = f"{method}: heads"
    data = source
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = f"{method}: heads file {path}"
        data = _read(path, where, f"{method}: heads={str(source)!r} must be a dict {{layer: [heads]}} or the path of a "
                                  f"head-set JSON file (no file {path})")
        if isinstance(data, dict) and "heads" in data:
            if not isinstance(data["heads"], dict):
                raise MethodArgumentError(f"{where}: key 'heads' must map layers to lists of heads, "
                                          f"got {type(data['heads']).__name__}")
            where = f"{where}, key 'heads'"
            data = data["heads"]
    if not isinstance(data, dict):
        raise MethodArgumentError(f"{where} must map layers to lists of heads, got {type(data).__name__}")
    out: dict[int, list[int]] = {}
    for key, heads in data.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise MethodArgumentError(f"{where}: layer {key!r} is not an integer") from None
        if layer < 0:
            raise MethodArgumentError(f"{where}: layer {layer} is negative")
        if _is_int(heads):
            heads = [heads]
        if not isinstance(heads, (list, tuple)) or not all(_is_int(h) for h in heads):
            raise MethodArgumentError(f"{where}: layer {layer} must list head indices (integers), got {heads!r}")
        if any(h < 0 for h in heads):
            raise MethodArgumentError(f"{where}: layer {layer} lists a negative head index")
        if heads:
            out[layer] = sorted(set(heads))
    return dict(sorted(out.items()))


def load_sink_dims(path: str | Path, method: str = "var") -> tuple[list[int], dict[str, Any]]:
    """(dims, info) from a sink-dimension file: a JSON list of dimension indices, or an object with
    ``"sink_dims"`` (``attnkit calibrate sinks``); ``info`` holds the object's ``hidden_size``, ``model`` and
    ``tau`` when present (empty for a list). One-line MethodArgumentError naming the file and key."""
    text, path = str(path), Path(path)
    where = f"{method}: sink_dims file {path}"
    data = _read(path, where, f"{method}: sink_dims={text!r} must be a list of dimension indices or the path of a "
                              f"sinks JSON file (no file {path})")
    info: dict[str, Any] = {}
    if isinstance(data, dict):
        if "sink_dims" not in data:
            raise MethodArgumentError(f"{where}: no key 'sink_dims' (not a sink-dimension file)")
        info = {k: data[k] for k in ("hidden_size", "model", "tau") if k in data}
        if "hidden_size" in info and not _is_int(info["hidden_size"]):
            raise MethodArgumentError(f"{where}: key 'hidden_size' must be an integer, got {info['hidden_size']!r}")
        where, data = f"{where}, key 'sink_dims'", data["sink_dims"]
    if not isinstance(data, list):
        raise MethodArgumentError(f"{where} must be a list of dimension indices, got {type(data).__name__}")
    if not data:
        raise MethodArgumentError(f"{where} lists no dimension (the calibration found none: pass sink_dims by hand)")
    for d in data:
        if not _is_int(d) or d < 0:
            raise MethodArgumentError(f"{where}: entry {d!r} is not a dimension index (an integer >= 0)")
    return sorted(set(data)), info


__all__ = ["load_head_set", "load_sink_dims"]
