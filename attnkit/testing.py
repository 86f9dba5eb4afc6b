"""Tiny, fully offline vision-language models for tests.

For each of the 10 supported VLM families this module builds, without any hub access:

* a tiny random config (text hidden 32, 4 heads / 2 KV heads, head_dim 8; vision hidden 32, 2 layers);
* the family's real ``Processor`` class around a small WordPiece tokenizer made with the ``tokenizers``
  library and the family's (Pillow-backend) image processor, configured so that the image-token count
  the processor emits matches what the tiny model produces for an image of any size;
* deterministic Pillow images and a left-padded 2-row batch made through that processor.

It also holds the common method checks (``check_restore``, ``check_neutral``, ``check_batch_equals_rows``,
``check_cached_equals_recomputed``, ``check_drop_equals_mask``, ``check_runs``, ``check_unsupported``, or
``check_method`` for all of them): tests/test_common.py runs them on every registered method, and the
author of a method outside attnkit can run them on their own class. Each raises AssertionError saying what
differs.

Token ids are decided by one vocabulary per family (``_vocab``), so the config and the tokenizer always
agree. Nothing here downloads weights, tokenizers or data.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

try:
    from transformers.video_processing_utils import VideoProcessorMixin
except ImportError:  # transformers < 5.19: the video processor base class needs torchvision
    from transformers.image_processing_utils import BaseImageProcessor

    class VideoProcessorMixin(BaseImageProcessor):  # type: ignore[no-redef]
        """Placeholder base for the tiny processors' (unused) video processor on releases before 5.19."""

        model_input_names = ["pixel_values_videos"]

__all__ = [
    "CHECKS",
    "CHECK_FAMILIES",
    "FAMILIES",
    "applicable_checks",
    "check_batch_equals_rows",
    "check_cached_equals_recomputed",
    "check_drop_equals_mask",
    "check_families",
    "check_method",
    "check_model",
    "check_neutral",
    "check_restore",
    "check_runs",
    "check_unsupported",
    "multimodal_token_ids",
    "sample_images",
    "supported_families",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
    "tiny_processor",
    "write_coco",
]

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "instructblip",
    "internvl",
    "gemma3",
    "idefics3",
)

# Sizes shared by every family.
HIDDEN = 32
INTERMEDIATE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN // NUM_HEADS
VISION_LAYERS = 2
MAX_POSITIONS = 1024

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Is there a dog in the image?",
    "Please describe this image in detail. Is there a person or a car?",
)

# --------------------------------------------------------------------------------------------------
# Vocabulary: special tokens first (small, stable ids), then words, then characters so any text
# tokenizes (WordPiece falls back to single characters and "##" continuations; anything else is <unk>).
# --------------------------------------------------------------------------------------------------

_COMMON_WORDS = """
a an the is are was were be there here this that these those it its in on at of to for with from by
and or not no yes what which who where when how many much image picture photo please answer describe
detail question can you see do does i any some all one two three four five left right top bottom
front behind next near under above small large big little red green blue yellow white black brown
gray color man woman people child room street water sky grass tree building sitting standing holding
looking object only single short word user assistant system model
""".split()

_COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

_CHARS = string.ascii_lowercase + string.digits
_BASE_VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*_COMMON_WORDS, *(w for name in _COCO_CATEGORIES for w in name.split())]
        + list(_CHARS + string.punctuation)
        + [f"##{c}" for c in _CHARS]
    )
)

UNK = "<unk>"


@dataclass(frozen=True)
class _Spec:
    """Tokenizer and chat-format facts of one family (token strings follow the real checkpoints)."""

    eos: str
    pad: str
    bos: str | None
    # multimodal_token_ids() key -> token string; these are suppressed during generation.
    mm_tokens: dict[str, str]
    # Tokenizer attributes read by the processor (e.g. ``tokenizer.image_token``).
    named_tokens: dict[str, str]
    # Other special tokens (chat markup).
    chat_tokens: tuple[str, ...]
    # Chat template pieces: per-role turn prefix, turn suffix, generation prompt, image placeholder.
    roles: dict[str, str]
    turn_end: str
    generation_prompt: str
    image_placeholder: str
    # Where BOS comes from: the chat template (default) or the tokenizer, which then prepends it to every text.
    tokenizer_adds_bos: bool = False


_LLAVA_CHAT = dict(
    roles={"system": "", "user": "USER: ", "assistant": "ASSISTANT: "},
    turn_end=" ",
    generation_prompt="ASSISTANT:",
    image_placeholder="<image>\n",
)
_CHATML = dict(
    roles={r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
    turn_end="<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
)
_QWEN_MM = {
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}
_QWEN = _Spec(
    eos="<|im_end|>",
    pad="<|endoftext|>",
    bos=None,
    mm_tokens=_QWEN_MM,
    named_tokens={f"{k}_token": v for k, v in _QWEN_MM.items()},
    chat_tokens=("<|im_start|>",),
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    **_CHATML,
)
_IDEFICS3_ROW_COL = {f"row_{i}_col_{j}": f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)}

