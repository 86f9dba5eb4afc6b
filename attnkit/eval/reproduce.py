"""Reproduce a paper's table from a YAML config: ``attnkit reproduce CONFIG --output DIR``.

A config names a model, the tasks with every protocol detail, the rows (the unwrapped baseline and methods
with their arguments) and the published number each row targets. ``run`` loads the model once, runs every
(row, task, seed) through the eval runner in its own directory ``DIR/ROW/TASK/seedS`` (resumable: finished
runs are not run again, a killed one continues where it stopped) and writes ``DIR/table.md`` and
``DIR/table.json``: per metric, the paper's number, ours (mean and standard deviation over the seeds) and
the difference.

Config format (YAML, read with ``yaml.safe_load``; relative data paths are relative to the working
directory, as ``attnkit eval``'s flags are)::

    name: vhr_llava15_7b            # optional (default: the file name); what the table is called
    description: VHR on LLaVA-1.5-7B  # optional
    citation: {paper: "...", table: "..."}   # where the published numbers come from (url, note optional)
    model:
      id: llava-hf/llava-1.5-7b-hf  # hub id, local path, testbed or tiny:FAMILY (as attnkit eval --model)
      dtype: float16                # optional: float32, bfloat16, float16, auto (fp32/bf16/fp16)
      device_map: auto              # optional
      trust_remote_code: false      # optional
    tasks:                          # a list; each runs once per seed for every row
      - name: chair                 # a label, used by rows and targets (letters, digits, . _ -)
        task: chair                 # the registered task (default: the label); attnkit list shows them
        options: {annotations: data/coco/annotations, num_images: 500}   # the task's Options fields
        seeds: [0, 1, 2, 3, 4]      # one run per seed (default [0]): sampling, CHAIR's image sample
        decoding: {do_sample: false, max_new_tokens: 512}   # also temperature, top_p, top_k (sampling only)
        batch_size: 8               # optional (default 8)
        limit: null                 # optional: the first N samples only (--limit caps it further)
        metrics:                    # the table's metrics: a path into the task's metrics dict and a scale
          CHAIR_s: {path: CHAIR_s, scale: 1}        # CHAIR reports percent already
          F1: {path: average.f1, scale: 100}        # POPE reports fractions; papers print percent
    rows:
      - name: baseline              # the row's directory name (letters, digits, . _ -)
        methods: []                 # none: the unwrapped model
        targets: {chair: {CHAIR_s: 49.68}}   # task label -> metric name -> published number (paper units)
      - name: vhr
        methods:                    # composed in this order, as attnkit eval --method a,b
          - {name: vhr, alpha: 2.0} # the method's config fields next to its name (or just "vhr")
        tasks: [chair]              # optional: the tasks this row runs (default: all)
        decoding: {}                # optional: overrides of the tasks' decoding for this row
        citation: {...}             # optional: overrides the top-level citation for this row's targets

Every key is checked: task options against the task's ``Options`` declaration (type, range, choices),
method arguments against the method's config (its own validation included), decoding, seeds, metric
declarations and targets; a bad one is a ``ConfigError`` naming the file and the key path, e.g.
``configs/x.yaml: rows[2].methods[0].alpha: expected number, >= 0.0, got str 'x'``. A metric path is checked against the
task's real metrics after its first run (``DataError`` naming the path and the keys there).

"ours" is the metric at ``path`` times ``scale``, its mean over the seeds and the sample standard
deviation (n - 1; none for one seed); delta = ours - paper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import AttnkitError, ConfigError, DataError, OutputError

#: where ``find_config`` looks for a config given by name
CONFIGS_DIR = "configs"
REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = "reproduce.json"  # each run directory's settings, checked before it is resumed or reused
TABLE_MD, TABLE_JSON = "table.md", "table.json"

_TOP_KEYS = ("name", "description", "citation", "model", "tasks", "rows")
_MODEL_KEYS = ("id", "dtype", "device_map", "trust_remote_code")
_TASK_KEYS = ("name", "task", "options", "seeds", "decoding", "batch_size", "limit", "metrics")
_ROW_KEYS = ("name", "methods", "tasks", "targets", "decoding", "citation")
_DECODING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens")
_CITATION_KEYS = ("paper", "table", "url", "note")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- the parsed config


@dataclass(frozen=True)
class ModelSpec:
    """How the model is loaded (``attnkit.load_model`` arguments)."""

    id: str
    dtype: str | None = None
    device_map: Any = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the table: ``path`` into the task's metrics dict, times ``scale`` = the paper's unit."""

    name: str
    path: tuple[str, ...]
    scale: float
    where: str  # key path of its declaration, for errors

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Decoding:
    """Decoding of one (row, task): greedy unless ``do_sample``; None = the runner's / task's default."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None

    def describe(self, default_max_new_tokens: int) -> str:
        if self.do_sample:
            parts = ["sampling"] + [f"{k} {getattr(self, k)}" for k in ("temperature", "top_p", "top_k")
                                    if getattr(self, k) is not None]
        else:
            parts = ["greedy"]
        parts.append(f"max_new_tokens {self.max_new_tokens or default_max_new_tokens}")
        return ", ".join(parts)


@dataclass
class TaskSpec:
    """One task of the config (a label, the registered task, its validated Options and how it runs)."""

    label: str
    task: str
    options: Any
    seeds: tuple[int, ...]
    decoding: dict[str, Any]  # as written (validated); a row's decoding overrides its keys
    base_decoding: Decoding  # the task's own, without row overrides
    batch_size: int
    limit: int | None
    metrics: dict[str, MetricSpec]
    where: str

    @property
    def task_class(self) -> Any:
        from .registry import get_task_class

        return get_task_class(self.task)


@dataclass
class MethodSpec:
    """One method of a row: its registered name and the config fields given (typed)."""

    name: str
    args: dict[str, Any]
    where: str

    def build(self) -> Any:
        """A fresh Method (or pipeline) object; ConfigError naming the key path if its config refuses the args."""
        from ..methods.registry import get_method_or_pipeline_class

        cls = get_method_or_pipeline_class(self.name)
        try:
            return cls(**self.args)
        except (AttnkitError, TypeError, ValueError) as e:
            raise ConfigError(f"{self.where}: {_one_line(e)}") from None

    def describe(self) -> str:
        if not self.args:
            return self.name
        return self.name + "(" + ", ".join(f"{k}={_show(v)}" for k, v in self.args.items()) + ")"


@dataclass
class RowSpec:
    """One row: methods composed in order (none = the unwrapped model), the tasks it runs, its targets."""

    name: str
    methods: list[MethodSpec]
    tasks: tuple[str, ...]
    targets: dict[tuple[str, str], float]
    decoding: dict[str, Any]
    citation: dict[str, str] | None
    where: str

    def describe_methods(self) -> str:
        return " + ".join(m.describe() for m in self.methods) or "none"


@dataclass
class ReproConfig:
    """A validated reproduce config (``load_config``)."""

    path: Path
    name: str
    description: str
    citation: dict[str, str] | None
    model: ModelSpec
    tasks: dict[str, TaskSpec]
    rows: list[RowSpec]
    decodings: dict[tuple[str, str], Decoding] = field(default_factory=dict)  # (row, task label) -> merged

    def row(self, name: str) -> RowSpec:
        return next(r for r in self.rows if r.name == name)

    def citation_of(self, row: RowSpec) -> dict[str, str] | None:
        return row.citation if row.citation is not None else self.citation


# ----------------------------------------------------------------------------- small helpers


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


class _Checker:
    """Builds ``FILE: key.path: message`` errors."""

    def __init__(self, path: Path) -> None:
        self.file = str(path)

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {where}: {message}" if where else f"{self.file}: {message}")

    def mapping(self, value: Any, where: str, keys: tuple[str, ...] | None = None,
                required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(where, f"key {k!r} is not a string")
            if keys is not None and k not in keys:
                raise self.fail(_join(where, k), f"unknown key (valid: {', '.join(keys)})")
        for k in required:
            if k not in value:
                raise self.fail(_join(where, k), "missing (required)")
        return value

    def string(self, value: Any, where: str, *, name: bool = False) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty string, got {_kind(value)}")
        if name and not _NAME.match(value):
            raise self.fail(where, f"{value!r} is not a valid name (letters, digits, '.', '_', '-'; "
                                   f"it names a directory)")
        return value

    def integer(self, value: Any, where: str, lo: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {_kind(value)}")
        if lo is not None and value < lo:
            raise self.fail(where, f"{value} must be >= {lo}")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(where, f"expected a number, got {_kind(value)}")
        return float(value)

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {_kind(value)}")
        return value

    def listing(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {_kind(value)}")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, (str, int, float, bool)):
        return f"{type(value).__name__} {value!r}"
    return {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _typed(check: _Checker, spec: Any, value: Any, where: str) -> Any:
    """A config value checked and converted to a declared option's type (``attnkit.options``), range and choices."""
    from ..options import coerce

    if isinstance(value, str) and spec.aliases and value.strip().lower() in spec.aliases:
        return spec.aliases[value.strip().lower()]
    try:
        typed = coerce(spec.type, value)
    except (ValueError, TypeError):
        raise check.fail(where, f"expected {spec.describe()}, got {_kind(value)}") from None
    problem = spec.check(typed)
    if problem:
        raise check.fail(where, problem)
    return typed


