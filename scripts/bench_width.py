"""Benchmark every method per decoder layer at real 7B width, through attnkit's real hooks.

The mini presets of scripts/bench.py keep the real sequence layouts but shrink the width to 256, where a
decode step is mostly fixed per-call overhead. This script keeps the layouts and the real width: a model
of a few decoder layers shaped like a 7B language model, with a tiny vision tower, wrapped by attnkit as a
user's model is (the adapter finds the image tokens, the manager routes, the methods rewrite). Per-layer
times come from hooks on the decoder layers, so the vision tower, the embeddings and the head are left
out; with every layer active for the method, the ratio to unwrapped sdpa is the cost per layer where the
method works.

Shapes (2 layers by default):

  llama2-7b   LLaMA-2-7B / Vicuna-7B (LLaVA-1.5, LLaVA-NeXT): hidden 4096, 32 heads, FFN 11008
  qwen2.5-7b  Qwen2.5-7B's GQA shape (that of Qwen2.5-VL-7B's and LLaVA-OneVision-7B's LM): hidden 3584,
              28 heads over 4 KV heads, FFN 18944, q/k/v biases (a Qwen2 LM in the LLaVA layout)

Layouts: 617 (LLaVA-1.5: 576 image tokens) and 2969 (LLaVA-NeXT: 2928 image tokens in 5 crops), as
scripts/bench.py's presets llava15-mini and llavanext-mini.

Methods, with their layer ranges set so that every layer of the short model is active (the defaults
skip layers 0-1 or use 32-layer indices): VAR (start_layer=0, skip_last=0, tau=20 default, with
planted sinks as in bench.py: +1000 in hidden dim 7 at the first token and every 64th image token
of every row at every layer's input at prefill), PAI (start_layer=0), ACT (start_layer=0, skip_last=0),
VHR (last_layers = all), VCD, ICD (20-token instruction), PAI + CFG (gamma 1.1). Pruning: FastV (k=1:
ranked at layer 0, layer 1 holds the kept half), PyramidDrop (one stage at layer 1 of 2 = 16 of 32),
VisionZip, HiPrune (both in the vision tower: every LM layer holds the kept tokens). SparseVLM needs
three stages and four layers; it is left to the mini presets (scripts/bench_prune.py).

What is measured, side by side in one run (configurations interleaved, order rotated and reversed
between repetitions, ratios = medians of per-repetition ratios to unwrapped sdpa):

  prefill b1  one forward over the prompt (position ids as generate() passes them, logits of the last
              token), per-layer time; --repeats at 617 tokens, --long-repeats at 2969
  decode b1   N decode steps by hand on that prefill's cache (each repetition goes on from the last
              one, as generate() would), per-layer time per step
  decode b8   the same at batch 8 (rows left-padded, 2 tokens shorter each), from one batch-8 prefill
              per configuration (timed once: "prefill b8", a single sample); --b8-layouts
  memory      (--memory-shapes) RSS added at the peak of a b1 prefill and its decode steps, in a child
              process per shape and layout with glibc's mmap threshold fixed at 1 MiB so that freed
              tensors leave RSS (as bench.py --memory; Linux only), after one untimed run of the same
              configuration; "kept" is what that first run left in RSS for good (bf16 matmuls of new
              shapes make oneDNN cache kernels: ACT's row blocks). Not in the timing process: with that
              threshold every large allocation maps fresh pages, which slows allocation-heavy paths.

Per layer the time is split into the attention module's four projections, the rest of the attention
module ("attention": RoPE, the cache update, the attention kernel or attnkit's dispatch) and the rest of
the layer (norms, MLP, and any select hook of a pruning method).

Pruning (--parts prune; llama2-7b, 2969 tokens, batch 8): prefill speed-up (one batch-8 prefill per
method) against the measured time bound sum_l T(n_full) / sum_l T(n_l), where T(n_full) is each layer's
time in the unwrapped prefill, T(n) for shorter n each unwrapped layer's time on n random embeddings padded
as the batch is, and n_l the length of layer l's cache after the method's prefill; decode speed-up against the ratio of attended KV lengths, for the attention of the
pruned layers and for the whole decode step (all layers, vision tower and head included).

Usage: python scripts/bench_width.py                       # the full run (about 20 min on 2 cores)
       python scripts/bench_width.py --shapes llama2-7b --layouts 617 --parts rewrite --repeats 3
"""

from __future__ import annotations

