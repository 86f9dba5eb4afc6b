"""Command-line front: ``attnkit list``, ``demo``, ``eval`` (run a task), ``reproduce`` (a paper's table from a
config), ``chair`` (score captions), ``pope`` (score yes/no answers made elsewhere), ``heads`` (VHR's head
divergence of one image and prompt), ``calibrate`` (sink dims, head table), ``report`` (a run directory as one
HTML file) and ``viz`` (attention maps over the image)."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

from .errors import AttnkitError


def _split_pair(pair: str) -> tuple[str, str]:
    if "=" not in pair:
        raise AttnkitError(f"--method-arg {pair!r}: expected key=value")
    k, v = pair.split("=", 1)
    return k.strip(), v


def _parse_method_args(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` strings -> kwargs, values guessed as int, float, bool, None or left as strings (untyped;
    ``_make_methods`` parses each value by the type of the config field it sets)."""
    from .options import guess_value

    return {k: guess_value(v) for k, v in map(_split_pair, pairs)}


def cmd_list(args: argparse.Namespace) -> int:
    import attnkit

    from .eval import list_tasks
    from .methods.registry import list_pipelines

    if not args.verbose:
        print("methods:  " + ", ".join(attnkit.list_methods()))
        print("pipelines: " + ", ".join(list_pipelines()) + " (attnkit eval --method NAME; not for wrap())")
        print("families: " + ", ".join(attnkit.list_models()))
        print("tasks:    " + ", ".join(list_tasks()))
        return 0
    print("families: " + ", ".join(attnkit.list_models()))
    print()
    print(_methods_help([*attnkit.list_methods(), *list_pipelines()]))
    print()
    print(_tasks_help(list_tasks()))
    return 0


def _spec_lines(specs: list[Any], flag: Any) -> list[str]:
    if not specs:
        return ["    (no options)"]
    return [f"    {flag(s)}\n        {s.help_line()}" for s in specs]


def _methods_help(names: list[str]) -> str:
    """Each method's options: ``--method-arg NAME.FIELD=VALUE`` or ``--NAME.FIELD VALUE``, with help and range."""
    from .methods.registry import get_method_or_pipeline_class

    out = ["method options (--method-arg [NAME.]FIELD=VALUE or --NAME.FIELD VALUE):"]
    for n in names:
        cls = get_method_or_pipeline_class(n)
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        out.append(f"  {n}: {doc}" if doc else f"  {n}:")
        out += _spec_lines(cls.Config.options(), lambda s, n=n: f"{n}.{s.name}=")
    return "\n".join(out)


def _tasks_help(names: list[str]) -> str:
    from .eval import get_task_class
    from .options import option_specs

    out = ["task options (attnkit eval --task NAME --FLAG VALUE):"]
    for n in names:
        cls = get_task_class(n)
        out.append(f"  {n}: {cls.description}" if cls.description else f"  {n}:")
        out += _spec_lines(option_specs(cls.Options), lambda s: s.flag if s.is_flag else f"{s.flag} VALUE")
    return "\n".join(out)


def _method_value(method: str, cls: Any, field: str, text: str) -> Any:
    """``text`` parsed by the declared type of ``field`` of ``cls.Config``; one-line MethodArgumentError if it does not parse."""
    from .errors import MethodArgumentError
    from .options import bad_value

    spec = next(s for s in cls.Config.options() if s.name == field)
    try:
        value = spec.parse(text)
    except ValueError:
        raise MethodArgumentError(bad_value(method, spec, text)) from None
    # a field that takes a structured value or a file's path (VAR sink_dims, ACT/VHR heads): text that parses
    # as neither and names no file is a malformed value, not a missing file
    if isinstance(value, str) and _takes_structure(spec.type) and not Path(value).expanduser().exists():
        raise MethodArgumentError(f"{bad_value(method, spec, text)}, or the path of a file (none of that name)")
    return value


def _takes_structure(tp: Any) -> bool:
    """Whether a declared type admits a list, tuple or dict (alone or in a union)."""
    import typing

    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(typing.get_origin(a) in (list, tuple, dict) or a in (list, tuple, dict) for a in args)


def _make_methods(names: str | None, pairs: list[str]) -> list[Any]:
    """``--method a,b`` with ``--method-arg [name.]k=v`` -> Method objects (``none`` or empty: no method).

    A bare ``k=v`` goes to every listed method that has the field ``k``; ``name.k=v`` to that one.
    Each value is parsed by the declared type of the field it sets (see ``attnkit.options``).
    """
    import dataclasses

    from .errors import MethodArgumentError
    from .methods.registry import get_method_or_pipeline_class

    listed = [n.strip().lower() for n in (names or "").split(",") if n.strip() and n.strip().lower() != "none"]
    classes = [get_method_or_pipeline_class(n) for n in listed]
    kwargs: list[dict[str, Any]] = [{} for _ in listed]
    for key, text in map(_split_pair, pairs):
        target, _, field = key.rpartition(".")
        target = target.lower()
        hit = False
        for i, (n, cls) in enumerate(zip(listed, classes)):
            fields = {f.name for f in dataclasses.fields(cls.Config)}
            name = field if field in fields or field.replace("-", "_") not in fields else field.replace("-", "_")
            if (target and target == n) or (not target and name in fields):
                kwargs[i][name] = _method_value(n, cls, name, text) if name in fields else text
                hit = True
        if not hit:
            if not listed:
                raise MethodArgumentError(f"--method-arg {key}: no --method given")
            if target and target not in listed:
                raise MethodArgumentError(f"--method-arg {key}: method {target!r} is not in --method {names}")
            valid = sorted({f.name for cls in classes for f in dataclasses.fields(cls.Config)})
            raise MethodArgumentError(
                f"{', '.join(listed)}: unknown argument {field!r} (valid: {', '.join(valid) or 'none'})"
            )
    return [cls(**kw) for cls, kw in zip(classes, kwargs)]