# ----------------------------------------------------------------------------- loading and validation


def find_config(name: str | Path) -> Path:
    """The config file ``name``: a path, or a name (with or without ``.yaml``) in ``./configs/`` (or one
    folder below) or in the ``configs/`` of the attnkit checkout this package runs from. ConfigError if none."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"config {path} is not a file")
    tried = []
    if len(path.parts) == 1:
        stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        for folder in (Path.cwd() / CONFIGS_DIR, REPO_ROOT / CONFIGS_DIR):
            tried.append(str(folder))
            found = [folder / stem, *sorted(folder.glob(f"*/{stem}"))] if folder.is_dir() else []
            for candidate in found:
                if candidate.is_file():
                    return candidate
    where = f" (also looked in {', '.join(dict.fromkeys(tried))})" if tried else ""
    raise ConfigError(f"config not found: {name}{where}")


def shipped_configs() -> list[Path]:
    """The YAML configs of the checkout's ``configs/`` directory and its subfolders, sorted."""
    folder = REPO_ROOT / CONFIGS_DIR
    return sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]) if folder.is_dir() else []


def load_config(path: str | Path) -> ReproConfig:
    """Read and validate the config at ``path`` (nothing heavy: no model, no data). ConfigError naming the
    file and the key path of the first problem."""
    import yaml

    src = Path(path)
    try:
        text = src.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config not found: {src}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {src}: {_one_line(e)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or _one_line(e)
        raise ConfigError(f"{src}{where}: invalid YAML ({what})") from None
    check = _Checker(src)
    if data is None:
        raise check.fail("", "the file is empty")
    top = check.mapping(data, "", _TOP_KEYS, required=("model", "tasks", "rows"))
    name = check.string(top.get("name", src.stem), "name", name=True)
    description = top.get("description") or ""
    if not isinstance(description, str):
        raise check.fail("description", f"expected a string, got {_kind(description)}")
    citation = _citation(check, top["citation"], "citation") if top.get("citation") is not None else None
    model = _model(check, top["model"])
    tasks = _tasks(check, top["tasks"])
    rows = _rows(check, top["rows"], tasks, citation)
    config = ReproConfig(src, name, description, citation, model, tasks, rows)
    for row in rows:  # each (row, task) decoding, merged and checked once
        for label in row.tasks:
            task = tasks[label]
            merged = {**task.decoding, **row.decoding}
            where = {k: f"{row.where if k in row.decoding else task.where}.decoding" for k in _DECODING_KEYS}
            config.decodings[(row.name, label)] = _decoding(check, merged, where)
    return config


def _citation(check: _Checker, value: Any, where: str) -> dict[str, str]:
    cite = check.mapping(value, where, _CITATION_KEYS, required=("paper", "table"))
    return {k: check.string(v, _join(where, k)) for k, v in cite.items()}


def _model(check: _Checker, value: Any) -> ModelSpec:
    from ..loading import _DTYPES

    if isinstance(value, str):
        value = {"id": value}
    m = check.mapping(value, "model", _MODEL_KEYS, required=("id",))
    dtype = m.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in _DTYPES):
        raise check.fail("model.dtype", f"{_show(dtype)} is not one of {', '.join(_DTYPES)}")
    device_map = m.get("device_map")
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise check.fail("model.device_map", f"expected a string or a mapping, got {_kind(device_map)}")
    trust = check.boolean(m.get("trust_remote_code", False), "model.trust_remote_code")
    return ModelSpec(check.string(m["id"], "model.id"), dtype, device_map, trust)