import argparse
import copy
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

import attnkit
from attnkit.hooks import compat
from attnkit.hooks.branch import positions  # padding-aware position ids, as generate() builds them

_spec = importlib.util.spec_from_file_location("attnkit_bench", Path(__file__).with_name("bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SHAPES = {
    "llama2-7b": dict(hidden=4096, heads=32, kv_heads=32, intermediate=11008, text_type="llama"),
    "qwen2.5-7b": dict(hidden=3584, heads=28, kv_heads=4, intermediate=18944, text_type="qwen2"),
    "tiny": dict(hidden=64, heads=4, kv_heads=2, intermediate=128, text_type="qwen2"),  # tests/test_bench_width.py
}
LAYOUTS = {"617": "llava15-mini", "2969": "llavanext-mini"}
REWRITE = ["sdpa", "var", "pai", "act", "vhr", "vcd", "icd", "pai-cfg"]
PRUNE = ["sdpa", "fastv", "pdrop", "visionzip", "hiprune"]
LABELS = {
    "sdpa": "unwrapped sdpa", "var": "VAR", "pai": "PAI", "act": "ACT", "vhr": "VHR", "vcd": "VCD", "icd": "ICD",
    "pai-cfg": "PAI + CFG", "fastv": "FastV k=1 r=0.5", "pdrop": "PyramidDrop (stage at layer 1)",
    "visionzip": "VisionZip 54+10", "hiprune": "HiPrune",
}
TARGETS = {"var": 1.10, "pai": 1.10, "act": 1.10, "vhr": 1.10, "vcd": 2.05, "icd": 2.05, "pai-cfg": 1.5}
TOKEN = 5  # the token every decode step feeds


def make_methods(kind: str, layers: int, hidden: int = 4096) -> list | None:
    """The methods of a configuration, every layer of a ``layers``-deep model active (None: unwrapped). VAR's
    tau is its default 20 at 7B width; a narrower test model gets sqrt(hidden) / 2, since a planted sink's
    normed value is at most sqrt(hidden)."""
    from attnkit.methods import ACT, ICD, PAI, VAR, VCD, VHR, FastV, HiPrune, PyramidDrop, VisionZip

    if kind == "sdpa":
        return None
    return {
        "var": lambda: [VAR(start_layer=0, skip_last=0, sink_dims=[bench.SINK_DIM], tau=min(20.0, hidden**0.5 / 2))],
        "pai": lambda: [PAI(start_layer=0)],
        "act": lambda: [ACT(start_layer=0, skip_last=0)],
        "vhr": lambda: [VHR(last_layers=layers)],
        "vcd": lambda: [VCD()],
        "icd": lambda: [ICD(disturbance_ids=bench.ICD_IDS)],
        "pai-cfg": lambda: [PAI(start_layer=0, cfg_gamma=1.1)],
        "fastv": lambda: [FastV(k=1)],
        "pdrop": lambda: [PyramidDrop(layers=(16,))],
        "visionzip": lambda: [VisionZip()],
        "hiprune": lambda: [HiPrune()],
    }[kind]()


# -- timing and memory -------------------------------------------------------------------------------------


class LayerTimer:
    """Per-layer wall times of a model's decoder layers (CPU: synchronous), split into the attention
    module's projections, the rest of the attention module, and the rest of the layer. Registered after
    wrap() so that its pre-hooks run first and its post-hooks last (attnkit's own layer hooks included)."""

    PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, model) -> None:
        self.layers = list(model.get_decoder().layers)
        n = len(self.layers)
        self.layer = [0.0] * n
        self.attn = [0.0] * n
        self.proj = [0.0] * n
        self._t: dict[tuple[str, int], float] = {}
        self._in_attn: int | None = None
        self.handles = []
        for i, layer in enumerate(self.layers):
            self._watch(layer, ("layer", i))
            self._watch(layer.self_attn, ("attn", i))
            for name in self.PROJ:
                self._watch(getattr(layer.self_attn, name), ("proj", i))

    def _watch(self, module, key) -> None:
        def pre(mod, args, kwargs=None):
            if key[0] == "attn":
                self._in_attn = key[1]
            self._t[key] = time.perf_counter()

        def post(mod, args, out, kwargs=None):
            dt = time.perf_counter() - self._t.pop(key)
            kind, i = key
            if kind == "layer":
                self.layer[i] += dt
            elif kind == "attn":
                self.attn[i] += dt
                self._in_attn = None
            elif self._in_attn == i:  # a projection called by the attention module (not by a select hook)
                self.proj[i] += dt

        self.handles.append(module.register_forward_pre_hook(pre, prepend=True))
        self.handles.append(module.register_forward_hook(post))

    def reset(self) -> None:
        n = len(self.layers)
        self.layer, self.attn, self.proj = [0.0] * n, [0.0] * n, [0.0] * n

    def read(self) -> dict[str, list[float]]:
        """Per layer: 'layer' (whole), 'attn' (attention module without its projections), 'proj'."""
        return {
            "layer": list(self.layer),
            "attn": [a - p for a, p in zip(self.attn, self.proj)],
            "proj": list(self.proj),
        }

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class PeakRSS:
    """RSS a block adds at its peak (Linux): VmHWM reset before it, minus the RSS before it."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.before = bench._rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc) -> None:
        self.added_mb = (bench._rss_kb("VmHWM") - self.before) / 1024


# -- models and inputs ----------------------------------------------------------------------------------------


def share_weights(model):
    """A second model object over the same parameter and buffer tensors (own config, modules and hooks)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), clone.parameters()))
    return clone