# Flags of `attnkit eval` added from declarations: a task option FIELD is --FIELD (dest FIELD), a
# method option is --METHOD.FIELD (dest below). Values arrive as raw text (None: not given) and are
# parsed by the field's type in cmd_eval, so one flag can serve several tasks that declare it.
_METHOD_DEST = "method_option:"


def _task_options(name: str, args: argparse.Namespace) -> Any:
    """The chosen task's Options from the raw flag values (typed, range-checked); warns about flags
    that belong to other tasks only (ignored, as before)."""
    from .eval import get_task_class, list_tasks
    from .options import bad_value, option_specs

    cls = get_task_class(name)
    specs = option_specs(cls.Options)
    values: dict[str, Any] = {}
    for spec in specs:
        raw = getattr(args, spec.name, None)
        if raw is None:
            continue
        if isinstance(raw, bool):
            value = raw
        else:
            try:
                value = spec.parse(raw)
            except ValueError:
                raise AttnkitError(bad_value(cls.name, spec, raw)) from None
        problem = spec.check(value)
        if problem:
            raise AttnkitError(f"{cls.name}: {problem}")
        values[spec.name] = value
    mine = {s.name for s in specs}
    for other in list_tasks():
        for spec in option_specs(get_task_class(other).Options):
            if spec.name not in mine and getattr(args, spec.name, None) is not None:
                print(f"attnkit: warning: {spec.flag} is a {other} option; --task {name} ignores it", file=sys.stderr)
                mine.add(spec.name)
    options = cls.Options(**values)
    for spec in specs:  # the resolved values go into results.json
        setattr(args, spec.name, getattr(options, spec.name))
    return options


def _all_task_fields() -> set[str]:
    from .eval import get_task_class, list_tasks
    from .options import option_specs

    return {s.name for t in list_tasks() for s in option_specs(get_task_class(t).Options)}


def _add_declared_flags(e: argparse.ArgumentParser, task: str | None, methods: list[str]) -> None:
    """Add every registered task's option flags and every method's ``--METHOD.FIELD`` flags to the eval
    parser; those of the chosen ``--task`` / ``--method`` are shown in ``--help``, the rest hidden."""
    import attnkit

    from .eval import get_task_class, list_tasks
    from .options import option_specs

    tasks = list_tasks()
    chosen = task if task in tasks else None
    reserved = {a.dest for a in e._actions}
    added: set[str] = set()
    group = e.add_argument_group(f"{chosen} options (--task {chosen})") if chosen else None
    for name in ([chosen] if chosen else []) + [t for t in tasks if t != chosen]:
        for spec in option_specs(get_task_class(name).Options):
            if spec.name in added:
                continue
            if spec.name in reserved:
                if name == chosen:
                    raise AttnkitError(f"task {name!r}: option {spec.name!r} clashes with the general flag "
                                       f"--{spec.name.replace('_', '-')}")
                continue
            added.add(spec.name)
            shown = name == chosen
            target = group if shown and group is not None else e
            kw: dict[str, Any] = {"dest": spec.name, "default": None,
                                  "help": spec.help_line() if shown else argparse.SUPPRESS}
            if spec.is_flag:
                target.add_argument(spec.flag, action="store_const", const=True, **kw)
            else:
                target.add_argument(spec.flag, metavar=spec.name.upper(), **kw)
    from .methods.registry import get_method_or_pipeline_class, list_pipelines

    for name in [*attnkit.list_methods(), *list_pipelines()]:
        cls = get_method_or_pipeline_class(name)
        shown = name in methods
        mgroup = e.add_argument_group(f"{name} options (--method {name}; or --method-arg {name}.FIELD=VALUE)") \
            if shown else e
        for spec in cls.Config.options():
            dest = f"{_METHOD_DEST}{name}.{spec.name}"
            mgroup.add_argument(f"--{name}.{spec.name.replace('_', '-')}", dest=dest, default=None,
                                metavar=spec.name.upper(), help=spec.help_line() if shown else argparse.SUPPRESS)
            if "_" in spec.name:  # the --method-arg spelling too, unlisted
                e.add_argument(f"--{name}.{spec.name}", dest=dest, default=None, help=argparse.SUPPRESS)