def _tasks(check: _Checker, value: Any) -> dict[str, TaskSpec]:
    from ..options import option_specs
    from .registry import UnknownTaskError, get_task_class

    items = check.listing(value, "tasks")
    if not items:
        raise check.fail("tasks", "the list is empty")
    out: dict[str, TaskSpec] = {}
    for i, item in enumerate(items):
        where = f"tasks[{i}]"
        t = check.mapping(item, where, _TASK_KEYS, required=("name",))
        label = check.string(t["name"], f"{where}.name", name=True)
        if label in out:
            raise check.fail(f"{where}.name", f"task label {label!r} is used twice")
        task_name = check.string(t.get("task", label), f"{where}.task" if "task" in t else f"{where}.name")
        try:
            cls = get_task_class(task_name)
        except UnknownTaskError as e:
            raise check.fail(f"{where}.task" if "task" in t else f"{where}.name", str(e)) from None
        specs = {s.name: s for s in option_specs(cls.Options)}
        raw = t.get("options") or {}
        raw = check.mapping(raw, f"{where}.options")
        values: dict[str, Any] = {}
        for key, val in raw.items():
            if key not in specs:
                raise check.fail(f"{where}.options.{key}", f"unknown option of task {cls.name} "
                                                            f"(valid: {', '.join(specs) or 'none'})")
            values[key] = _typed(check, specs[key], val, f"{where}.options.{key}")
        try:
            options = cls.Options(**values)
        except (AttnkitError, TypeError, ValueError) as e:
            raise check.fail(f"{where}.options", _one_line(e)) from None
        seeds_raw = t.get("seeds", [0])
        seeds_list = [seeds_raw] if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) else \
            check.listing(seeds_raw, f"{where}.seeds")
        if not seeds_list:
            raise check.fail(f"{where}.seeds", "the list is empty")
        seeds = tuple(check.integer(s, f"{where}.seeds[{k}]", lo=0) for k, s in enumerate(seeds_list))
        if len(set(seeds)) != len(seeds):
            raise check.fail(f"{where}.seeds", f"seed {next(s for s in seeds if seeds.count(s) > 1)} is listed twice")
        decoding = check.mapping(t.get("decoding") or {}, f"{where}.decoding", _DECODING_KEYS)
        base = _decoding(check, decoding, f"{where}.decoding")
        batch = check.integer(t.get("batch_size", 8), f"{where}.batch_size", lo=1)
        limit = t.get("limit")
        limit = None if limit is None else check.integer(limit, f"{where}.limit", lo=1)
        metrics = _metrics(check, t.get("metrics") or {}, f"{where}.metrics")
        out[label] = TaskSpec(label, cls.name, options, seeds, dict(decoding), base, batch, limit, metrics, where)
    return out