def batch_inputs(inputs: dict, batch: int) -> dict:
    """A ``batch``-row left-padded batch from one row: row r drops 2r text tokens after the image (the
    prompt layout is otherwise the row's), the image inputs repeated."""
    ids, mask = inputs["input_ids"][0], inputs["attention_mask"][0]
    width = ids.shape[0]
    rows_ids, rows_mask = [], []
    for r in range(batch):
        keep = torch.ones(width, dtype=torch.bool)
        if r:
            keep[width - 1 - 2 * r : width - 1] = False  # the last text tokens before the final one
        row = ids[keep]
        pad = width - row.shape[0]
        rows_ids.append(torch.cat([row.new_zeros(pad), row]))
        rows_mask.append(torch.cat([mask.new_zeros(pad), mask[keep]]))
    out = {"input_ids": torch.stack(rows_ids), "attention_mask": torch.stack(rows_mask)}
    for key, value in inputs.items():
        if key not in out:
            out[key] = value.repeat(batch, *([1] * (value.dim() - 1)))
    return out


def plant_sinks(model, batches: list[dict]) -> None:
    """bench.py's planted sinks, in every row: +1000 in SINK_DIM at each row's first token and every
    SINK_EVERY-th image token, at every layer's input at prefill, for the (rows, length) of each batch
    (and of that batch doubled, for contrast rows that repeat it)."""
    where: dict[tuple[int, int], torch.Tensor] = {}
    for inputs in batches:
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        image = ids == bench.IMAGE_TOKEN
        rank = image.long().cumsum(1) - 1
        sinks = image & (rank % bench.SINK_EVERY == 0)
        first = mask.long().argmax(1)
        sinks[torch.arange(ids.shape[0]), first] = True
        where[tuple(ids.shape)] = sinks
        where[(2 * ids.shape[0], ids.shape[1])] = sinks.repeat(2, 1)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        sinks = where.get(tuple(hidden.shape[:2]))
        if sinks is None:
            return None
        hidden = hidden.clone()
        hidden[..., bench.SINK_DIM] += 1000.0 * sinks.to(hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    for layer in model.get_decoder().layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)


