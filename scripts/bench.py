"""Benchmark attnkit on CPU-sized models with real VLM layouts: hook overhead and the methods' cost.

Measures prefill time, N-token greedy generate time and peak memory, side by side in one run, for:

  (a) unwrapped sdpa
  (b) wrapped with no active method      target: (b)/(a) <= 1.03
  (c) `identity` on every layer          (the eager path's cost)
  (d) eager + output_attentions=True      (how the methods' original code runs)
  (e) VAR  (defaults; tau=8 and sink_dims=[7] for the planted sinks, see below)
  (f) PAI  (defaults: alpha=0.2, layers 2..31, last row only)
  (g) ACT  (defaults: beta=0.4, threshold=0.1, every head of layers 2..31)
  (h) PAI with its CFG step (cfg_gamma=1.1: the image-free prompt as extra batch rows)
  (i) VHR  (defaults: alpha=2, VHD selection at prefill with the image-free rows, last 14 layers)

Method targets: generate time <= 1.15x and peak memory <= 1.10x of (a); >= 1.5x faster than (d)
at llavanext-mini. The model is random, so it has no massive activations of its own: every
configuration runs with the same planted sinks (+1000 in hidden dim 7 at the first token and every
64th image token, at every layer's input at prefill, as LLaVA's visual sinks are), so that VAR finds
sinks and takes the eager path where a real model makes it (tau=8 because the parameter-free RMS
norm of a width-256 state is at most 16).

Time: configurations are interleaved, their order rotated and reversed between repetitions; each
eager (d) run is followed by an untimed settling run (it frees gigabytes of attention maps).
Times are medians over --repeats; ratios are medians of per-repetition ratios to (a), which
cancels slow drifts of the machine's speed.

Memory: each configuration runs in a fresh subprocess (--memory-repeats times, alternating):
build the model, one untimed generate, return the freed heap to the OS (malloc_trim), then reset
the kernel's peak-RSS mark (/proc/self/clear_refs) and run the measured generate. "peak RSS" is
the process's VmHWM during that generate (Python, torch, model and all); "added" is VmHWM minus
the RSS just before it, i.e. what generate itself needed at its peak (KV cache, activations,
attention maps). RSS counts every CPU tensor, unlike tracemalloc. The children run with
MALLOC_MMAP_THRESHOLD_=1MiB: glibc's default dynamic threshold keeps freed multi-MB tensors in the
heap, which adds +-100 MB of run-to-run noise to RSS at llavanext-mini (--default-malloc to see it);
with a fixed threshold every large tensor is mapped and unmapped, so RSS follows the live tensors.
Linux (glibc) only.

Presets keep the real sequence layout (LM depth, image-token counts) at reduced width:

  llava15-mini    LLaVA-1.5 layout: 32 LM layers, 576 image tokens (CLIP 336/14)
  llavanext-mini  LLaVA-NeXT layout: 32 LM layers, 576 base + 48x(48+1) high-res = 2928 image tokens

Usage: python scripts/bench.py --preset llava15-mini [--repeats 5] [--new-tokens 32]
       python scripts/bench.py --preset llavanext-mini --configs a,d,e,f,g,h --memory
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
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
    Qwen2Config,
)

import attnkit

IMAGE_TOKEN = 250
VOCAB = 256
SINK_DIM = 7
SINK_EVERY = 64  # one planted visual sink per 64 image tokens (9 at 576, 46 at 2928)

#: configuration key -> (letter, label)
KINDS = {
    "sdpa": ("a", "(a) unwrapped sdpa"),
    "wrap-empty": ("b", "(b) wrapped, no method"),
    "identity": ("c", "(c) identity, every layer"),
    "eager": ("d", "(d) eager + output_attentions"),
    "var": ("e", "(e) VAR"),
    "pai": ("f", "(f) PAI"),
    "act": ("g", "(g) ACT"),
    "pai-cfg": ("h", "(h) PAI + CFG"),
    "vhr": ("i", "(i) VHR"),
    "vcd": ("j", "(j) VCD"),
    "icd": ("k", "(k) ICD (20-token instruction)"),
}
#: ICD's instruction for the bench (no processor): 20 plain token ids after the first token of each row
ICD_IDS = list(range(100, 120))


def make_methods(kind: str) -> list | None:
    """The attnkit methods of a configuration (None: not wrapped)."""
    from attnkit.methods import ACT, ICD, PAI, VAR, VCD, VHR

    return {
        "wrap-empty": [],
        "identity": ["identity"],
        "var": [VAR(tau=8.0, sink_dims=[SINK_DIM])],
        "pai": [PAI()],
        "act": [ACT()],
        "pai-cfg": [PAI(cfg_gamma=1.1)],
        "vhr": [VHR()],
        "vcd": [VCD()],
        "icd": [ICD(disturbance_ids=ICD_IDS)],
    }.get(kind)


def plant_sinks(model, inputs) -> None:
    """Permanent pre-hooks on every decoder layer: +1000 in SINK_DIM at the first token and every
    SINK_EVERY-th image token of the prompt (first batch row), at prefill only."""
    ids = inputs["input_ids"][0]
    where = (ids == IMAGE_TOKEN).nonzero().flatten()[::SINK_EVERY]
    where = torch.cat([torch.tensor([0], device=where.device), where])
    prompt_len = ids.shape[0]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != prompt_len:
            return None
        hidden = hidden.clone()
        hidden[0, where, SINK_DIM] += 1000.0
        if args:
            return (hidden, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    for layer in model.get_decoder().layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)


def _text_config(hidden: int, layers: int, heads: int, intermediate: int = 0, kv_heads: int = 0,
                 text_type: str = "llama"):
    """The LM config: LLaMA (MHA unless kv_heads), or Qwen2 (GQA, q/k/v biases: the LM of LLaVA-OneVision-7B)."""
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text_type]
    return cls(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _vision_config() -> CLIPVisionConfig:
    # CLIP-L/14 at 336 px gives the 24x24 = 576-token grid; width and depth reduced for CPU.
    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=336, patch_size=14)


def build(preset: str, hidden: int, layers: int, heads: int, text_tokens: int, intermediate: int = 0,
          device: str = "cpu", dtype: str = "float32", kv_heads: int = 0, text_type: str = "llama"):
    """(model, inputs) for a preset; weights random (timing does not depend on them)."""
    text_config = _text_config(hidden, layers, heads, intermediate, kv_heads, text_type)
    torch.manual_seed(0)
    if preset == "llava15-mini":
        cfg = LlavaConfig(vision_config=_vision_config(), text_config=text_config,
                          image_token_index=IMAGE_TOKEN, image_seq_length=576, vision_feature_select_strategy="default")
        with torch.device(device):  # built on the device (a 7B-wide model initialises in seconds on a GPU)
            model = LlavaForConditionalGeneration(cfg)
        n_image = 576
        extra = {"pixel_values": torch.randn(1, 3, 336, 336)}
    elif preset == "llavanext-mini":
        cfg = LlavaNextConfig(vision_config=_vision_config(), text_config=text_config,
                              image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[672, 672]],
                              vision_feature_select_strategy="default")
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(cfg)
        n_image = 576 + 48 * 49
        extra = {"pixel_values": torch.randn(1, 5, 3, 336, 336), "image_sizes": torch.tensor([[672, 672]])}
    else:
        raise SystemExit(f"unknown preset {preset!r} (valid: llava15-mini, llavanext-mini)")
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, IMAGE_TOKEN, (text_tokens,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[: text_tokens // 4], torch.full((n_image,), IMAGE_TOKEN),
                     text[text_tokens // 4 :]])[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
    inputs = {k: v.to(device, getattr(torch, dtype) if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    return model, inputs, n_image


def _timed(fn: Callable[[], object]) -> float:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class Runner:
    """Runs one configuration's prefill or generate on the preset model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model, self.inputs, self.n_image = build(args.preset, args.hidden, args.layers, args.heads, args.text_tokens,
                                                      args.intermediate, args.device, args.dtype)
        plant_sinks(self.model, self.inputs)
        self.gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def __call__(self, kind: str, what: str) -> float:
        model, inputs = self.model, self.inputs
        if kind == "eager":
            model.set_attn_implementation({"text_config": "eager"})
        methods = make_methods(kind)
        handle = attnkit.wrap(model, methods) if methods is not None else None
        try:
            extra = {"output_attentions": True} if kind == "eager" else {}
            with torch.no_grad():
                if what == "prefill":  # with the position ids generate() passes (VHR packs its image-free rows then)
                    pos = torch.arange(inputs["input_ids"].shape[1], device=inputs["input_ids"].device)[None]
                    return _timed(lambda: model(**inputs, **extra, position_ids=pos, logits_to_keep=1))
                if kind == "eager":
                    extra["return_dict_in_generate"] = True
                return _timed(lambda: model.generate(**inputs, **self.gen_kw, **extra))
        finally:
            if handle is not None:
                handle.remove()
            if kind == "eager":
                model.set_attn_implementation({"text_config": "sdpa"})