_SPECS: dict[str, _Spec] = {
    "llava": _Spec(
        eos="</s>", pad="<pad>", bos="<s>", mm_tokens={"image": "<image>"},
        named_tokens={"image_token": "<image>"}, chat_tokens=(), **_LLAVA_CHAT,
    ),
    "llava_next": _Spec(
        eos="</s>", pad="<pad>", bos="<s>", mm_tokens={"image": "<image>"},
        named_tokens={"image_token": "<image>"}, chat_tokens=(), **_LLAVA_CHAT,
    ),
    "llava_onevision": _Spec(
        eos="<|im_end|>", pad="<|endoftext|>", bos=None,
        mm_tokens={"image": "<image>", "video": "<video>"},
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_tokens=("<|im_start|>",), image_placeholder="<image>\n", **_CHATML,
    ),
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    # InstructBlipProcessor registers "<image>" itself (it needs an AddedToken, so no tokenizer attribute)
    # and prepends the query-token placeholders, so the template emits nothing for an image. The prompt
    # also goes to the Q-Former tokenizer, so BOS is added by the LM tokenizer (as Vicuna's does).
    "instructblip": _Spec(
        eos="</s>", pad="<pad>", bos="<s>", mm_tokens={"image": "<image>"}, named_tokens={},
        chat_tokens=(), roles={"system": "", "user": "", "assistant": ""}, turn_end=" ",
        generation_prompt="", image_placeholder="", tokenizer_adds_bos=True,
    ),
    "internvl": _Spec(
        eos="<|im_end|>", pad="<|endoftext|>", bos=None,
        mm_tokens={"image": "<IMG_CONTEXT>", "image_start": "<img>", "image_end": "</img>", "video": "<video>"},
        named_tokens={
            "context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
            "end_image_token": "</img>", "video_token": "<video>",
        },
        chat_tokens=("<|im_start|>",), image_placeholder="<IMG_CONTEXT>\n", **_CHATML,
    ),
    "gemma3": _Spec(
        eos="<eos>", pad="<pad>", bos="<bos>",
        mm_tokens={"image": "<image_soft_token>", "boi": "<start_of_image>", "eoi": "<end_of_image>"},
        named_tokens={
            "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
        },
        chat_tokens=("<start_of_turn>", "<end_of_turn>"),
        roles={"system": "<start_of_turn>user\n", "user": "<start_of_turn>user\n",
               "assistant": "<start_of_turn>model\n"},
        turn_end="<end_of_turn>\n", generation_prompt="<start_of_turn>model\n",
        image_placeholder="<start_of_image>",
    ),
    # Idefics3Processor hard-codes its token strings, so no tokenizer attributes are needed.
    "idefics3": _Spec(
        eos="<end_of_utterance>", pad="<pad>", bos="<|im_start|>",
        mm_tokens={
            "image": "<image>", "fake_image": "<fake_token_around_image>", "global_image": "<global-img>",
            **_IDEFICS3_ROW_COL,
        },
        named_tokens={}, chat_tokens=(),
        roles={"system": "System:", "user": "User:", "assistant": "Assistant:"},
        turn_end="<end_of_utterance>\n", generation_prompt="Assistant:", image_placeholder="<image>",
    ),
}  # fmt: skip


def _check_family(family: str) -> _Spec:
    if family not in _SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return _SPECS[family]


def _special_tokens(family: str) -> list[str]:
    spec = _check_family(family)
    named = [spec.pad, UNK, *([spec.bos] if spec.bos else []), spec.eos]
    return list(dict.fromkeys([*named, *spec.chat_tokens, *spec.mm_tokens.values(), *spec.named_tokens.values()]))


@lru_cache(maxsize=None)
def _vocab(family: str) -> tuple[str, ...]:
    """The family's full token list; a token's position is its id (in tokenizer and config alike)."""
    return tuple(dict.fromkeys([*_special_tokens(family), *_BASE_VOCAB]))


def _token_id(family: str, token: str) -> int:
    return _vocab(family).index(token)


def multimodal_token_ids(family: str) -> dict[str, int]:
    """Ids of the family's multimodal special tokens, e.g. ``{"image": 5, "vision_start": 7, ...}``."""
    return {key: _token_id(family, tok) for key, tok in _check_family(family).mm_tokens.items()}


def _wordpiece_tokenizer(
    vocab: tuple[str, ...],
    special: list[str],
    *,
    padding_side: str,
    post_processor: processors.PostProcessor | None = None,
    **kwargs: Any,
) -> PreTrainedTokenizerFast:
    """Lower-casing WordPiece over ``vocab`` with ``special`` as atomic special tokens."""
    backend = Tokenizer(models.WordPiece({tok: i for i, tok in enumerate(vocab)}, unk_token=kwargs["unk_token"]))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    # Without a post-processor the wrapper installs one that adds nothing (BOS comes from the chat template).
    backend.post_processor = post_processor
    # Tokens already in the vocab keep their ids.
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in special])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    # Set as an attribute, not an init kwarg: processors copy tokenizer init kwargs into the text kwargs of
    # every tokenizer they call, which would force InstructBLIP's Q-Former tokenizer to the same side.
    tokenizer.padding_side = padding_side
    return tokenizer


def _tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The family's tokenizer: left padding, its special tokens as named attributes where processors read them."""
    spec = _check_family(family)
    prepend_bos = None
    if spec.tokenizer_adds_bos:
        prepend_bos = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A $B:1",
            special_tokens=[(spec.bos, _token_id(family, spec.bos))],
        )
    return _wordpiece_tokenizer(
        _vocab(family),
        _special_tokens(family),
        padding_side="left",
        post_processor=prepend_bos,
        unk_token=UNK,
        pad_token=spec.pad,
        eos_token=spec.eos,
        bos_token=spec.bos,
        # A dict makes model-specific named attributes: tokenizer.image_token, tokenizer.image_token_id, ...
        extra_special_tokens=dict(spec.named_tokens) or None,
    )


_QFORMER_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def _qformer_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-like tokenizer for InstructBLIP's Q-Former ([PAD] = 0 as in the Q-Former config).

    It pads on the right, like the real (bert-base-uncased) one: the Q-Former uses absolute position
    embeddings that ignore the attention mask, so left padding would shift its text positions and change
    a row's output with the batch it is in.
    """
    vocab = tuple(dict.fromkeys([*_QFORMER_SPECIAL, *_BASE_VOCAB]))
    cls_sep = [(tok, vocab.index(tok)) for tok in ("[CLS]", "[SEP]")]
    return _wordpiece_tokenizer(
        vocab,
        _QFORMER_SPECIAL,
        padding_side="right",
        post_processor=processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=cls_sep
        ),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def _jinja_str(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _chat_template(spec: _Spec) -> str:
    """A minimal Jinja chat template; ``{"type": "image"}`` items become the family's placeholder."""
    role_prefix = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {_jinja_str(role)} -%}}{{{{- {_jinja_str(prefix)} -}}}}"
        for i, (role, prefix) in enumerate(spec.roles.items())
    )
    return (
        (f"{{{{- {_jinja_str(spec.bos)} -}}}}" if spec.bos and not spec.tokenizer_adds_bos else "")
        + "{%- for message in messages -%}"
        + role_prefix
        + "{%- endif -%}"
        + "{%- if message['content'] is string -%}{{- message['content'] -}}"
        + "{%- else -%}{%- for item in message['content'] -%}"
        + f"{{%- if item['type'] == 'image' -%}}{{{{- {_jinja_str(spec.image_placeholder)} -}}}}"
        + "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
        + "{%- endfor -%}{%- endif -%}"
        + f"{{{{- {_jinja_str(spec.turn_end)} -}}}}"
        + "{%- endfor -%}"
        + f"{{%- if add_generation_prompt -%}}{{{{- {_jinja_str(spec.generation_prompt)} -}}}}{{%- endif -%}}"
    )


