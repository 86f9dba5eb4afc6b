"""Adapter base class: what the toolkit needs to know about a VLM family.

An adapter answers structural questions only (where are the language-model layers,
which tokens are image tokens, how do they map to an image grid, what is the image-free
variant of the inputs, how the vision encoder's output becomes image tokens, which token
pads a batch); it never knows about methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..errors import InputError, UnsupportedModelError

#: Input keys that carry images (dropped from the image-free variant of the inputs).
VISION_INPUT_KEYS = (
    "pixel_values",
    "pixel_attention_mask",
    "image_sizes",
    "image_grid_thw",
    "qformer_input_ids",
    "qformer_attention_mask",
    "image_num_patches",
    "pixel_values_videos",
    "video_grid_thw",
)

#: Input keys with one entry per image (or crop, tile, patch), in the batch's order: concatenated along
#: dim 0 they describe more images (see ``Adapter.repeat_image_inputs``).
IMAGE_INPUT_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw", "image_num_patches")


@dataclass(frozen=True)
class Grid:
    """Row-major block of image tokens: position of cell (i, j) = start + i * stride + j."""

    start: int
    rows: int
    cols: int
    stride: int

    def positions(self) -> torch.Tensor:
        """(rows, cols) tensor of sequence positions."""
        i = torch.arange(self.rows)[:, None]
        j = torch.arange(self.cols)[None, :]
        return self.start + i * self.stride + j


def compact_left(keep: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Left-pad compaction: (B, S) bool -> (B, width) gather index holding, per row, the kept columns in
    their order, right-aligned, with -1 in the padding on the left (``width`` defaults to the most kept
    in a row). Use with ``gather_left``; ``index >= 0`` is the new attention mask."""
    keep = keep.bool()
    counts = keep.sum(1)
    if width is None:
        width = int(counts.max()) if keep.shape[0] else 0
    index = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    for r in range(keep.shape[0]):
        cols = keep[r].nonzero().flatten()
        if cols.numel() > width:
            raise ValueError(f"row {r} keeps {cols.numel()} tokens, more than the width {width}")
        index[r, width - cols.numel() :] = cols
    return index


def gather_left(value: torch.Tensor, index: torch.Tensor, fill: Any) -> torch.Tensor:
    """(B, S, ...) per-token tensor gathered along dim 1 by a ``compact_left`` index, ``fill`` where it is -1."""
    idx = index.to(value.device)
    safe = idx.clamp(min=0)
    shape = (*safe.shape, *value.shape[2:])
    gathered = value.gather(1, safe.view(*safe.shape, *([1] * (value.dim() - 2))).expand(shape))
    pad = (idx < 0).view(*idx.shape, *([1] * (value.dim() - 2)))
    return gathered.masked_fill(pad, fill) if bool(pad.any()) else gathered


@dataclass(frozen=True)
class VisionFeatures:
    """How the vision encoder's output becomes the language model's image tokens, per image (or crop).

    ``layers``: the encoder layers in order (each with ``self_attn``); ``feature_layer``: index in
    ``layers`` of the layer whose output the projector takes; ``has_cls``: that output starts with a
    [CLS] token the language model never sees; ``side``: LLM tokens per image side (a square grid);
    ``pool``: encoder patches per LLM token side (1: one token per patch, else a pool x pool average);
    ``crop_counts``: for anyres families (a base view plus high-res crops, each a full encoder image),
    the crop counts, base included, an image can have; empty when every image is one view.
    """

    layers: tuple[torch.nn.Module, ...]
    feature_layer: int
    has_cls: bool
    side: int
    pool: int = 1
    crop_counts: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        """LLM tokens per image (per crop for anyres families)."""
        return self.side * self.side

    @property
    def anyres(self) -> bool:
        """Whether an image is encoded as several crops (see ``Adapter.anyres_images``)."""
        return bool(self.crop_counts)


@dataclass(frozen=True)
class AnyresImage:
    """One image of an anyres family: ``crops`` encoder images (the base view, then ``rows`` x ``cols``
    high-res crops, row-major) that become ``tokens`` placeholders when packed by the model."""

    crops: int
    rows: int
    cols: int
    tokens: int