def memory_child(args: argparse.Namespace) -> int:
    """In a fresh process: one untimed generate, then the peak RSS of a second one (JSON on stdout)."""
    run = Runner(args)
    run(args.memory_child, "generate")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back, so RSS = live memory
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    run(args.memory_child, "generate")
    peak = _rss_kb("VmHWM")
    print(json.dumps({"peak_kb": peak, "added_kb": peak - before}))
    return 0


def measure_device_memory(run: Runner, kinds: list[str]) -> dict[str, dict[str, float]]:
    """On an accelerator: torch's peak allocation (MB) during one generate per configuration, in this process
    ("added": the peak minus what was allocated before it)."""
    out = {}
    for kind in kinds:
        run(kind, "generate")  # warm
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(kind, "generate")
        peak = torch.cuda.max_memory_allocated()
        out[kind] = {"peak": peak / 2**20, "added": (peak - before) / 2**20}
    return out


def measure_memory(args: argparse.Namespace, kinds: list[str], argv: list[str]) -> dict[str, dict[str, float]]:
    """Median peak / added RSS (MB) per configuration, each run in its own subprocess."""
    samples: dict[str, list[dict[str, int]]] = {k: [] for k in kinds}
    for rep in range(args.memory_repeats):
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            cmd = [sys.executable, __file__, *argv, "--memory-child", kind]
            env = dict(os.environ)
            if not args.default_malloc:
                env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # see the module docstring
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            samples[kind].append(json.loads(out.strip().splitlines()[-1]))
    return {
        k: {
            "peak": statistics.median(s["peak_kb"] for s in v) / 1024,
            "added": statistics.median(s["added_kb"] for s in v) / 1024,
        }
        for k, v in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava15-mini", choices=["llava15-mini", "llavanext-mini"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=0, help="LM FFN width (0 = 2 x hidden; 11008 for LLaMA-7B)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda, --memory reads torch's peak allocation)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--configs", default="a,b,c,d", help="which of a..i to run (e.g. a,d,e,f,g,h for the methods)")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS, one subprocess per configuration")
    p.add_argument("--memory-repeats", type=int, default=2)
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold (noisy RSS)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.repeats < 5:
        print("note: fewer than 5 repeats; medians are noisy", file=sys.stderr)

    wanted = {c.strip() for c in args.configs.split(",")} | {"a"}  # (a) is the reference
    kinds = [k for k, (letter, _) in KINDS.items() if letter in wanted]
    whats = ([] if args.skip_prefill else ["prefill"]) + ([] if args.skip_generate else ["generate"])
    run = Runner(args)
    for what in whats:  # warm-up
        for kind in kinds:
            run(kind, what)
    times: dict[tuple[str, str], list[float]] = {(k, w): [] for k in kinds for w in whats}
    for rep in range(args.repeats):
        # rotate the order each repetition and reverse it every other one, so that every
        # configuration runs in every slot and after different neighbours
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
        if rep % 2:
            order = order[::-1]
        for what in whats:
            for kind in order:
                times[(kind, what)].append(run(kind, what))
                if kind == "eager":
                    # eager + output_attentions frees gigabytes; an untimed run lets the
                    # allocator settle so the next configuration is not charged for it
                    run("sdpa", what)
    memory = None
    if args.memory and args.device != "cpu":
        memory = measure_device_memory(run, kinds)
    elif args.memory:
        child_argv = [a for a in argv if a != "--memory"]
        memory = measure_memory(args, kinds, child_argv)

    seq = run.inputs["input_ids"].shape[1]
    where = (torch.cuda.get_device_name() if args.device != "cpu" else f"CPU, {torch.get_num_threads()} threads")
    print(f"\n### {args.preset}: {args.layers} LM layers, hidden {args.hidden}, FFN {args.intermediate or 2 * args.hidden}, "
          f"{run.n_image} image tokens, prompt {seq} tokens, {args.dtype}, torch {torch.__version__}, {where}, "
          f"median of {args.repeats}\n")
    header, sep = "| configuration |", "|---|"
    for what in whats:
        name = "prefill" if what == "prefill" else f"generate {args.new_tokens} tok"
        header += f" {name} (s) | {what} vs (a) |"
        sep += "---:|---:|"
    if "eager" in kinds and len(kinds) > 2 and whats:
        header += f" (d) / this, {whats[-1]} |"
        sep += "---:|"
    if memory:
        peak_name = "peak RSS (MB)" if args.device == "cpu" else "peak allocated (MB)"
        header += f" {peak_name} | added by generate (MB) | added vs (a) |"
        sep += "---:|---:|---:|"
    print(header)
    print(sep)

    def ratio(kind: str, ref: str, what: str) -> float:
        # median over repetitions of (this / ref) within the same repetition, which cancels slow
        # drifts of the machine's speed
        return statistics.median(t / r for t, r in zip(times[(kind, what)], times[(ref, what)]))

    for kind in kinds:
        row = f"| {KINDS[kind][1]} |"
        for what in whats:
            row += f" {statistics.median(times[(kind, what)]):.3f} | {ratio(kind, 'sdpa', what):.3f} |"
        if "eager" in kinds and len(kinds) > 2 and whats:
            row += f" {ratio('eager', kind, whats[-1]):.2f} |"
        if memory:
            m, a = memory[kind], memory["sdpa"]
            row += f" {m['peak']:.0f} | {m['added']:.0f} | {m['added'] / a['added']:.2f} |"
        print(row)
    print("\nratios: median over repetitions of the time divided by (a)'s time in the same repetition")
    if memory:
        ratios = ", ".join(f"{KINDS[k][0]} {memory[k]['peak'] / memory['sdpa']['peak']:.2f}" for k in kinds)
        if args.device == "cpu":
            print(f"memory: median of {args.memory_repeats} fresh processes per configuration; peak RSS ratios to (a): {ratios}")
        else:
            print(f"memory: torch's peak allocation during one generate, in this process; ratios to (a): {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
