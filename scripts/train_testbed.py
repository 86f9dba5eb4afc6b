"""Train the testbed VLM from scratch on the shapes set (CPU, deterministic for a seed and thread count).

    python scripts/train_testbed.py --out attnkit/testbed/model            # the shipped weights
    python scripts/train_testbed.py --out /tmp/tb --stage1-steps 5 --stage2-steps 5 --n-train 200   # smoke run

Two stages (plain end-to-end training stays near chance for a long time at this size):
1. the vision tower alone, as a classifier of every patch: which shape and which colour covers it
   (from the polygons; a linear head on each patch's last-layer state), so patch features say what
   is where (an image-level multi-label head learned colours fast and shapes hardly at all);
2. the whole model on 30% description requests and 70% "Is there a X in the image?" questions
   (loss on the answer tokens only), the classifier loss kept at weight 0.5, and a presence probe
   at weight 0.5: a linear head on the asked shape word's hidden state after layer 2 predicts
   whether the shape is in the image. Answering needs two hops (the word's shape, then that shape
   in the image tokens); without the probe the model learned to describe images early but kept
   guessing yes/no for 2,400 steps. The probe and the classifier heads are not saved.
AdamW, batch 32, bf16 autocast on CPU, linear warm-up; stage 2 holds its peak learning rate for
70% of the steps (the model switches from guessing to reading the image abruptly, late) and then
decays it (cosine). The training images are
drawn in memory by ``attnkit.testbed.shapes.generate`` (split "train"), the same stream
``make_shapes`` writes. Weights are saved in float16 (the config says float32: loading upcasts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from attnkit.eval.inputs import chat_text
from attnkit.testbed import model as M
from attnkit.testbed import shapes as S

DESCRIBE = ("Please describe this image in detail.", "Describe this image.", "What do you see in the image?")
SUFFIX = " Please answer yes or no."
AUX_LAYER = 2  # the presence probe reads the asked shape word's state after this many decoder layers


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def draw_set(n: int, seed: int) -> tuple[torch.Tensor, list[list[S.Obj]]]:
    pixels = torch.empty(n, 3, S.IMAGE_SIZE, S.IMAGE_SIZE, dtype=torch.uint8)
    objects = []
    for i, (objs, img) in enumerate(S.generate("train", n, seed)):
        pixels[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        objects.append(objs)
    return pixels, objects


class Batcher:
    """Random batches of (pixels, token ids, answer mask, classifier targets)."""

    def __init__(self, processor, pixels, objects, seed: int) -> None:
        self.tok = processor.tokenizer
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        self.pixels, self.objects = pixels, objects
        self.rng = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.image_id = self.tok.convert_tokens_to_ids(M.IMAGE)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id
        self.processor = processor
        self.shape_labels, self.colour_labels = patch_labels(objects)

    def normalise(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.pixels[idx].float() / 255 - self.mean) / self.std

    def prompt_ids(self, question: str) -> list[int]:
        return self.tok(chat_text(self.processor, question).replace(M.IMAGE, M.IMAGE * M.NUM_IMAGE_TOKENS),
                        add_special_tokens=False)["input_ids"]

    def sample_text(self, objs: list[S.Obj], caption_share: float) -> tuple[str, str, str | None]:
        """(question, answer, the shape word of an existence question or None)."""
        rng = self.rng
        if rng.random() < caption_share:
            order = objs[:]
            rng.shuffle(order)
            return rng.choice(DESCRIBE), S.describe(order), None
        present = [o.shape for o in objs]
        if rng.random() < 0.5:
            shape, answer = rng.choice(present), "Yes"
        else:
            shape, answer = rng.choice([s for s in S.SHAPES if s not in present]), "No"
        word = S.mention(shape, rng)
        q = f"Is there {'an' if word[0] in 'aeiou' else 'a'} {word} in the image?"
        if rng.random() < 0.7:
            q += SUFFIX
        return q, answer, word

    def text_batch(self, idx: torch.Tensor, caption_share: float):
        """(ids, attention mask, answer-token mask, (rows, positions, labels) of the asked shape words)."""
        seqs, masks = [], []
        aux: tuple[list[int], list[int], list[float], list[int], list[int]] = ([], [], [], [], [])
        for r, i in enumerate(idx.tolist()):
            q, a, word = self.sample_text(self.objects[i], caption_share)
            p = self.prompt_ids(q)
            ans = self.tok(" " + a, add_special_tokens=False)["input_ids"] + [self.eos]
            seqs.append(p + ans)
            masks.append([0] * len(p) + [1] * len(ans))
            if word is not None:  # the last token of the shape word, after the image tokens
                w = self.tok(" " + word, add_special_tokens=False)["input_ids"]
                start = max(k for k in range(len(p) - len(w) + 1) if p[k:k + len(w)] == w)
                aux[0].append(r)
                aux[1].append(start + len(w) - 1)
                aux[2].append(1.0 if a == "Yes" else 0.0)
                aux[3].append(len(p) - 1)
                aux[4].append(S.SHAPES.index(self.shape_of(word)))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad)
        att = torch.zeros(len(seqs), width, dtype=torch.long)
        ans = torch.zeros(len(seqs), width, dtype=torch.bool)
        for r, (s, m) in enumerate(zip(seqs, masks)):  # right padding: positions stay 0..n-1
            ids[r, : len(s)] = torch.tensor(s)
            att[r, : len(s)] = 1
            ans[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return ids, att, ans, (torch.tensor(aux[0], dtype=torch.long), torch.tensor(aux[1], dtype=torch.long),
                               torch.tensor(aux[2]), torch.tensor(aux[3], dtype=torch.long),
                               torch.tensor(aux[4], dtype=torch.long))

    @staticmethod
    def shape_of(word: str) -> str:
        return word if word in S.SHAPES else next(s for s, syn in S.SYNONYMS.items() if word in syn)

    def batch(self, size: int):
        return torch.randint(len(self.objects), (size,), generator=self.g)


def patch_labels(objects: list[list[S.Obj]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, per 8x8 patch: the shape (1..10) and colour (1..8) of the object covering >= 20% of it, else 0."""
    side = S.IMAGE_SIZE // M.PATCH
    shape_ix = {s: i + 1 for i, s in enumerate(S.SHAPES)}
    colour_ix = {c: i + 1 for i, c in enumerate(S.COLOURS)}
    shapes = torch.zeros(len(objects), side * side, dtype=torch.long)
    colours = torch.zeros_like(shapes)
    for i, objs in enumerate(objects):
        for o in objs:
            mask = Image.new("L", (S.IMAGE_SIZE, S.IMAGE_SIZE), 0)
            ImageDraw.Draw(mask).polygon(o.polygon, fill=1)
            cover = torch.from_numpy(np.array(mask)).float().view(side, M.PATCH, side, M.PATCH).mean((1, 3)).flatten()
            shapes[i, cover >= 0.2] = shape_ix[o.shape]
            colours[i, cover >= 0.2] = colour_ix[o.colour]
    return shapes, colours