def _prescan(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--task`` and ``--method`` of an ``eval`` command line, before the full parse (they choose flags and help)."""
    if not argv or argv[0] != "eval":
        return None, []
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default=None)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv[1:])
    methods = [m.strip().lower() for m in (known.method or "").split(",") if m.strip()]
    return (known.task.strip().lower() if known.task else None), methods


def _make_task(args: argparse.Namespace) -> Any:
    """The task of ``--task`` built from its declared options (the testbed's bundled data with ``--model testbed``)."""
    from .eval import get_task_class
    from .eval.registry import task_for_model

    cls = get_task_class(args.task)
    options = _task_options(cls.name, args)
    return task_for_model(cls.name, options, seed=args.seed, model_id=args.model)


def _method_flag_pairs(args: argparse.Namespace) -> list[str]:
    """``--METHOD.FIELD VALUE`` flags as ``METHOD.FIELD=VALUE`` pairs (after the --method-arg ones, so they win)."""
    return [f"{dest[len(_METHOD_DEST):]}={v}" for dest, v in vars(args).items()
            if dest.startswith(_METHOD_DEST) and v is not None]


def cmd_eval(args: argparse.Namespace) -> int:
    """Run a benchmark task through a model wrapped with the given methods."""
    from .eval.runner import RunSettings, run_task

    task = _make_task(args)
    methods = _make_methods(args.method, [*args.method_arg, *_method_flag_pairs(args)])
    settings = RunSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                           seed=args.seed, resume=args.resume, skip_missing=args.skip_missing,
                           progress=not args.no_progress, do_sample=args.do_sample,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    model, processor = _load(args, seed=args.seed)
    from .eval import get_task_class
    from .options import option_specs

    # other tasks' flags (not given) and the --METHOD.FIELD flags (as pairs) left out of the record
    others = _all_task_fields() - {s.name for s in option_specs(get_task_class(args.task).Options)}
    config = {k: v for k, v in vars(args).items()
              if k != "func" and not k.startswith(_METHOD_DEST) and not (k in others and v is None)}
    if _method_flag_pairs(args):
        config["method_flags"] = _method_flag_pairs(args)
    run_task(task, model, processor, methods, args.output, settings, model_id=args.model, config=config)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Run a paper-table config (``configs/*.yaml``): every row on every task and seed, then table.md/table.json."""
    from .eval import reproduce

    config = reproduce.load_config(reproduce.find_config(args.config))
    rows = [r.strip() for r in (args.rows or "").split(",") if r.strip()] or None
    if args.limit is not None and args.limit < 1:
        raise AttnkitError(f"--limit must be >= 1, got {args.limit}")
    reproduce.select_rows(config, rows)  # unknown --rows names fail before anything else
    if args.dry_run:
        print(reproduce.describe_plan(config, limit=args.limit, rows=rows, output=args.output))
        return 0
    if args.output is None:
        raise AttnkitError("reproduce: --output DIR is required (the runs and the table are written there); "
                           "--dry-run prints the plan without it")
    table = reproduce.run(config, args.output, limit=args.limit, rows=rows, progress=not args.no_progress)

    print(reproduce.table_markdown(table))
    print(f"written: {Path(args.output) / reproduce.TABLE_MD}, {Path(args.output) / reproduce.TABLE_JSON}")
    return 0


def cmd_build_pope(args: argparse.Namespace) -> int:
    """Build POPE question files from a COCO-format instances file."""
    from .eval.pope import build_pope

    try:
        files = build_pope(args.instances, args.output, source=args.source, num_images=args.num_images,
                           questions_per_image=args.questions_per_image, seed=args.seed,
                           splits=args.split.split(","))
    except ValueError as e:  # argument ranges
        if isinstance(e, AttnkitError):
            raise
        raise AttnkitError(str(e)) from None
    for split, path in files.items():
        print(f"{split}: {path}")
    return 0


def cmd_chair(args: argparse.Namespace) -> int:
    """Score captions produced elsewhere with CHAIR."""
    from .eval.chair import format_summary, score_file

    metrics, written = score_file(args.captions, args.annotations, split=args.split,
                                  image_id_key=args.image_id_key, caption_key=args.caption_key, output=args.output,
                                  vocab=args.vocab)
    print(format_summary(metrics))
    print(f"\nper-caption results: {written}")
    return 0


def cmd_pope(args: argparse.Namespace) -> int:
    """Score POPE answers produced elsewhere with one of the papers' answer rules."""
    import json

    from .eval.pope import PARSERS, format_summary, score_answers_file

    metrics, written = score_answers_file(args.answers, args.questions, parser=args.parser,
                                          answer_key=args.answer_key, output=args.output)
    if args.json:
        print(json.dumps(metrics))
        return 0
    rule = PARSERS[args.parser]
    n = metrics["average"]["n"]
    print(f"POPE, {n} answers, parser {rule.name}: {rule.rule}\n")
    print(format_summary(metrics, left_out=True if rule.name == "icd" else None))
    unanswered = {s: k for s, k in metrics.get("unanswered", {}).items() if k}
    if unanswered:
        print("\nquestions without an answer: " + ", ".join(f"{s} {k}" for s, k in unanswered.items()))
    print(f"\nper-answer results: {written}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The testbed on POPE-adversarial and CHAIR with every method (default), or a family's tiny random model."""
    if args.family is None:
        from .testbed import demo

        names = tuple(n.strip() for n in args.methods.split(",") if n.strip())
        from .methods.registry import get_method_class

        for n in names:
            if n != "none":
                get_method_class(n)  # unknown names fail before any work
        table = demo.run(names, pope_questions=args.pope_questions, chair_images=args.chair_images,
                         batch_size=args.batch_size, out_dir=args.output, progress=not args.no_progress,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
        print("testbed (attnkit's shipped toy VLM on its shapes set; see README, Testbed): POPE adversarial "
              f"({args.pope_questions} questions) and CHAIR ({args.chair_images} images), each method at its defaults "
              "(VisionZip 6+1 and HiPrune 21 tokens: their LLaVA-1.5 shares of 576 scaled to 64)\n")
        print(table)
        return 0
    return _demo_family(args)


def _demo_family(args: argparse.Namespace) -> int:
    """Greedy generation on a tiny offline random model, without and with a method, both outputs printed."""
    import torch

    import attnkit
    from attnkit import testing

    if args.family not in testing.FAMILIES:
        raise AttnkitError(f"unknown family {args.family!r} (valid: {', '.join(testing.FAMILIES)})")
    made = _make_methods(args.method, args.method_arg)
    if len(made) != 1:
        raise AttnkitError(f"--method {args.method}: --family takes exactly one method")
    method = made[0]
    model, inputs = testing.tiny_model(args.family, seed=args.seed)
    processor = testing.tiny_processor(args.family)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**inputs, **gen)[:, prompt_len:]
        with attnkit.wrap(model, method):
            wrapped = model.generate(**inputs, **gen)[:, prompt_len:]
    print(f"tiny:{args.family} (random weights, so the words are noise), method {method!r}")
    for r in range(plain.shape[0]):
        print(f"row {r} unwrapped: {processor.decode(plain[r], skip_special_tokens=True)!r}")
        print(f"row {r} {method.name:>9}: {processor.decode(wrapped[r], skip_special_tokens=True)!r}")
    same = bool(torch.equal(plain, wrapped))
    print(f"identical outputs: {same}")
    return 0


def _read_image(path: str) -> Any:
    """The image at ``path`` as RGB PIL; DataError naming the file when it is missing or unreadable."""
    from .eval.inputs import open_rgb

    return open_rgb(path)


def _output_dir(path: str) -> Any:
    """``--out`` checked before any work: a directory, or a name whose parent directory exists."""

    from .errors import OutputError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output dir {out} exists and is not a directory")
    if not out.exists() and not out.parent.is_dir():
        raise OutputError(f"output dir {out}: its parent directory {out.parent} does not exist")
    return out


def cmd_heads(args: argparse.Namespace) -> int:
    """VHR's vision-aware head divergence of one (image, prompt): heads.json and heads.png in --out."""
    import attnkit

    from .errors import OutputError
    from .eval.inputs import make_batch
    from .inspect.heads import head_report, render_heatmap, save_heads_json

    out = _output_dir(args.out)
    image = _read_image(args.image)
    model, processor = _load(args)
    batch = make_batch(processor, attnkit.get_adapter(model), [args.prompt], [image])
    report = head_report(model, batch, alpha=args.alpha, last_layers=args.last_layers,
                         outlier_filter=not args.no_outlier_filter)
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output dir {out}: {e.strerror or e}") from None
    json_path = save_heads_json(report, out / "heads.json", model=args.model, image=args.image, prompt=args.prompt)
    png_path = out / "heads.png"
    render_heatmap(report.vhd[0], report.heads[0], png_path)
    heads = report.selected(0)
    action = "reinforced" if report.alpha != 1.0 else "selected (not reinforced: --alpha 1)"
    filt = "on" if report.outlier_filter else "off"
    print(f"{args.model}: VHD of {report.num_layers} layers x {report.num_heads} heads "
          f"(alpha {report.alpha:g}, outlier filter {filt})")
    last = report.num_layers - 1
    span = f"layers {report.first_layer}-{last}" if report.first_layer < last else f"layer {last}"
    print(f"{action} heads per layer, {span} ({sum(map(len, heads.values()))} in all):")
    for layer in range(report.first_layer, report.num_layers):
        chosen = heads.get(layer, [])
        print(f"  layer {layer}: {len(chosen)} {chosen}")
    print(f"wrote {json_path}")
    print(f"wrote {png_path}")
    return 0


def _index_list(flag: str, text: str | None) -> list[int] | None:
    """``--layers`` / ``--heads`` text (``2,4,8-10``, ``-1``, ``all``) -> a list of ints, or None for all."""
    from .options import parse_text

    if text is None or text.strip().lower() in ("all", "none", ""):
        return None
    try:
        out = parse_text(list[int], text)
    except ValueError:
        raise AttnkitError(f"{flag} {text!r}: expected indices such as 2,4,8-10 (or all)") from None
    if not out:
        raise AttnkitError(f"{flag} {text!r}: expected indices such as 2,4,8-10 (or all)")
    return out


def cmd_viz(args: argparse.Namespace) -> int:
    """Attention maps of one (image, prompt) over the image, before and after --method: PNGs and viz.json."""
    import json
    import re

    import attnkit

    from .errors import OutputError
    from .eval.inputs import make_batch
    from .inspect.maps import attention_map
    from .inspect.render import render_maps, render_shares
    from .inspect.heads import _atomic_write

    out = _output_dir(args.out)
    image = _read_image(args.image)
    layers = _index_list("--layers", args.layers)
    heads = _index_list("--heads", args.heads)

    sink_dims: Any = args.sink_dims  # a file of attnkit calibrate sinks, or a list
    if sink_dims is not None and not Path(sink_dims).is_file():
        sink_dims = _index_list("--sink-dims", sink_dims)
    methods = _make_methods(",".join(args.method), args.method_arg)  # unknown names fail before loading
    if args.max_new_tokens < 1:
        raise AttnkitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, processor = _load(args)
    batch = make_batch(processor, attnkit.get_adapter(model), [args.prompt], [image])
    common = dict(layers=layers, heads=heads, token=args.token, processor=processor, image_size=image.size,
                  max_new_tokens=args.max_new_tokens, sink_tau=args.sink_tau, sink_dims=sink_dims)
    before = attention_map(model, batch, **common)
    after = attention_map(model, batch, methods=methods, **common) if methods else None
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output dir {out}: {e.strerror or e}") from None
    label = "+".join(m.name for m in methods) or None
    written = [out / "maps.png", out / "maps_mean.png", out / "shares.png"]
    render_maps(before, image, after, path=written[0])
    render_maps(before, image, after, aggregate=True, path=written[1])
    render_shares(before.shares, after.shares if after else None, label=label or "after", path=written[2])
    tokenizer = getattr(processor, "tokenizer", processor)

    def answer(m: Any) -> str | None:
        return tokenizer.decode(m.tokens, skip_special_tokens=True) if m.token is None else None

    record: dict[str, Any] = {"model": args.model, "image": args.image, "prompt": args.prompt,
                              "image_size": list(image.size), "before": dict(before.to_dict(), answer=answer(before))}
    if after is not None:
        record["after"] = dict(after.to_dict(), answer=answer(after))
    # one line per innermost list of numbers (a grid row), the rest indented
    text = re.sub(r"\[\s+([-0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(record, indent=1)) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(out / "viz.json", write, "viz file")
    written.append(out / "viz.json")
    what = f"prompt token {before.token}" if before.token is not None else \
        f"the answer ({before.answer_steps} steps)"
    print(f"{args.model}: attention of {what} to the {tuple(before.mean.shape)} image grid, layers "
          f"{', '.join(map(str, before.layers))}; sinks: tau {before.sink_tau:g}, dims {before.sink_dims_source}")
    for name, m in (("before", before), (label, after)):
        if m is None:
            continue
        shares = m.shares.mean()
        said = answer(m)
        print(f"{name}: " + (f"answer {said!r}; " if said is not None else "") + "image share per layer "
              + " ".join(f"{v:.3f}" for v in shares["image"].tolist()))
    for path in written:
        print(f"wrote {path}")
    return 0


def _output_file(path: str, what: str) -> Any:
    """An output file path checked before any work: not a directory, its parent directory exists."""

    from .errors import OutputError

    out = Path(path)
    if out.is_dir():
        raise OutputError(f"{what} {out} is a directory")
    if not out.parent.is_dir():
        raise OutputError(f"{what} {out}: its parent directory {out.parent} does not exist")
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``attnkit calibrate sinks|heads``: see attnkit.inspect.calibrate."""
    from .inspect import calibrate as cal

    from .errors import DataError

    if args.n < 1:
        raise DataError(f"-n {args.n}: must be >= 1")
    prompt = args.prompt if args.prompt is not None else cal.DEFAULT_PROMPT
    sink_dims = getattr(args, "sink_dims", None)
    if sink_dims is not None and sink_dims.strip() and all(c in "0123456789,- " for c in sink_dims):
        from .options import parse_text

        try:
            sink_dims = parse_text(list[int], sink_dims)
        except ValueError:
            raise DataError(f"--sink-dims {sink_dims!r}: expected dimension indices (2533,1415) or a file") from None
    out = _output_file(args.out, f"{args.what} file")
    png = None
    if args.what == "heads" and args.png is not None:
        png = _output_file(args.png, "heat map")
    images = cal.list_images(args.images, args.n)
    model, processor = _load(args)
    if args.what == "sinks":
        calib = cal.calibrate_sinks(model, processor, images, prompt=prompt, n=args.n, tau=args.tau,
                                    min_layers=args.min_layers, max_token_share=args.max_token_share)
        path = cal.save_sinks_json(calib, out, model=args.model)
        print(f"{args.model}: {calib.samples} samples, {calib.num_layers} layers, hidden size {calib.hidden_size}, "
              f"tau {calib.tau:.4g}")
        if calib.dims:
            print(f"sink dimensions: {', '.join(map(str, calib.dims))}")
            for d in calib.dims:
                print(f"  dim {d}: above tau in {int(calib.layers_hit[d])}/{calib.num_layers} layers, "
                      f"max |normed| {float(calib.max_abs[:, d].max()):.4g} "
                      f"({float(calib.ratio[:, d].max()):.3g}x the median dimension), "
                      f"{float(calib.tokens_over[:, d].max()):.3g} tokens per sample above tau")
        else:
            print("sink dimensions: none found (no dimension where a few tokens exceed tau in enough layers)")
        print(f"wrote {path}")
        return 0
    calib = cal.calibrate_heads(model, processor, images, prompt=prompt, n=args.n, sink_dims=sink_dims,
                                tau=args.tau, last_layers=args.last_layers,
                                outlier_filter=not args.no_outlier_filter)
    written = cal.save_calibration_heads_json(calib, out, model=args.model, png=png if png is not None else True)
    heads = calib.selected()
    print(f"{args.model}: {calib.samples} samples, {calib.num_layers} layers x {calib.num_heads} heads; "
          f"sink dims {calib.sink_dims or 'none'} ({calib.sink_dims_source}), tau {calib.tau:.4g}")
    print(f"selected heads (VHR's rule on the mean VHD, layers {calib.first_layer}-{calib.num_layers - 1}; "
          f"{sum(map(len, heads.values()))} in all):")
    for layer in range(calib.first_layer, calib.num_layers):
        print(f"  layer {layer}: {heads.get(layer, [])}")
    for p in written:
        print(f"wrote {p}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML file of an eval (or reproduce) run directory."""
    from .inspect.report import find_runs, write_report

    out = _output_file(args.out, "report") if args.out is not None else None
    runs = find_runs(args.run_dir)
    path = write_report(args.run_dir, out)
    print(f"{len(runs)} run{'s' if len(runs) != 1 else ''}: wrote {path}")
    return 0


def _demo_methods() -> tuple[str, ...]:
    from .testbed.demo import DEFAULT_METHODS

    return DEFAULT_METHODS


def _add_image_prompt_flags(p: argparse.ArgumentParser) -> None:
    """--model, --image and --prompt of the one-image commands (heads, viz)."""
    p.add_argument("--model", required=True, help="hub id, local path, testbed or tiny:FAMILY")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question or instruction (the model's chat template wraps it)")


def _add_loading_flags(p: argparse.ArgumentParser) -> None:
    """--dtype, --device-map and --trust-remote-code: how every command that loads a model loads it."""
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--device-map", default=None)
    p.add_argument("--trust-remote-code", action="store_true")


def _load(args: argparse.Namespace, **kwargs: Any) -> tuple[Any, Any]:
    """(model, processor) from --model and the loading flags (attnkit.loading.load_model)."""
    from . import loading

    return loading.load_model(args.model, dtype=args.dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``attnkit: error: ...``, exit 2) instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        print(f"attnkit: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``argv`` (when given) picks the ``eval`` task and method options shown in ``--help``."""
    task, methods = _prescan(list(argv) if argv is not None else [])
    p = _Parser(prog="attnkit", description="Training-free attention methods for VLMs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="list methods, model families and tasks")
    ls.add_argument("--verbose", "-v", action="store_true", help="with every method's and task's options")
    ls.set_defaults(func=cmd_list)

    # The declared task and method flags import every method (torch): only for an eval command line
    # (or a parser asked for without one).
    declared = argv is None or bool(argv) and argv[0] == "eval"
    epilog = []
    if declared:
        import attnkit

        from .eval import list_tasks

        if task not in list_tasks():
            epilog.append(_tasks_help(list_tasks()))
        if not any(m in attnkit.list_methods() for m in methods):
            epilog.append(_methods_help(attnkit.list_methods()))
        epilog.append("values: lists 2,4,8-10; dicts 3:0,1;4:2; none; true/false; or JSON ([2, 4], "
                      "{\"3\": [0, 1]})")
    e = sub.add_parser("eval", help="run a registered task (pope, chair, grounding, ...) through a wrapped model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(epilog) or None)
    e.add_argument("--model", required=True,
                   help="hub id, local path, testbed (the shipped toy VLM; its data is the default) or tiny:FAMILY")
    e.add_argument("--method", default="none", help="method name(s), comma-separated; 'none' = unwrapped")
    e.add_argument("--method-arg", action="append", default=[], metavar="[NAME.]K=V")
    e.add_argument("--task", required=True, help="a registered task (attnkit list); its options are flags, "
                                                  "see attnkit eval --task NAME --help")
    e.add_argument("--limit", type=int, default=None, help="run only the first N samples")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (POPE 16, CHAIR 512)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (seeded by --seed)")
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--top-p", type=float, default=None)
    e.add_argument("--top-k", type=int, default=None,
                   help="with --do-sample: keep the K most likely tokens (0: no top-k filter; default: the model's "
                        "generation config, transformers' 50)")
    e.add_argument("--output", required=True, help="run directory (samples.jsonl, results.json)")
    e.add_argument("--resume", action="store_true", help="continue the run in --output, skipping logged ids")
    e.add_argument("--skip-missing", action="store_true", help="skip samples whose image file is missing")
    _add_loading_flags(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)
    if declared:
        _add_declared_flags(e, task, methods)

    r = sub.add_parser(
        "reproduce", help="reproduce a paper's table from a YAML config (configs/): every row, task and seed",
        description="Run every row of a config (the baseline and the methods, with their arguments) on every task "
                    "and seed through the eval runner, one directory per run (DIR/ROW/TASK/seedS, resumable: a "
                    "run that finished is not run again, a killed one continues), then write DIR/table.md and "
                    "DIR/table.json: per metric, the paper's number, ours (mean ± std over the seeds) and the "
                    "difference. The config format is in attnkit/eval/reproduce.py and the README.")
    r.add_argument("config", help="a YAML config: a path, or a name in configs/ (e.g. quickstart)")
    r.add_argument("--output", default=None, metavar="DIR", help="where the runs and the table go (required "
                                                                  "unless --dry-run)")
    r.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N samples of each run "
                                                                        "(a smoke test: not comparable with the paper)")
    r.add_argument("--rows", default=None, metavar="NAME,...", help="run only these rows (comma-separated)")
    r.add_argument("--dry-run", action="store_true", help="validate and print the plan (tasks, rows, runs, sample "
                                                          "counts, forward passes); loads no model")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_reproduce)

    c = sub.add_parser("chair", help="score captions produced elsewhere with CHAIR")
    c.add_argument("captions", help="JSONL (or JSON list) of {image_id, caption}")
    c.add_argument("--annotations", required=True, help="COCO annotations dir (instances_*.json, captions_*.json)")
    c.add_argument("--split", default="val2014")
    c.add_argument("--image-id-key", default="image_id")
    c.add_argument("--caption-key", default="caption")
    c.add_argument("--output", default=None, help="per-caption results (default CAPTIONS.chair.jsonl)")
    c.add_argument("--vocab", default=None,
                   help="vocabulary JSON ({category: [synonyms]}) of a non-COCO set (default COCO's)")
    c.set_defaults(func=cmd_chair)

    from .eval.pope import PARSERS

    pp = sub.add_parser("pope", help="score POPE yes/no answers produced elsewhere",
                        description="Score POPE answers made by another tool with attnkit's answer rule or the "
                                    "rule of a paper's script (--parser). Prints accuracy, precision, recall, F1 "
                                    "and yes ratio per split and their average; writes each answer's verdict.")
    pp.add_argument("answers", help="JSONL (or JSON list) of answers: a question id (question_id or id), the "
                                    "answer text (--answer-key), optionally label and split")
    pp.add_argument("--questions", action="append", default=None, metavar="FILE_OR_DIR",
                    help="POPE question file, or a dir of {source}_pope_{split}.json files, giving the labels and "
                         "splits (repeatable; not needed when each answer has a label)")
    pp.add_argument("--parser", default="attnkit", choices=list(PARSERS),
                    help="answer rule: attnkit (default, attnkit's own), official (POPE/LLaVA), opera "
                         "(OPERA/PAI/HALC), vcd (VCD/AGLA), icd (ICD)")
    pp.add_argument("--answer-key", default="text", help="field of the answer text (default text, as LLaVA's "
                                                         "answer files; POPE's and OPERA's: answer)")
    pp.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    pp.add_argument("--output", default=None, help="per-answer results (default ANSWERS.pope.jsonl)")
    pp.set_defaults(func=cmd_pope)

    b = sub.add_parser("build-pope", help="build POPE question files from a COCO-format instances file")
    b.add_argument("instances", help="COCO-format instances JSON (e.g. annotations/instances_val2014.json)")
    b.add_argument("--output", required=True, help="directory for {source}_pope_{split}.json")
    b.add_argument("--source", default="coco", help="name used in the file names (coco, aokvqa, gqa)")
    b.add_argument("--split", default="all", help="random, popular, adversarial, comma list or all")
    b.add_argument("--num-images", type=int, default=500)
    b.add_argument("--questions-per-image", type=int, default=6)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_build_pope)

    d = sub.add_parser("demo", help="the testbed on POPE and CHAIR with every method (or --family: a tiny random model)")
    d.add_argument("--methods", default=",".join(_demo_methods()), help="testbed rows, comma-separated ('none' = unwrapped)")
    d.add_argument("--pope-questions", type=int, default=800, help="testbed: POPE-adversarial questions per row")
    d.add_argument("--chair-images", type=int, default=200, help="testbed: CHAIR images per row")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--output", default=None, help="testbed: keep each row's run directory here (default: a temp dir)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--family", default=None, help="instead: generate on this family's tiny random model")
    d.add_argument("--method", default="identity", help="with --family: the method to wrap with")
    d.add_argument("--method-arg", action="append", default=[], metavar="K=V")
    d.add_argument("--max-new-tokens", type=int, default=12)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    h = sub.add_parser(
        "heads", help="VHR's vision-aware head divergence of one image and prompt: heads.json and heads.png",
        description="One prefill of the model wrapped with VHR on the image and prompt. Writes DIR/heads.json "
                    "(vhd, vhd_raw, norm: layers x heads; heads: {layer: [heads]} VHR selects, readable "
                    "back by vhr's heads option; the settings) and DIR/heads.png (a heat map, layers x heads, "
                    "the selected heads outlined).")
    _add_image_prompt_flags(h)
    h.add_argument("--out", required=True, metavar="DIR", help="output directory (created; its parent must exist)")
    h.add_argument("--alpha", type=float, default=2.0,
                   help="VHR's reinforcement (default 2.0, VHR's): the outlined heads are exactly those VHR "
                        "reinforces, and layers after the first reinforced one are measured with it; with "
                        "--alpha 1 the scores are the model's own VHD (nothing reinforced)")
    h.add_argument("--last-layers", type=int, default=None, metavar="N",
                   help="VHR selects heads in the last N layers (default: the family's, 14 of 32 for LLaVA)")
    h.add_argument("--no-outlier-filter", action="store_true",
                   help="keep the VHD of heads whose VHD and image-free norm both exceed mean + std of their layer")
    _add_loading_flags(h)
    h.set_defaults(func=cmd_heads)

    v = sub.add_parser(
        "viz", help="attention maps of one image and prompt over the image, before and after --method: PNGs, JSON",
        description="Greedy-generates the answer (or, with --token, one prefill) with a read-only observer and "
                    "writes to DIR: maps.png (per chosen layer, the answer's attention to the image tokens over "
                    "the image; with --method, before and after side by side; visual sinks outlined, pruned "
                    "tokens grey), maps_mean.png (the mean over the chosen layers), shares.png (per layer, the "
                    "share of attention on image / text / sink tokens) and viz.json (the numbers).")
    _add_image_prompt_flags(v)
    v.add_argument("--method", action="append", default=[], metavar="NAME",
                   help="measure again under this method (repeat or comma-separate to compose); none: before only")
    v.add_argument("--method-arg", action="append", default=[], metavar="[NAME.]K=V")
    v.add_argument("--layers", default=None, help="layers drawn, e.g. 8-15 or 2,4,6 or -1 (default all)")
    v.add_argument("--heads", default=None, help="heads averaged, e.g. 0-7 (default all)")
    v.add_argument("--token", type=int, default=None, metavar="N",
                   help="observe prompt position N (negative: from the end) at prefill instead of the answer")
    v.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default 8; stops at EOS)")
    v.add_argument("--sink-tau", type=float, default=None,
                   help="VAR's sink threshold (default VAR's 20; small models need less: at most sqrt(hidden))")
    v.add_argument("--sink-dims", default=None, metavar="LIST|FILE",
                   help="sink dimensions (1415,2533) or a file of attnkit calibrate sinks (default VAR's: its "
                        "table, else found from the input)")
    v.add_argument("--out", required=True, metavar="DIR", help="output directory (created; its parent must exist)")
    _add_loading_flags(v)
    v.set_defaults(func=cmd_viz)

    cal = sub.add_parser("calibrate", help="calibrate a model: its sink dimensions (VAR) or a per-head table (VHR, ACT)")
    cal_sub = cal.add_subparsers(dest="what", required=True, parser_class=_Parser)
    for what, text, desc in (
        ("sinks", "the sink dimensions of the language model, with the evidence: a file for var's sink_dims",
         "Prefills of the first N images of DIR with one prompt; at each decoder layer's input, the RMS-normed "
         "hidden states (VAR's rule). A dimension is a sink dimension where, in at least --min-layers of the "
         "layers, between one token and --max-token-share of the tokens exceed --tau in at least half the "
         "samples. Writes FILE: sink_dims (var reads it: --var.sink-dims FILE) and the evidence per candidate "
         "dimension (per layer: max |normed|, ratio to the median dimension, tokens above tau)."),
        ("heads", "per (layer, head): image-attention share, visual-sink share, mean VHD; a head set for vhr and act",
         "Prefills of the first N images of DIR with one prompt. Per (layer, head): the image-attention share "
         "of the text tokens after the image, the share of it on visual sinks, the mean VHD (VHR's, alpha 1). "
         "Writes FILE (heads: VHR's rule on the mean VHD, readable by --vhr.heads FILE and --act.heads FILE; "
         "the three tables) and heat maps FILE-stem.png (VHD), .image.png, .sink.png."),
    ):
        c2 = cal_sub.add_parser(what, help=text, description=desc)
        c2.add_argument("--model", required=True, help="hub id, local path, testbed or tiny:FAMILY")
        c2.add_argument("--images", required=True, metavar="DIR", help="directory of images (the first N by name)")
        c2.add_argument("-n", type=int, default=20, metavar="N", help="number of images (default 20)")
        c2.add_argument("--prompt", default=None, help="the prompt of every prefill (default: "
                                                        "'Please describe this image in detail.')")
        c2.add_argument("--out", required=True, metavar="FILE", help="the JSON file to write")
        c2.add_argument("--tau", type=float, default=None,
                        help="sink threshold on |RMS-normed hidden| (default: VAR's 20, or 0.7 x sqrt(hidden "
                             "size) for models narrower than 817" + ("; heads: the sink file's" if what == "heads"
                                                                     else "") + ")")
        if what == "sinks":
            c2.add_argument("--min-layers", type=float, default=0.5, metavar="SHARE",
                            help="share of the layers where a sink dimension must show (default 0.5)")
            c2.add_argument("--max-token-share", type=float, default=0.1, metavar="SHARE",
                            help="most tokens of a sample above tau for a massive activation (default 0.1)")
        else:
            c2.add_argument("--sink-dims", default=None, metavar="LIST|FILE",
                            help="sink dimensions (2533,1415) or a file of attnkit calibrate sinks (default: VAR's "
                                 "table for known models, else calibrated on the same images)")
            c2.add_argument("--last-layers", type=int, default=None, metavar="N",
                            help="VHR selects heads in the last N layers (default: the family's)")
            c2.add_argument("--no-outlier-filter", action="store_true", help="VHD without VHR's outlier filter")
            c2.add_argument("--png", default=None, metavar="FILE",
                            help="the VHD heat map (default FILE-stem.png; the others next to it)")
        _add_loading_flags(c2)
        c2.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("report", help="a run directory (attnkit eval or reproduce) as one self-contained HTML file",
                       description="Metrics and, per sample, the image (thumbnail), question, answer, label or "
                                   "hallucinated objects and the grounding overlay; a filter to the wrong answers. "
                                   "Images are embedded: the file opens from disk with no server or network.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="an attnkit eval --output dir, or a dir with run dirs below it")
    r.add_argument("--out", default=None, metavar="FILE", help="the HTML file (default RUN_DIR/report.html)")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return args.func(args)
    except AttnkitError as e:
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnkit: interrupted (an eval run continues with --resume, a reproduce run when started again)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
