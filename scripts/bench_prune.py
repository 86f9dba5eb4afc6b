"""Benchmark the visual-token pruning methods on scripts/bench.py's presets: prefill time, decode time
of N greedy tokens and peak memory of each method vs the unpruned model, next to its FLOPs ratio.

Configurations (side by side in one run, interleaved, order rotated and reversed between repetitions):

  none       unwrapped sdpa (the reference)
  fastv      FastV k=2 r=0.5 (drop mode)                      targets: prefill speed-up >= 0.9 x the
                                                               FLOPs bound 1/flops_ratio; decode >= 1.2x
  fastv-mask FastV k=2 r=0.5 in mask mode (same selection, nothing removed: the machinery's cost)
  pdrop      PyramidDrop defaults (layers 8/16/24 of 32, ratio 0.5)
  sparsevlm  SparseVLM budget 192 (when installed in this checkout)
  visionzip  VisionZip 54+10 (per crop at llavanext-mini)
  hiprune    HiPrune with the family's default budget (192 per image; 640 per image at llavanext-mini)

"prefill" is one forward over the prompt (logits of the last token only); "decode" is the time from
the first generated token to the last of an N-token greedy generate (timestamps taken by a stopping
criterion at every step), so it excludes the prefill. Speed-ups are medians over repetitions of the
reference's time divided by the method's time in the same repetition. "flops" is the method's
PruneReport.flops_ratio (decoder layers' prefill FLOPs relative to unpruned, see
attnkit/methods/pruning.py); "bound" = 1 / flops, the prefill speed-up that FLOPs alone would give.
"time bound" is the same bound with measured layer times in place of FLOPs: the language model alone
(no vision tower, no head) is timed on random embeddings of every token count the method's layers
process, and L * T(n_full) / sum_l T(n_l) is the prefill speed-up of an implementation that adds
nothing to the unpruned layers' cost (medians over the repetitions, T(n) per layer = a whole-LM
forward over n tokens / L).

Memory (--memory): each configuration in a fresh subprocess, peak RSS (VmHWM) of one generate after
a warm-up, as in scripts/bench.py.

Decode bound (--decode-loop, instead of the table): N decode steps in a hand-written loop (no
generate() around them) from a prefilled cache, for the unpruned model, FastV, and FastV's pruned cache
with attnkit's hooks removed after the prefill (batch 1 needs no mask, so the pruned cache decodes
correctly without them): what a pruned cache can give at decode and what the hooks cost.

Usage: python scripts/bench_prune.py --preset llava15-mini [--repeats 5] [--new-tokens 32] [--memory]
       python scripts/bench_prune.py --preset llavanext-mini --decode-loop
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import attnkit
from attnkit.hooks import compat

_spec = importlib.util.spec_from_file_location("attnkit_bench", Path(__file__).with_name("bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

LABELS = {
    "none": "unpruned sdpa",
    "fastv": "FastV k=2 r=0.5",
    "fastv-mask": "FastV k=2 r=0.5, mask mode",
    "pdrop": "PyramidDrop 8/16/24 x0.5",
    "sparsevlm": "SparseVLM budget 192",
    "visionzip": "VisionZip 54+10",
    "hiprune": "HiPrune, default budget",
}


def make_method(kind: str):
    from attnkit import methods

    if kind == "none":
        return None
    if kind == "fastv":
        return methods.FastV(k=2, r=0.5)
    if kind == "fastv-mask":
        return methods.FastV(k=2, r=0.5, mode="mask")
    if kind == "pdrop":
        return methods.PyramidDrop()
    return attnkit.make_method(kind)


class Stamps(StoppingCriteria):
    """Records the time at every generation step (never stops generation)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model, self.inputs, self.n_image = bench.build(args.preset, args.hidden, args.layers, args.heads, args.text_tokens)
        self.new_tokens = args.new_tokens
        self.flops: dict[str, float] = {}
        self.tokens: dict[str, list[int]] = {}

    def __call__(self, kind: str, what: str) -> float:
        method = make_method(kind)
        handle = attnkit.wrap(self.model, method) if method is not None else None
        try:
            with torch.no_grad():
                if what == "prefill":
                    t0 = time.perf_counter()
                    self.model(**self.inputs, logits_to_keep=1)
                    took = time.perf_counter() - t0
                else:
                    stamps = Stamps()
                    self.model.generate(**self.inputs, max_new_tokens=self.new_tokens + 1,
                                        min_new_tokens=self.new_tokens + 1, do_sample=False,
                                        stopping_criteria=StoppingCriteriaList([stamps]))
                    took = stamps.times[-1] - stamps.times[0]  # N decode steps after the first token
            if method is not None and hasattr(method, "report"):
                self.flops[kind] = method.report.flops_ratio
                self.tokens[kind] = list(method.report.tokens_per_layer)
            return took
        finally:
            if handle is not None:
                handle.remove()