def lr_at(step: int, total: int, peak: float, warmup: int, hold: float = 0.0) -> float:
    """Linear warm-up, the peak held for ``hold`` of the steps, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = max(warmup, int(hold * total))
    if step < start:
        return peak
    frac = (step - start) / max(1, total - start)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class PatchClassifier(torch.nn.Module):
    """Per-patch linear head over the vision tower's last layer: which shape and colour covers each patch."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.n_shapes = len(S.SHAPES) + 1
        self.head = torch.nn.Linear(hidden, self.n_shapes + len(S.COLOURS) + 1)

    def loss(self, patch_states: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(shape + colour cross-entropy over patches, accuracy on the patches an object covers)."""
        out = self.head(patch_states[:, 1:]).float()  # CLS dropped, as the projector sees it
        k = self.n_shapes
        loss = F.cross_entropy(out[..., :k].reshape(-1, k), shapes.reshape(-1)) + \
            F.cross_entropy(out[..., k:].reshape(-1, out.shape[-1] - k), colours.reshape(-1))
        fg = shapes > 0
        acc = (out[..., :k].argmax(-1)[fg] == shapes[fg]).float().mean().item()
        return loss, acc


def vision_states(model, pixels: torch.Tensor) -> torch.Tensor:
    return model.model.vision_tower(pixel_values=pixels).last_hidden_state


@torch.no_grad()
def quick_pope(model, batcher: Batcher, pixels_val, objects_val, n: int = 240) -> dict[str, float]:
    """Yes/no accuracy on present / absent-partner / absent-other questions of held-out images (first answer token)."""
    model.eval()
    tok = batcher.tok
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    stats = {"present": [0, 0], "partner": [0, 0], "other": [0, 0]}
    rng = random.Random(123)
    for start in range(0, min(n, len(objects_val)), 48):
        rows = list(range(start, min(start + 48, n, len(objects_val))))
        items = []
        for i in rows:
            present = [o.shape for o in objects_val[i]]
            absent_partners = [S.partner_of(s) for s in present if S.partner_of(s) not in present]
            others = [s for s in S.SHAPES if s not in present and s not in absent_partners]
            items.append((i, rng.choice(present), "present"))
            if absent_partners:
                items.append((i, rng.choice(absent_partners), "partner"))
            items.append((i, rng.choice(others), "other"))
        seqs = [batcher.prompt_ids(f"Is there a {s} in the image?{SUFFIX}") for _, s, _ in items]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), batcher.pad)
        att = torch.zeros_like(ids)
        for r, s in enumerate(seqs):  # left padding, as generation uses
            ids[r, width - len(s):] = torch.tensor(s)
            att[r, width - len(s):] = 1
        pix = ((pixels_val[[i for i, _, _ in items]].float() / 255) - batcher.mean) / batcher.std
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=att, pixel_values=pix, position_ids=pos)
        says_yes = out.logits[:, -1, yes] > out.logits[:, -1, no]
        for (_, _, kind), y in zip(items, says_yes.tolist()):
            stats[kind][0] += int(y)
            stats[kind][1] += 1
    model.train()
    return {f"yes_{k}": v[0] / max(1, v[1]) for k, v in stats.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the trained model (save_pretrained)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=30000)
    ap.add_argument("--batch", type=int, default=32, help="stage 2 batch")
    ap.add_argument("--batch1", type=int, default=48, help="stage 1 batch")
    ap.add_argument("--stage1-steps", type=int, default=1500)
    ap.add_argument("--stage2-steps", type=int, default=2000)
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it in the last bits)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 (slower on CPUs with bf16 support)")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    processor = M.build_processor()
    model = M.build_model(args.seed)
    model.train()

    pixels, objects = draw_set(args.n_train, args.seed)
    val_pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1)
                              for _, im in S.generate("trainval-probe", 240, args.seed)])
    val_objects = [o for o, _ in S.generate("trainval-probe", 240, args.seed)]
    log(f"drew {args.n_train} training images", t0)
    b = Batcher(processor, pixels, objects, args.seed)
    # the hand-built prompt must be exactly what the processor makes at evaluation time
    q = "Is there a circle in the image?" + SUFFIX
    ref = processor(text=[chat_text(processor, q)], images=[[S.generate("train", 1, 0).__next__()[1]]],
                    return_tensors="pt")
    assert ref["input_ids"][0].tolist() == b.prompt_ids(q), "training prompt differs from the processor's"

    classifier = PatchClassifier(M.VISION["hidden_size"])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16)

    # stage 1: the vision tower as a classifier
    params = [*model.model.vision_tower.parameters(), *classifier.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr1, weight_decay=0.01)
    for step in range(args.stage1_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.stage1_steps, args.lr1, min(50, args.stage1_steps // 10 + 1))
        idx = b.batch(args.batch1)
        with autocast:
            states = vision_states(model, b.normalise(idx))
        loss, acc = classifier.loss(states, b.shape_labels[idx], b.colour_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.stage1_steps - 1:
            log(f"stage 1 step {step}: loss {loss.item():.4f}, shape accuracy on object patches {acc:.3f}", t0)

    # stage 2: the whole model on descriptions and existence questions
    presence = torch.nn.Linear(M.TEXT["hidden_size"], 1)
    asked_probe = torch.nn.Linear(M.TEXT["hidden_size"], len(S.SHAPES))
    params = [*model.parameters(), *classifier.parameters(), *presence.parameters(), *asked_probe.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr2, weight_decay=0.01)
    history = []
    for step in range(args.stage2_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.stage2_steps, args.lr2, min(100, args.stage2_steps // 10 + 1), hold=0.7)
        idx = b.batch(args.batch)
        ids, att, ans, (aux_rows, aux_pos, aux_label, last_pos, asked) = b.text_batch(idx, caption_share=0.3)
        states: dict[str, torch.Tensor] = {}
        hook = model.model.vision_tower.register_forward_hook(
            lambda mod, inp, out: states.__setitem__("v", out.last_hidden_state))
        try:
            with autocast:
                out = model(input_ids=ids, attention_mask=att, pixel_values=b.normalise(idx),
                            output_hidden_states=True)
        finally:
            hook.remove()
        # next-token loss on the answer tokens: position t predicts token t+1
        target = ids[:, 1:][ans[:, 1:]]
        lm_loss = F.cross_entropy(out.logits[:, :-1][ans[:, 1:]].float(), target)
        cls_loss, _ = classifier.loss(states["v"], b.shape_labels[idx], b.colour_labels[idx])
        # the asked shape's presence, read at its word after layer AUX_LAYER: the first hop of the answer
        word_states = out.hidden_states[AUX_LAYER][aux_rows, aux_pos].float()
        aux_loss = F.binary_cross_entropy_with_logits(presence(word_states).squeeze(-1), aux_label) \
            if len(aux_rows) else lm_loss.new_zeros(())
        # which shape was asked, read at the last prompt token after AUX_LAYER: the hop that brings the question there
        last_states = out.hidden_states[AUX_LAYER][aux_rows, last_pos].float()
        ask_loss = F.cross_entropy(asked_probe(last_states), asked) if len(aux_rows) else lm_loss.new_zeros(())
        loss = lm_loss + 0.5 * cls_loss + 0.5 * aux_loss + 0.5 * ask_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"stage 2 step {step}: answer loss {lm_loss.item():.4f}, classifier {cls_loss.item():.4f}, "
                f"presence {aux_loss.item():.4f}, asked shape {ask_loss.item():.4f}", t0)
        if args.eval_every and (step % args.eval_every == 0 or step == args.stage2_steps - 1) and step:
            probe = quick_pope(model, b, val_pixels, val_objects)
            history.append({"step": step, **probe})
            log(f"  probe: yes on present {probe['yes_present']:.3f}, absent partner {probe['yes_partner']:.3f}, "
                f"absent other {probe['yes_other']:.3f}", t0)

    model.eval()
    out = M.save(model, processor, args.out, dtype=torch.float16)
    train_info = {"seed": args.seed, "n_train": args.n_train, "batch": args.batch, "batch1": args.batch1,
                  "stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps,
                  "lr1": args.lr1, "lr2": args.lr2, "threads": args.threads, "bf16": not args.no_bf16,
                  "seconds": round(time.time() - t0, 1), "torch": torch.__version__, "probe": history}
    (out / "training.json").write_text(json.dumps(train_info, indent=2) + "\n", encoding="utf-8")
    log(f"saved to {out}", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
