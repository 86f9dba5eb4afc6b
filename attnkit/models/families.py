"""One adapter per supported VLM family (transformers >= 5 model classes)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..errors import InputError, TransformersCompatError, UnsupportedModelError
from .base import Adapter, AnyresImage, Grid, VisionFeatures, compact_left, gather_left


def _base_side(config: Any) -> int:
    vcfg = config.vision_config
    return vcfg.image_size // vcfg.patch_size


def anyres_order(grid: torch.Tensor, rows: int, cols: int, side: int) -> torch.Tensor:
    """Order of the kept grid patches of rows x cols crops read row-major across the whole high-res grid.

    grid (rows*cols, g): sorted patch indices (row-major on a crop's side x side grid) kept in each
    crop, crops row-major. Returns the permutation of ``grid.flatten()`` (crop-major) that reads them
    along the rows of the (rows*side) x (cols*side) grid (LLaVA-NeXT's 'spatial' layout, without
    unpadding or newline tokens).
    """
    crop = torch.arange(grid.shape[0], device=grid.device)[:, None]
    y = (crop // cols) * side + grid // side
    x = (crop % cols) * side + grid % side
    return (y * (cols * side) + x).flatten().argsort()


class _LlavaFeatures:
    """LLaVA-1.5 / LLaVA-NeXT vision path: CLIP with [CLS]; the projector reads one encoder layer's
    output (``vision_feature_layer``) without [CLS] (``vision_feature_select_strategy="default"``)."""

    describes_vision_features = True

    def _llava_features(self, crop_counts: tuple[int, ...] = ()) -> VisionFeatures:
        cfg = self.config
        layers = self.vision_encoder_layers()
        fl = cfg.vision_feature_layer
        if not isinstance(fl, int) or isinstance(fl, bool):
            raise UnsupportedModelError(f"{self.family} with several vision_feature_layer values is not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"{self.family} with vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
                "is not supported (only 'default')"
            )
        index = fl % (len(layers) + 1) - 1  # hidden_states[i] is the output of encoder layer i - 1
        if index < 0:
            raise UnsupportedModelError(f"{self.family} vision_feature_layer={fl} takes the embeddings, not a layer")
        return VisionFeatures(layers, index, True, _base_side(cfg), 1, crop_counts)

    def vision_feature_states(self, output: Any) -> torch.Tensor | None:
        states = getattr(output, "hidden_states", None)
        fl = self.config.vision_feature_layer
        if states is not None and -len(states) <= fl < len(states) and states[fl] is not None:
            return states[fl]
        return None


class LlavaAdapter(_LlavaFeatures, Adapter):
    """LLaVA-1.5: CLIP patches (CLS dropped) as one square grid per image."""

    family = "llava"
    model_types = ("llava",)
    global_view_cropped = True  # CLIP's processor: shortest-edge resize, then centre crop

    def vision_features(self) -> VisionFeatures:
        return self._llava_features()

    def projector_input(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def image_token_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return None
        side = _base_side(self.config)
        if self.config.vision_feature_select_strategy == "full":
            return None  # CLS kept: not a square grid
        return [side * side] * pixel_values.shape[0]


class LlavaNextAdapter(_LlavaFeatures, Adapter):
    """LLaVA-NeXT: base-image grid, then the unpadded high-res grid with one newline token per row.

    Newline tokens carry the image token id (they are part of the image features), so they are
    image positions; image_grids() leaves them out of the high-res grid.

    Vision features: each image is a base view plus rows x cols high-res crops, every crop a full
    CLIP grid; ``LlavaNextModel.pack_image_features`` lays them out (base grid, unpadded high-res
    grid, newlines). ``anyres_packing`` diverts that packing (the only place that sees both the crops
    and ``image_sizes``: generate() encodes images through ``get_image_features`` and drops
    ``image_sizes`` before the first forward); ``pack_crops`` lays reduced crops out as the original
    LLaVA-NeXT code's 'spatial' merge does.
    """

    family = "llava_next"
    model_types = ("llava_next",)

    def crop_grid(self, image_size: Any) -> tuple[int, int]:
        """(rows, cols) of the high-res crops of an image of ``image_size`` (height, width): the image
        processor cuts the resized image into rows x cols vision-sized crops, row-major after the base view."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        gh, gw = get_anyres_image_grid_shape(
            [int(x) for x in image_size], self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        return int(gh), int(gw)

    def _highres_shape(self, image_size: Any) -> tuple[int, int]:
        """(rows, cols) of the unpadded high-res grid, as the model's pack_image_features builds it."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        side = _base_side(self.config)
        gh, gw = self.crop_grid(image_size)
        feat = unpad_image(torch.zeros(1, gh * side, gw * side), torch.as_tensor(image_size))
        return self._limit(feat.shape[1], feat.shape[2], side)

    def _limit(self, h: int, w: int, side: int) -> tuple[int, int]:
        return h, w

    def _anyres(self, inputs: dict[str, Any]) -> list[bool]:
        """Per image of the batch: does it get the high-res grid (else base grid + one newline)?"""
        return [True] * len(inputs["image_sizes"])

    def _layouts(self, inputs: dict[str, Any]) -> list[tuple[int, int] | None]:
        """Per image of the batch: (rows, cols) of its high-res grid, or None for base grid + newline."""
        return [
            self._highres_shape(size) if anyres else None
            for size, anyres in zip(inputs["image_sizes"].tolist(), self._anyres(inputs))
        ]

    def _counts(self, layouts: list[tuple[int, int] | None]) -> list[int]:
        base = _base_side(self.config) ** 2
        return [base + (1 if hw is None else hw[0] * (hw[1] + 1)) for hw in layouts]

    def image_token_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        if inputs.get("image_sizes") is None:
            return None
        return self._counts(self._layouts(inputs))

    def image_grids(self, inputs: dict[str, Any]) -> list[list[Grid]]:
        side = _base_side(self.config)
        layouts = self._layouts(inputs)
        images = iter(layouts)
        out = []
        for runs in self.split_spans(inputs["input_ids"], self._counts(layouts)):
            grids = []
            for start, _ in runs:
                grids.append(Grid(start, side, side, side))
                hw = next(images)
                if hw is not None:
                    grids.append(Grid(start + side * side, hw[0], hw[1], hw[1] + 1))
            out.append(grids)
        return out

    # -- vision features (anyres) -------------------------------------------------------------
    def vision_features(self) -> VisionFeatures:
        tile = self.config.vision_config.image_size
        pinpoints = self.config.image_grid_pinpoints
        crops = tuple(sorted({1 + (int(h) // tile) * (int(w) // tile) for h, w in pinpoints}))
        return self._llava_features(crops)

    def anyres_images(self, image_sizes: Any) -> list[AnyresImage]:
        sizes = torch.as_tensor(image_sizes)
        fulls = self.image_token_counts({"image_sizes": sizes})
        out = []
        for size, full in zip(sizes.tolist(), fulls):
            rows, cols = self.crop_grid(size)
            out.append(AnyresImage(1 + rows * cols, rows, cols, full))
        return out

    def anyres_packing(
        self, pack_images: Callable[[list[AnyresImage], list[torch.Tensor]], list[torch.Tensor | None]]
    ) -> tuple[Any, str, Callable]:
        from ..hooks import compat

        inner = self.model.model
        if not callable(getattr(type(inner), "pack_image_features", None)):
            raise TransformersCompatError(
                f"{type(inner).__name__} has no pack_image_features ({compat.where()}); "
                f"attnkit cannot repack {self.family}'s crops"
            )
        if "pack_image_features" in vars(inner):
            raise UnsupportedModelError(
                f"pack_image_features of this {self.family} model is already replaced (one replacement at a time)"
            )
        original = type(inner).pack_image_features.__get__(inner)

        def pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
            images = self.anyres_images(image_sizes)
            crops = [int(f.shape[0]) for f in image_features]
            if [im.crops for im in images] != crops:
                raise RuntimeError(f"{self.family}: image_sizes give {[im.crops for im in images]} crops, features {crops}")
            packed = pack_images(images, list(image_features))
            out: list[torch.Tensor] = []
            for i, (feature, tokens) in enumerate(zip(image_features, packed)):
                if tokens is None:
                    whole, _ = original([feature], image_sizes[i : i + 1], vision_feature_select_strategy, image_newline)
                    tokens = whole[0]
                out.append(tokens)
            lens = torch.tensor([t.shape[0] for t in out], dtype=torch.long, device=image_features[0].device)
            return out, lens

        return inner, "pack_image_features", pack

    def pack_crops(self, tokens: torch.Tensor, grid: torch.Tensor, lead: int, image: AnyresImage) -> torch.Tensor:
        """The 'spatial' merge of the original LLaVA-NeXT code, without unpadding or newline tokens: the base
        crop's tokens in their own order; then the high-res crops' grid tokens read row-major across the
        whole high-res grid; then their ``lead`` tokens, crop by crop; then their trailing tokens (those
        after the grid ones), crop by crop."""
        g, dim = grid.shape[1], tokens.shape[-1]
        high = tokens[1:]
        order = anyres_order(grid[1:], image.rows, image.cols, self.vision_features().side).to(tokens.device)
        return torch.cat(
            [
                tokens[0],
                high[:, lead : lead + g].reshape(-1, dim)[order],
                high[:, :lead].reshape(-1, dim),
                high[:, lead + g :].reshape(-1, dim),
            ]
        )


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: as LLaVA-NeXT, plus the anyres_max_9 downscaling of large high-res grids.

    Its vision features (SigLIP, no [CLS], per-row patching rules) are not described."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    describes_vision_features = False

    def vision_features(self) -> VisionFeatures:
        return Adapter.vision_features(self)

    def vision_feature_states(self, output: Any) -> torch.Tensor | None:
        return None

    def anyres_images(self, image_sizes: Any) -> list[AnyresImage]:
        return Adapter.anyres_images(self, image_sizes)

    def anyres_packing(self, pack_images: Callable) -> tuple[Any, str, Callable]:
        return Adapter.anyres_packing(self, pack_images)

    def pack_crops(self, tokens: torch.Tensor, grid: torch.Tensor, lead: int, image: AnyresImage) -> torch.Tensor:
        return Adapter.pack_crops(self, tokens, grid, lead, image)

    def _anyres(self, inputs: dict[str, Any]) -> list[bool]:
        # a row with several images gets base grids only (the model's need_patching rule)
        per_row = inputs.get("batch_num_images")
        if per_row is None:
            return [True] * len(inputs["image_sizes"])
        return [int(n) == 1 for n in per_row.tolist() for _ in range(int(n))]

    def _limit(self, h: int, w: int, side: int) -> tuple[int, int]:
        max_patches = int(str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))
        ratio = math.sqrt(h * w / (max_patches * side**2))
        if ratio > 1.1:
            return int(h // ratio), int(w // ratio)
        return h, w


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: <|vision_start|> image x (h/2 * w/2) <|vision_end|>; grid from image_grid_thw."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    wrap_before = 1
    wrap_after = 1
    vision_paths = ("model.visual", "visual")
    positions_1d = False  # mRoPE: image tokens take (t, h, w) positions

    def alter_pixels(self, pixel_values: torch.Tensor, pixels: Callable, inputs: dict[str, Any]) -> torch.Tensor:
        """Qwen-VL's pixel_values are the batch's patches flattened, (N, d), which do not say where an image
        ends: ``pixels`` is called once per image (its t*h*w patches, from image_grid_thw), so that an
        image's alteration does not depend on the images batched with it."""
        grid = inputs.get("image_grid_thw")
        if not isinstance(grid, torch.Tensor) or pixel_values.dim() != 2:
            return pixels(pixel_values)
        sizes = [int(n) for n in grid.prod(-1).tolist()]
        if sum(sizes) != pixel_values.shape[0]:
            raise InputError(
                f"{self.family}: image_grid_thw describes {sum(sizes)} patches, pixel_values holds {pixel_values.shape[0]}"
            )
        parts = [pixels(chunk) for chunk in pixel_values.split(sizes)]
        if not all(isinstance(p, torch.Tensor) and p.shape == c.shape for p, c in zip(parts, pixel_values.split(sizes))):
            raise InputError("the contrast's pixels function must return each image's patches in the same shape")
        return torch.cat(parts, dim=0)

    def keep_batch_rows(self, n: int) -> None:
        """The model keeps each row's mRoPE offset (``base_model.rope_deltas``, (B, 1)) for its decode steps; a
        forward without position ids computes it for the batch it got, contrast rows included."""
        owner = getattr(self.model, "base_model", None)
        deltas = getattr(owner, "rope_deltas", None)
        if isinstance(deltas, torch.Tensor) and deltas.dim() >= 1 and deltas.shape[0] > n:
            owner.rope_deltas = deltas[:n]

    def image_grids(self, inputs: dict[str, Any]) -> list[list[Grid]]:
        merge = self.config.vision_config.spatial_merge_size
        thw = inputs["image_grid_thw"].tolist()
        out = []
        k = 0
        for runs in self.image_spans(inputs["input_ids"], inputs):
            grids = []
            for start, end in runs:
                t, h, w = thw[k]
                rows, cols = h // merge, w // merge
                if t * rows * cols != end - start:
                    raise ValueError(f"{self.family}: image run of {end - start} tokens != grid {t}x{rows}x{cols}")
                grids.append(Grid(start, rows, cols, cols))
                k += 1
            out.append(grids)
        return out


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    @property
    def first_droppable_layer(self) -> int:
        # DeepStack adds vision features to the image positions' hidden states after each of the
        # first len(deepstack_visual_indexes) decoder layers
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", ()) or ())


class InstructBlipAdapter(Adapter):
    """InstructBLIP: num_query_tokens Q-Former outputs in front of the prompt; no spatial grid.

    Its top-level forward requires pixel_values, so the image-free inputs run on the language model.
    """

    family = "instructblip"
    model_types = ("instructblip",)
    has_image_grid = False
    vision_paths = ("vision_model", "model.vision_model")
    vhr_layer_share = 18 / 32  # VHR's official setting for InstructBLIP (Vicuna-7B, 32 layers)

    def image_grids(self, inputs: dict[str, Any]) -> None:
        return None

    def context_module(self) -> torch.nn.Module:
        # generate() hands merged embeddings straight to language_model.generate(), so the
        # top-level forward never runs: the language model's forward starts each step.
        return self.model.language_model

    def image_mask_from_layout(self, attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
        """The processor puts the num_query_tokens placeholders first: the first n real tokens of each row."""
        n = self.config.num_query_tokens
        real = torch.ones(batch, seq, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return real & (real.long().cumsum(1) <= n)

    def text_only_model(self) -> torch.nn.Module:
        return self.model.language_model

    def repeat_image_inputs(self, inputs: dict[str, Any], pixels: Callable | None = None) -> dict[str, Any]:
        raise UnsupportedModelError(
            f"{self.family}: contrast rows with altered pixels or prompts are not supported (generate() hands only "
            "merged embeddings to the language model)"
        )

    @classmethod
    def left_pad_batch(cls, batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
        """InstructBlipProcessor prepends the query placeholders to already padded text: [query][pad][text].
        Each row becomes [pad][query][text] (input_ids and attention_mask)."""
        mask = batch["attention_mask"]
        index = compact_left(mask.bool(), width=mask.shape[1])
        batch = dict(batch)
        batch["input_ids"] = gather_left(batch["input_ids"], index, pad_id)
        batch["attention_mask"] = gather_left(mask, index, 0)
        return batch


class InternVLAdapter(Adapter):
    """InternVL: <img> image x (tokens per tile x tiles) </img>; one square grid per tile."""

    family = "internvl"
    model_types = ("internvl",)
    global_view = -1  # tiles first, then the whole-image thumbnail
    wrap_before = 1
    wrap_after = 1

    def image_grids(self, inputs: dict[str, Any]) -> list[list[Grid]]:
        vcfg = self.config.vision_config
        size = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
        patch = vcfg.patch_size[0] if isinstance(vcfg.patch_size, (list, tuple)) else vcfg.patch_size
        side = int(size // patch * self.config.downsample_ratio)
        per_tile = side * side
        out = []
        for runs in self.image_spans(inputs["input_ids"], inputs):
            grids = []
            for start, end in runs:
                if (end - start) % per_tile:
                    raise ValueError(f"{self.family}: image run of {end - start} tokens is not whole tiles")
                for t in range((end - start) // per_tile):
                    grids.append(Grid(start + t * per_tile, side, side, side))
            out.append(grids)
        return out


class Gemma3Adapter(Adapter):
    """Gemma3: <start_of_image> image x mm_tokens_per_image <end_of_image>, bidirectional inside."""

    family = "gemma3"
    model_types = ("gemma3",)
    wrap_before = 1
    wrap_after = 1
    describes_vision_features = True

    def vision_features(self) -> VisionFeatures:
        """SigLIP (no [CLS]); the projector average-pools the last layer's patches into
        ``mm_tokens_per_image`` tokens, one per pool x pool cell."""
        layers = self.vision_encoder_layers()
        side = math.isqrt(int(self.config.mm_tokens_per_image))
        vcfg = self.config.vision_config
        return VisionFeatures(layers, len(layers) - 1, False, side, (vcfg.image_size // vcfg.patch_size) // side)

    def projector_input(self) -> torch.nn.Module:
        # the pooled features enter the projector's soft-embedding norm
        return self.model.model.multi_modal_projector.mm_soft_emb_norm

    def rotary_embeddings(
        self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # one rotary module, with parameters per layer type (sliding / full attention)
        return self.rotary_module()(hidden, position_ids, self.text_config.layer_types[layer])


class Idefics3Adapter(Adapter):
    """Idefics3 / SmolVLM: <fake_token_around_image><global-img> image x n <fake_token_around_image>.

    With image splitting each tile is its own run (preceded by a <row_i_col_j> token).
    """

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    global_view = -1  # tiles first, then the <global-img> view
    wrap_before = 2
    wrap_after = 1
    vision_paths = ("model.vision_model", "vision_model")

    def _keep_padding_images(self, pixel_values: torch.Tensor, altered: torch.Tensor) -> torch.Tensor:
        # pixel_values (B, n, C, H, W) pads rows with fewer images by all-zero images, which the model skips
        padding = (pixel_values == 0).flatten(2).all(-1)
        return altered.masked_fill(padding[..., None, None, None].to(altered.device), 0)


ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    InstructBlipAdapter,
    InternVLAdapter,
    Gemma3Adapter,
    Idefics3Adapter,
)
