"""Shared machinery of the vision-side pruning methods (VisionZip, HiPrune).

These methods decide, inside the vision encoder, which image tokens reach the language model, so the
LLM sees fewer image tokens per image from its first layer on. A method subclass only says how many
tokens an image keeps (``keep_count``), which encoder layers it needs attention statistics from
(``stat_layers``) and how to reduce the image's tokens (``reduce``); this module does the rest with
torch hooks and one temporary attribute, all added in ``attach`` through the handle
(``Handle.add_hook`` / ``Handle.set_attr``, owned by the method), which removes them on remove().
Where the image features go is the adapter's knowledge (``Adapter.vision_features``,
``projector_input``, ``vision_feature_states`` and, for anyres families, ``anyres_packing`` and
``pack_crops``); this module asks for it and never branches on a family name:

- a forward pre-hook on each needed vision attention module computes, from the module's own q/k
  projections (vision towers run fused sdpa, which returns no weights), the attention probabilities
  of that layer and keeps the statistics the methods use (the [CLS] row summed over heads, the mean
  over queries, the head-averaged keys);
- a forward pre-hook where the image features enter the projector (``Adapter.projector_input``)
  replaces them with the reduced tokens (LLaVA: the multi-modal projector, whose input is the
  ``vision_feature_layer`` output without [CLS]; a forward hook on the tower keeps that layer's
  [CLS] state, which VisionZip puts first; Gemma3: the pooled features entering the projector's
  soft-embedding norm); anyres families replace the packing of the crops instead. These hooks act
  whenever the model encodes images, also when generate() encodes them before the first forward
  (transformers 5 passes ``mm_encoder_outputs`` instead of ``pixel_values`` then);
- a forward pre-hook on the top-level model (added in ``attach``, so it runs before the handle's own
  pre-hook reads the forward's inputs) shrinks every image's run of placeholder tokens to the
  kept count (input_ids, attention_mask, token_type_ids and every other per-token tensor, position
  ids made contiguous), and at each decode step of generate() rewrites the full-length attention
  mask, the position ids and cache_position the same way, so the LLM runs exactly as if the prompt
  had been written with fewer placeholders (as the official code feeds fewer tokens).

Families: ``llava`` (LLaVA-1.5: CLIP with [CLS], ``vision_feature_select_strategy="default"`` and
an int ``vision_feature_layer``), ``llava_next`` (LLaVA-NeXT anyres, same tower settings; see below)
and ``gemma3`` (SigLIP, no [CLS]; the 4x4 average pool of the projector makes one LLM token per
pooled cell, so the per-patch statistics are averaged over each cell, as HiPrune's Qwen2.5-VL code
averages over each 2x2 merge group).

LLaVA-NeXT. The tower encodes each image as a base view plus rows x cols high-res crops, every crop
a full CLIP grid; transformers' ``LlavaNextModel.pack_image_features`` then lays the base grid out,
unpads the high-res grid (drops rows or columns that only show the processor's padding) and ends
every high-res row with an ``image_newline`` token. Both official repositories reduce every crop on
its own and then build a different layout, which attnkit follows:

- VisionZip (``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``; layout in
  ``visionzip/llava_arch.py`` ``restore_image_features_sorted``): every crop, base included, keeps
  [CLS] + ``dominant - 1`` patches + ``contextual`` merged tokens. The base crop enters as is (CLS,
  dominant patches, contextual); the high-res crops' dominant patches are put back on the whole
  high-res grid and read row-major across crops, followed by the high-res crops' [CLS] tokens and
  then their contextual tokens (crop by crop). No unpadding and no newline token: the official code
  builds the newline tensor but never concatenates it (its ``grid_with_newline`` is the bare grid).
- HiPrune (``LLaVA/llava/model/llava_arch.py`` ``encode_images`` and
  ``prepare_inputs_labels_for_multimodal``): the retention budget is split evenly over the crops
  that were encoded together (``int(HIPRUNE_RETENTION / B)``, B crops, base included; its
  benchmarks run one image per batch), every crop selects anchors, buffers (+-1, +-24 on its own
  24x24 grid) and registers, and the merge type is forced to ``'spatial'``: no unpadding, no newline
  tokens, the base crop's kept tokens first, then the high-res crops' kept tokens read row-major
  across the whole high-res grid.

Where attnkit differs: the per-crop split of HiPrune's budget is per image (``budget //`` the
image's crop count, the official rule with one image per batch); VisionZip with ``contextual=0``
appends nothing (the official ``image_feature[:, -0:]`` would append every token of every crop
again); grid sizes come from the model (the official code hard-codes 24 and 576); and an image
whose crops would keep all their tokens is packed by transformers unchanged (unpadded, with
newlines), so a budget >= the tokens of every crop leaves the model unchanged, where the official
code would still drop unpadding and newlines. The reduction runs where transformers packs the
features: ``pack_image_features`` of the inner model is shadowed by an instance attribute for the
life of the handle (``Adapter.anyres_packing`` gives it, ``Handle.set_attr`` sets it and remove()
deletes it), since it is the only place that sees both the crops and ``image_sizes`` (generate()
encodes images through ``get_image_features`` and drops ``image_sizes`` before the first forward). The [CLS] and patch states come from the tower's ``vision_feature_layer``
output (the tensor the projector reads), and the reduced tokens are projected there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, UnsupportedModelError
from ..hooks import compat
from ..models import ADAPTERS
from ..models.base import AnyresImage, VisionFeatures, compact_left, gather_left
from ..models.families import anyres_order  # noqa: F401  (re-exported: the anyres layout's order)
from .base import Method
from .pruning import LayerShape, PruneReport

#: The families whose adapters describe their vision features (``Adapter.describes_vision_features``).
SUPPORTED_FAMILIES = tuple(cls.family for cls in ADAPTERS if cls.describes_vision_features)

#: What a vision-side pruner knows of the model: the adapter's description of its vision features.
VisionPlan = VisionFeatures


@dataclass
class VisionStats:
    """Attention statistics of one vision encoder layer for a batch of images, per LLM-side token.

    ``cls_attn``: (B, N) attention of the [CLS] query to each token, summed over heads (None
    without [CLS]); ``mean_attn``: (B, N) attention each token receives, averaged over heads and over
    every query ([CLS] included); ``keys``: (B, N, hd) the layer's keys averaged over heads.
    N counts the LLM-side tokens (patches, or pooled cells), never [CLS].
    """

    cls_attn: torch.Tensor | None
    mean_attn: torch.Tensor
    keys: torch.Tensor
    cls_key: torch.Tensor | None = None

    def rows(self, index: slice) -> VisionStats:
        """The statistics of images ``index`` of the batch (LLaVA-NeXT: the crops of one image)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return VisionStats(pick(self.cls_attn), self.mean_attn[index], self.keys[index], pick(self.cls_key))


