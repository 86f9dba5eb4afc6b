"""A run directory as one self-contained HTML file: ``attnkit report RUN_DIR``.

Reads what ``attnkit eval`` writes (run.json, samples.jsonl, results.json, CHAIR's chair_per_caption.jsonl)
in RUN_DIR, or, for a directory of ``attnkit reproduce`` (table.json / table.md) or any directory holding
runs below it, in every run directory found under it. The page holds the metrics and, per sample, a thumbnail
of its image, the question, the answer, the label or the hallucinated objects (CHAIR) and, for grounding
runs, an overlay of what the record keeps (the object's box, the attention's argmax cell: grounding records do
not keep the attention map itself). Images are embedded as base64 data URIs (one per distinct image, in the
page's style sheet), CSS and the wrong-answer filter's JS are inline: the file opens from disk, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..eval.records import read_json, read_jsonl
from .heads import _atomic_write

__all__ = ["RunData", "find_runs", "load_run", "render_report", "write_report"]

RUN_FILES = ("samples.jsonl", "results.json", "run.json")
TABLE_FILES = ("table.json", "table.md")
#: Longest side of an embedded thumbnail, in pixels.
THUMB = 224
#: Smaller images are shown at least this large (longest side, pixels).
MIN_SHOWN = 128


@dataclass
class RunData:
    """One eval run directory: its files parsed (``results``/``run`` None where absent)."""

    path: Path
    records: list[dict[str, Any]]
    results: dict[str, Any] | None
    run: dict[str, Any] | None
    per_caption: dict[str, dict[str, Any]] = field(default_factory=dict)  # CHAIR: image id -> entry

    @property
    def task(self) -> str:
        for source in (self.results, self.run):
            task = (source or {}).get("task")
            if isinstance(task, dict):
                task = task.get("task")
            if task:
                return str(task)
        return "?"


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def find_runs(root: str | os.PathLike) -> list[Path]:
    """``root`` if it is a run directory, else every run directory below it (sorted); DataError if none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"run dir not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (expected an attnkit eval or reproduce output dir)")
    if _is_run(root):
        return [root]
    found = sorted({p.parent for name in RUN_FILES for p in root.rglob(name) if p.is_file()})
    if not found:
        raise DataError(f"{root}: not a run directory (no {', '.join(RUN_FILES)}) and no run directory below it")
    return found


def load_run(path: str | os.PathLike) -> RunData:
    """The run directory's files; DataError naming the file (and line) of anything malformed."""
    path = Path(path)
    results = read_json(path / "results.json", "results file") if (path / "results.json").is_file() else None
    run = read_json(path / "run.json", "run file") if (path / "run.json").is_file() else None
    for name, obj in (("results.json", results), ("run.json", run)):
        if obj is not None and not isinstance(obj, dict):
            raise DataError(f"{path / name}: expected a JSON object, got {type(obj).__name__}")
    records = read_jsonl(path / "samples.jsonl")
    per_caption: dict[str, dict[str, Any]] = {}
    chair = path / "chair_per_caption.jsonl"
    if chair.is_file():
        for entry in read_jsonl(chair, key="image_id", what="CHAIR entry"):
            per_caption[str(entry["image_id"])] = entry
    return RunData(path, records, results, run, per_caption)


# ------------------------------------------------------------------------------------------- images


class _Images:
    """Thumbnails as data URIs, one CSS class per distinct file (so a file asked about 6 times is in the page once)."""

    def __init__(self) -> None:
        self.classes: dict[str, tuple[str, int, int, int, int]] = {}  # path -> (class, w, h, orig w, orig h)
        self.css: list[str] = []

    def get(self, path: Path) -> tuple[str, int, int, int, int] | None:
        key = str(path)
        if key in self.classes:
            return self.classes[key]
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                size = im.size
                im.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=82)
        except (OSError, ValueError, SyntaxError):
            return None
        name = f"i{len(self.classes)}"
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        self.css.append(f'.{name}{{background-image:url("data:image/jpeg;base64,{data}")}}')
        self.classes[key] = (name, im.size[0], im.size[1], size[0], size[1])
        return self.classes[key]


