"""Turn (question, image) pairs into one left-padded model batch through the processor's chat template."""

from __future__ import annotations

from typing import Any

import torch


def chat_text(processor: Any, question: str) -> str:
    """The question as one user turn (image first, then text), with the generation prompt appended."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _move_padding_left(batch: dict[str, Any]) -> None:
    """InstructBlipProcessor prepends the query placeholders to already padded text: [query][pad][text].
    Reorder each row to [pad][query][text] so the batch is truly left-padded."""
    mask = batch["attention_mask"]
    order = torch.argsort(mask, dim=1, stable=True)  # padding (0) first, otherwise order kept
    for key in ("input_ids", "attention_mask"):
        batch[key] = torch.gather(batch[key], 1, order)


def make_batch(processor: Any, family: str, questions: list[str], images: list[Any]) -> dict[str, Any]:
    """Left-padded batch, one row per question, each with its one image before the text."""
    if len(images) != len(questions):
        raise ValueError(f"need one image per question, got {len(images)} images for {len(questions)} questions")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "padding_side", "left") != "left":
        tokenizer.padding_side = "left"  # batched generation needs left padding
    texts = [chat_text(processor, q) for q in questions]
    batch = dict(processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt"))
    if family == "instructblip":
        _move_padding_left(batch)
    return batch
