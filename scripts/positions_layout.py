"""How much the layout of the kept tokens moves PyramidDrop's and SparseVLM's output: positions="official"
(renumbered after each drop, SparseVLM's merged tokens after the kept image tokens) against the default
positions="original", on attnkit's tiny random models (one image, one prompt, greedy decoding).

Prints, per model and method, the largest change of the last prompt position's logits and how many of
the first N greedy tokens are the same under both layouts.

    python scripts/positions_layout.py [--new 8] [--seed 1]
"""

from __future__ import annotations

import argparse

import torch

import attnkit
from attnkit import testing
from attnkit.methods import PyramidDrop, SparseVLM

MODELS = [("llava", 4), ("llava", 8), ("internvl", 8), ("idefics3", 8)]
PROMPT = "Please describe this image in detail and answer yes or no."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=8, help="greedy tokens compared")
    parser.add_argument("--seed", type=int, default=1, help="seed of the tiny models' weights")
    args = parser.parse_args()
    for family, layers in MODELS:
        model, _ = testing.tiny_model(family, num_layers=layers, seed=args.seed)
        inputs = testing.tiny_inputs(family, prompts=[PROMPT], images=testing.sample_images(1))
        n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
        for cls in (PyramidDrop, SparseVLM):
            last, tokens = {}, {}
            for positions in ("original", "official"):
                with torch.no_grad(), attnkit.wrap(model, cls(positions=positions)):
                    last[positions] = model(**inputs).logits[0, -1]
                    out = model.generate(**inputs, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
                tokens[positions] = out[0, -args.new :]
            moved = (last["official"] - last["original"]).abs().max().item()
            same = int((tokens["official"] == tokens["original"]).sum())
            print(f"{family:9s} {layers} layers, {n_image:3d} image tokens, {cls.name:9s}: "
                  f"max |logit change| {moved:.3f}, greedy tokens the same {same}/{args.new}")


if __name__ == "__main__":
    main()