def _image_path(run: RunData, record: dict[str, Any]) -> Path | None:
    """Where the record's image is: its ``image`` (runs since attnkit records it), else POPE's file name in the
    task's image dir; relative paths as given, else under the run dir. None: not known."""
    candidates: list[Path] = []
    if isinstance(record.get("image"), str):
        candidates.append(Path(record["image"]))
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    task = (run.run or {}).get("task") or ((run.results or {}).get("config") or {}).get("task") or {}
    if isinstance(meta.get("image"), str) and isinstance(task, dict) and task.get("image_dir"):
        candidates.append(Path(task["image_dir"]) / meta["image"])
    for c in candidates:
        for p in (c, run.path / c) if not c.is_absolute() else (c,):
            if p.is_file():
                return p
    return candidates[0] if candidates else None


# ------------------------------------------------------------------------------------------- HTML pieces


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _metrics_html(metrics: Any) -> str:
    """Scalars as a two-column table; a dict of dicts of scalars (POPE's splits) as a matrix; the rest as JSON."""
    if not isinstance(metrics, dict):
        return f"<pre>{_e(json.dumps(metrics, indent=1))}</pre>"
    out = []
    flat = [(k, v) for k, v in metrics.items() if _scalar(v)]
    if flat:
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_num(v)}</td></tr>" for k, v in flat)
        out.append(f'<table class="metrics">{rows}</table>')
    for key, value in metrics.items():
        if _scalar(value):
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) and all(map(_scalar, v.values()))
                                                    for v in value.values()):
            cols = list(dict.fromkeys(c for v in value.values() for c in v))
            head = "".join(f"<th>{_e(c)}</th>" for c in cols)
            body = "".join(f"<tr><th>{_e(r)}</th>" + "".join(f"<td>{_num(v.get(c, ''))}</td>" for c in cols)
                           + "</tr>" for r, v in value.items())
            out.append(f'<table class="metrics"><caption>{_e(key)}</caption><tr><th></th>{head}</tr>{body}</table>')
        elif isinstance(value, dict) and all(map(_scalar, value.values())):
            rows = "".join(f"<tr><th>{_e(k)}</th><td>{_num(v)}</td></tr>" for k, v in value.items())
            out.append(f'<table class="metrics"><caption>{_e(key)}</caption>{rows}</table>')
        else:
            out.append(f"<details><summary>{_e(key)}</summary><pre>{_e(json.dumps(value, indent=1))}</pre></details>")
    return "".join(out)


def _rows_table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_num(r.get(c, '')) if _scalar(r.get(c, '')) else _e(json.dumps(r[c]))}</td>"
                                    for c in cols) + "</tr>" for r in rows)
    return f'<table class="metrics"><tr>{head}</tr>{body}</table>'


