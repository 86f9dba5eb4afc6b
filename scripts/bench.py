"""Benchmark attnkit's hook overhead on CPU-sized models with real VLM layouts.

Measures prefill time and N-token greedy generate time, side by side in one run, for:

  (a) unwrapped sdpa
  (b) wrapped with no active method      target: (b)/(a) <= 1.03
  (c) `identity` on every layer          (the eager path's cost)
  (d) eager + output_attentions=True      (how the methods' original code runs)

Configurations are interleaved, their order rotated and reversed between repetitions; each
eager run is followed by an untimed settling run (it frees gigabytes of attention maps).
Times are medians over --repeats; ratios are medians of per-repetition ratios to (a), which
cancels slow drifts of the machine's speed.

Presets keep the real sequence layout (LM depth, image-token counts) at reduced width:

  llava15-mini    LLaVA-1.5 layout: 32 LM layers, 576 image tokens (CLIP 336/14)
  llavanext-mini  LLaVA-NeXT layout: 32 LM layers, 576 base + 48x(48+1) high-res = 2928 image tokens

Usage: python scripts/bench.py --preset llava15-mini [--repeats 5] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import attnkit

IMAGE_TOKEN = 250
VOCAB = 256


def _text_config(hidden: int, layers: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _vision_config() -> CLIPVisionConfig:
    # CLIP-L/14 at 336 px gives the 24x24 = 576-token grid; width and depth reduced for CPU.
    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=336, patch_size=14)


def build(preset: str, hidden: int, layers: int, heads: int, text_tokens: int):
    """(model, inputs) for a preset; weights random (timing does not depend on them)."""
    torch.manual_seed(0)
    if preset == "llava15-mini":
        cfg = LlavaConfig(vision_config=_vision_config(), text_config=_text_config(hidden, layers, heads),
                          image_token_index=IMAGE_TOKEN, image_seq_length=576, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg)
        n_image = 576
        extra = {"pixel_values": torch.randn(1, 3, 336, 336)}
    elif preset == "llavanext-mini":
        cfg = LlavaNextConfig(vision_config=_vision_config(), text_config=_text_config(hidden, layers, heads),
                              image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[672, 672]],
                              vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration(cfg)
        n_image = 576 + 48 * 49
        extra = {"pixel_values": torch.randn(1, 5, 3, 336, 336), "image_sizes": torch.tensor([[672, 672]])}
    else:
        raise SystemExit(f"unknown preset {preset!r} (valid: llava15-mini, llavanext-mini)")
    model = model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, IMAGE_TOKEN, (text_tokens,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[: text_tokens // 4], torch.full((n_image,), IMAGE_TOKEN),
                     text[text_tokens // 4 :]])[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
    return model, inputs, n_image


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava15-mini", choices=["llava15-mini", "llavanext-mini"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--configs", default="a,b,c,d", help="which of a,b,c,d to run (e.g. a,b for the overhead alone)")
    args = p.parse_args(argv)
    if args.repeats < 5:
        print("note: fewer than 5 repeats; medians are noisy", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, inputs, n_image = build(args.preset, args.hidden, args.layers, args.heads, args.text_tokens)
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def run(kind: str, what: str) -> float:
        if kind == "eager":
            model.set_attn_implementation({"text_config": "eager"})
        handle = None
        if kind == "wrap-empty":
            handle = attnkit.wrap(model, [])
        elif kind == "identity":
            handle = attnkit.wrap(model, "identity")
        try:
            extra = {"output_attentions": True} if kind == "eager" else {}
            with torch.no_grad():
                if what == "prefill":
                    return _timed(lambda: model(**inputs, **extra, logits_to_keep=1))
                if kind == "eager":
                    extra["return_dict_in_generate"] = True
                return _timed(lambda: model.generate(**inputs, **gen_kw, **extra))
        finally:
            if handle is not None:
                handle.remove()
            if kind == "eager":
                model.set_attn_implementation({"text_config": "sdpa"})

    kinds = [("sdpa", "(a) unwrapped sdpa"), ("wrap-empty", "(b) wrapped, no method"),
             ("identity", "(c) identity, every layer"), ("eager", "(d) eager + output_attentions")]
    wanted = {c.strip() for c in args.configs.split(",")} | {"a"}  # (a) is the reference
    kinds = [k for k in kinds if k[1][1] in wanted]
    whats = ["prefill"] + ([] if args.skip_generate else ["generate"])
    for what in whats:  # warm-up
        for kind, _ in kinds:
            run(kind, what)
    times: dict[tuple[str, str], list[float]] = {(k, w): [] for k, _ in kinds for w in whats}
    for rep in range(args.repeats):
        # rotate the order each repetition and reverse it every other one, so that every
        # configuration runs in every slot and after different neighbours
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
        if rep % 2:
            order = order[::-1]
        for what in whats:
            for kind, _ in order:
                times[(kind, what)].append(run(kind, what))
                if kind == "eager":
                    # eager + output_attentions frees gigabytes; an untimed run lets the
                    # allocator settle so the next configuration is not charged for it
                    run("sdpa", what)

    seq = inputs["input_ids"].shape[1]
    print(f"\n### {args.preset}: {args.layers} LM layers, hidden {args.hidden}, {n_image} image tokens, "
          f"prompt {seq} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    header = "| configuration | prefill (s) | prefill vs (a) |"
    sep = "|---|---:|---:|"
    if "generate" in whats:
        header += f" generate {args.new_tokens} tok (s) | generate vs (a) |"
        sep += "---:|---:|"
    print(header)
    print(sep)
    for kind, label in kinds:
        row = f"| {label} |"
        for w in whats:
            med = statistics.median(times[(kind, w)])
            # ratio = median over repetitions of (this / unwrapped) within the same repetition,
            # which cancels slow drifts of the machine's speed
            ratio = statistics.median(t / a for t, a in zip(times[(kind, w)], times[("sdpa", w)]))
            row += f" {med:.3f} | {ratio:.3f} |"
        print(row)
    print("\nratios: median over repetitions of the time divided by (a)'s time in the same repetition")
    return 0


if __name__ == "__main__":
    sys.exit(main())
