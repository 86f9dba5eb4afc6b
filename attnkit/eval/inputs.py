"""Turn (question, image) pairs into one left-padded model batch through the processor's chat template."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models.base import Adapter


def open_rgb(src: Any, culprit: str = "") -> Any:
    """A PIL image, or the image file at ``src``, as RGB. A missing, unreadable or non-image file raises a
    one-line DataError naming it, after ``culprit`` (e.g. ``"question 12: "``)."""
    from PIL import Image

    from ..errors import DataError

    if hasattr(src, "convert"):
        return src.convert("RGB")
    try:
        with Image.open(src) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{culprit}image file not found: {src}") from None
    except IsADirectoryError:
        raise DataError(f"{culprit}image {src} is a directory") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{culprit}cannot read image {src}: {reason}") from None


def chat_text(processor: Any, question: str) -> str:
    """The question as one user turn (image first, then text), with the generation prompt appended."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def make_batch(
    processor: Any, adapter: Adapter | type[Adapter] | str, questions: list[str], images: list[Any]
) -> dict[str, Any]:
    """Left-padded batch, one row per question, each with its one image before the text. ``adapter``: the
    model's adapter (or its class, or its family name), which makes the processor's output truly
    left-padded where the family's processor does not (``Adapter.left_pad_batch``)."""
    from ..models import adapter_class

    if len(images) != len(questions):
        raise ValueError(f"need one image per question, got {len(images)} images for {len(questions)} questions")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "padding_side", "left") != "left":
        tokenizer.padding_side = "left"  # batched generation needs left padding
    texts = [chat_text(processor, q) for q in questions]
    batch = dict(processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt"))
    cls = adapter_class(adapter) if isinstance(adapter, str) else adapter
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return cls.left_pad_batch(batch, 0 if pad_id is None else int(pad_id))