def lm_time(model, n: int) -> float:
    """Seconds of one language-model forward (decoder layers and norm, no head) over n random embeddings."""
    lm = model.get_decoder()
    embeds = torch.randn(1, n, model.config.get_text_config().hidden_size)
    with torch.no_grad():
        t0 = time.perf_counter()
        lm(inputs_embeds=embeds, use_cache=False)
        return time.perf_counter() - t0


def memory_child(args: argparse.Namespace) -> int:
    run = Runner(args)
    run(args.memory_child, "decode")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run(args.memory_child, "decode")
    print(json.dumps({"peak_kb": bench._rss_kb("VmHWM")}))
    return 0


def measure_memory(kinds: list[str], argv: list[str], repeats: int) -> dict[str, float]:
    samples: dict[str, list[int]] = {k: [] for k in kinds}
    for rep in range(repeats):
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
            out = subprocess.run([sys.executable, __file__, *argv, "--memory-child", kind], check=True,
                                 capture_output=True, text=True, env=env).stdout
            samples[kind].append(json.loads(out.strip().splitlines()[-1])["peak_kb"])
    return {k: statistics.median(v) / 1024 for k, v in samples.items()}


def decode_loop(args: argparse.Namespace) -> int:
    """Decode steps by hand from a prefilled cache: unpruned, FastV, FastV's cache without hooks."""
    model, inputs, _ = bench.build(args.preset, args.hidden, args.layers, args.heads, args.text_tokens)
    prompt = inputs["input_ids"].shape[1]
    token = torch.tensor([[5]])

    def once(kind: str) -> tuple[float, torch.Tensor]:
        handle = None if kind == "none" else attnkit.wrap(model, make_method("fastv"))
        try:
            with torch.no_grad():
                cache = compat.output_cache(model(**inputs, use_cache=True, logits_to_keep=1))
                if kind == "fastv-no-hooks":
                    handle.remove()
                t0 = time.perf_counter()
                for i in range(args.new_tokens):
                    step = {compat.cache_keyword(model): cache}
                    out = model(input_ids=token, **step, attention_mask=torch.ones(1, prompt + i + 1, dtype=torch.long))
                return time.perf_counter() - t0, out.logits
        finally:
            if handle is not None:
                handle.remove()

    kinds = ["none", "fastv", "fastv-no-hooks"]
    logits = {kind: once(kind)[1] for kind in kinds}  # warm-up
    if not torch.allclose(logits["fastv"], logits["fastv-no-hooks"], atol=1e-4):
        raise SystemExit("bench_prune: FastV's pruned cache decodes differently without the hooks")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(args.repeats):
        order = kinds[rep % 3:] + kinds[: rep % 3]
        for kind in order[::-1] if rep % 2 else order:
            times[kind].append(once(kind)[0])
    print(f"\n### {args.preset}: {args.new_tokens} decode steps by hand, median of {args.repeats}\n")
    print("| configuration | decode (s) | speed-up |")
    print("|---|---:|---:|")
    for kind in kinds:
        ratio = statistics.median(r / t for r, t in zip(times["none"], times[kind]))
        print(f"| {kind} | {statistics.median(times[kind]):.3f} | {ratio:.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava15-mini", choices=["llava15-mini", "llavanext-mini"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(LABELS))
    p.add_argument("--memory", action="store_true")
    p.add_argument("--memory-repeats", type=int, default=2)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode-loop", action="store_true",
                   help="instead of the table: decode steps by hand, unpruned vs FastV vs FastV's cache without hooks")
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    if args.decode_loop:
        return decode_loop(args)
    available = set(attnkit.list_methods())
    kinds = ["none", "fastv", "fastv-mask", "pdrop", "sparsevlm", "visionzip", "hiprune"]
    kinds = [k for k in kinds if k in ("none", "fastv", "fastv-mask", "pdrop") or k in available]
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(",")} | {"none"}
        unknown = wanted - set(LABELS)
        if unknown:
            p.error(f"unknown config {sorted(unknown)[0]!r}")
        kinds = [k for k in kinds if k in wanted]
    run = Runner(args)
    whats = ["prefill", "decode"]
    for what in whats:
        for kind in kinds:
            run(kind, what)  # warm-up (and the FLOPs ratio)
    times = {(k, w): [] for k in kinds for w in whats}
    for rep in range(args.repeats):
        order = kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]
        if rep % 2:
            order = order[::-1]
        for what in whats:
            for kind in order:
                times[(kind, what)].append(run(kind, what))
    # the time bound: the LM alone at every token count some method's layers process
    full = run.inputs["input_ids"].shape[1]
    counts = sorted({full} | {c for k in kinds for c in run.tokens.get(k, [])})
    lm_times: dict[int, list[float]] = {c: [] for c in counts}
    for c in counts:
        lm_time(run.model, c)  # warm-up
    for rep in range(args.repeats):
        for c in counts if rep % 2 == 0 else counts[::-1]:
            lm_times[c].append(lm_time(run.model, c))
    layer_t = {c: statistics.median(v) for c, v in lm_times.items()}

    def time_bound(kind: str) -> float:
        per_layer = run.tokens.get(kind)
        if not per_layer:
            return 1.0
        return len(per_layer) * layer_t[full] / sum(layer_t[c] for c in per_layer)

    memory = measure_memory(kinds, [a for a in argv if a != "--memory"], args.memory_repeats) if args.memory else None

    def speedup(kind: str, what: str) -> float:
        return statistics.median(r / t for r, t in zip(times[("none", what)], times[(kind, what)]))

    seq = run.inputs["input_ids"].shape[1]
    print(f"\n### {args.preset}: {args.layers} LM layers, hidden {args.hidden}, {run.n_image} image tokens, prompt {seq} "
          f"tokens, {args.new_tokens} decode tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n")
    head = ("| method | flops | bound | time bound | prefill (s) | prefill speed-up | speed-up / bound "
            "| speed-up / time bound | decode (s) | decode speed-up |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if memory:
        head += " peak RSS (MB) | vs unpruned |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for kind in kinds:
        flops = run.flops.get(kind, 1.0)
        pre, dec = speedup(kind, "prefill"), speedup(kind, "decode")
        tb = time_bound(kind)
        row = (f"| {LABELS[kind]} | {flops:.3f} | {1 / flops:.2f} | {tb:.2f} | "
               f"{statistics.median(times[(kind, 'prefill')]):.3f} | {pre:.2f} | {pre * flops:.2f} | {pre / tb:.2f} | "
               f"{statistics.median(times[(kind, 'decode')]):.3f} | {dec:.2f} |")
        if memory:
            row += f" {memory[kind]:.0f} | {memory[kind] / memory['none']:.2f} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