def _decoding(check: _Checker, d: dict[str, Any], where: str | dict[str, str]) -> Decoding:
    """The decoding settings ``d``, checked; ``where``: the key path of the mapping (or one per key, where
    a row's settings override a task's)."""
    def at(key: str) -> str:
        return _join(where[key] if isinstance(where, dict) else where, key)

    do_sample = check.boolean(d.get("do_sample", False), at("do_sample"))
    temperature = top_p = top_k = max_new = None
    if d.get("temperature") is not None:
        temperature = check.number(d["temperature"], at("temperature"))
        if temperature <= 0:
            raise check.fail(at("temperature"), f"{_show(d['temperature'])} must be > 0")
    if d.get("top_p") is not None:
        top_p = check.number(d["top_p"], at("top_p"))
        if not 0 < top_p <= 1:
            raise check.fail(at("top_p"), f"{_show(d['top_p'])} must be in (0, 1]")
    if d.get("top_k") is not None:
        top_k = check.integer(d["top_k"], at("top_k"), lo=0)
    if d.get("max_new_tokens") is not None:
        max_new = check.integer(d["max_new_tokens"], at("max_new_tokens"), lo=1)
    if not do_sample:
        for key in ("temperature", "top_p", "top_k"):
            if d.get(key) is not None:
                raise check.fail(at(key), f"only with do_sample: true (decoding is greedy otherwise; do_sample "
                                          f"is set at {at('do_sample')})" if "do_sample" in d else
                                 "only with do_sample: true (decoding is greedy otherwise)")
    return Decoding(do_sample, temperature, top_p, top_k, max_new)


def _metrics(check: _Checker, value: Any, where: str) -> dict[str, MetricSpec]:
    m = check.mapping(value, where)
    out: dict[str, MetricSpec] = {}
    for name, decl in m.items():
        at = _join(where, name)
        d = check.mapping(decl, at, ("path", "scale"), required=("path", "scale"))
        path = check.string(d["path"], f"{at}.path")
        parts = tuple(path.split("."))
        if any(not p for p in parts):
            raise check.fail(f"{at}.path", f"{path!r} has an empty part (keys joined by '.')")
        scale = check.number(d["scale"], f"{at}.scale")
        if scale == 0:
            raise check.fail(f"{at}.scale", "must not be 0")
        out[name] = MetricSpec(name, parts, scale, at)
    return out


def _rows(check: _Checker, value: Any, tasks: dict[str, TaskSpec], citation: dict[str, str] | None
          ) -> list[RowSpec]:
    items = check.listing(value, "rows")
    if not items:
        raise check.fail("rows", "the list is empty")
    out: list[RowSpec] = []
    for i, item in enumerate(items):
        where = f"rows[{i}]"
        r = check.mapping(item, where, _ROW_KEYS, required=("name",))
        name = check.string(r["name"], f"{where}.name", name=True)
        if any(o.name == name for o in out):
            raise check.fail(f"{where}.name", f"row name {name!r} is used twice")
        methods = [_method(check, m, f"{where}.methods[{k}]")
                   for k, m in enumerate(check.listing(r.get("methods") or [], f"{where}.methods"))]
        labels = tuple(tasks)
        if r.get("tasks") is not None:
            listed = check.listing(r["tasks"], f"{where}.tasks")
            if not listed:
                raise check.fail(f"{where}.tasks", "the list is empty (leave it out to run every task)")
            for k, label in enumerate(listed):
                if label not in tasks:
                    raise check.fail(f"{where}.tasks[{k}]", f"{label!r} is not a task of this config "
                                                            f"(tasks: {', '.join(tasks)})")
            labels = tuple(dict.fromkeys(listed))
        targets: dict[tuple[str, str], float] = {}
        raw_targets = check.mapping(r.get("targets") or {}, f"{where}.targets")
        for label, per_metric in raw_targets.items():
            at = f"{where}.targets.{label}"
            if label not in labels:
                raise check.fail(at, f"{label!r} is not a task this row runs (its tasks: {', '.join(labels)})")
            for metric, number in check.mapping(per_metric, at).items():
                if metric not in tasks[label].metrics:
                    declared = ", ".join(tasks[label].metrics) or "none"
                    raise check.fail(f"{at}.{metric}", f"metric {metric!r} is not declared in "
                                                       f"{tasks[label].where}.metrics (declared: {declared})")
                targets[(label, metric)] = check.number(number, f"{at}.{metric}")
        decoding = check.mapping(r.get("decoding") or {}, f"{where}.decoding", _DECODING_KEYS)
        row_cite = _citation(check, r["citation"], f"{where}.citation") if r.get("citation") is not None else None
        if targets and row_cite is None and citation is None:
            raise check.fail(f"{where}.targets", "published numbers need a citation (citation: {paper, table}, "
                                                 "here or at the top level)")
        out.append(RowSpec(name, methods, labels, targets, dict(decoding), row_cite, where))
    return out


