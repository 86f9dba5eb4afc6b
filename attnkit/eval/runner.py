"""Run a task through a (wrapped) model: batched greedy generation, per-sample log, resume, data parallel.

Output directory:

- ``samples.jsonl``: one line per sample (id, prompt, output, parsed, label, meta; image: the image file's
  path when the sample has one), flushed per line;
  under data parallel each rank appends to ``shards/rank{R}.jsonl`` and rank 0 merges them at the end.
- ``results.json``: metrics, the full resolved config, method configs, model id, package versions,
  seed, counts and timing; plus any extra files the task asks for.
- ``run.json``: the settings the run was started with; ``--resume`` refuses a different run.

Resume skips the ids already logged. A run killed at any point (even SIGKILL) loses at most the line
being written; that torn line is dropped on resume and its sample redone.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError, OutputError
from .base import Sample, Task
from .inputs import make_batch, open_rgb
from .records import JsonlWriter, ensure_writable, read_jsonl, write_json

SAMPLES = "samples.jsonl"
RESULTS = "results.json"
RUN = "run.json"
SHARDS = "shards"


@dataclass
class RunSettings:
    """How to run a task (everything but the task, the model and the methods)."""

    batch_size: int = 1
    max_new_tokens: int | None = None  # None: the task's default
    limit: int | None = None
    seed: int = 0
    resume: bool = False
    skip_missing: bool = False
    progress: bool = True
    do_sample: bool = False  # greedy unless asked; sampling draws from torch's RNG seeded with ``seed``
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # None: the model's generation config (transformers' default is 50); 0: no top-k

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise DataError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"--limit must be >= 1, got {self.limit}")
        if (self.temperature is not None or self.top_p is not None or self.top_k is not None) and not self.do_sample:
            raise DataError("--temperature/--top-p/--top-k need --do-sample (decoding is greedy otherwise)")
        if self.temperature is not None and self.temperature <= 0:
            raise DataError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DataError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise DataError(f"--top-k must be an integer >= 0 (0: no top-k filter), got {self.top_k!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"do_sample": self.do_sample}
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        if self.top_p is not None:
            kw["top_p"] = self.top_p
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        return kw


# -- data parallel --------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: torch.device | None = None


def _dist() -> Dist:
    """Rank and world size under ``accelerate launch`` / torchrun (env WORLD_SIZE > 1), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Dist(state.process_index, state.num_processes, state.wait_for_everyone, state.device)


# -- helpers --------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("attnkit", "torch", "transformers", "accelerate", "datasets", "pycocotools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _open_image(sample: Sample) -> Any:
    """The sample's image as RGB PIL; unreadable files are a DataError naming the id and the path."""
    src = sample.image
    if callable(src) and not hasattr(src, "convert"):
        src = src()
    return open_rgb(src, f"question {sample.id}: ")


def _is_path(image: Any) -> bool:
    return isinstance(image, (str, os.PathLike))