class Config:
    """One configuration: its own model object (weights shared with the reference), handle and timer."""

    def __init__(self, kind: str, base, layers: int, batches: list[dict]) -> None:
        self.kind = kind
        self.model = base if kind == "sdpa" else share_weights(base)
        plant_sinks(self.model, batches)
        methods = make_methods(kind, layers, base.config.get_text_config().hidden_size)
        self.handle = attnkit.wrap(self.model, methods) if methods is not None else None
        self.timer = LayerTimer(self.model)
        self.cache = {}  # batch -> (cache, per-layer lengths after the prefill, 2-D mask so far)
        self.key = compat.cache_keyword(self.model)

    def prefill(self, inputs: dict) -> dict[str, list[float]]:
        batch = inputs["input_ids"].shape[0]
        self.cache.pop(batch, None)  # (callers measuring memory drop it first: drop_cache)
        self.timer.reset()
        with torch.no_grad():
            out = self.model(**inputs, position_ids=positions(inputs["attention_mask"]), use_cache=True,
                             logits_to_keep=1)
        times = self.timer.read()
        cache = compat.output_cache(out)
        self.cache[batch] = (cache, [layer.keys.shape[-2] for layer in cache.layers], inputs["attention_mask"])
        return times

    def decode(self, batch: int, steps: int) -> tuple[dict[str, list[float]], float]:
        """``steps`` more decode steps on the prefilled cache (each repetition goes on where the last one
        stopped, as generate() would; the cache grows by ``steps`` tokens per repetition, the same in every
        configuration): mean per-layer times per step, and the mean wall time of a whole step."""
        token = torch.full((batch, 1), TOKEN, dtype=torch.long)
        total = {"layer": [], "attn": [], "proj": []}
        walls = []
        for _ in range(steps):
            self.timer.reset()
            t0 = time.perf_counter()
            self.step(token)
            walls.append(time.perf_counter() - t0)
            for k, v in self.timer.read().items():
                total[k].append(v)
        mean = {k: [statistics.fmean(step[i] for step in v) for i in range(len(v[0]))] for k, v in total.items()}
        return mean, statistics.fmean(walls)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step of ``token`` (B, 1) on the batch's cache, as generate() feeds it (the 2-D mask one
        column longer, each row's next position); the last logits (B, vocab)."""
        batch = token.shape[0]
        cache, lengths, mask = self.cache[batch]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        pos = mask.long().sum(-1, keepdim=True) - 1
        with torch.no_grad():
            out = self.model(input_ids=token, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self.key: cache})
        self.cache[batch] = (cache, lengths, mask)
        return out.logits[:, -1]

    def drop_cache(self, batch: int) -> None:
        self.cache.pop(batch, None)

    def kv_lengths(self, batch: int) -> list[int]:
        return self.cache[batch][1]

    def close(self) -> None:
        self.timer.remove()
        if self.handle is not None:
            self.handle.remove()
        self.cache.clear()


def rotated(kinds: list[str], rep: int) -> list[str]:
    order = kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]
    return order[::-1] if rep % 2 else order


def per_layer(times: dict[str, list[float]], what: str = "layer", layers: list[int] | None = None) -> float:
    vals = times[what]
    idx = range(len(vals)) if layers is None else layers
    return statistics.fmean(vals[i] for i in idx)


def paired(samples: dict[str, list], kind: str, fn, ref: str = "sdpa") -> float:
    """Median over repetitions of fn(kind's sample) / fn(ref's sample)."""
    return statistics.median(fn(a) / fn(b) for a, b in zip(samples[kind], samples[ref]))


# -- the two parts --------------------------------------------------------------------------------------------


def build_base(args, shape: str, layout: str):
    s = SHAPES[shape]
    model, inputs, n_image = bench.build(LAYOUTS[layout], s["hidden"], args.layers, s["heads"], args.text_tokens,
                                         s["intermediate"], "cpu", args.dtype, s["kv_heads"], s["text_type"])
    return model, inputs


