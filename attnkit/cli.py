"""Command-line front: ``attnkit list``, ``demo``, ``eval`` (run a task) and ``chair`` (score captions)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import AttnkitError


def _parse_method_args(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` strings -> kwargs, values parsed as int, float, bool, None or left as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise AttnkitError(f"--method-arg {pair!r}: expected key=value")
        k, v = pair.split("=", 1)
        lowered = v.strip().lower()
        val: Any = v
        if lowered in ("true", "false"):
            val = lowered == "true"
        elif lowered in ("none", "null"):
            val = None
        else:
            for conv in (int, float):
                try:
                    val = conv(v)
                    break
                except ValueError:
                    pass
        out[k.strip()] = val
    return out


def cmd_list(args: argparse.Namespace) -> int:
    import attnkit

    from .eval import TASKS

    print("methods:  " + ", ".join(attnkit.list_methods()))
    print("families: " + ", ".join(attnkit.list_models()))
    print("tasks:    " + ", ".join(TASKS))
    return 0


def _parse_layers(text: str | None) -> list[int] | None:
    """"8-15" or "2,4,6" or "2,8-10" -> sorted layer indices; None or "all" -> None."""
    if text is None or text.strip().lower() == "all":
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise AttnkitError(f"--layers {text!r}: expected indices like 8-15 or 2,4,6") from None
    return sorted(out)


def _make_methods(names: str | None, pairs: list[str]) -> list[Any]:
    """``--method a,b`` with ``--method-arg [name.]k=v`` -> Method objects (``none`` or empty: no method).

    A bare ``k=v`` goes to every listed method that has the field ``k``; ``name.k=v`` to that one.
    """
    import dataclasses

    from .errors import MethodArgumentError
    from .methods.registry import get_method_class, make_method

    listed = [n.strip() for n in (names or "").split(",") if n.strip() and n.strip().lower() != "none"]
    classes = [get_method_class(n) for n in listed]
    kwargs: list[dict[str, Any]] = [{} for _ in listed]
    for key, value in _parse_method_args(pairs).items():
        target, _, field = key.rpartition(".")
        hit = False
        for i, (n, cls) in enumerate(zip(listed, classes)):
            fields = {f.name for f in dataclasses.fields(cls.Config)}
            if (target and target == n) or (not target and field in fields):
                kwargs[i][field] = value
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
    return [make_method(n, **kw) for n, kw in zip(listed, kwargs)]


def _make_task(args: argparse.Namespace) -> Any:
    from .eval import TASKS

    name = args.task
    if name not in TASKS:
        raise AttnkitError(f"unknown task {name!r} (valid: {', '.join(TASKS)})")
    if args.model == "testbed" and args.data_dir is None and args.annotations is None:
        return _testbed_task(args)
    if name == "pope":
        from .eval.pope import PopeTask

        if args.data_dir is None:
            raise AttnkitError("--task pope needs --data-dir (question files or the lmms-lab/POPE dataset)")
        kw: dict[str, Any] = {"source": args.source or "coco", "splits": (args.split or "adversarial").split(","),
                              "image_dir": args.image_dir, "strict": args.strict}
        if args.suffix is not None:
            kw["suffix"] = args.suffix
        return PopeTask(args.data_dir, **kw)
    annotations = args.annotations or args.data_dir
    if annotations is None:
        raise AttnkitError(f"--task {name} needs --annotations (the COCO annotations dir)")
    split = args.split or "val2014"
    if name == "chair":
        from .eval.chair import ChairTask

        return ChairTask(annotations, args.image_dir, split=split, num_images=args.num_images, seed=args.seed,
                         vocab=args.vocab)
    from .eval.grounding import GroundingTask

    kw = {"split": split, "refs": args.refs, "layers": _parse_layers(args.layers)}
    if args.suffix is not None:
        kw["suffix"] = args.suffix
    return GroundingTask(annotations, args.image_dir, **kw)


def _testbed_task(args: argparse.Namespace) -> Any:
    """The task on the testbed's bundled val data (``--model testbed`` without a data dir)."""
    from . import testbed

    kw: dict[str, Any] = {}
    if args.suffix is not None and args.task != "chair":
        kw["suffix"] = args.suffix
    if args.task == "pope":
        return testbed.pope_task((args.split or "adversarial").split(","), strict=args.strict, **kw)
    if args.split is not None and args.split != testbed.SPLIT:
        raise AttnkitError(f"--split {args.split}: the testbed ships only its {testbed.SPLIT!r} split")
    if args.task == "chair":
        if args.vocab is not None:
            kw["vocab"] = args.vocab
        return testbed.chair_task(min(args.num_images, testbed.N_VAL), seed=args.seed, **kw)
    return testbed.grounding_task(layers=_parse_layers(args.layers), **kw)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run a benchmark task through a model wrapped with the given methods."""
    from .eval.runner import RunSettings, run_task
    from .loading import load_model

    task = _make_task(args)
    methods = _make_methods(args.method, args.method_arg)
    settings = RunSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                           seed=args.seed, resume=args.resume, skip_missing=args.skip_missing,
                           progress=not args.no_progress, do_sample=args.do_sample,
                           temperature=args.temperature, top_p=args.top_p)
    model, processor = load_model(args.model, dtype=args.dtype, device_map=args.device_map,
                                  trust_remote_code=args.trust_remote_code, seed=args.seed)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    run_task(task, model, processor, methods, args.output, settings, model_id=args.model, config=config)
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
    method = attnkit.make_method(args.method, **_parse_method_args(args.method_arg))
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


def _demo_methods() -> tuple[str, ...]:
    from .testbed.demo import DEFAULT_METHODS

    return DEFAULT_METHODS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``attnkit: error: ...``, exit 2) instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        print(f"attnkit: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnkit", description="Training-free attention methods for VLMs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="list methods, model families and tasks").set_defaults(func=cmd_list)

    e = sub.add_parser("eval", help="run a benchmark task (pope, chair, grounding) through a wrapped model")
    e.add_argument("--model", required=True,
                   help="hub id, local path, testbed (the shipped toy VLM; its data is the default) or tiny:FAMILY")
    e.add_argument("--method", default="none", help="method name(s), comma-separated; 'none' = unwrapped")
    e.add_argument("--method-arg", action="append", default=[], metavar="[NAME.]K=V")
    e.add_argument("--task", required=True, help="pope, chair or grounding")
    e.add_argument("--source", default=None, help="POPE source: coco, aokvqa, gqa (default coco)")
    e.add_argument("--split", default=None,
                   help="POPE: random, popular, adversarial, comma list or all (default adversarial); "
                        "CHAIR/grounding: COCO split (default val2014)")
    e.add_argument("--data-dir", default=None, help="POPE question files or dataset; CHAIR/grounding annotations")
    e.add_argument("--image-dir", default=None, help="images (POPE default: DATA_DIR/images)")
    e.add_argument("--annotations", default=None, help="COCO annotations dir (instances_*.json, captions_*.json)")
    e.add_argument("--refs", default=None, help="grounding: RefCOCO-style refs JSON (image_id, ann_id, sentences)")
    e.add_argument("--layers", default=None, help="grounding: layers to average, e.g. 8-15 (default all)")
    e.add_argument("--num-images", type=int, default=500, help="CHAIR: images sampled from the split")
    e.add_argument("--vocab", default=None,
                   help="CHAIR: vocabulary JSON ({category: [synonyms]}) of a non-COCO set (default COCO's)")
    e.add_argument("--strict", action="store_true", help="POPE: replies that are not clearly yes/no count as unknown")
    e.add_argument("--suffix", default=None, help="text appended to each question (POPE default: ' Please answer yes or no.')")
    e.add_argument("--limit", type=int, default=None, help="run only the first N samples")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (POPE 16, CHAIR 512)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (seeded by --seed)")
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--top-p", type=float, default=None)
    e.add_argument("--output", required=True, help="run directory (samples.jsonl, results.json)")
    e.add_argument("--resume", action="store_true", help="continue the run in --output, skipping logged ids")
    e.add_argument("--skip-missing", action="store_true", help="skip samples whose image file is missing")
    e.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    e.add_argument("--device-map", default=None)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AttnkitError as e:
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnkit: interrupted (an eval run continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