def _encoder_layers(tower: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The longest ModuleList of the tower whose entries have ``self_attn`` (the encoder layers)."""
    best: list[torch.nn.Module] = []
    for mod in tower.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and all(hasattr(m, "self_attn") for m in mod):
            if len(mod) > len(best):
                best = list(mod)
    if not best:
        raise UnsupportedModelError(f"{type(tower).__name__}: no encoder layers with self_attn found")
    return tuple(best)


class Adapter:
    """Base adapter. Subclasses set ``family``, ``model_types`` and override what differs."""

    family: ClassVar[str] = ""
    #: config.model_type values this adapter handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Name of the language sub-config (the key given to set_attn_implementation).
    text_config_key: ClassVar[str] = "text_config"
    #: Wrapper tokens just before / after each run of image tokens (e.g. <img> ... </img>).
    wrap_before: ClassVar[int] = 0
    wrap_after: ClassVar[int] = 0
    #: Attribute paths tried, in order, to find the vision encoder.
    vision_paths: ClassVar[tuple[str, ...]] = ("model.vision_tower", "vision_tower")
    #: Which of an image's grids shows the whole image (0: the first, e.g. LLaVA-NeXT's base view;
    #: -1: the last, e.g. InternVL's thumbnail after its tiles).
    global_view: ClassVar[int] = 0
    #: Whether that view passes through the image processor's centre crop (if it has one enabled);
    #: otherwise the view shows the whole image, resized.
    global_view_cropped: ClassVar[bool] = False
    #: Whether image tokens lie on a spatial grid (False for InstructBLIP's Q-Former queries).
    has_image_grid: ClassVar[bool] = True
    #: Whether every token has one rotary position (1-D RoPE), so that a shortened sequence can be
    #: renumbered 0..n-1 (pruning with positions="official"); False for 3-D mRoPE (Qwen2/2.5/3-VL).
    positions_1d: ClassVar[bool] = True
    #: Whether the adapter describes the path from the vision encoder to the image tokens
    #: (``vision_features``, ``vision_feature_states``, ``projector_input`` and, for anyres families,
    #: ``anyres_images`` / ``anyres_packing`` / ``pack_crops``), which methods acting inside the vision
    #: encoder need.
    describes_vision_features: ClassVar[bool] = False
    #: VHR's default reinforced depth, as a share of the language model's layers: the official 14 of
    #: LLaVA-1.5/NeXT-7B's 32 layers (InstructBLIP: 18 of 32); see ``vhr_last_layers``.
    vhr_layer_share: ClassVar[float] = 14 / 32

    @property
    def first_droppable_layer(self) -> int:
        """The first decoder layer before which tokens may be dropped (pruning in drop mode): later
        than 0 for models that add image features to the hidden states inside the first layers."""
        return 0

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.text_config = getattr(model.config, self.text_config_key)

    # -- language model geometry -----------------------------------------------------------
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.get_decoder().layers

    def attention_modules(self) -> list[torch.nn.Module]:
        """The self-attention module of each decoder layer, in layer order."""
        mods = []
        for i, layer in enumerate(self.decoder_layers()):
            attn = getattr(layer, "self_attn", None)
            if attn is None or getattr(attn, "layer_idx", None) != i:
                raise RuntimeError(f"{type(self.model).__name__}: decoder layer {i} has no self_attn with layer_idx")
            mods.append(attn)
        return mods

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.text_config, "head_dim", None)
        return hd or self.text_config.hidden_size // self.num_heads

    @property
    def vhr_last_layers(self) -> int:
        """VHR's default ``last_layers`` for this model: ``vhr_layer_share`` of its depth, rounded (at least 1)."""
        return max(1, min(self.num_layers, round(self.vhr_layer_share * self.num_layers)))

    def rotary_module(self) -> torch.nn.Module | None:
        """The language model's rotary-embedding module (what turns position ids into (cos, sin)), or None."""
        return getattr(self.model.get_decoder(), "rotary_emb", None)

    def rotary_embeddings(
        self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) the language model gives decoder layer ``layer`` for ``position_ids`` (B, q)."""
        return self.rotary_module()(hidden, position_ids)

    # -- image tokens ----------------------------------------------------------------------
    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """Token ids that stand for image features in the language-model sequence."""
        return (int(self.config.image_token_id),)

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: True at image-token positions."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for tid in self.image_token_ids:
            mask |= input_ids == tid
        return mask

    def context_module(self) -> torch.nn.Module:
        """The module whose forward starts each prefill / decode step (its pre-hook feeds the ForwardState)."""
        return self.model

    def image_mask_from_layout(self, attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
        """Image mask when only embeddings reach context_module() (None: the family cannot tell)."""
        return None

    def image_positions(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the sorted positions of its image tokens."""
        return [row.nonzero().flatten() for row in self.image_mask(input_ids)]

    def image_token_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        """Image tokens of each image of the batch, in order, for families whose images can sit
        back to back with no separator token (None: every image is its own run)."""
        return None

    def image_spans(self, input_ids: torch.Tensor, inputs: dict[str, Any] | None = None) -> list[list[tuple[int, int]]]:
        """Per row, the [start, end) span of each image (or tile) in the sequence.

        Runs of contiguous image tokens; when ``inputs`` are given and the family knows each
        image's token count, back-to-back images are split apart.
        """
        return self.split_spans(input_ids, self.image_token_counts(inputs) if inputs is not None else None)

    def split_spans(self, input_ids: torch.Tensor, counts: list[int] | None) -> list[list[tuple[int, int]]]:
        """Runs of contiguous image tokens per row, cut by ``counts`` (tokens per image, batch order)."""
        k = 0
        spans = []
        for row in self.image_mask(input_ids):
            runs: list[tuple[int, int]] = []
            for p in row.nonzero().flatten().tolist():
                if runs and runs[-1][1] == p:
                    runs[-1] = (runs[-1][0], p + 1)
                else:
                    runs.append((p, p + 1))
            if counts is not None:
                split = []
                for start, end in runs:
                    while start < end:
                        if k >= len(counts) or start + counts[k] > end:
                            raise ValueError(f"{self.family}: image tokens do not match the images' token counts")
                        split.append((start, start + counts[k]))
                        start += counts[k]
                        k += 1
                runs = split
            spans.append(runs)
        return spans

    # -- image grid ------------------------------------------------------------------------
    def image_grids(self, inputs: dict[str, Any]) -> list[list[Grid]] | None:
        """Per row, the row-major grids of the image tokens (None when the family has no grid).

        Default: each run of image tokens is one square grid.
        """
        out = []
        for runs in self.image_spans(inputs["input_ids"], inputs):
            grids = []
            for start, end in runs:
                side = math.isqrt(end - start)
                if side * side != end - start:
                    raise ValueError(f"{self.family}: image run of {end - start} tokens is not a square grid")
                grids.append(Grid(start, side, side, side))
            out.append(grids)
        return out

    # -- image-free variant ----------------------------------------------------------------
    def text_only_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The same prompts with every image (its tokens and wrapper tokens) removed, left-padded again."""
        input_ids = inputs["input_ids"]
        attn = inputs.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(input_ids)
        drop = torch.zeros_like(input_ids, dtype=torch.bool)
        for r, runs in enumerate(self.image_spans(input_ids)):
            for start, end in runs:
                drop[r, max(0, start - self.wrap_before) : end + self.wrap_after] = True
        keep = (~drop) & attn.bool()
        per_token = {
            k: v
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor) and v.shape[:2] == input_ids.shape and k not in VISION_INPUT_KEYS
        }
        index = compact_left(keep)
        pad_id = self.pad_id
        out: dict[str, Any] = {k: gather_left(v, index, pad_id if k == "input_ids" else 0) for k, v in per_token.items()}
        out["attention_mask"] = (index >= 0).to(attn.dtype)
        for k in ("token_type_ids", "mm_token_type_ids"):
            if k in out:
                out[k] = torch.zeros_like(out[k])
        return out

    def keep_batch_rows(self, n: int) -> None:
        """Keep the first ``n`` rows of any per-batch state the model stores across forwards (after attnkit
        drops prefill-only contrast rows from the KV cache). Default: the family keeps none."""

    # -- repeated images (contrast rows that repeat the batch) ----------------------------------
    def repeat_image_inputs(
        self, inputs: dict[str, Any], pixels: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """``inputs`` (a new dict) with every per-image input describing the batch's images twice: as given,
        then with ``pixel_values`` replaced by ``pixels(pixel_values)`` (None: unchanged); for rows appended
        after the batch's (each family consumes image features in row order). Other keys pass through.
        UnsupportedModelError (one line) for a family whose images cannot be repeated so."""
        if inputs.get("pixel_values_videos") is not None:
            raise InputError(f"{self.family}: contrast rows that repeat the images do not support video inputs")
        out = dict(inputs)
        for key in IMAGE_INPUT_KEYS:
            value = out.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            twin = value
            if key == "pixel_values" and pixels is not None:
                twin = self.alter_pixels(value, pixels, out)
                if not isinstance(twin, torch.Tensor) or twin.shape != value.shape:
                    got = tuple(twin.shape) if isinstance(twin, torch.Tensor) else type(twin).__name__
                    raise InputError(
                        f"the contrast's pixels function returned {got} for pixel_values {tuple(value.shape)} (same shape needed)"
                    )
                twin = self._keep_padding_images(value, twin.to(value.dtype))
            out[key] = torch.cat([value, twin.to(value.device)], dim=0)
        per_row = out.get("batch_num_images")  # images per row (LLaVA-OneVision): the rows appended carry the same
        if isinstance(per_row, torch.Tensor) and per_row.dim() == 1:
            out["batch_num_images"] = torch.cat([per_row, per_row])
        return out

    def alter_pixels(
        self, pixel_values: torch.Tensor, pixels: Callable[[torch.Tensor], torch.Tensor], inputs: dict[str, Any]
    ) -> torch.Tensor:
        """``pixels`` applied to the batch's ``pixel_values`` (the contrast rows' altered images). Default: one
        call on the whole tensor, whose leading dimension is the images (or the rows)."""
        return pixels(pixel_values)

    def _keep_padding_images(self, pixel_values: torch.Tensor, altered: torch.Tensor) -> torch.Tensor:
        """``altered`` with the batch's padding images (a family's placeholders for absent images) restored."""
        return altered

    def text_only_model(self) -> torch.nn.Module:
        """The module to call with text_only_inputs (the model itself, except where it requires images)."""
        return self.model

    @property
    def pad_id(self) -> int:
        """The token id that pads a batch: the generation config's, else the text or top-level config's, else 0."""
        for cfg in (self.model.generation_config, self.text_config, self.config):
            pid = getattr(cfg, "pad_token_id", None)
            if pid is not None:
                return int(pid)
        return 0

    # -- vision tower ----------------------------------------------------------------------
    def vision_tower(self) -> torch.nn.Module:
        for path in self.vision_paths:
            obj: Any = self.model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is not None:
                return obj
        raise RuntimeError(f"{type(self.model).__name__}: vision tower not found at {self.vision_paths}")

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        """The self-attention modules of the vision encoder, in layer order."""
        return [
            m
            for m in self.vision_tower().modules()
            if type(m).__name__.endswith("Attention") and "Pooling" not in type(m).__name__
            and "Multihead" not in type(m).__name__
        ]

    # -- vision encoder -> image tokens (for methods acting inside the vision encoder) ------------
    def vision_encoder_layers(self) -> tuple[torch.nn.Module, ...]:
        """The vision encoder's layers (each with ``self_attn``), in order."""
        return _encoder_layers(self.vision_tower())

    def vision_features(self) -> VisionFeatures:
        """How the vision encoder's output becomes image tokens; UnsupportedModelError (one line, naming the
        family) where the adapter does not describe it (``describes_vision_features`` False) or the
        model's configuration is not one it can describe."""
        raise UnsupportedModelError(f"family {self.family!r} does not describe its vision features")

    def vision_attention(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute a vision attention module's attention from its forward pre-hook arguments (vision
        towers run fused sdpa, which returns no weights): (B, H, S, S) float32 probabilities and
        (B, H, S, hd) float32 keys, from its own q/k projections and additive mask."""
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        bsz, seq, _ = hidden.shape
        heads, hd = module.num_heads, module.head_dim
        q = module.q_proj(hidden).view(bsz, seq, heads, hd).transpose(1, 2).float()
        k = module.k_proj(hidden).view(bsz, seq, heads, hd).transpose(1, 2).float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * module.scale
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.float()
        return scores.softmax(-1), k

    def vision_feature_states(self, output: Any) -> torch.Tensor | None:
        """From the vision tower's forward output, the (B, S, D) states of the feature layer, [CLS]
        included, as the projector's input is cut from them (None: not in this output)."""
        return None

    def projector_input(self) -> torch.nn.Module | None:
        """The module whose forward takes the (B, N, D) image tokens of each image (N = side * side,
        [CLS] dropped, pooled) as its first argument, before projection (a forward pre-hook may replace
        them); None for anyres families, whose crops are packed (see ``anyres_packing``)."""
        return None

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (..., N, D) as the encoder produces them -> the language model's (..., N, D')."""
        return self.model.model.multi_modal_projector(tokens)

    def anyres_images(self, image_sizes: Any) -> list[AnyresImage]:
        """Anyres families: per image of ``image_sizes`` (its (height, width)), its crops and placeholders."""
        raise UnsupportedModelError(f"family {self.family!r} does not encode images as crops")

    def anyres_packing(
        self, pack_images: Callable[[list[AnyresImage], list[torch.Tensor]], list[torch.Tensor | None]]
    ) -> tuple[Any, str, Callable]:
        """Anyres families: (object, attribute name, stand-in) to set for the life of a handle
        (``Handle.set_attr``) so that ``pack_images(images, features)`` packs each image's crops: it gets
        the batch's images (AnyresImage, in order) and each one's (crops, N, D') projected crop features
        and answers, per image, its packed (tokens, D') tensor or None (packed by the model as usual)."""
        raise UnsupportedModelError(f"family {self.family!r} does not encode images as crops")

    def pack_crops(self, tokens: torch.Tensor, grid: torch.Tensor, lead: int, image: AnyresImage) -> torch.Tensor:
        """Anyres families: one image's reduced crops (crops, k, D'), ``tokens[:, lead : lead + g]`` the
        kept grid patches at sorted patch indices ``grid`` (crops, g), laid out as one (tokens, D')
        sequence (see the family's adapter)."""
        raise UnsupportedModelError(f"family {self.family!r} does not encode images as crops")

    # -- batches -------------------------------------------------------------------------------
    @classmethod
    def left_pad_batch(cls, batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
        """The family processor's batch made truly left-padded (every row's real tokens right-aligned);
        ``pad_id`` fills the padding of input_ids. Default: the processor already pads on the left."""
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"