@dataclass
class Reduction:
    """One image's (or crop's) reduced tokens and where they came from.

    ``tokens`` (B, k, D) in the order the method gives them; ``tokens[:, lead : lead + g]`` are grid
    patches kept as they are, at the sorted patch indices ``grid`` (B, g); the first ``lead`` tokens
    ([CLS]) and the tokens after the grid ones (VisionZip's contextual tokens) have no grid position.
    """

    tokens: torch.Tensor
    grid: torch.Tensor
    lead: int = 0


def make_plan(method: str, adapter: Any) -> VisionFeatures:
    """The adapter's description of the vision features, or a one-line UnsupportedModelError naming the
    method and the family."""
    if not adapter.describes_vision_features:
        raise UnsupportedModelError(
            f"{method}: family {adapter.family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    try:
        return adapter.vision_features()
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{method}: {err}") from None


class VisionPruner(Method):
    """Base of the vision-side pruning methods: hooks, input shrinking and the report.

    Subclasses implement ``keep_count(n)``, ``stat_layers(plan)`` and ``reduce(...)``.
    """

    families = SUPPORTED_FAMILIES

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.report: PruneReport | None = None
        self._plan: VisionFeatures | None = None
        self._adapter: Any = None
        self._stats: dict[int, VisionStats] = {}  # from the vision tower's last forward
        self._cls: torch.Tensor | None = None  # (B, D) [CLS] hidden state at the feature layer
        self._state: dict[str, Any] | None = None  # the last pruned prompt, for its decode steps
        self._feats: torch.Tensor | None = None  # anyres: (crops, 1 + N, D) feature-layer states
        self._encoded: list[tuple[int, int]] | None = None  # anyres: (full, kept) per image last packed
        self._prunes = False

    # -- subclass interface ----------------------------------------------------------------
    def keep_count(self, n: int) -> int:
        """LLM tokens an image of ``n`` tokens keeps (>= n: the image is left unchanged)."""
        raise NotImplementedError

    def crop_keep(self, n: int, crops: int) -> int:
        """Anyres (LLaVA-NeXT): tokens each crop of ``n`` tokens keeps in an image of ``crops`` crops (base
        included); >= n: the image is left unchanged. Default: ``keep_count(n)`` per crop."""
        return self.keep_count(n)

    def stat_layers(self, plan: VisionPlan) -> list[int]:
        """Encoder layer indices whose attention statistics ``reduce`` needs."""
        raise NotImplementedError

    def check_plan(self, plan: VisionPlan) -> None:
        """Validate arguments that depend on the model (MethodArgumentError)."""

    def reduce(
        self, tokens: torch.Tensor, cls: torch.Tensor | None, stats: dict[int, VisionStats], plan: VisionPlan
    ) -> torch.Tensor:
        """(B, N, D) image tokens (and (B, D) [CLS] or None) -> (B, keep_count(N), D) tokens for the LLM."""
        return self.reduce_crops(tokens, cls, stats, plan, self.keep_count(tokens.shape[1])).tokens

    def reduce_crops(
        self, tokens: torch.Tensor, cls: torch.Tensor | None, stats: dict[int, VisionStats], plan: VisionPlan, keep: int
    ) -> Reduction:
        """As ``reduce`` with ``keep`` tokens per image (crop), and the grid positions of the kept patches."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self, handle) -> None:
        adapter = handle.adapter
        plan = make_plan(self.name, adapter)
        self.check_plan(plan)
        self._plan, self._adapter = plan, adapter
        self._stats, self._state, self._cls, self.report = {}, None, None, None
        self._feats, self._encoded = None, None
        n = plan.tokens
        if plan.anyres:
            prunes = any(self.crop_keep(n, c) < n for c in plan.crop_counts)
        else:
            prunes = self.keep_count(n) < n
        self._prunes = prunes
        if prunes:  # (every image keeping all its tokens: no vision hooks at all)
            for i in sorted(set(self.stat_layers(plan))):
                handle.add_hook(plan.layers[i].self_attn, self._stat_hook(i), pre=True, with_kwargs=True, owner=self)
            if plan.has_cls or plan.anyres:  # the projector never sees [CLS]; packing sees projected crops only
                handle.add_hook(adapter.vision_tower(), self._on_tower_output, owner=self)
            if plan.anyres:
                handle.set_attr(*adapter.anyres_packing(self._pack_images))
            else:
                handle.add_hook(adapter.projector_input(), self._on_projector_input, pre=True, owner=self)
        # before the handle's own pre-hook (added after every attach): it must see the shortened prompt
        handle.add_hook(handle.model, self._on_model_input, pre=True, with_kwargs=True, owner=self)

    def detach(self) -> None:
        # the handle removes the hooks and the packing stand-in; only the per-call state is left to drop
        self._stats, self._state, self._cls = {}, None, None
        self._feats, self._encoded = None, None

    # -- vision side -----------------------------------------------------------------------
    def _stat_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._stats[index] = self._layer_stats(module, args, kwargs)

        return hook

    def _layer_stats(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> VisionStats:
        """Attention probabilities of one vision layer (``Adapter.vision_attention``), reduced to VisionStats."""
        plan = self._plan
        with torch.no_grad():
            probs, k = self._adapter.vision_attention(module, args, kwargs)  # (B, H, S, S), (B, H, S, hd)
            keys = k.mean(1)  # (B, S, hd), averaged over heads
            mean_attn = probs.mean(1).mean(1)  # (B, S): over heads, then over every query
            cls_attn = cls_key = None
            if plan.has_cls:
                cls_attn = probs[:, :, 0, 1:].sum(1)
                mean_attn, cls_key, keys = mean_attn[:, 1:], keys[:, 0], keys[:, 1:]
            if plan.pool > 1:
                mean_attn = self._pool(mean_attn[..., None])[..., 0]
                keys = self._pool(keys)
        return VisionStats(cls_attn, mean_attn, keys, cls_key)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P*P, C) per patch -> (B, side*side, C) averaged over each pooled cell (row-major)."""
        plan = self._plan
        bsz, _, ch = x.shape
        p = plan.side * plan.pool
        grid = x.transpose(1, 2).reshape(bsz, ch, p, p)
        return torch.nn.functional.avg_pool2d(grid, plan.pool).flatten(2).transpose(1, 2)

    def _on_tower_output(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Keep the feature layer's states: the [CLS] hidden state (the projector never sees it) and, for
        anyres families, the whole output ([CLS] and patches) of every crop."""
        states = self._adapter.vision_feature_states(output)
        if states is not None:
            if self._plan.anyres:
                self._feats = states
            else:
                self._cls = states[:, 0]

    # -- anyres (LLaVA-NeXT) ---------------------------------------------------------------
    def _image_counts(self, image_sizes: Any) -> list[tuple[AnyresImage, int, int]]:
        """Per image: (its crops and placeholders, tokens each crop keeps, tokens the image keeps)."""
        n = self._plan.tokens
        out = []
        for image in self._adapter.anyres_images(image_sizes):
            keep = self.crop_keep(n, image.crops)
            out.append((image, keep, image.tokens if keep >= n else image.crops * keep))
        return out

    def _pack_images(self, images: list[AnyresImage], features: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Packs the crops of each image of the batch in the model's stead (``Adapter.anyres_packing``).

        features: per image, its (crops, N, D) projected crop tokens. An image whose crops keep every
        token is left to the model's own packing (None); the others are reduced crop by crop from the
        feature-layer states, projected, and laid out by ``Adapter.pack_crops`` (see the module docstring).
        """
        plan, adapter = self._plan, self._adapter
        n = plan.tokens
        total = sum(im.crops for im in images)
        feats, stats = self._feats, self._stats
        self._feats, self._stats = None, {}
        out: list[torch.Tensor | None] = []
        encoded = []
        start = 0
        for image, feature in zip(images, features):
            rng = slice(start, start + image.crops)
            start += image.crops
            keep = self.crop_keep(n, image.crops)
            if keep >= n:
                out.append(None)
                encoded.append((image.tokens, image.tokens))
                continue
            missing = [j for j in self.stat_layers(plan) if j not in stats]
            if missing or feats is None:
                raise RuntimeError(f"{self.name}: the vision encoder did not run before its features were packed")
            if feats.shape[0] != total or feats.shape[1] != n + 1:
                raise RuntimeError(f"{self.name}: vision states of shape {tuple(feats.shape)} do not match {total} crops")
            sub = {j: st.rows(rng) for j, st in stats.items()}
            red = self.reduce_crops(feats[rng, 1:], feats[rng, 0], sub, plan, keep)
            tokens = adapter.project(red.tokens.to(feats.dtype)).to(feature.dtype)  # (crops, keep, D)
            packed = adapter.pack_crops(tokens, red.grid, red.lead, image)
            kept = image.crops * keep
            if packed.shape[0] != kept:
                raise RuntimeError(f"{self.name}: packed {packed.shape[0]} tokens for an image, expected {kept}")
            out.append(packed)
            encoded.append((image.tokens, kept))
        self._encoded = encoded
        return out

    def _anyres_counts(self, kwargs: dict) -> list[tuple[int, int]]:
        """Anyres: (placeholders unpruned, kept) per image of the batch, in order."""
        if kwargs.get("pixel_values") is not None:
            if kwargs.get("image_sizes") is None:
                raise InputError(f"{self.name}: {self._adapter.family} needs image_sizes with pixel_values")
            return [(image.tokens, kept) for image, _, kept in self._image_counts(kwargs["image_sizes"])]
        # generate() encoded the images (through _pack_images) before this first forward, without image_sizes
        encoded = kwargs["mm_encoder_outputs"]["image"].pooler_output
        lens = [int(t.shape[0]) for t in encoded]
        if not self._prunes:
            return [(m, m) for m in lens]
        got, self._encoded = self._encoded, None
        if got is None or [k for _, k in got] != lens:
            raise InputError(
                f"{self.name}: mm_encoder_outputs were not encoded by this wrapped model; "
                "pass pixel_values and image_sizes"
            )
        return got

    def _on_projector_input(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """Replace the (B, N, D) image tokens entering the projector by the reduced (B, kept, D)."""
        tokens = args[0]
        n = self._plan.tokens
        if tokens.dim() != 3 or tokens.shape[1] != n or self.keep_count(n) >= n:
            return None
        missing = [i for i in self.stat_layers(self._plan) if i not in self._stats]
        if missing or (self._plan.has_cls and self._cls is None):
            raise RuntimeError(f"{self.name}: the vision encoder did not run before its features reached the projector")
        stats, cls = self._stats, self._cls
        if any(st.mean_attn.shape[0] != tokens.shape[0] for st in stats.values()):
            raise RuntimeError(f"{self.name}: vision statistics and image features disagree in batch size")
        self._stats, self._cls = {}, None
        reduced = self.reduce(tokens, cls, stats, self._plan)
        return (reduced.to(tokens.dtype), *args[1:])

    # -- language side ---------------------------------------------------------------------
    def _on_model_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            kwargs = dict(kwargs, input_ids=args[0]) if "input_ids" not in kwargs else dict(kwargs)
            args = args[1:]
        input_ids = kwargs.get("input_ids")
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        cache = compat.find_cache(args, kwargs)
        past_len = compat.cache_length(cache) if cache is not None else 0
        if past_len == 0:
            self._state = None
            encoded = kwargs.get("mm_encoder_outputs") or {}
            if kwargs.get("pixel_values") is None and encoded.get("image") is None:
                return None
            if input_ids is None:
                raise InputError(f"{self.name}: needs input_ids with the image placeholders (got inputs_embeds)")
            return args, self._shrink_prompt(kwargs)
        if self._state is None or ref is None:
            return None
        return args, self._rewrite_decode(kwargs, ref.shape[1], past_len)

    def _spans(self, kwargs: dict) -> list[list[tuple[int, int, int]]]:
        """Per row, (start, end, kept) of each image's placeholder run."""
        input_ids = kwargs["input_ids"]
        if self._plan.anyres:
            counts = self._anyres_counts(kwargs)
            try:
                runs = self._adapter.split_spans(input_ids, [full for full, _ in counts])
            except ValueError as err:
                raise InputError(f"{self.name}: {err}") from None
            if sum(len(r) for r in runs) != len(counts):
                raise InputError(f"{self.name}: {len(counts)} images but {sum(len(r) for r in runs)} placeholder runs")
            kept = iter(k for _, k in counts)
            return [[(s, e, next(kept)) for s, e in row] for row in runs]
        n = self._plan.tokens
        # runs of placeholders; back-to-back images (one run) are cut into images of n tokens each
        runs = self._adapter.split_spans(input_ids, None)
        bad = sorted({e - s for row in runs for s, e in row if (e - s) % n})
        if bad:
            raise InputError(f"{self.name}: image runs of {bad} tokens, expected multiples of {n} (one image = {n})")
        kept = self.keep_count(n)
        return [[(p, p + n, kept) for s, e in row for p in range(s, e, n)] for row in runs]

    def _shrink_prompt(self, kwargs: dict) -> dict:
        input_ids = kwargs["input_ids"]
        bsz, seq = input_ids.shape
        spans = self._spans(kwargs)
        lm_layers = self._adapter.num_layers
        real = kwargs.get("attention_mask")
        real = torch.ones_like(input_ids, dtype=torch.bool) if real is None else real.bool()
        img_full = max((sum(e - s for s, e, _ in row) for row in spans), default=0)
        img_kept = max((sum(min(k, e - s) for s, e, k in row) for row in spans), default=0)
        if all(k >= e - s for row in spans for s, e, k in row):  # nothing to prune: the model runs unchanged
            self.report = PruneReport(
                self.name, seq, img_full, [seq] * lm_layers, [img_full] * lm_layers
            ).finish(LayerShape.from_adapter(self._adapter))
            return kwargs
        keep = torch.ones(bsz, seq, dtype=torch.bool)
        for r, row in enumerate(spans):
            for s, e, k in row:
                keep[r, s + k : e] = False
        # gather index (B, width): left-padded again when rows drop different numbers of tokens
        index = compact_left(keep)
        width = index.shape[1]
        dropped_before = (~keep).long().cumsum(1)  # dropped tokens up to each column
        dropped_row = (~keep).sum(1)  # all are real tokens (placeholders)
        out = dict(kwargs)
        for key, value in kwargs.items():
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (bsz, seq):
                continue
            if key == "position_ids":
                value = value - dropped_before.to(value.device, value.dtype)
                fill = 1
            else:
                fill = self._adapter.pad_id if key == "input_ids" else 0
            out[key] = gather_left(value, index, fill)
        cache_position = kwargs.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1:
            out["cache_position"] = cache_position[:width]
        self._state = {"seq": seq, "width": width, "index": index, "dropped_row": dropped_row}
        self.report = PruneReport(
            self.name,
            seq,
            img_full,
            [width] * lm_layers,
            [img_kept] * lm_layers,
        ).finish(LayerShape.from_adapter(self._adapter))
        return out

    def _rewrite_decode(self, kwargs: dict, q_len: int, past_len: int) -> dict:
        """A decode step after a pruned prompt: generate() still holds the full-length mask and positions."""
        st = self._state
        out = dict(kwargs)
        shift = st["seq"] - st["width"]
        attn = kwargs.get("attention_mask")
        if isinstance(attn, torch.Tensor) and attn.dim() == 2:
            if attn.shape[1] != past_len + q_len + shift:
                return kwargs  # the caller already feeds masks over the pruned sequence
            prompt = gather_left(attn[:, : st["seq"]], st["index"], 0)
            out["attention_mask"] = torch.cat([prompt, attn[:, st["seq"] :]], dim=1)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 2:
            out["position_ids"] = pos - st["dropped_row"].to(pos.device, pos.dtype)[:, None]
        cache_position = kwargs.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1 and int(cache_position[0]) >= st["seq"]:
            out["cache_position"] = cache_position - shift
        return out
