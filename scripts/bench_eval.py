"""Benchmark the eval harness: its overhead over a bare generate loop, and throughput vs batch size.

Both measurements run on the same POPE samples (built from a drawn COCO-format set) and the same
model: the tiny LLaVA processor with a wider language model (random weights; timing does not depend
on them). Everything is measured side by side in one run, interleaved, order alternated:

  overhead    the runner (``attnkit.eval.runner.run_task``: samples.jsonl per line, parsing, tqdm,
              scoring, results.json) vs a bare loop doing the same image loading, batching,
              ``model.generate`` and decoding.                         target: ratio <= 1.05
  throughput  the runner at batch 1, 4 and 8 (samples/s).            target: batch 8 >= 2x batch 1

Usage: python scripts/bench_eval.py [--images 8] [--repeats 5] [--hidden 256] [--layers 8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from attnkit import testing
from attnkit.eval.inputs import make_batch
from attnkit.eval.pope import PopeTask, build_pope
from attnkit.eval.runner import RunSettings, run_task


def build_model(hidden: int, layers: int) -> torch.nn.Module:
    cfg = testing.tiny_config("llava", num_layers=layers)
    cfg.text_config.hidden_size = hidden
    cfg.text_config.intermediate_size = 2 * hidden
    cfg.text_config.num_attention_heads = max(1, hidden // 32)
    cfg.text_config.num_key_value_heads = max(1, hidden // 32)
    cfg.text_config.head_dim = 32
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.generation_config.update(pad_token_id=0, do_sample=False)
    return model


def bare_loop(model, processor, task: PopeTask, batch: int, new_tokens: int) -> int:
    """What a user would write by hand: load images, batch, generate, decode."""
    samples = task.load()
    n = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        images = []
        for s in chunk:
            with Image.open(s.image) as im:
                images.append(im.convert("RGB"))
        inputs = make_batch(processor, "llava", [s.question for s in chunk], images)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        n += len(chunk)
    return n


def harness(model, processor, task: PopeTask, batch: int, new_tokens: int, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    results = run_task(task, model, processor, [], out, RunSettings(batch_size=batch, max_new_tokens=new_tokens),
                       model_id="bench", print_summary=False)
    return results["counts"]["scored"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="POPE images (x 6 questions each)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="batch size of the overhead comparison")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="attnkit-bench-eval-"))
    try:
        ann = testing.write_coco(tmp / "coco", n_images=max(args.images, 3), size=(336, 252))
        build_pope(ann / "instances_val2014.json", tmp / "pope", num_images=args.images, seed=0, splits=["random"])
        task = PopeTask(tmp / "pope", splits=["random"], image_dir=tmp / "coco" / "val2014")
        n = len(task.load())
        model = build_model(args.hidden, args.layers)
        processor = testing.tiny_processor("llava")
        # generate() in the runner has no min_new_tokens; force the same lengths in both by disabling EOS
        model.generation_config.eos_token_id = None
        print(f"{n} POPE samples, LM hidden {args.hidden} x {args.layers} layers, {args.new_tokens} new tokens, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        harness(model, processor, task, args.batch, args.new_tokens, tmp / "warm")  # warm-up

        ratios, bare_t, harn_t = [], [], []
        for rep in range(args.repeats):
            order = ["bare", "harness"] if rep % 2 == 0 else ["harness", "bare"]
            t = {}
            for kind in order:
                t0 = time.perf_counter()
                if kind == "bare":
                    bare_loop(model, processor, task, args.batch, args.new_tokens)
                else:
                    harness(model, processor, task, args.batch, args.new_tokens, tmp / "run")
                t[kind] = time.perf_counter() - t0
            bare_t.append(t["bare"])
            harn_t.append(t["harness"])
            ratios.append(t["harness"] / t["bare"])
        print(f"\noverhead at batch {args.batch} ({args.repeats} repeats, medians)")
        print("| | seconds | samples/s |\n|---|---|---|")
        print(f"| bare generate loop | {statistics.median(bare_t):.2f} | {n / statistics.median(bare_t):.1f} |")
        print(f"| attnkit runner | {statistics.median(harn_t):.2f} | {n / statistics.median(harn_t):.1f} |")
        print(f"| ratio runner / bare (median of paired) | {statistics.median(ratios):.3f} | |", flush=True)

        sizes = [1, 4, 8]
        times: dict[int, list[float]] = {b: [] for b in sizes}
        for rep in range(args.repeats):
            for b in sizes if rep % 2 == 0 else reversed(sizes):
                t0 = time.perf_counter()
                harness(model, processor, task, b, args.new_tokens, tmp / "run")
                times[b].append(time.perf_counter() - t0)
        print(f"\nthroughput of the runner ({args.repeats} repeats, medians)")
        print("| batch | samples/s | vs batch 1 |\n|---|---|---|")
        base = statistics.median(times[1])
        for b in sizes:
            med = statistics.median(times[b])
            print(f"| {b} | {n / med:.1f} | {base / med:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