# --------------------------------------------------------------------------------------------------
# Configs. Image-side geometry per family (kept in sync with the image processors below):
#   llava / llava_next: CLIP 32 px, patch 8 -> 4x4 = 16 tokens per crop (CLS dropped, "default").
#   llava_onevision:    SigLIP 32 px, patch 8 -> 16 tokens per crop ("full", no CLS).
#   qwen*:              patch 4, spatial merge 2; images resized to <= 32x32 px -> <= 16 tokens.
#   instructblip:       8 Q-Former query tokens.
#   internvl:           32 px tiles, patch 4, pixel shuffle 0.5 -> 16 tokens per tile.
#   gemma3:             SigLIP 32 px, patch 4 (8x8) pooled to 4x4 = 16 tokens.
#   idefics3:           32 px tiles, patch 4 (8x8), scale factor 2 -> 16 tokens per tile.
# --------------------------------------------------------------------------------------------------

_TILE = 32  # vision input side in pixels
_PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # llava_next / onevision anyres grids (multiples of _TILE)
_NUM_QUERY_TOKENS = 8
_QWEN_MIN_PIXELS = 16 * 16
_QWEN_MAX_PIXELS = 32 * 32
_INTERNVL_MAX_TILES = 4
_IDEFICS3_LONGEST_EDGE = 2 * _TILE


def _text_config(family: str, num_layers: int, *, head_dim: bool = True, bos_eos: bool = True) -> dict:
    """Decoder kwargs shared by all language models (GQA: 4 query heads over 2 KV heads)."""
    spec = _SPECS[family]
    kwargs = dict(
        vocab_size=len(_vocab(family)),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=_token_id(family, spec.pad),
    )
    if head_dim:
        kwargs["head_dim"] = HEAD_DIM
    if bos_eos:
        kwargs["bos_token_id"] = _token_id(family, spec.bos) if spec.bos else None
        kwargs["eos_token_id"] = _token_id(family, spec.eos)
    return kwargs


def _vit_config(model_type: str, *, patch_size: int, **extra: Any) -> dict:
    """ViT-style vision tower kwargs (CLIP, SigLIP, InstructBLIP, InternVL, Idefics3) on _TILE-pixel inputs."""
    return dict(
        model_type=model_type,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=_TILE,
        patch_size=patch_size,
        **extra,
    )


def _qwen_vision_config(family: str) -> dict:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower: patch 4, 2x2 merge, merger output = text hidden size."""
    common = dict(depth=VISION_LAYERS, num_heads=NUM_HEADS, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        return dict(common, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2)
    common.update(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, out_hidden_size=HIDDEN)
    if family == "qwen2_5_vl":
        # Windows of 2x2 merged patches (16 px) in layer 0, full attention in layer 1.
        return dict(common, window_size=16, fullatt_block_indexes=[1])
    # qwen3_vl: learned 8x8 position grid (interpolated), deepstack features from vision layer 0.
    return dict(common, num_position_embeddings=64, deepstack_visual_indexes=[0])


def tiny_config(family: str, *, num_layers: int = 2) -> PreTrainedConfig:
    """Tiny random-model config of ``family`` whose token ids match ``tiny_processor(family)``."""
    spec = _check_family(family)
    mm = multimodal_token_ids(family)
    if family in ("llava", "llava_next"):
        kwargs = dict(
            text_config=dict(model_type="llama", **_text_config(family, num_layers)),
            vision_config=_vit_config("clip_vision_model", patch_size=8, projection_dim=HIDDEN),
            image_token_index=mm["image"],
            image_seq_length=16,
            vision_feature_select_strategy="default",
        )
        if family == "llava_next":
            kwargs["image_grid_pinpoints"] = _PINPOINTS
        return transformers.AutoConfig.for_model(family, **kwargs)
    if family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", **_text_config(family, num_layers, head_dim=False)),
            vision_config=_vit_config("siglip_vision_model", patch_size=8, vision_use_head=False),
            image_token_index=mm["image"],
            video_token_index=mm["video"],
            vision_feature_select_strategy="full",
            image_grid_pinpoints=_PINPOINTS,
        )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        qwen3 = family == "qwen3_vl"
        # mRoPE: (temporal, height, width) sections over head_dim / 2 = 4 rotary frequencies.
        rope = {"rope_type": "default", "mrope_section": [2, 1, 1]}
        if qwen3:
            rope["mrope_interleaved"] = True
        text = _text_config(family, num_layers, head_dim=qwen3, bos_eos=not qwen3)
        return transformers.AutoConfig.for_model(
            family,
            text_config=dict(text, rope_parameters=rope),
            vision_config=_qwen_vision_config(family),
            image_token_id=mm["image"],
            video_token_id=mm["video"],
            vision_start_token_id=mm["vision_start"],
            vision_end_token_id=mm["vision_end"],
        )
    if family == "instructblip":
        # Llama LM (as in the Vicuna checkpoints) rather than the default OPT, which has no GQA.
        return transformers.InstructBlipConfig(
            text_config=dict(model_type="llama", **_text_config(family, num_layers)),
            vision_config=_vit_config("instructblip_vision_model", patch_size=8),
            qformer_config=dict(
                vocab_size=len(_qformer_tokenizer()),
                hidden_size=HIDDEN,
                num_hidden_layers=VISION_LAYERS,
                num_attention_heads=NUM_HEADS,
                intermediate_size=INTERMEDIATE,
                max_position_embeddings=128,
            ),
            num_query_tokens=_NUM_QUERY_TOKENS,
            image_token_index=mm["image"],
        )
    if family == "internvl":
        return transformers.InternVLConfig(
            text_config=dict(model_type="qwen2", **_text_config(family, num_layers, head_dim=False)),
            vision_config=_vit_config("internvl_vision", patch_size=4),
            image_token_id=mm["image"],
            image_seq_length=16,
            downsample_ratio=0.5,
        )
    if family == "gemma3":
        text = _text_config(family, num_layers)
        return transformers.Gemma3Config(
            text_config=dict(
                text,
                query_pre_attn_scalar=HEAD_DIM,
                # Alternate local (sliding window 32) and global layers, so both code paths run.
                sliding_window=32,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            ),
            vision_config=_vit_config("siglip_vision_model", patch_size=4, vision_use_head=False),
            mm_tokens_per_image=16,
            image_token_index=mm["image"],
            boi_token_index=mm["boi"],
            eoi_token_index=mm["eoi"],
        )
    assert family == "idefics3"
    return transformers.Idefics3Config(
        text_config=dict(model_type="llama", **_text_config(family, num_layers)),
        vision_config=_vit_config("idefics3_vision", patch_size=4),
        image_token_id=mm["image"],
        scale_factor=2,
        # Deprecated top-level pad id; set it anyway so no out-of-vocab default (128002) is left in the config.
        pad_token_id=_token_id(family, spec.pad),
    )


# --------------------------------------------------------------------------------------------------
# Processors (Pillow image-processor backends: torchvision is not required).
# --------------------------------------------------------------------------------------------------


def _placeholder_video_processor(**kwargs: Any) -> VideoProcessorMixin:
    """Stand-in for the video processor some processors require (real ones need torchvision).
    Videos are not supported by the tiny processors."""
    return VideoProcessorMixin(**kwargs)


def _with_video_processor(cls: type[ProcessorMixin], *args: Any, **kwargs: Any) -> ProcessorMixin:
    """Construct ``cls(*args, **kwargs)``, a processor taking a (placeholder) video processor.

    Without torchvision, transformers does not export ``VideoProcessorMixin``, so the type check in
    ``ProcessorMixin.__init__`` cannot resolve the expected class and raises for every video processor.
    Accept a ``VideoProcessorMixin`` for this one instance while it is constructed; all other checks run.
    """
    processor = cls.__new__(cls)
    default_check = processor.check_argument_for_proper_class

    def check(argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, VideoProcessorMixin):
            return VideoProcessorMixin
        return default_check(argument_name, argument)

    processor.check_argument_for_proper_class = check
    cls.__init__(processor, *args, **kwargs)
    del processor.check_argument_for_proper_class
    return processor


def tiny_processor(family: str) -> ProcessorMixin:
    """The family's real processor around a tiny offline tokenizer and image processor, left padding."""
    spec = _check_family(family)
    tokenizer = _tokenizer(family)
    template = _chat_template(spec)
    if family in ("llava", "llava_next"):
        size = dict(size={"shortest_edge": _TILE}, crop_size={"height": _TILE, "width": _TILE})
        common = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        if family == "llava":
            return transformers.LlavaProcessor(
                transformers.LlavaImageProcessorPil(**size), tokenizer, chat_template=template, **common
            )
        image_processor = transformers.LlavaNextImageProcessorPil(**size, image_grid_pinpoints=_PINPOINTS)
        return transformers.LlavaNextProcessor(image_processor, tokenizer, chat_template=template, **common)
    if family == "llava_onevision":
        image_processor = transformers.LlavaOnevisionImageProcessorPil(
            size={"height": _TILE, "width": _TILE}, image_grid_pinpoints=_PINPOINTS
        )
        return _with_video_processor(
            transformers.LlavaOnevisionProcessor,
            image_processor,
            tokenizer,
            _placeholder_video_processor(),
            num_image_tokens=16,
            vision_feature_select_strategy="full",
            chat_template=template,
        )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        geometry = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
        image_processor = transformers.Qwen2VLImageProcessorPil(
            size={"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS}, **geometry
        )
        processor_class = {
            "qwen2_vl": transformers.Qwen2VLProcessor,
            "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
            "qwen3_vl": transformers.Qwen3VLProcessor,
        }[family]
        video_processor = _placeholder_video_processor(**geometry)
        return _with_video_processor(
            processor_class, image_processor, tokenizer, video_processor, chat_template=template
        )
    if family == "instructblip":
        processor = transformers.InstructBlipProcessor(
            transformers.BlipImageProcessorPil(size={"height": _TILE, "width": _TILE}),
            tokenizer,
            _qformer_tokenizer(),
            num_query_tokens=_NUM_QUERY_TOKENS,
        )
        processor.chat_template = template  # its __init__ drops chat_template
        return processor
    if family == "internvl":
        image_processor = transformers.GotOcr2ImageProcessorPil(
            size={"height": _TILE, "width": _TILE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=_INTERNVL_MAX_TILES,
        )
        return _with_video_processor(
            transformers.InternVLProcessor,
            image_processor,
            tokenizer,
            _placeholder_video_processor(),
            image_seq_length=16,
            chat_template=template,
        )
    if family == "gemma3":
        image_processor = transformers.Gemma3ImageProcessorPil(size={"height": _TILE, "width": _TILE})
        return transformers.Gemma3Processor(image_processor, tokenizer, chat_template=template, image_seq_length=16)
    assert family == "idefics3"
    image_processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": _IDEFICS3_LONGEST_EDGE}, max_image_size={"longest_edge": _TILE}
    )
    return transformers.Idefics3Processor(image_processor, tokenizer, image_seq_len=16, chat_template=template)


# --------------------------------------------------------------------------------------------------
# Images, batches and models.
# --------------------------------------------------------------------------------------------------

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]  # fmt: skip