def _markdown_html(text: str) -> str:
    """A markdown table (``| a | b |`` lines) as an HTML table; other lines as paragraphs."""
    out, table = [], []

    def flush() -> None:
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                 if not set(line.replace("|", "").strip()) <= set("-: ")]
        if cells:
            head = "".join(f"<th>{_e(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
            out.append(f'<table class="metrics"><tr>{head}</tr>{body}</table>')
        table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{_e(line.strip().lstrip('#').strip())}</p>")
    flush()
    return "".join(out)


def _table_html(root: Path) -> str:
    """The reproduce table: table.json's rows (a list of objects, or under "rows"), else table.md."""
    path = root / "table.json"
    if path.is_file():
        data = read_json(path, "table file")
        rows = data.get("rows") if isinstance(data, dict) else data
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            return _rows_table(rows)
    if (root / "table.md").is_file():
        return _markdown_html((root / "table.md").read_text(encoding="utf-8"))
    if path.is_file():
        return f"<pre>{_e(json.dumps(read_json(path, 'table file'), indent=1))}</pre>"
    return ""


def _verdict(run: RunData, record: dict[str, Any]) -> tuple[str | None, list[str]]:
    """("wrong" / "ok" / None when the record has nothing to judge, lines of HTML about it)."""
    lines: list[str] = []
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    entry = run.per_caption.get(str(meta.get("image_id", record.get("id")))) if run.per_caption else None
    if entry is not None:  # CHAIR
        hall = entry.get("hallucinated") or []
        words = ", ".join(f"{h.get('word')} ({h.get('object')})" if isinstance(h, dict) else str(h) for h in hall)
        mentioned = ", ".join(sorted({m.get("object", "") for m in entry.get("mentioned") or [] if isinstance(m, dict)}))
        lines.append(f'<div class="{"bad" if hall else "good"}">hallucinated: {_e(words) if hall else "none"}</div>')
        lines.append(f"<div>mentioned: {_e(mentioned or 'none')}</div>")
        lines.append(f"<div>ground truth: {_e(', '.join(map(str, entry.get('ground_truth') or [])) or 'none')}</div>")
        return ("wrong" if hall else "ok"), lines
    grounding = record.get("grounding")
    if isinstance(grounding, dict):
        hit = bool(grounding.get("hit"))
        lines.append(f'<div class="{"good" if hit else "bad"}">pointing: {"hit" if hit else "miss"}, '
                     f"mass in box {100 * float(grounding.get('mass', 0)):.1f}% "
                     f"(chance {100 * float(grounding.get('chance', 0)):.1f}%)</div>")
        if meta.get("object"):
            lines.append(f"<div>object: {_e(meta['object'])}</div>")
        if _scalar(record.get("parsed")) and _scalar(record.get("label")):
            lines.append(f"<div>parsed: {_e(record.get('parsed'))} · label: {_e(record.get('label'))}</div>")
        return ("ok" if hit else "wrong"), lines
    label, parsed = record.get("label"), record.get("parsed")
    if label is not None and _scalar(label) and parsed is not None and _scalar(parsed):
        right = str(parsed).strip().lower() == str(label).strip().lower()
        lines.append(f'<div class="{"good" if right else "bad"}">parsed: {_e(parsed)} · label: {_e(label)}</div>')
        return ("ok" if right else "wrong"), lines
    if label is not None:
        lines.append(f"<div>label: {_e(json.dumps(label) if not _scalar(label) else label)}</div>")
    return None, lines


def _thumb_html(run: RunData, record: dict[str, Any], images: _Images) -> str:
    path = _image_path(run, record)
    got = images.get(path) if path is not None else None
    if got is None:
        why = "image not recorded" if path is None else f"image missing: {path}"
        return f'<div class="thumb missing" title="{_e(why)}">{_e(why)}</div>'
    name, w, h, ow, oh = got
    scale = max(1.0, MIN_SHOWN / max(w, h))  # small images shown larger (the browser scales the thumbnail)
    w, h = round(w * scale), round(h * scale)
    overlay = ""
    grounding, meta = record.get("grounding"), record.get("meta") if isinstance(record.get("meta"), dict) else {}
    if isinstance(grounding, dict) and ow and oh:
        sx, sy = w / ow, h / oh
        bbox = meta.get("bbox")
        if isinstance(bbox, list) and len(bbox) == 4:
            x, y, bw, bh = (float(v) for v in bbox)
            overlay += (f'<div class="box" style="left:{x * sx:.1f}px;top:{y * sy:.1f}px;'
                        f'width:{bw * sx:.1f}px;height:{bh * sy:.1f}px" title="object box"></div>')
        point = grounding.get("point")
        if isinstance(point, list) and len(point) == 2:
            px, py = float(point[0]) * sx, float(point[1]) * sy
            overlay += (f'<div class="pt" style="left:{px - 4:.1f}px;top:{py - 4:.1f}px" '
                        f'title="argmax cell of the answer-time attention"></div>')
    return (f'<div class="thumb {name}" style="width:{w}px;height:{h}px" role="img" '
            f'title="{_e(path)}">{overlay}</div>')


def _sample_html(run: RunData, record: dict[str, Any], images: _Images) -> tuple[str, str | None]:
    verdict, lines = _verdict(run, record)
    text = [f'<div class="id">{_e(record.get("id"))}</div>',
            f'<div class="q"><b>Q</b> {_e(record.get("prompt", ""))}</div>',
            f'<div class="a"><b>A</b> {_e(record.get("output", ""))}</div>', *lines]
    cls = {"wrong": "sample wrong", "ok": "sample ok"}.get(verdict or "", "sample")
    return (f'<div class="{cls}" data-wrong="{1 if verdict == "wrong" else 0}">'
            f'{_thumb_html(run, record, images)}<div class="text">{"".join(text)}</div></div>'), verdict


def _run_html(root: Path, run: RunData, index: int, images: _Images) -> tuple[str, int, int]:
    rel = run.path.relative_to(root) if run.path != root else Path(run.path.name)
    info = run.results or run.run or {}
    methods = ", ".join(
        f"{m.get('name')}({', '.join(f'{k}={v}' for k, v in (m.get('config') or {}).items())})"
        if isinstance(m, dict) else str(m) for m in info.get("methods") or []
    ) or "none"
    head = [f'<h2 id="run{index}">{_e(rel)}</h2>',
            f'<p class="info">task <b>{_e(run.task)}</b> · model <b>{_e(info.get("model") or "?")}</b> · '
            f"methods {_e(methods)} · {len(run.records)} samples</p>"]
    if run.results is not None:
        head.append(_metrics_html(run.results.get("metrics")))
    else:
        head.append("<p>no results.json (the run did not finish): samples only</p>")
    samples, wrong, judged = [], 0, 0
    for record in run.records:
        piece, verdict = _sample_html(run, record, images)
        samples.append(piece)
        wrong += verdict == "wrong"
        judged += verdict is not None
    if any(isinstance(r.get("grounding"), dict) for r in run.records):
        head.append('<p class="note">Overlay: the object\'s box (green) and the argmax cell of the answer-time '
                    "attention (red dot); grounding records keep these, not the attention map itself.</p>")
    note = f"{wrong} of {judged} wrong" if judged else "no labels to judge"
    head.append(f'<p class="info">{_e(note)}</p>')
    return f'<section class="run">{"".join(head)}<div class="samples">{"".join(samples)}</div></section>', wrong, judged


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-top:1px solid #ccc;padding-top:.8em;margin-top:1.5em}
table.metrics{border-collapse:collapse;margin:.5em 1em .5em 0;display:inline-table;vertical-align:top}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:2px 8px;text-align:right}
table.metrics th{background:#f4f4f4;text-align:left}caption{font-weight:bold;text-align:left}
.sample{display:flex;gap:12px;padding:8px;border-bottom:1px solid #eee}
.sample.wrong{background:#fff4f4}.thumb{flex:none;position:relative;background-size:100% 100%;border:1px solid #ccc}
.thumb.missing{width:160px;height:100px;display:flex;align-items:center;justify-content:center;text-align:center;
font-size:12px;color:#888;background:repeating-linear-gradient(45deg,#f6f6f6,#f6f6f6 8px,#eee 8px,#eee 16px)}
.box{position:absolute;border:2px solid #0c0;box-sizing:border-box}
.pt{position:absolute;width:8px;height:8px;border-radius:50%;background:#e00;border:1px solid #fff}
.id{color:#888;font-size:12px}.good{color:#070}.bad{color:#b00;font-weight:bold}.note,.info{color:#555}
body.only-wrong .sample[data-wrong="0"]{display:none}
#filter{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd}
"""

_JS = """
document.getElementById('only-wrong').addEventListener('change', function (e) {
  document.body.classList.toggle('only-wrong', e.target.checked);
});
"""


def render_report(run_dir: str | os.PathLike) -> str:
    """The HTML page of a run directory (eval or reproduce; see the module docstring)."""
    root = Path(run_dir)
    paths = find_runs(root)
    runs = [load_run(p) for p in paths]
    images = _Images()
    table = _table_html(root) if any((root / n).is_file() for n in TABLE_FILES) else ""
    parts, wrong, judged = [], 0, 0
    for i, run in enumerate(runs):
        piece, w, j = _run_html(root, run, i, images)
        parts.append(piece)
        wrong, judged = wrong + w, judged + j
    toc = ""
    if len(runs) > 1:
        items = "".join(f'<li><a href="#run{i}">{_e(r.path.relative_to(root))}</a> ({_e(r.task)})</li>'
                        for i, r in enumerate(runs))
        toc = f"<ul>{items}</ul>"
    filt = (f'<div id="filter"><label><input type="checkbox" id="only-wrong"> show only wrong answers, '
            f"hallucinated captions and pointing misses ({wrong} of {judged})</label></div>")
    title = f"attnkit report: {root.resolve().name}"
    body = (f"<h1>{_e(title)}</h1><p class=\"info\">{_e(root)} · {len(runs)} run"
            f"{'s' if len(runs) != 1 else ''} · written {_e(time.strftime('%Y-%m-%d %H:%M'))}</p>"
            + (f"<h2>Table</h2>{table}" if table else "") + toc + filt + "".join(parts))
    style = _CSS + "\n".join(images.css)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{style}</style></head><body>{body}<script>{_JS}</script></body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``render_report(run_dir)`` to ``out`` (default RUN_DIR/report.html), atomically; returns the path."""
    page = render_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)

        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # a page to share: the umask's permissions, not mkstemp's 0600

    _atomic_write(path, write, "report")
    return path