def _method(check: _Checker, value: Any, where: str) -> MethodSpec:
    from ..errors import UnknownMethodError
    from ..methods.registry import get_method_or_pipeline_class

    if isinstance(value, str):
        value = {"name": value}
    m = check.mapping(value, where, required=("name",))
    name = check.string(m["name"], f"{where}.name").strip().lower()
    try:
        cls = get_method_or_pipeline_class(name)
    except UnknownMethodError as e:
        raise check.fail(f"{where}.name", str(e)) from None
    specs = {s.name: s for s in cls.Config.options()}
    args: dict[str, Any] = {}
    for key, val in m.items():
        if key == "name":
            continue
        if key not in specs:
            raise check.fail(f"{where}.{key}", f"unknown argument of {name} (valid: {', '.join(specs) or 'none'})")
        args[key] = _typed(check, specs[key], val, f"{where}.{key}")
    spec = MethodSpec(name, args, f"{check.file}: {where}")
    spec.build()  # the config's own validation (cross-field checks, files it reads)
    return spec


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Unit:
    """One run: a row on a task with a seed, in ``DIR/ROW/TASK/seedS``."""

    row: str
    task: str
    seed: int

    def directory(self, root: Path) -> Path:
        return root / self.row / self.task / f"seed{self.seed}"


def select_rows(config: ReproConfig, rows: list[str] | None) -> list[RowSpec]:
    """The config's rows, or those named (in the config's order); ConfigError for a name it lacks."""
    if not rows:
        return list(config.rows)
    names = [r.name for r in config.rows]
    for name in rows:
        if name not in names:
            raise ConfigError(f"--rows: {config.path} has no row {name!r} (rows: {', '.join(names)})")
    return [r for r in config.rows if r.name in rows]


def units(config: ReproConfig, rows: list[str] | None = None) -> list[Unit]:
    """Every (row, task, seed) to run, row by row, tasks in config order, seeds in listed order."""
    return [Unit(r.name, label, seed) for r in select_rows(config, rows) for label in r.tasks
            for seed in config.tasks[label].seeds]


def effective_limit(task: TaskSpec, limit: int | None) -> int | None:
    limits = [n for n in (task.limit, limit) if n is not None]
    return min(limits) if limits else None


def _build_task(config: ReproConfig, label: str, seed: int) -> Any:
    from .registry import task_for_model

    spec = config.tasks[label]
    return task_for_model(spec.task, spec.options, seed=seed, model_id=config.model.id)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face hub and datasets in offline mode for the duration (the environment variables, and the
    flags of those libraries where already imported): a dry run reads local data and caches, never downloads."""
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flags = [(m, attr) for m, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                                        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")))
             if m in sys.modules for attr in attrs if hasattr(sys.modules[m], attr)]
    saved = [(m, attr, getattr(sys.modules[m], attr)) for m, attr in flags]
    try:
        os.environ.update({k: "1" for k in env})
        for m, attr, _ in saved:
            setattr(sys.modules[m], attr, True)
        yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for m, attr, value in saved:
            setattr(sys.modules[m], attr, value)


def _count(config: ReproConfig, label: str) -> tuple[int | None, str]:
    """(samples of the task at its first seed, "" ) from its data, or (count from the config or None, why).
    Offline: a dataset that is neither local nor cached counts as missing."""
    spec = config.tasks[label]
    task = None
    try:
        with _offline():
            task = _build_task(config, label, spec.seeds[0])
            return len(task.load()), ""
    except AttnkitError as e:
        reason = _one_line(e)
    # the task's planned size where it has one (CHAIR: num_images, or the length of its image_ids list)
    planned = getattr(task, "num_images", getattr(spec.options, "num_images", None))
    if isinstance(planned, int) and not isinstance(planned, bool):
        return planned, f"num_images from the config; data not read: {reason}"
    return None, f"data not read: {reason}"


def _forward_passes(samples: int, batch: int, max_new: int) -> int:
    """Upper bound of the model's forward passes: one per new token per batch (fewer when a batch stops early)."""
    return math.ceil(samples / batch) * max_new


