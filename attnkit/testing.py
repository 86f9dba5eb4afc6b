"""Tiny, fully offline vision-language models for tests.

For each of the 10 supported VLM families this module builds, without any hub access:

* a tiny random config (text hidden 32, 4 heads / 2 KV heads, head_dim 8; vision hidden 32, 2 layers);
* the family's real ``Processor`` class around a small WordPiece tokenizer made with the ``tokenizers``
  library and the family's (Pillow-backend) image processor, configured so that the image-token count
  the processor emits matches what the tiny model produces for an image of any size;
* deterministic Pillow images and a left-padded 2-row batch made through that processor.

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
    "FAMILIES",
    "multimodal_token_ids",
    "sample_images",
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
