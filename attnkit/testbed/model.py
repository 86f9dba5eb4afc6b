"""The testbed VLM: LLaVA architecture (CLIP-style tower, MLP projector, Llama LM) at toy size.

Built from stock transformers classes and saved with ``save_pretrained``, so
``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
load it like any hub checkpoint. The tokenizer is word-level (tokenizers library) over the words
of the shapes set, its questions and its captions; the chat template is LLaVA-1.5's
(``USER: <image>\\n... ASSISTANT:``). ``scripts/train_testbed.py`` trains it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import shapes as S

IMAGE_SIZE = S.IMAGE_SIZE
PATCH = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 64: the CLS token is dropped ("default" strategy)
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256)

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL = (PAD, UNK, BOS, EOS, IMAGE)
#: words of prompts, captions and answers (everything the training data says)
WORDS = (
    "user assistant please answer yes or no is there a an in the image this picture describe detail "
    "what do you see shows with and of on grey background shape shapes question it one word "
    "which are how many colour color any"
).split()
PUNCTUATION = tuple(".,?:!;'\"-")

CHAT_TEMPLATE = (
    "{{- '<s>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{{- ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def vocabulary() -> list[str]:
    """Token list; a token's position is its id."""
    words = [*WORDS, *S.SHAPES, *S.COLOURS, *(w for syn in S.SYNONYMS.values() for s in syn for w in s.split())]
    return list(dict.fromkeys([*SPECIAL, *words, *PUNCTUATION]))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-casing word-level tokenizer, left padding, ``tokenizer.image_token`` set for the processor."""
    vocab = vocabulary()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # words and single punctuation marks
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, "a ." -> "a."
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, pad_token=PAD, bos_token=BOS,
                                  eos_token=EOS, extra_special_tokens={"image_token": IMAGE})
    tok.padding_side = "left"
    return tok


def build_processor() -> Any:
    """LlavaProcessor: 64x64 CLIP-normalised images (no resize for set images), the word tokenizer, the chat template."""
    image_processor = transformers.LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.LlavaProcessor(image_processor, build_tokenizer(), chat_template=CHAT_TEMPLATE,
                                       patch_size=PATCH, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1)


def build_config() -> Any:
    vocab = vocabulary()
    ids = {t: vocab.index(t) for t in SPECIAL}
    return transformers.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(vocab), pad_token_id=ids[PAD], bos_token_id=ids[BOS],
                         eos_token_id=ids[EOS], tie_word_embeddings=True, **TEXT),
        vision_config=dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH,
                           projection_dim=TEXT["hidden_size"], **VISION),
        image_token_index=ids[IMAGE],
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def build_model(seed: int = 0) -> Any:
    """A freshly initialised testbed model (random weights, seeded), with its generation settings."""
    import torch

    torch.manual_seed(seed)
    config = build_config()
    model = transformers.LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (config.text_config.bos_token_id,
                                                         config.text_config.eos_token_id,
                                                         config.text_config.pad_token_id)
    gc.do_sample, gc.max_new_tokens = False, 24
    return model


def save(model: Any, processor: Any, out_dir: str | Path, dtype: Any = None) -> Path:
    """``save_pretrained`` of model and processor into ``out_dir``; tensors stored as ``dtype`` if given.

    The config keeps the model's own dtype, so ``from_pretrained`` loads the stored half-precision
    tensors back into float32 (the testbed runs on CPUs).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = None if dtype is None else {k: v.to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)
    return out
