"""CARVE's end-to-end latency against a plain answer (one greedy generate on the image), side by side.

Usage: python scripts/bench_carve.py [--family llava] [--layers 8] [--new-tokens 16] [--repeats 5]
       [--size 336x336] [--device cpu]

Both run on the same tiny random model (attnkit.testing) and image: "plain" is make_batch + generate with
``max_new_tokens = min_new_tokens = N``; "carve" is attnkit.methods.carve.answer with ``probe_tokens = N``
and the same N for the final answer. Reported: the median seconds of each over interleaved repetitions,
and the median of the paired ratios.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import _timed  # scripts/bench.py: synchronises CUDA around the call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="llava")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", default="336x336")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from attnkit import testing
    from attnkit.eval.inputs import make_batch
    from attnkit.methods import carve

    width, height = map(int, args.size.split("x"))
    model, _ = testing.tiny_model(args.family, num_layers=args.layers)
    model.to(args.device)
    processor = testing.tiny_processor(args.family)
    image = testing.sample_images(1, size=(width, height))[0]
    question = "Is there a dog in the image? Please answer yes or no."
    n = args.new_tokens

    def plain() -> None:
        batch = make_batch(processor, args.family, [question], [image])
        batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def pipeline() -> None:
        carve.answer(model, processor, image, question, probe_tokens=n, max_new_tokens=n, min_new_tokens=n)

    plain(), pipeline()  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        a.append(_timed(plain))
        b.append(_timed(pipeline))
    ratios = [y / x for x, y in zip(a, b)]
    print(f"tiny:{args.family} layers={args.layers} image {width}x{height} new_tokens={n} device={args.device} "
          f"threads={args.threads} repeats={args.repeats}")
    print(f"plain answer: {statistics.median(a) * 1000:.1f} ms   carve: {statistics.median(b) * 1000:.1f} ms   "
          f"carve / plain: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