def describe_plan(config: ReproConfig, *, limit: int | None = None, rows: list[str] | None = None,
                  output: str | Path | None = None) -> str:
    """The plan as text: model, tasks (seeds, decoding, sample counts), rows, every run with its sample count
    and an upper bound of forward passes; with ``output``, each run's state there. Loads no model."""
    chosen = select_rows(config, rows)
    todo = units(config, rows)
    m = config.model
    load = ", ".join(f"{k} {v}" for k, v in (("dtype", m.dtype), ("device_map", m.device_map)) if v is not None)
    lines = [f"config {config.path}: {config.name}" + (f" · {config.description}" if config.description else ""),
             f"model {m.id}" + (f" ({load})" if load else "") + " (not loaded: dry run)"]
    if config.citation:
        lines.append(f"published numbers: {_cite_text(config.citation)}")
    counts: dict[str, tuple[int | None, str]] = {}
    lines.append("tasks:")
    for label, spec in config.tasks.items():
        if not any(label in r.tasks for r in chosen):
            continue
        counts[label] = _count(config, label)
        n, why = counts[label]
        cap = effective_limit(spec, limit)
        shown = "unknown" if n is None else str(n)
        if n is not None and cap is not None and cap < n:
            shown = f"{cap} (limit; {n} in all)"
        elif n is None and cap is not None:
            shown = f"at most {cap} (limit)"
        dec = spec.base_decoding
        lines.append(f"  {label}: task {spec.task}, seeds {', '.join(map(str, spec.seeds))}, "
                     f"{dec.describe(spec.task_class.default_max_new_tokens)}, batch {spec.batch_size}; "
                     f"{shown} samples per run" + (f" ({why})" if why else ""))
        for k, v in _options_given(spec).items():
            lines.append(f"      {k}: {_show(v)}")
    lines.append("rows:")
    for row in chosen:
        targets = ", ".join(f"{t}.{mname} {v:g}" for (t, mname), v in row.targets.items())
        lines.append(f"  {row.name}: {row.describe_methods()}; tasks {', '.join(row.tasks)}"
                     + (f"; targets {targets}" if targets else ""))
    lines.append("runs (row / task / seed: samples, forward passes at most" + (", state" if output else "") + "):")
    total_samples = total_passes = 0
    unknown = 0
    for u in todo:
        spec = config.tasks[u.task]
        n, _ = counts[u.task]
        cap = effective_limit(spec, limit)
        if n is not None and cap is not None:
            n = min(n, cap)
        dec = config.decodings[(u.row, u.task)]
        max_new = dec.max_new_tokens or spec.task_class.default_max_new_tokens
        if n is None:
            unknown += 1
            text = "unknown samples"
        else:
            passes = _forward_passes(n, spec.batch_size, max_new)
            total_samples += n
            total_passes += passes
            text = f"{n} samples, <= {passes:,} forward passes"
        state = f"; {_state_text(u.directory(Path(output)))}" if output else ""
        lines.append(f"  {u.row} / {u.task} / seed {u.seed}: {text}{state}")
    more = f" (+ {unknown} runs of unknown size)" if unknown else ""
    lines.append(f"total: {len(todo)} runs, {total_samples:,} samples, <= {total_passes:,} forward passes{more}; "
                 "contrast rows (VCD, VHR, ...) are extra batch rows of the same passes")
    if limit is not None:
        lines.append(f"--limit {limit}: a smoke test, not comparable with the paper")
    return "\n".join(lines)


def _options_given(spec: TaskSpec) -> dict[str, Any]:
    """The task options that differ from their declared defaults (what the config sets)."""
    from ..options import option_specs

    return {s.name: getattr(spec.options, s.name) for s in option_specs(type(spec.options))
            if getattr(spec.options, s.name) != s.default}


def _state_text(directory: Path) -> str:
    from .records import read_jsonl
    from .runner import RESULTS, SAMPLES

    if (directory / RESULTS).is_file():
        return "done"
    if (directory / SAMPLES).is_file():
        try:
            return f"resumes after {len(read_jsonl(directory / SAMPLES))} logged samples"
        except DataError:
            return "has a damaged samples.jsonl"
    return "new"


# ----------------------------------------------------------------------------- run


def unit_spec(config: ReproConfig, unit: Unit) -> dict[str, Any]:
    """What a run directory holds (all that changes its outputs but the sample limit and batch size), as JSON."""
    row, spec = config.row(unit.row), config.tasks[unit.task]
    m = config.model
    spec_dict = {
        "model": {"id": m.id, "dtype": m.dtype, "device_map": m.device_map, "trust_remote_code": m.trust_remote_code},
        "task": spec.task,
        "options": dataclasses.asdict(spec.options),
        "seed": unit.seed,
        "methods": [{"name": meth.name, "config": meth.build().config.to_dict()} for meth in row.methods],
        "decoding": dataclasses.asdict(config.decodings[(unit.row, unit.task)]),
    }
    return json.loads(json.dumps(spec_dict, default=str))


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            diff = _first_difference(old.get(key), new.get(key), _join(where, str(key)))
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for k, (a, b) in enumerate(zip(old, new)):
            diff = _first_difference(a, b, f"{where}[{k}]")
            if diff:
                return diff
        return None
    return None if old == new else f"{where}: {json.dumps(old)} there, {json.dumps(new)} now"