def _new_tokens(out: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """generate() returns prompt + new tokens for most models; some return only the new ones."""
    n = input_ids.shape[1]
    if out.shape[1] > n and torch.equal(out[:, :n].to(input_ids.device), input_ids):
        return out[:, n:]
    return out


def _method_record(methods: list[Any]) -> list[dict[str, Any]]:
    return [{"name": m.name, "config": m.config.to_dict()} for m in methods]


def _existing(out_dir: Path, rank: int, world: int) -> list[dict[str, Any]]:
    """Records already logged in the output dir (main file + every shard file); repairs own torn tails."""
    records = read_jsonl(out_dir / SAMPLES, repair=rank == 0)
    shard_dir = out_dir / SHARDS
    if shard_dir.is_dir():
        for f in sorted(shard_dir.glob("rank*.jsonl")):
            records += read_jsonl(f, repair=world > 1 and f.name == f"rank{rank}.jsonl")
    return records


def _check_resume(out_dir: Path, run_info: dict[str, Any], resume: bool) -> None:
    has_samples = (out_dir / SAMPLES).exists() or any((out_dir / SHARDS).glob("rank*.jsonl"))
    if has_samples and not resume:
        raise OutputError(f"{out_dir} already holds a run ({SAMPLES}); pass --resume to continue it or choose another --output")
    prev_path = out_dir / RUN
    if resume and prev_path.exists():
        import json

        try:
            prev = json.loads(prev_path.read_text())
        except ValueError:
            raise DataError(f"{prev_path}: invalid JSON; cannot check what run --resume would continue") from None
        for key in ("model", "methods", "task", "max_new_tokens", "generation"):
            if prev.get(key) != run_info.get(key):
                raise OutputError(
                    f"--resume: {out_dir} holds a run with a different {key} "
                    f"({prev.get(key)!r} != {run_info.get(key)!r}); choose another --output"
                )


# -- the run --------------------------------------------------------------------------------------
def run_task(
    task: Task,
    model: torch.nn.Module,
    processor: Any,
    methods: list[Any],
    output_dir: str | Path,
    settings: RunSettings | None = None,
    *,
    model_id: str = "",
    config: dict[str, Any] | None = None,
    print_summary: bool = True,
) -> dict[str, Any] | None:
    """Run ``task`` on ``model`` wrapped with ``methods`` (Method objects; empty = unwrapped model).

    A pipeline method (``pipeline = True``, registered with ``register_pipeline``, e.g. CARVE) runs alone:
    per sample ``method.run(model, processor, image, question, max_new_tokens=..., **generation)`` gives the
    output text, on the unwrapped model (batch_size is ignored; tasks that observe attention refuse it).

    Returns the results dict on rank 0 (None on other ranks). ``config`` is the caller's full resolved
    configuration (e.g. the CLI arguments), recorded in results.json.
    """
    import attnkit

    settings = settings or RunSettings()
    dist = _dist()
    out_dir = Path(output_dir)
    # Every rank runs the same read-only checks, so a bad input stops all of them (none waits
    # at a barrier for a rank that has already failed); only rank 0 writes before generation.
    ensure_writable(out_dir)

    samples = task.load()
    if settings.limit is not None:
        samples = samples[: settings.limit]
    if not samples:
        raise DataError(f"task {task.name}: the dataset is empty")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"task {task.name}: question id {dup!r} appears more than once")

    max_new = settings.max_new_tokens or task.default_max_new_tokens
    run_info = {
        "model": model_id,
        "methods": _method_record(methods),
        "task": task.config(),
        "max_new_tokens": max_new,
        "generation": settings.generate_kwargs(),
        "seed": settings.seed,
    }
    _check_resume(out_dir, run_info, settings.resume)
    missing = [s.id for s in samples if _is_path(s.image) and not Path(s.image).is_file()]
    if missing and not settings.skip_missing:
        first = next(s for s in samples if s.id == missing[0])
        more = f" (and {len(missing) - 1} more; --skip-missing skips them)" if len(missing) > 1 else ""
        raise DataError(f"question {first.id}: image file not found: {first.image}{more}")
    missing_set = set(missing)
    dist.barrier()
    if dist.rank == 0 and not (out_dir / RUN).exists():
        write_json(out_dir / RUN, run_info)

    done = {r["id"] for r in _existing(out_dir, dist.rank, dist.world)}
    dist.barrier()  # every rank has read the same done-set before anyone appends
    pending = [s for s in samples if s.id not in done and s.id not in missing_set]
    mine = pending[dist.rank :: dist.world]

    if dist.world > 1:
        (out_dir / SHARDS).mkdir(exist_ok=True)
        log_path = out_dir / SHARDS / f"rank{dist.rank}.jsonl"
    else:
        log_path = out_dir / SAMPLES

    torch.manual_seed(settings.seed)
    if dist.device is not None and getattr(model, "hf_device_map", None) is None:
        model.to(dist.device)
    adapter = attnkit.get_adapter(model)
    observer = task.observer(adapter, processor)
    pipelines = [m for m in methods if getattr(m, "pipeline", False)]
    if pipelines and (len(methods) > 1 or observer is not None):
        what = "other methods" if len(methods) > 1 else f"task {task.name} (it observes the attention)"
        raise DataError(f"method {pipelines[0].name} runs its own passes per sample; it cannot run with {what}")
    for m in methods:
        use = getattr(m, "use_processor", None)  # Method.use_processor (ICD tokenises its instruction)
        if callable(use):
            use(processor)
    active = list(methods) + ([observer] if observer is not None else [])
    handle = attnkit.wrap(model, active) if active and not pipelines else None
    started = time.time()
    generated = 0
    writer = JsonlWriter(log_path)
    try:
        if pipelines:
            generated = _run_pipeline(task, model, processor, pipelines[0], mine, writer, max_new, settings, dist)
        else:
            generated = _generate_all(task, model, processor, adapter, observer, mine, writer, max_new, settings, dist)
    finally:
        writer.close()
        if handle is not None:
            handle.remove()
    elapsed = time.time() - started

    dist.barrier()
    if dist.rank != 0:
        return None
    return _finish(task, samples, missing, done, out_dir, run_info, settings, dist, model_id, config,
                   methods, generated, elapsed, print_summary)


