"""Command-line front: ``attnkit list`` and ``attnkit demo`` (eval/reproduce/viz come with the eval layer)."""

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

    print("methods:  " + ", ".join(attnkit.list_methods()))
    print("families: " + ", ".join(attnkit.list_models()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Greedy generation on a tiny offline model, without and with a method, both outputs printed."""
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="Training-free attention methods for VLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list methods and model families").set_defaults(func=cmd_list)
    d = sub.add_parser("demo", help="generate on a tiny offline model with and without a method")
    d.add_argument("--family", default="llava")
    d.add_argument("--method", default="identity")
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


if __name__ == "__main__":
    sys.exit(main())
