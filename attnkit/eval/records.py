"""The run's files: samples.jsonl written one flushed line per sample, torn-tail repair, atomic JSON writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import DataError, OutputError


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file ``path`` (``what`` names it in errors); DataError naming the file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


def read_jsonl(path: Path, *, repair: bool = False, key: str = "id", what: str = "sample record") -> list[dict[str, Any]]:
    """The records of a samples file (or of another JSON-lines file whose lines all hold ``key``, a ``what``).

    The last line is torn when the writer was killed mid-write: it has no trailing newline.
    It is dropped (and, with ``repair``, cut off the file so appends start on a clean line).
    Any other line that is not a JSON object with ``key`` is an error naming the file and line.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if complete < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(complete)
    records = []
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {number}: invalid JSON ({e.args[0].split(':')[0]})") from None
        if not isinstance(record, dict) or key not in record:
            raise DataError(f"{path} line {number}: not a {what} (no '{key}')")
        records.append(record)
    return records


class JsonlWriter:
    """Appends one JSON object per line and flushes each, so a killed run loses at most the line in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def sync(self) -> None:
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON (or JSON lines for a ``.jsonl`` name and a list) atomically: temp file, then rename."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for item in obj:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
            else:
                json.dump(obj, f, indent=2, ensure_ascii=False)
                f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def ensure_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove a file can be written there, before any work starts."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".attnkit-write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"output dir {directory} is not writable: {e.strerror or e}") from None