def run_rewrite(args, shape: str, layout: str, log) -> dict:
    t_start = time.perf_counter()
    base, inputs1 = build_base(args, shape, layout)
    batch8 = layout in args.b8_layouts.split(",")
    inputs8 = batch_inputs(inputs1, 8) if batch8 else None
    kinds = [k for k in REWRITE if k in args.kinds]
    configs = {k: Config(k, base, args.layers, [inputs1] + ([inputs8] if batch8 else [])) for k in kinds}
    repeats = args.repeats if layout == "617" else args.long_repeats
    pre1 = {k: [] for k in kinds}
    for rep in range(repeats):
        for kind in rotated(kinds, rep):
            pre1[kind].append(configs[kind].prefill(inputs1))
    if "var" in configs:  # the planted sinks must put VAR on its rewriting path
        sinks = configs["var"].handle.methods[0].state().get("sinks", {})
        if not any(bool(v.any()) for v in sinks.values() if isinstance(v, torch.Tensor)):
            raise SystemExit("bench_width: VAR found no sinks; the planted sinks did not take")
    log(f"  {shape} {layout}: prefill b1 done")
    dec1 = {k: [] for k in kinds}
    for rep in range(args.repeats):
        for kind in rotated(kinds, rep):
            dec1[kind].append(configs[kind].decode(1, args.new_tokens)[0])
    pre8, dec8 = {}, {k: [] for k in kinds}
    if batch8:
        for kind in kinds:
            configs[kind].drop_cache(1)
            pre8[kind] = configs[kind].prefill(inputs8)
        log(f"  {shape} {layout}: prefill b8 done")
        for rep in range(args.repeats):
            for kind in rotated(kinds, rep):
                dec8[kind].append(configs[kind].decode(8, args.new_tokens)[0])
    for c in configs.values():
        c.close()
    out = {"shape": shape, "layout": layout, "prompt": int(inputs1["input_ids"].shape[1]), "prefill_repeats": repeats,
           "rows": {}}
    for kind in kinds:
        row = {
            "prefill_b1_s": statistics.median(per_layer(t) for t in pre1[kind]),
            "prefill_b1": paired(pre1, kind, per_layer),
            "prefill_b1_attn": paired(pre1, kind, lambda t: per_layer(t, "attn")),
            "decode_b1_ms": 1e3 * statistics.median(per_layer(t) for t in dec1[kind]),
            "decode_b1": paired(dec1, kind, per_layer),
            "decode_b1_attn": paired(dec1, kind, lambda t: per_layer(t, "attn")),
        }
        if batch8:
            row["prefill_b8"] = per_layer(pre8[kind]) / per_layer(pre8["sdpa"])
            row["decode_b8_ms"] = 1e3 * statistics.median(per_layer(t) for t in dec8[kind])
            row["decode_b8"] = paired(dec8, kind, per_layer)
            row["decode_b8_attn"] = paired(dec8, kind, lambda t: per_layer(t, "attn"))
        out["rows"][kind] = row
    del configs, base
    gc.collect()
    if shape in args.memory_shapes.split(","):
        memory = measure_memory(args, shape, layout)
        for kind, mb in memory.items():
            out["rows"][kind]["added_mb"] = mb["added"]
            out["rows"][kind]["kept_mb"] = mb["kept"]
            out["rows"][kind]["memory"] = mb["added"] / memory["sdpa"]["added"]
    out["seconds"] = time.perf_counter() - t_start
    log(f"rewrite {shape} {layout}: {out['seconds']:.0f} s")
    return out


def measure_memory(args, shape: str, layout: str) -> dict[str, dict[str, float]]:
    """Per configuration (MB): "added", the RSS added at the peak of a b1 prefill and the decode steps after it,
    after one such run to warm the configuration; "kept", the RSS that warm-up run left behind for good. In a
    child process with glibc's mmap threshold fixed at 1 MiB, so that freed tensors leave RSS. Not in this
    process: with that threshold every large allocation maps fresh pages, which slows allocation-heavy paths
    and would distort the times."""
    cmd = [sys.executable, __file__, "--memory-child", f"{shape}:{layout}", "--layers", str(args.layers),
           "--new-tokens", str(args.new_tokens), "--text-tokens", str(args.text_tokens), "--dtype", args.dtype,
           "--kinds", ",".join(sorted(args.kinds))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(args) -> int:
    shape, layout = args.memory_child.split(":")
    base, inputs1 = build_base(args, shape, layout)
    kinds = [k for k in REWRITE if k in args.kinds]
    configs = {k: Config(k, base, args.layers, [inputs1]) for k in kinds}
    out = {}
    for kind in kinds:
        runs = []
        for _ in range(2):  # the first run warms the configuration (bench.py's untimed generate), the second counts
            for c in configs.values():
                c.drop_cache(1)
            with PeakRSS() as peak:
                configs[kind].prefill(inputs1)
                configs[kind].decode(1, args.new_tokens)
            runs.append(peak)
        # RSS the first run left behind for good (e.g. oneDNN's cached kernels for new matmul shapes)
        out[kind] = {"added": runs[1].added_mb, "kept": (runs[1].before - runs[0].before) / 1024}
    print(json.dumps(out))
    return 0


def lm_times(base, batch: int, lengths: list[int]) -> dict[int, list[float]]:
    """Per-layer times of the unwrapped language model on ``n`` random embeddings, ``batch`` rows left-padded
    as batch_inputs pads them (row r: 2r pads), for each n."""
    lm = base.get_decoder()
    timer = LayerTimer(base)
    hidden = base.config.get_text_config().hidden_size
    dtype = next(lm.parameters()).dtype
    out = {}
    try:
        for n in sorted(set(lengths)):
            embeds = torch.randn(batch, n, hidden, dtype=dtype) * 0.02
            mask = torch.ones(batch, n, dtype=torch.long)
            for r in range(batch):
                mask[r, : 2 * r] = 0
            timer.reset()
            with torch.no_grad():
                lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=False)
            out[n] = timer.read()["layer"]
    finally:
        timer.remove()
    return out