def sample_images(n: int = 2, size: tuple[int, int] = (64, 48), seed: int = 0) -> list[Image.Image]:
    """``n`` deterministic RGB images of ``size`` (width, height): coloured shapes on a plain background."""
    width, height = size
    images = []
    for index in range(n):
        rng = random.Random(seed * 10_007 + index)
        image = Image.new("RGB", size, rng.choice(_PALETTE))
        draw = ImageDraw.Draw(image)
        for _ in range(3 + index % 3):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            x1, y1 = x0 + rng.randint(1, max(1, width // 2)), y0 + rng.randint(1, max(1, height // 2))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x0, y0, x1, y1), fill=rng.choice(_PALETTE), outline=(0, 0, 0))
        images.append(image)
    return images


def tiny_inputs(
    family: str,
    processor: ProcessorMixin | None = None,
    prompts: list[str] | None = None,
    images: list[Image.Image] | None = None,
) -> dict[str, Any]:
    """Left-padded batch, one row per prompt, each with one image before its text, made by the processor
    through its chat template (``padding=True``, ``return_tensors="pt"``)."""
    from .eval.inputs import make_batch

    processor = processor if processor is not None else tiny_processor(family)
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    images = list(images) if images is not None else sample_images(len(prompts))
    return make_batch(processor, family, prompts, images)


COCO_TEST_CATEGORIES: tuple[str, ...] = ("person", "dog", "cat", "car", "chair", "cup", "bus", "bird")


def write_coco(root: str | Path, n_images: int = 6, size: tuple[int, int] = (64, 48), seed: int = 11) -> Path:
    """A small COCO-format set under ``root``: ``val2014/`` drawn images, ``annotations/`` with
    ``instances_val2014.json`` (three distinct categories per image, one box each) and
    ``captions_val2014.json`` (one caption per image). Returns the annotations directory."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    names = COCO_TEST_CATEGORIES
    images, anns, caps = [], [], []
    width, height = size
    for i, image in enumerate(sample_images(n_images, size=size, seed=seed), start=1):
        name = f"COCO_val2014_{i:012d}.jpg"
        image.save(root / "val2014" / name)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        for k in range(3):
            box = [width * (1 + 2 * k) / 16, height * (1 + 2 * k) / 16, width * (5 - k) / 16, height * (5 - k) / 16]
            anns.append({"id": 10 * i + k, "image_id": i, "category_id": (i + 2 * k) % len(names) + 1,
                         "iscrowd": 0, "bbox": box, "area": box[2] * box[3]})
        caps.append({"id": i, "image_id": i, "caption": f"A {names[i % len(names)]} on a table."})
    cats = [{"id": c + 1, "name": n, "supercategory": "thing"} for c, n in enumerate(names)]
    info = {"description": "attnkit.testing.write_coco"}
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"info": info, "images": images, "annotations": anns, "categories": cats}))
    (root / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"info": info, "images": images, "annotations": caps}))
    return root / "annotations"


def _generation_settings(family: str) -> dict[str, Any]:
    """Greedy decoding that stops at the family's EOS and never emits a multimodal special token."""
    spec = _SPECS[family]
    return dict(
        pad_token_id=_token_id(family, spec.pad),
        eos_token_id=_token_id(family, spec.eos),
        do_sample=False,
        suppress_tokens=sorted(multimodal_token_ids(family).values()),
    )


def tiny_model(
    family: str, seed: int = 0, *, num_layers: int = 2, init_std: float = 0.2
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A tiny random fp32 SDPA model of ``family`` in eval mode and a 2-row left-padded batch for it.

    Every >=2-D floating parameter is redrawn from N(0, init_std) (1-D norms and biases are kept), so that
    attention is far from uniform. Greedy generation never emits multimodal special tokens.
    """
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(
        tiny_config(family, num_layers=num_layers), attn_implementation="sdpa", dtype=torch.float32
    )
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dim() >= 2:
                param.normal_(0.0, init_std)
    settings = _generation_settings(family)
    # InstructBLIP's generate() delegates to its language model, which has its own generation config.
    generators = [model, *(m for m in model.modules() if m is not model and isinstance(m, GenerationMixin))]
    for module in generators:
        module.generation_config.update(**settings)
    return model, tiny_inputs(family)


# --------------------------------------------------------------------------------------------------
# The common method checks: the properties every registered method must have (tests/test_common.py runs
# them on every method of the registry; an out-of-tree method's author can call them on their own class).
# --------------------------------------------------------------------------------------------------

#: The checks, in order, by the name ``applicable_checks`` and tests/test_common.py use.
CHECKS: tuple[str, ...] = ("restore", "neutral", "batch_equals_rows", "cached_equals_recomputed", "drop_equals_mask")
#: Families of the per-method checks (LLaMA, mRoPE Qwen, InstructBLIP's embeddings-only prefill, Gemma3's
#: bidirectional image block and sliding window); a method that supports none of them gets its first two.
CHECK_FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "instructblip", "gemma3")
#: Depth of the checks' tiny models: room for layer ranges and pruning stages at their default indices.
CHECK_LAYERS = 4
#: Tolerances (those of the existing equivalence tests): a neutral setting reproduces the unwrapped logits to
#: NEUTRAL_ATOL; batched rows, cached decoding and dropped tokens reproduce their reference to EXACT_ATOL.
NEUTRAL_ATOL = 1e-5
EXACT_ATOL = 1e-4
#: What an active setting must move the last-token logits by at least, so that a check cannot pass vacuously.
EFFECT_MIN = 1e-3

_CHECK_MODELS: dict[tuple[str, int], tuple[PreTrainedModel, dict[str, Any]]] = {}


def check_model(family: str, num_layers: int = CHECK_LAYERS) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The checks' shared ``tiny_model(family, seed=0, num_layers=num_layers)``, built once. A check that fails
    drops it (a broken method may have left it wrapped), so the next check gets a fresh one."""
    key = (family, num_layers)
    if key not in _CHECK_MODELS:
        _CHECK_MODELS[key] = tiny_model(family, seed=0, num_layers=num_layers)
    return _CHECK_MODELS[key]


def _method_class(method: Any) -> type:
    from .methods.base import Method
    from .methods.registry import get_method_class

    cls = get_method_class(method) if isinstance(method, str) else method
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"expected a Method subclass or a registered method name, got {method!r}")
    return cls


def supported_families(method: Any) -> tuple[str, ...]:
    """The tiny families ``method`` (a Method class or registered name) declares it supports (``families``)."""
    declared = _method_class(method).families
    return FAMILIES if declared is None else tuple(f for f in FAMILIES if f in declared)


def check_families(method: Any) -> tuple[str, ...]:
    """The families the per-method checks run on: CHECK_FAMILIES that the method supports, else its first two."""
    supported = supported_families(method)
    return tuple(f for f in CHECK_FAMILIES if f in supported) or supported[:2]


def _has_modes(cls: type) -> bool:
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    return "mode" in fields and fields["mode"].type in ("str", str)


def applicable_checks(method: Any) -> dict[str, str | None]:
    """Each name of CHECKS -> None where the check applies to ``method``, else the reason it does not.

    ``neutral`` needs a declared ``neutral`` setting; ``cached_equals_recomputed`` needs ``cache_exact``
    (False for methods that decide something at prefill, or per forward, that a recomputation decides
    again otherwise); ``drop_equals_mask`` needs a config field ``mode`` ("drop" / "mask").
    """
    cls = _method_class(method)
    out: dict[str, str | None] = dict.fromkeys(CHECKS)
    if cls.neutral is None:
        out["neutral"] = f"{cls.name} declares no neutral setting (neutral = None)"
    if not getattr(cls, "cache_exact", True):
        out["cached_equals_recomputed"] = f"{cls.name} sets cache_exact = False (see its docstring)"
    if not _has_modes(cls):
        out["drop_equals_mask"] = f"{cls.name}'s config has no mode field (drop / mask)"
    return out


def _make(method: Any, settings: dict[str, Any] | None, **override: Any) -> Any:
    cls = _method_class(method)
    return cls(**{**(settings or {}), **override})


def _is_neutral(method: Any, settings: dict[str, Any] | None) -> bool:
    """Whether ``settings`` already are the method's neutral setting (then no effect is expected)."""
    cls = _method_class(method)
    if cls.neutral is None:
        return False
    return _make(cls, settings).config == _make(cls, settings, **cls.neutral).config


def _no_grad_logits(model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _greedy(model: PreTrainedModel, inputs: dict[str, Any], n: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def _drops_model_on_failure(check: Any) -> Any:
    """Decorator of a check: when it raises, forget the shared model it ran on (a broken method may have left
    it wrapped or hooked), so the next check builds a fresh one."""
    import functools
    import inspect

    signature = inspect.signature(check)

    @functools.wraps(check)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            check(*args, **kwargs)
        except BaseException:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            _CHECK_MODELS.pop((bound.arguments["family"], bound.arguments.get("num_layers", CHECK_LAYERS)), None)
            raise

    return run


def _where(cls: type, family: str, settings: dict[str, Any] | None) -> str:
    return f"{cls.name} on {family} with {settings or 'its defaults'}"


def _assert_effect(
    cls: type, family: str, settings: dict[str, Any] | None, ref: torch.Tensor, got: torch.Tensor
) -> None:
    """An active setting must change the last-token logits, or the check that follows proves nothing."""
    if _is_neutral(cls, settings):
        return
    moved = float((got[:, -1] - ref[:, -1]).abs().max())
    if not moved > EFFECT_MIN:
        raise AssertionError(
            f"{_where(cls, family, settings)}: the method moves the last-token logits by only {moved:.2e} "
            f"(<= {EFFECT_MIN}), so this check would pass without testing anything; pass settings that act"
        )


def _identity(value: Any) -> Any:
    """What must stay the same of a module attribute: a scalar's value, any other object's identity; tensors
    (and None) are per-forward state (Qwen's rope_deltas), whose values the logits comparison covers."""
    if value is None or isinstance(value, torch.Tensor):
        return "tensor or None"
    if isinstance(value, (bool, int, float, str, bytes)):
        return (type(value), value)
    return id(value)


def _snapshot(model: PreTrainedModel) -> dict[str, Any]:
    """What a handle may touch: attention implementations, configs, every module's attributes (by identity)
    and torch hooks, global module hooks, parameters and buffers (values)."""
    from torch.nn.modules import module as torch_module

    impls = {"": model.config._attn_implementation}
    for key in getattr(model.config, "sub_configs", {}):
        sub = getattr(model.config, key, None)
        if sub is not None:
            impls[key] = sub._attn_implementation
    modules = {}
    for name, mod in model.named_modules():
        attrs = {}
        for key, value in vars(mod).items():
            if "hook" in key and isinstance(value, dict):
                attrs[key] = tuple(value)  # the hook ids
            elif key not in ("_parameters", "_buffers", "_modules"):
                attrs[key] = _identity(value)
        modules[name] = (type(mod), attrs, tuple(mod._parameters), tuple(mod._buffers), tuple(mod._modules))
    global_hooks = {
        key: tuple(value)
        for key, value in vars(torch_module).items()
        if key.startswith("_global") and isinstance(value, dict)
    }
    return dict(
        impls=impls,
        config=model.config.to_dict(),
        generation=model.generation_config.to_dict(),
        modules=modules,
        global_hooks=global_hooks,
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
    )


def _volatile(first: dict[str, Any], second: dict[str, Any]) -> set[tuple[str, str]]:
    """(module, attribute) pairs whose value an unwrapped forward and generate replaced between two snapshots."""
    out = set()
    for name, (_, attrs, *_rest) in first["modules"].items():
        attrs2 = second["modules"].get(name, (None, {}))[1]
        out |= {(name, k) for k in attrs.keys() | attrs2.keys() if attrs.get(k) != attrs2.get(k)}
    return out


def _compare_snapshots(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    for key in ("impls", "config", "generation", "global_hooks"):
        if before[key] != after[key]:
            diff = sorted(k for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k))
            raise AssertionError(f"{what}: {key} not restored (differs at {diff[:5]})")
    if before["modules"].keys() != after["modules"].keys():
        raise AssertionError(f"{what}: the module tree changed")
    for name, (typ, attrs, params, buffers, children) in before["modules"].items():
        typ2, attrs2, params2, buffers2, children2 = after["modules"][name]
        where = f"{what}: module {name or '<model>'}"
        if typ2 is not typ:
            raise AssertionError(f"{where}: class {typ.__name__} became {typ2.__name__}")
        added, lost = sorted(attrs2.keys() - attrs.keys()), sorted(attrs.keys() - attrs2.keys())
        if added or lost:
            raise AssertionError(f"{where}: attributes added {added} / removed {lost}")
        volatile = before.get("volatile", set())
        changed = sorted(k for k in attrs if attrs[k] != attrs2[k] and (name, k) not in volatile)
        if changed:
            raise AssertionError(f"{where}: attributes or hooks replaced: {changed}")
        if (params, buffers, children) != (params2, buffers2, children2):
            raise AssertionError(f"{where}: parameters, buffers or submodules changed")
    for key, value in before["state"].items():
        if not torch.equal(value, after["state"][key]):
            raise AssertionError(f"{what}: {key} changed value")


class _Boom(Exception):
    """Raised from inside generate() by check_restore."""


@_drops_model_on_failure
def check_restore(
    method: Any, family: str, settings: dict[str, Any] | None = None, *, num_layers: int = CHECK_LAYERS, n_new: int = 3
) -> None:
    """``handle.remove()`` after a wrapped forward and generate, and leaving the handle's ``with`` block by an
    exception raised inside generate(), both give back the exact original: attention implementations,
    configs, every module attribute and torch hook, parameters, and bit-identical logits and greedy tokens."""
    import attnkit

    cls = _method_class(method)
    model, inputs = check_model(family, num_layers)
    first = _snapshot(model)
    ref_logits, ref_tokens = _no_grad_logits(model, inputs), _greedy(model, inputs, n_new)
    before = _snapshot(model)
    before["volatile"] = _volatile(first, before)  # what the model's own forward rewrites (Qwen's rope_deltas)
    handle = attnkit.wrap(model, _make(cls, settings))
    try:
        _no_grad_logits(model, inputs)
        _greedy(model, inputs, n_new)
    finally:
        handle.remove()
    what = f"{_where(cls, family, settings)}, after remove()"
    _compare_snapshots(before, _snapshot(model), what)
    if not torch.equal(_no_grad_logits(model, inputs), ref_logits):
        raise AssertionError(f"{what}: the logits differ from the unwrapped model's")
    if not torch.equal(_greedy(model, inputs, n_new), ref_tokens):
        raise AssertionError(f"{what}: the greedy tokens differ from the unwrapped model's")

    class Raise(transformers.LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] > inputs["input_ids"].shape[1]:  # after the first decode step
                raise _Boom
            return scores

    try:
        with attnkit.wrap(model, _make(cls, settings)), torch.no_grad():
            model.generate(**inputs, max_new_tokens=n_new, do_sample=False, logits_processor=[Raise()])
    except _Boom:
        pass
    else:
        raise AssertionError(f"{_where(cls, family, settings)}: the exception raised inside generate() was lost")
    what = f"{_where(cls, family, settings)}, after an exception left the with block"
    _compare_snapshots(before, _snapshot(model), what)
    if not torch.equal(_no_grad_logits(model, inputs), ref_logits):
        raise AssertionError(f"{what}: the logits differ from the unwrapped model's")


@_drops_model_on_failure
def check_neutral(
    method: Any, family: str, settings: dict[str, Any] | None = None, *, num_layers: int = CHECK_LAYERS, n_new: int = 4
) -> None:
    """With its ``neutral`` setting laid over ``settings``, the method reproduces the unwrapped model: logits
    at every real position to NEUTRAL_ATOL and the same greedy tokens; ``settings`` alone (unless they are
    neutral themselves) must change the last-token logits, so that the neutral setting is what cancels it."""
    import attnkit

    cls = _method_class(method)
    if cls.neutral is None:
        raise AssertionError(f"{cls.name} declares no neutral setting (neutral = None)")
    neutral = {**(settings or {}), **cls.neutral}
    model, inputs = check_model(family, num_layers)
    ref, ref_tokens = _no_grad_logits(model, inputs), _greedy(model, inputs, n_new)
    with attnkit.wrap(model, _make(cls, neutral)):
        got, tokens = _no_grad_logits(model, inputs), _greedy(model, inputs, n_new)
    with attnkit.wrap(model, _make(cls, settings)):
        active = _no_grad_logits(model, inputs)
    keep = inputs["attention_mask"].bool()
    where = _where(cls, family, neutral)
    if got.shape != ref.shape:
        raise AssertionError(f"{where}: logits of shape {tuple(got.shape)}, unwrapped {tuple(ref.shape)}")
    err = float((got[keep] - ref[keep]).abs().max())
    if not err <= NEUTRAL_ATOL:
        raise AssertionError(f"{where}: logits differ from the unwrapped model's by {err:.2e} (> {NEUTRAL_ATOL})")
    if not torch.equal(tokens, ref_tokens):
        raise AssertionError(f"{where}: greedy tokens {tokens.tolist()} != unwrapped {ref_tokens.tolist()}")
    _assert_effect(cls, family, settings, ref, active)


@_drops_model_on_failure
def check_batch_equals_rows(
    method: Any, family: str, settings: dict[str, Any] | None = None, *, num_layers: int = CHECK_LAYERS, n_new: int = 4
) -> None:
    """Under the method, each row of a left-padded 2-row batch (DEFAULT_PROMPTS, one image each) gets the
    last-token logits (to EXACT_ATOL) and the greedy tokens it gets alone; the method must change the
    batch's logits."""
    import attnkit

    cls = _method_class(method)
    model, batch = check_model(family, num_layers)
    if not (batch["attention_mask"] == 0).any():
        raise AssertionError(f"{family}: the check's batch is not left-padded")
    ref = _no_grad_logits(model, batch)
    with attnkit.wrap(model, _make(cls, settings)):
        got = _no_grad_logits(model, batch)
        tokens = _greedy(model, batch, n_new)
        alone = []
        for row in range(len(DEFAULT_PROMPTS)):
            one = _row_inputs(family, row)
            alone.append((_no_grad_logits(model, one)[0, -1], _greedy(model, one, n_new)[0]))
    where = _where(cls, family, settings)
    for row, (last, row_tokens) in enumerate(alone):
        err = _max_diff(last, got[row, -1])
        if not err <= EXACT_ATOL:
            raise AssertionError(
                f"{where}: row {row}'s last-token logits differ by {err:.2e} batched and alone (> {EXACT_ATOL})"
            )
        if not torch.equal(row_tokens, tokens[row]):
            raise AssertionError(
                f"{where}: row {row} generates {tokens[row].tolist()} batched, {row_tokens.tolist()} alone"
            )
    _assert_effect(cls, family, settings, ref, got)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two logits tensors; -inf entries (a method's cutoff, e.g. VCD's) must
    sit at the same places in both (else inf), and only the finite ones are compared."""
    inf_a, inf_b = torch.isneginf(a), torch.isneginf(b)
    if not torch.equal(inf_a, inf_b):
        return float("inf")
    keep = ~inf_a
    return float((a[keep] - b[keep]).abs().max()) if bool(keep.any()) else 0.0


@lru_cache(maxsize=None)
def _row_inputs_cached(family: str, row: int) -> dict[str, Any]:
    return tiny_inputs(family, prompts=[DEFAULT_PROMPTS[row]], images=[sample_images(len(DEFAULT_PROMPTS))[row]])


def _row_inputs(family: str, row: int) -> dict[str, Any]:
    """Row ``row`` of tiny_model's batch (DEFAULT_PROMPTS, one image each) as a batch of one, unpadded."""
    return dict(_row_inputs_cached(family, row))


def extend_inputs(inputs: dict[str, Any], new: torch.Tensor) -> dict[str, Any]:
    """``inputs`` with ``new`` (B, n) tokens appended, per-token tensors extended as generate() does."""
    out = dict(inputs)
    ids = inputs["input_ids"]
    out["input_ids"] = torch.cat([ids, new], dim=1)
    for key, value in inputs.items():
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.shape[:2] == ids.shape:
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([value, value.new_full((ids.shape[0], new.shape[1]), fill)], dim=1)
    return out


@_drops_model_on_failure
def check_cached_equals_recomputed(
    method: Any, family: str, settings: dict[str, Any] | None = None, *, num_layers: int = CHECK_LAYERS, n_new: int = 4
) -> None:
    """Under the method, every step of a KV-cached greedy generate gives the logits (to EXACT_ATOL) and the
    token that a full forward over the prompt and the tokens so far gives; the method must change them."""
    import attnkit

    cls = _method_class(method)
    model, inputs = check_model(family, num_layers)
    ref = _no_grad_logits(model, inputs)
    with attnkit.wrap(model, _make(cls, settings)), torch.no_grad():
        gen = model.generate(
            **inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
            return_dict_in_generate=True, output_scores=True, output_logits=True,
        )  # fmt: skip
        tokens = gen.sequences[:, inputs["input_ids"].shape[1] :]
        full = [model(**extend_inputs(inputs, tokens[:, :t])).logits[:, -1] for t in range(n_new)]
    where = _where(cls, family, settings)
    for t in range(n_new):
        err = _max_diff(full[t], gen.logits[t])
        if not err <= EXACT_ATOL:
            raise AssertionError(
                f"{where}: step {t}: cached logits differ from the recomputation by {err:.2e} (> {EXACT_ATOL})"
            )
        allowed = torch.isfinite(gen.scores[t])  # the ids generate() suppresses
        pick = full[t].masked_fill(~allowed, float("-inf")).argmax(-1)
        if not torch.equal(pick, tokens[:, t]):
            raise AssertionError(
                f"{where}: step {t}: cached decoding picks {tokens[:, t].tolist()}, recomputation {pick.tolist()}"
            )
    _assert_effect(cls, family, settings, ref[:, -1:], full[0][:, None])


@lru_cache(maxsize=None)
def _short_inputs_cached(family: str) -> dict[str, Any]:
    return tiny_inputs(family, prompts=["Dog?", "Is it red?"], images=sample_images(2, size=(32, 32)))


def _short_inputs(family: str) -> dict[str, Any]:
    """A left-padded 2-row batch of short prompts (28 tokens on Gemma3), for drop mode under a sliding window."""
    return dict(_short_inputs_cached(family))


def _fits_window(model: PreTrainedModel, inputs: dict[str, Any], n_new: int) -> bool:
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return not window or inputs["input_ids"].shape[1] + n_new < window


@_drops_model_on_failure
def check_drop_equals_mask(
    method: Any, family: str, settings: dict[str, Any] | None = None, *, num_layers: int = CHECK_LAYERS, n_new: int = 3
) -> None:
    """For a method whose config has ``mode`` ("drop" / "mask"): dropping the tokens gives the last-token logits
    (to EXACT_ATOL) and the greedy tokens that masking them gives, and the drop run is shorter than the
    prompt. On a sliding-window family the prompts are shortened to fit the window (drop mode needs that)."""
    import attnkit

    cls = _method_class(method)
    if not _has_modes(cls):
        raise AssertionError(f"{cls.name}'s config has no mode field (drop / mask)")
    model, inputs = check_model(family, num_layers)
    if not _fits_window(model, inputs, n_new):
        inputs = _short_inputs(family)
        if not _fits_window(model, inputs, n_new):
            raise AssertionError(f"{family}: no prompt of the check fits the sliding window")
    ref = _no_grad_logits(model, inputs)
    runs = {}
    for mode in ("drop", "mask"):
        with attnkit.wrap(model, _make(cls, settings, mode=mode)):
            runs[mode] = (_no_grad_logits(model, inputs), _greedy(model, inputs, n_new))
    (dropped, drop_tokens), (masked, mask_tokens) = runs["drop"], runs["mask"]
    where = _where(cls, family, settings)
    if not dropped.shape[1] < inputs["input_ids"].shape[1]:
        raise AssertionError(f"{where}: mode='drop' dropped no token (logits over {dropped.shape[1]} positions)")
    err = float((dropped[:, -1] - masked[:, -1]).abs().max())
    if not err <= EXACT_ATOL:
        raise AssertionError(f"{where}: last-token logits differ by {err:.2e} between drop and mask (> {EXACT_ATOL})")
    if not torch.equal(drop_tokens, mask_tokens):
        raise AssertionError(f"{where}: drop generates {drop_tokens.tolist()}, mask {mask_tokens.tolist()}")
    _assert_effect(cls, family, settings, ref, masked)


@_drops_model_on_failure
def check_runs(
    method: Any, family: str, settings: dict[str, Any] | None = None, *, num_layers: int = CHECK_LAYERS, n_new: int = 2
) -> None:
    """The method wraps the family's tiny model, a forward gives finite last logits for every row (-inf allowed
    where a cutoff masks tokens) and generate()
    gives ``n_new`` tokens; remove() restores the unwrapped logits."""
    import attnkit

    cls = _method_class(method)
    model, inputs = check_model(family, num_layers)
    ref = _no_grad_logits(model, inputs)
    with attnkit.wrap(model, _make(cls, settings)):
        got = _no_grad_logits(model, inputs)
        tokens = _greedy(model, inputs, n_new)
    after = _no_grad_logits(model, inputs)
    where = _where(cls, family, settings)
    last = got[:, -1]  # a cutoff may set -inf (VCD, ICD); no NaN, no +inf, finite ones in every row
    if got.shape[0] != ref.shape[0] or last.isnan().any() or last.isposinf().any() or not last.isfinite().any(-1).all():
        raise AssertionError(f"{where}: the wrapped forward gave logits of shape {tuple(got.shape)}, not all finite")
    if tokens.shape != (ref.shape[0], n_new):
        raise AssertionError(f"{where}: generate gave new tokens of shape {tuple(tokens.shape)}")
    if not torch.equal(after, ref):
        raise AssertionError(f"{where}: the logits after remove() differ from the unwrapped model's")


@_drops_model_on_failure
def check_unsupported(method: Any, family: str, settings: dict[str, Any] | None = None) -> None:
    """On a family outside the method's ``families``, wrap() raises UnsupportedModelError and leaves the model
    as it was."""
    import attnkit
    from .errors import UnsupportedModelError

    cls = _method_class(method)
    model, inputs = check_model(family)
    before = _snapshot(model)
    try:
        handle = attnkit.wrap(model, _make(cls, settings))
    except UnsupportedModelError:
        pass
    else:
        handle.remove()
        raise AssertionError(f"{cls.name} does not support {family} (families = {cls.families}) but wrap() accepted it")
    _compare_snapshots(before, _snapshot(model), f"{_where(cls, family, settings)}, after a refused wrap()")


_CHECK_FUNCTIONS = {
    "restore": check_restore,
    "neutral": check_neutral,
    "batch_equals_rows": check_batch_equals_rows,
    "cached_equals_recomputed": check_cached_equals_recomputed,
    "drop_equals_mask": check_drop_equals_mask,
}


def check_method(method: Any, settings: Any = None) -> list[str]:
    """Every applicable check on ``method`` (a Method class or registered name): the CHECKS on
    ``check_families(method)``, check_runs on the other supported families, check_unsupported on the rest.
    ``settings``: config kwargs for the checks, or a callable family -> kwargs (None: the defaults).
    Raises the first AssertionError; returns what ran, e.g. ``["restore/llava", ...]``."""
    cls = _method_class(method)
    pick = settings if callable(settings) else (lambda family: settings)
    ran = []
    for name, reason in applicable_checks(cls).items():
        if reason is None:
            for family in check_families(cls):
                _CHECK_FUNCTIONS[name](cls, family, pick(family))
                ran.append(f"{name}/{family}")
    for family in FAMILIES:
        if family in check_families(cls):
            continue  # the checks above ran the method there
        if family in supported_families(cls):
            check_runs(cls, family, pick(family))
            ran.append(f"runs/{family}")
        else:
            check_unsupported(cls, family, pick(family))
            ran.append(f"unsupported/{family}")
    return ran