def _generate_all(task, model, processor, adapter, observer, mine, writer, max_new, settings, dist) -> int:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    bar = tqdm(total=len(mine), unit="sample", desc=f"{task.name}", disable=not settings.progress or dist.rank != 0,
               dynamic_ncols=True)
    count = 0
    try:
        for start in range(0, len(mine), settings.batch_size):
            chunk = mine[start : start + settings.batch_size]
            images = [_open_image(s) for s in chunk]
            batch = make_batch(processor, adapter, [s.question for s in chunk], images)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new, **settings.generate_kwargs())
            new = _new_tokens(out, batch["input_ids"])
            texts = processor.batch_decode(new, skip_special_tokens=True)
            extras = task.collect(observer, chunk, batch, new, adapter) if observer is not None else None
            for i, (sample, text) in enumerate(zip(chunk, texts)):
                record = _record(task, sample, text)
                if extras is not None:
                    record.update(extras[i])
                writer.write(record)
            count += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
    return count


def _record(task: Task, sample: Sample, text: str) -> dict[str, Any]:
    text = text.strip()
    record = {"id": sample.id, "prompt": sample.question, "output": text, "parsed": task.parse(text),
              "label": sample.label, "meta": sample.meta}
    if _is_path(sample.image):  # where the image is (attnkit report shows it)
        record["image"] = str(sample.image)
    return record


def _run_pipeline(task, model, processor, method, mine, writer, max_new, settings, dist) -> int:
    """A pipeline method, one sample at a time: ``method.run`` gives each output text."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), unit="sample", desc=f"{task.name} ({method.name})",
               disable=not settings.progress or dist.rank != 0, dynamic_ncols=True)
    try:
        for sample in mine:
            text = method.run(model, processor, _open_image(sample), sample.question, max_new_tokens=max_new,
                              **settings.generate_kwargs())
            writer.write(_record(task, sample, text))
            bar.update(1)
    finally:
        bar.close()
    return len(mine)


def _finish(task, samples, missing, done_before, out_dir, run_info, settings, dist, model_id, config, methods,
            generated, elapsed, print_summary) -> dict[str, Any]:
    records = _existing(out_dir, 0, 1)
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id.setdefault(r["id"], r)
    wanted = [s.id for s in samples if s.id in by_id]
    ordered = [by_id[i] for i in wanted]
    if dist.world > 1 or (out_dir / SHARDS).is_dir():
        # merge shards into samples.jsonl (dataset order, then any ids from other runs), then drop them
        rest = [r for i, r in by_id.items() if i not in set(wanted)]
        write_json(out_dir / SAMPLES, ordered + rest)
        for f in (out_dir / SHARDS).glob("rank*.jsonl"):
            f.unlink()
        try:
            (out_dir / SHARDS).rmdir()
        except OSError:
            pass
    not_done = len(samples) - len(missing) - len(ordered)
    if not ordered:
        raise DataError(f"task {task.name}: no sample could be run (all {len(missing)} images missing)")
    metrics = task.score(ordered)
    results = {
        "task": task.name,
        "model": model_id,
        "methods": run_info["methods"],
        "metrics": metrics,
        "counts": {
            "samples": len(samples),
            "scored": len(ordered),
            "skipped_missing_image": len(missing),
            "not_run": not_done,
            "from_previous_runs": len(done_before & set(wanted)),
            "generated_this_run": generated,
        },
        "missing_images": missing,
        "seed": settings.seed,
        "config": {
            "run": asdict(settings) | {"max_new_tokens": run_info["max_new_tokens"], "processes": dist.world},
            "task": task.config(),
            "cli": config or {},
        },
        "versions": package_versions(),
        "timing": {
            "seconds_this_run": round(elapsed, 3),
            "samples_per_second": round(generated / elapsed, 4) if elapsed > 0 and generated else None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "command": " ".join(sys.argv),
    }
    for name, obj in task.extra_outputs(ordered).items():
        write_json(out_dir / name, obj)
    write_json(out_dir / RESULTS, results)
    if print_summary:
        head = f"**{task.name}** · model `{model_id or '?'}` · methods {', '.join(m.name for m in methods) or 'none'}"
        counts = f"{len(ordered)} scored, {len(missing)} skipped (missing image)"
        print(f"\n{head} · {counts}\n\n{task.summary(metrics)}\n\nwritten: {out_dir / RESULTS}")
    return results