def run_prune(args, log) -> dict:
    t_start = time.perf_counter()
    shape, layout = args.prune_shape, "2969"
    base, inputs1 = build_base(args, shape, layout)
    inputs8 = batch_inputs(inputs1, 8)
    kinds = [k for k in PRUNE if k in args.kinds]
    configs = {k: Config(k, base, args.layers, [inputs1, inputs8]) for k in kinds}
    pre8 = {}
    for kind in kinds:
        pre8[kind] = configs[kind].prefill(inputs8)
    log("  prune: prefill b8 done")
    kv8 = {k: configs[k].kv_lengths(8) for k in kinds}
    dec8, wall8 = {k: [] for k in kinds}, {k: [] for k in kinds}
    for rep in range(args.repeats):
        for kind in rotated(kinds, rep):
            times, wall = configs[kind].decode(8, args.new_tokens)
            dec8[kind].append(times)
            wall8[kind].append(wall)
    for c in configs.values():
        c.close()
    log("  prune: decode b8 done")
    # the time bound: the unwrapped layers on the token counts each method's layers hold
    # T(n_full) per layer: the unwrapped configuration's own batch-8 prefill (the same layers and padding)
    t8 = lm_times(base, 8, [n for k in kinds for n in kv8[k] if n not in kv8["sdpa"]])
    for i, n in enumerate(kv8["sdpa"]):
        t8.setdefault(n, [0.0] * len(kv8["sdpa"]))[i] = pre8["sdpa"]["layer"][i]
    out = {"shape": shape, "layout": layout, "prompt": int(inputs1["input_ids"].shape[1]), "rows": {}}
    for kind in kinds:
        pruned = [i for i, (a, b) in enumerate(zip(kv8["sdpa"], kv8[kind])) if b < a]
        bound8 = sum(t8[n][i] for i, n in enumerate(kv8["sdpa"])) / sum(t8[n][i] for i, n in enumerate(kv8[kind]))
        row = {
            "kv_b8": kv8[kind],
            "pruned_layers": pruned,
            "prefill_b8_speedup": sum(pre8["sdpa"]["layer"]) / sum(pre8[kind]["layer"]),
            "time_bound_b8": bound8,
            "decode_b8_step_speedup": 1 / paired(wall8, kind, lambda w: w),
            "decode_b8_layers_speedup": 1 / paired(dec8, kind, lambda t: sum(t["layer"])),
            "kv_ratio_all": sum(kv8["sdpa"]) / sum(kv8[kind]),
        }
        if pruned:
            row["kv_ratio_pruned"] = statistics.fmean(kv8["sdpa"][i] / kv8[kind][i] for i in pruned)
            row["decode_b8_attn_speedup"] = 1 / paired(dec8, kind, lambda t: per_layer(t, "attn", pruned))
            row["decode_b8_pruned_layer_speedup"] = 1 / paired(dec8, kind, lambda t: per_layer(t, "layer", pruned))
        out["rows"][kind] = row
    out["seconds"] = time.perf_counter() - t_start
    log(f"prune {shape} {layout}: {out['seconds']:.0f} s")
    return out


# -- report ---------------------------------------------------------------------------------------------------


def _mark(value: float, target: float | None) -> str:
    return f"{value:.2f}" if target is None or value <= target else f"**{value:.2f}**"


def print_rewrite(res: dict) -> None:
    b8 = "decode_b8" in res["rows"]["sdpa"]
    print(f"\n#### {res['shape']}, {res['prompt']}-token prompt (prefill median of {res['prefill_repeats']};"
          f" {res['seconds']:.0f} s)\n")
    head = "| configuration | prefill b1 | (attention) | decode b1 | (attention) |"
    sep = "|---|---:|---:|---:|---:|"
    if b8:
        head += " prefill b8 (1 run) | decode b8 | (attention) |"
        sep += "---:|---:|---:|"
    mem = "memory" in res["rows"]["sdpa"]
    if mem:
        head += " memory added | kept after a first run (MB) |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for kind, r in res["rows"].items():
        t = TARGETS.get(kind)
        if kind == "sdpa":
            line = (f"| {LABELS[kind]} (per layer: prefill {r['prefill_b1_s']:.2f} s, decode b1 {r['decode_b1_ms']:.1f} ms"
                    + (f", decode b8 {r['decode_b8_ms']:.1f} ms" if b8 else "")
                    + (f"; memory added {r['added_mb']:.0f} MB" if mem else "") + ") |"
                    + " 1.00 | 1.00 | 1.00 | 1.00 |" + (" 1.00 | 1.00 | 1.00 |" if b8 else "")
                    + (f" 1.00 | {r['kept_mb']:.0f} |" if mem else ""))
            print(line)
            continue
        line = (f"| {LABELS[kind]} | {_mark(r['prefill_b1'], t)} | {r['prefill_b1_attn']:.2f} | {_mark(r['decode_b1'], t)} |"
                f" {r['decode_b1_attn']:.2f} |")
        if b8:
            line += f" {_mark(r['prefill_b8'], t)} | {_mark(r['decode_b8'], t)} | {r['decode_b8_attn']:.2f} |"
        if mem:
            line += f" {_mark(r['memory'], 1.05 if kind in ('var', 'pai', 'act', 'vhr') else None)} | {r['kept_mb']:.0f} |"
        print(line)