def _unit_state(directory: Path, spec: dict[str, Any], limit: int | None) -> str:
    """"done" (results for this limit), "resume" or "new"; OutputError if the directory holds other settings."""
    from .records import read_json
    from .runner import RESULTS

    spec_path = directory / SPEC
    if not spec_path.exists():
        if any(directory.glob("*.jsonl")) or (directory / RESULTS).exists():
            raise OutputError(f"{directory} holds a run without {SPEC} (not made by attnkit reproduce); "
                              f"choose another --output")
        return "new"
    old = read_json(spec_path, "run settings")
    diff = _first_difference(old, spec)
    if diff:
        raise OutputError(f"{directory} holds a run with other settings ({diff}); choose another --output "
                          f"or remove that directory")
    results_path = directory / RESULTS
    if results_path.is_file():
        results = read_json(results_path, "results")
        if ((results.get("config") or {}).get("run") or {}).get("limit", "?") == limit:
            return "done"
    return "resume"


def _write_text(path: Path, text: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def metric_value(config: ReproConfig, label: str, metric: MetricSpec, metrics: dict[str, Any]) -> float:
    """The value at ``metric.path`` in a run's metrics, times its scale; DataError naming the config's key
    path, the missing key and the keys found there."""
    node: Any = metrics
    for depth, key in enumerate(metric.path):
        if not isinstance(node, dict) or key not in node:
            at = ".".join(metric.path[:depth]) or "the top level"
            keys = ", ".join(map(str, node)) if isinstance(node, dict) else f"a {type(node).__name__}, not a mapping"
            raise DataError(f"{config.path}: {metric.where}.path: {metric.dotted!r} is not in the metrics of task "
                            f"{config.tasks[label].task}: no {key!r} at {at} (there: {keys})")
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise DataError(f"{config.path}: {metric.where}.path: {metric.dotted!r} in the metrics of task "
                        f"{config.tasks[label].task} is not a number ({_kind(node)})")
    return float(node) * metric.scale


def run(config: ReproConfig, output: str | Path, *, limit: int | None = None, rows: list[str] | None = None,
        progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every (row, task, seed) of ``config`` not finished in ``output`` and write table.md / table.json
    there; returns the table (``build_table``). The model is loaded once, only if a run is left to do."""
    from .. import loading
    from .records import ensure_writable, read_json, write_json
    from .runner import RESULTS, RunSettings, run_task

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit must be >= 1, got {limit!r}")
    root = Path(output)
    todo = units(config, rows)
    ensure_writable(root)
    states = {}
    for u in todo:  # every directory checked before anything runs
        states[u] = _unit_state(u.directory(root), unit_spec(config, u), effective_limit(config.tasks[u.task], limit))
    tasks = {(u.task, u.seed): None for u in todo if states[u] != "done"}
    for label, seed in tasks:  # tasks built (their files read) before the model loads
        tasks[(label, seed)] = _build_task(config, label, seed)
    model = processor = None
    metrics: dict[tuple[str, str, int], dict[str, Any]] = {}
    for k, u in enumerate(todo, 1):
        directory = u.directory(root)
        head = f"[{k}/{len(todo)}] row {u.row} / task {u.task} / seed {u.seed}"
        spec = config.tasks[u.task]
        cap = effective_limit(spec, limit)
        if states[u] == "done":
            log(f"{head}: done ({directory}), not run again")
            metrics[(u.row, u.task, u.seed)] = read_json(directory / RESULTS, "results")["metrics"]
            continue
        if model is None:
            m = config.model
            log(f"loading {m.id}")
            model, processor = loading.load_model(m.id, dtype=m.dtype, device_map=m.device_map,
                                                  trust_remote_code=m.trust_remote_code)
        row = config.row(u.row)
        log(f"{head}: {row.describe_methods()}" + (" (resuming)" if states[u] == "resume" else "") + f" -> {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        if states[u] == "new":
            write_json(directory / SPEC, unit_spec(config, u))
        dec = config.decodings[(u.row, u.task)]
        settings = RunSettings(batch_size=spec.batch_size, max_new_tokens=dec.max_new_tokens, limit=cap, seed=u.seed,
                               resume=True, progress=progress, do_sample=dec.do_sample, temperature=dec.temperature,
                               top_p=dec.top_p, top_k=dec.top_k)
        methods = [meth.build() for meth in row.methods]
        record = {"reproduce": {"config": str(config.path), "name": config.name, "row": u.row, "task": u.task,
                                "seed": u.seed, "limit": cap, **unit_spec(config, u)}}
        results = run_task(tasks[(u.task, u.seed)], model, processor, methods, directory, settings,
                           model_id=config.model.id, config=record, print_summary=False)
        assert results is not None  # one process: rank 0
        metrics[(u.row, u.task, u.seed)] = results["metrics"]
        values = [f"{name} {metric_value(config, u.task, ms, results['metrics']):.2f}"
                  for name, ms in spec.metrics.items()]
        if values:
            log(f"    {', '.join(values)}")
    table = build_table(config, metrics, rows=rows, limit=limit)
    write_json(root / TABLE_JSON, table)
    _write_text(root / TABLE_MD, table_markdown(table))
    return table


# ----------------------------------------------------------------------------- the table


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cite_text(cite: dict[str, str]) -> str:
    text = f"{cite['paper']}, {cite['table']}"
    if cite.get("url"):
        text += f" ({cite['url']})"
    if cite.get("note"):
        text += f"; {cite['note']}"
    return text


def build_table(config: ReproConfig, metrics: dict[tuple[str, str, int], dict[str, Any]], *,
                rows: list[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """The table from each run's metrics (``{(row, task label, seed): task.score() output}``): one entry per
    (row, task, declared metric) with the per-seed values (path x scale), their mean and sample standard
    deviation (None for one seed), the paper's number, its citation and delta = mean - paper."""
    entries = []
    citations: list[dict[str, str]] = []
    for row in select_rows(config, rows):
        cite = config.citation_of(row)
        for label in row.tasks:
            spec = config.tasks[label]
            for name, ms in spec.metrics.items():
                missing = [s for s in spec.seeds if (row.name, label, s) not in metrics]
                if missing:
                    raise DataError(f"no results for row {row.name}, task {label}, seed {missing[0]}")
                values = [metric_value(config, label, ms, metrics[(row.name, label, s)]) for s in spec.seeds]
                mean, std = _mean_std(values)
                paper = row.targets.get((label, name))
                ref = None
                if paper is not None and cite is not None:
                    if cite not in citations:
                        citations.append(cite)
                    ref = citations.index(cite) + 1
                entries.append({
                    "row": row.name, "methods": [{"name": m.name, "args": m.args} for m in row.methods],
                    "task": label, "metric": name, "path": ms.dotted, "scale": ms.scale,
                    "seeds": list(spec.seeds), "per_seed": values, "mean": mean, "std": std,
                    "paper": paper, "delta": None if paper is None else mean - paper,
                    "citation": ref,
                })
    m = config.model
    return {
        "name": config.name, "description": config.description, "config": str(config.path),
        "model": {"id": m.id, "dtype": m.dtype, "device_map": m.device_map},
        "limit": limit, "rows": [r.name for r in select_rows(config, rows)],
        "citations": citations, "entries": entries,
    }


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def table_markdown(table: dict[str, Any]) -> str:
    """table.md: one line per (row, task, metric): paper, ours (mean ± std over seeds), seeds, delta."""
    lines = [f"# {table['name']}" + (f": {table['description']}" if table.get("description") else ""), ""]
    meta = f"model `{table['model']['id']}` · config `{table['config']}`"
    if table.get("limit") is not None:
        meta += f" · **--limit {table['limit']}: not comparable with the paper**"
    lines += [meta, "", "| row | methods | task | metric | paper | ours | seeds | delta |",
              "|---|---|---|---|---|---|---|---|"]
    for e in table["entries"]:
        methods = " + ".join(m["name"] + ("(" + ", ".join(f"{k}={_show(v)}" for k, v in m["args"].items()) + ")"
                                          if m["args"] else "") for m in e["methods"]) or "none"
        paper = _num(e["paper"]) + (f" [{e['citation']}]" if e.get("citation") else "")
        ours = _num(e["mean"]) + ("" if e["std"] is None else f" ± {e['std']:.2f}")
        lines.append(f"| {e['row']} | {methods} | {e['task']} | {e['metric']} | {paper} | {ours} | "
                     f"{len(e['seeds'])} | {_num(e['delta'], signed=True)} |")
    lines.append("")
    scales = dict.fromkeys(f"{e['metric']} = {e['path']} x {e['scale']:g}" for e in table["entries"])
    lines.append("ours: the task's metric x scale (" + "; ".join(scales) + "), mean ± sample standard deviation "
                 "over the seeds; delta = ours - paper.")
    for k, cite in enumerate(table.get("citations", []), 1):
        lines.append(f"[{k}] {_cite_text(cite)}")
    return "\n".join(lines) + "\n"


__all__ = ["ConfigError", "Decoding", "MethodSpec", "MetricSpec", "ModelSpec", "ReproConfig", "RowSpec", "TaskSpec",
           "Unit", "build_table", "describe_plan", "find_config", "load_config", "metric_value", "run",
           "shipped_configs", "table_markdown", "units"]