def print_prune(res: dict) -> None:
    print(f"\n#### pruning, {res['shape']}, {res['prompt']}-token prompt, batch 8 ({res['seconds']:.0f} s)\n")
    print("| method | KV per layer | prefill speed-up / time bound (1 run) | KV ratio, pruned layers |"
          " decode attention speed-up there | / KV ratio | decode step speed-up | KV ratio, all layers | / KV ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for kind, r in res["rows"].items():
        if kind == "sdpa":
            print(f"| {LABELS[kind]} | {r['kv_b8']} | 1.00 / 1.00 | 1.00 | 1.00 | | 1.00 | 1.00 | |")
            continue
        p8 = f"{r['prefill_b8_speedup']:.2f} / {r['time_bound_b8']:.2f} = {r['prefill_b8_speedup'] / r['time_bound_b8']:.2f}"
        kvp, attn, step = r["kv_ratio_pruned"], r["decode_b8_attn_speedup"], r["decode_b8_step_speedup"]
        print(f"| {LABELS[kind]} | {r['kv_b8']} | {p8} | {kvp:.2f} | {attn:.2f} | {attn / kvp:.2f} | {step:.2f} |"
              f" {r['kv_ratio_all']:.2f} | {step / r['kv_ratio_all']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama2-7b,qwen2.5-7b", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--layouts", default="617,2969")
    p.add_argument("--b8-layouts", default="617", help="layouts whose rewriting methods also decode at batch 8 "
                   "(a batch-8 prefill at 2969 tokens takes about a minute per configuration)")
    p.add_argument("--parts", default="rewrite,prune")
    p.add_argument("--kinds", default=",".join(dict.fromkeys(REWRITE + PRUNE)), help="configurations to run")
    p.add_argument("--prune-shape", default="llama2-7b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="repetitions (prefill at 617 tokens, every decode)")
    p.add_argument("--long-repeats", type=int, default=2, help="repetitions of the b1 prefill at 2969 tokens")
    p.add_argument("--memory-shapes", default="llama2-7b", help="shapes whose memory is measured (child processes)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps per repetition")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--dtype", default="", help="bfloat16 where the CPU has AVX512-BF16 or AMX, else float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.dtype:
        flags = open("/proc/cpuinfo").read()
        args.dtype = "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"
    args.kinds = set(args.kinds.split(","))
    if args.memory_child:
        return memory_child(args)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    results = {"rewrite": [], "prune": None}
    parts = args.parts.split(",")
    if "rewrite" in parts:
        for layout in args.layouts.split(","):
            for shape in args.shapes.split(","):
                results["rewrite"].append(run_rewrite(args, shape, layout, log))
    if "prune" in parts:
        results["prune"] = run_prune(args, log)
    print(f"\n### Real width: {args.layers} decoder layers, {args.dtype}, torch {torch.__version__}, "
          f"CPU, {torch.get_num_threads()} threads, median of {args.repeats} ({args.long_repeats} for a 2969-token prefill), {args.new_tokens} decode steps, "
          f"total {time.perf_counter() - t0:.0f} s")
    print("\nPer-layer time vs unwrapped sdpa in the same repetition (attention: the attention module without its"
          " projections); memory: RSS added at the peak of a b1 prefill and its decode steps, vs unwrapped; bold: over the target.")
    for res in results["rewrite"]:
        print_rewrite(res)
    if results["prune"]:
        print_prune(results["prune"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
