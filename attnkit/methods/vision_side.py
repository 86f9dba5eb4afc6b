"""Shared machinery of the vision-side pruning methods (VisionZip, HiPrune).

These methods decide, inside the vision encoder, which image tokens reach the language model, so the
LLM sees fewer image tokens per image from its first layer on. A method subclass only says how many
tokens an image keeps (``keep_count``), which encoder layers it needs attention statistics from
(``stat_layers``) and how to reduce the image's tokens (``reduce``); this module does the rest with
torch hooks, all installed in ``attach`` and removed in ``detach``:

- a forward pre-hook on each needed vision attention module computes, from the module's own q/k
  projections (vision towers run fused sdpa, which returns no weights), the attention probabilities
  of that layer and keeps the statistics the methods use (the [CLS] row summed over heads, the mean
  over queries, the head-averaged keys);
- a forward pre-hook where the image features enter the projector replaces them with the reduced
  tokens (LLaVA: the multi-modal projector, whose input is the ``vision_feature_layer`` output
  without [CLS]; a forward hook on the tower keeps that layer's [CLS] state, which VisionZip puts
  first; Gemma3: the pooled features entering the projector's soft-embedding norm). These hooks act
  whenever the model encodes images, also when generate() encodes them before the first forward
  (transformers 5 passes ``mm_encoder_outputs`` instead of ``pixel_values`` then);
- a forward pre-hook on the top-level model shrinks every image's run of placeholder tokens to the
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
life of the handle (``detach`` deletes it), since it is the only place that sees both the crops and
``image_sizes`` (generate() encodes images through ``get_image_features`` and drops ``image_sizes``
before the first forward). The [CLS] and patch states come from the tower's ``vision_feature_layer``
output (the tensor the projector reads), and the reduced tokens are projected there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, TransformersCompatError, UnsupportedModelError
from ..hooks import compat
from .base import Method
from .pruning import LayerShape, PruneReport

SUPPORTED_FAMILIES = ("llava", "llava_next", "gemma3")


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


def anyres_order(grid: torch.Tensor, rows: int, cols: int, side: int) -> torch.Tensor:
    """Order of the kept grid patches of rows x cols crops read row-major across the whole high-res grid.

    grid (rows*cols, g): sorted patch indices (row-major on a crop's side x side grid) kept in each
    crop, crops row-major. Returns the permutation of ``grid.flatten()`` (crop-major) that reads them
    along the rows of the (rows*side) x (cols*side) grid, as the official LLaVA-NeXT code of VisionZip
    and HiPrune lays them out (without unpadding or newline tokens).
    """
    crop = torch.arange(grid.shape[0], device=grid.device)[:, None]
    y = (crop // cols) * side + grid // side
    x = (crop % cols) * side + grid % side
    return (y * (cols * side) + x).flatten().argsort()


@dataclass(frozen=True)
class VisionPlan:
    """Where a family's vision features go and how they map to LLM tokens."""

    family: str
    layers: list[torch.nn.Module]  # the vision encoder layers, in order (each has .self_attn)
    feature_layer: int  # index of the encoder layer whose output the projector takes
    has_cls: bool
    side: int  # LLM-side tokens per image side
    pool: int  # patches per LLM token side (1: one token per patch)
    crop_counts: tuple[int, ...] = ()  # llava_next: the crops (base included) an image can have


def _encoder_layers(tower: torch.nn.Module) -> list[torch.nn.Module]:
    """The ModuleList of the vision tower whose entries have ``self_attn`` (the encoder layers)."""
    best: list[torch.nn.Module] = []
    for mod in tower.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and all(hasattr(m, "self_attn") for m in mod):
            if len(mod) > len(best):
                best = list(mod)
    if not best:
        raise UnsupportedModelError(f"{type(tower).__name__}: no encoder layers with self_attn found")
    return best


def make_plan(method: str, adapter: Any) -> VisionPlan:
    """The family's plan, or a one-line UnsupportedModelError naming the method and family."""
    family = adapter.family
    cfg = adapter.config
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{method}: family {family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    tower = adapter.vision_tower()
    layers = _encoder_layers(tower)
    vcfg = cfg.vision_config
    patches = vcfg.image_size // vcfg.patch_size
    if family in ("llava", "llava_next"):
        fl = cfg.vision_feature_layer
        if not isinstance(fl, int) or isinstance(fl, bool):
            raise UnsupportedModelError(f"{method}: {family} with several vision_feature_layer values is not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"{method}: {family} with vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
                "is not supported (only 'default')"
            )
        index = fl % (len(layers) + 1) - 1  # hidden_states[i] is the output of encoder layer i - 1
        if index < 0:
            raise UnsupportedModelError(f"{method}: {family} vision_feature_layer={fl} takes the embeddings, not a layer")
        crops: tuple[int, ...] = ()
        if family == "llava_next":
            tile = vcfg.image_size
            crops = tuple(sorted({1 + (int(h) // tile) * (int(w) // tile) for h, w in cfg.image_grid_pinpoints}))
        return VisionPlan(family, layers, index, True, patches, 1, crops)
    side = math.isqrt(int(cfg.mm_tokens_per_image))
    return VisionPlan(family, layers, len(layers) - 1, False, side, patches // side)


class VisionPruner(Method):
    """Base of the vision-side pruning methods: hooks, input shrinking and the report.

    Subclasses implement ``keep_count(n)``, ``stat_layers(plan)`` and ``reduce(...)``.
    """

    families = SUPPORTED_FAMILIES

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.report: PruneReport | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._plan: VisionPlan | None = None
        self._adapter: Any = None
        self._stats: dict[int, VisionStats] = {}  # from the vision tower's last forward
        self._cls: torch.Tensor | None = None  # (B, D) [CLS] hidden state at the feature layer
        self._state: dict[str, Any] | None = None  # the last pruned prompt, for its decode steps
        self._feats: torch.Tensor | None = None  # llava_next: (crops, 1 + N, D) feature-layer states
        self._encoded: list[tuple[int, int]] | None = None  # llava_next: (full, kept) per image last packed
        self._packed: torch.nn.Module | None = None  # llava_next: the module whose pack_image_features we shadow
        self._prunes = False

    # -- subclass interface ----------------------------------------------------------------
    def keep_count(self, n: int) -> int:
        """LLM tokens an image of ``n`` tokens keeps (>= n: the image is left unchanged)."""
        raise NotImplementedError

    def crop_keep(self, n: int, crops: int) -> int:
        """LLaVA-NeXT: tokens each crop of ``n`` tokens keeps in an image of ``crops`` crops (base
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
        model = handle.model
        n = plan.side * plan.side
        if plan.family == "llava_next":
            prunes = any(self.crop_keep(n, c) < n for c in plan.crop_counts)
        else:
            prunes = self.keep_count(n) < n
        self._prunes = prunes
        try:
            for i in sorted(set(self.stat_layers(plan))) if prunes else []:
                attn = plan.layers[i].self_attn
                self._hooks.append(attn.register_forward_pre_hook(self._stat_hook(i), with_kwargs=True))
            projector = model.model.multi_modal_projector
            if not prunes:  # every image keeps all its tokens: no vision hooks at all
                pass
            elif plan.family == "llava":
                self._hooks.append(adapter.vision_tower().register_forward_hook(self._on_tower_output))
                self._hooks.append(projector.register_forward_pre_hook(self._on_projector_input))
            elif plan.family == "llava_next":
                self._hooks.append(adapter.vision_tower().register_forward_hook(self._on_tower_output))
                self._shadow_pack(model.model)
            else:
                self._hooks.append(projector.mm_soft_emb_norm.register_forward_pre_hook(self._on_projector_input))
            self._hooks.append(model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._packed is not None and vars(self._packed).get("pack_image_features") == self._pack:
            del self._packed.pack_image_features
        self._packed = None
        self._stats, self._state, self._cls = {}, None, None
        self._feats, self._encoded = None, None

    # -- vision side -----------------------------------------------------------------------
    def _stat_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            self._stats[index] = self._layer_stats(module, hidden, mask)

        return hook

    def _layer_stats(self, module: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> VisionStats:
        """Attention probabilities of one vision layer from its q/k projections, reduced to VisionStats."""
        plan = self._plan
        bsz, seq, _ = hidden.shape
        heads, hd = module.num_heads, module.head_dim
        with torch.no_grad():
            q = module.q_proj(hidden).view(bsz, seq, heads, hd).transpose(1, 2).float()
            k = module.k_proj(hidden).view(bsz, seq, heads, hd).transpose(1, 2).float()
            scores = torch.matmul(q, k.transpose(-1, -2)) * module.scale
            if mask is not None and mask.dtype != torch.bool:
                scores = scores + mask.float()
            probs = scores.softmax(-1)  # (B, H, S, S)
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
        """LLaVA: keep the [CLS] hidden state of the feature layer (the projector never sees it);
        LLaVA-NeXT: keep the whole feature-layer output ([CLS] and patches) of every crop."""
        states = getattr(output, "hidden_states", None)
        fl = self._adapter.config.vision_feature_layer
        if states is not None and -len(states) <= fl < len(states) and states[fl] is not None:
            if self._plan.family == "llava_next":
                self._feats = states[fl]
            else:
                self._cls = states[fl][:, 0]

    # -- LLaVA-NeXT ------------------------------------------------------------------------
    def _shadow_pack(self, inner: torch.nn.Module) -> None:
        if not callable(getattr(type(inner), "pack_image_features", None)):
            raise TransformersCompatError(
                f"{self.name}: {type(inner).__name__} has no pack_image_features ({compat.where()}); "
                "attnkit cannot reduce LLaVA-NeXT's crops"
            )
        if "pack_image_features" in vars(inner):
            raise UnsupportedModelError(
                f"{self.name}: pack_image_features of this llava_next model is already replaced "
                "(one vision-side pruning method per model)"
            )
        inner.pack_image_features = self._pack
        self._packed = inner

    def _image_counts(self, image_sizes: Any) -> list[tuple[int, int, int, int, int]]:
        """Per image: (crops, crop rows, crop cols, placeholder tokens unpruned, tokens kept)."""
        n = self._plan.side * self._plan.side
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        fulls = self._adapter.image_token_counts({"image_sizes": image_sizes})
        out = []
        for size, full in zip(sizes, fulls):
            rows, cols = self._adapter.crop_grid(size)
            crops = 1 + rows * cols
            keep = self.crop_keep(n, crops)
            out.append((crops, rows, cols, full, full if keep >= n else crops * keep))
        return out

    def _pack(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        """Stands in for ``LlavaNextModel.pack_image_features`` while the handle is attached.

        image_features: per image, its (crops, N, D) projected crop tokens. An image whose crops keep
        every token goes through the model's own packing; the others are reduced crop by crop from the
        feature-layer states and laid out as the official code does (see the module docstring).
        """
        inner, plan = self._packed, self._plan
        original = type(inner).pack_image_features.__get__(inner)
        n = plan.side * plan.side
        counts = self._image_counts(image_sizes)
        crops = [int(f.shape[0]) for f in image_features]
        if [c[0] for c in counts] != crops:
            raise RuntimeError(f"{self.name}: image_sizes give {[c[0] for c in counts]} crops, features {crops}")
        feats, stats = self._feats, self._stats
        self._feats, self._stats = None, {}
        out: list[torch.Tensor] = []
        start = 0
        for i, (feature, (c, rows, cols, full, kept)) in enumerate(zip(image_features, counts)):
            rng = slice(start, start + c)
            start += c
            keep = self.crop_keep(n, c)
            if keep >= n:
                whole, _ = original([feature], image_sizes[i : i + 1], vision_feature_select_strategy, image_newline)
                out.append(whole[0])
                continue
            missing = [j for j in self.stat_layers(plan) if j not in stats]
            if missing or feats is None:
                raise RuntimeError(f"{self.name}: the vision encoder did not run before its features were packed")
            if feats.shape[0] != sum(crops) or feats.shape[1] != n + 1:
                raise RuntimeError(
                    f"{self.name}: vision states of shape {tuple(feats.shape)} do not match {sum(crops)} crops"
                )
            sub = {j: st.rows(rng) for j, st in stats.items()}
            red = self.reduce_crops(feats[rng, 1:], feats[rng, 0], sub, plan, keep)
            tokens = inner.multi_modal_projector(red.tokens.to(feats.dtype)).to(feature.dtype)  # (c, keep, D)
            g, lead = red.grid.shape[1], red.lead
            high = tokens[1:]
            order = anyres_order(red.grid[1:], rows, cols, plan.side).to(tokens.device)
            dim = tokens.shape[-1]
            packed = torch.cat(
                [
                    tokens[0],  # base view: the method's own per-crop order
                    high[:, lead : lead + g].reshape(-1, dim)[order],  # kept patches, row-major on the high-res grid
                    high[:, :lead].reshape(-1, dim),  # [CLS] of each high-res crop
                    high[:, lead + g :].reshape(-1, dim),  # contextual tokens, crop by crop
                ]
            )
            if packed.shape[0] != kept:
                raise RuntimeError(f"{self.name}: packed {packed.shape[0]} tokens for an image, expected {kept}")
            out.append(packed)
        self._encoded = [(full, kept) for _, _, _, full, kept in counts]
        lens = torch.tensor([t.shape[0] for t in out], dtype=torch.long, device=image_features[0].device)
        return out, lens

    def _next_counts(self, kwargs: dict) -> list[tuple[int, int]]:
        """LLaVA-NeXT: (placeholders unpruned, kept) per image of the batch, in order."""
        if kwargs.get("pixel_values") is not None:
            if kwargs.get("image_sizes") is None:
                raise InputError(f"{self.name}: llava_next needs image_sizes with pixel_values")
            return [(full, kept) for _, _, _, full, kept in self._image_counts(kwargs["image_sizes"])]
        # generate() encoded the images (through _pack) before this first forward, without image_sizes
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
        n = self._plan.side * self._plan.side
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
        if self._plan.family == "llava_next":
            counts = self._next_counts(kwargs)
            try:
                runs = self._adapter.split_spans(input_ids, [full for full, _ in counts])
            except ValueError as err:
                raise InputError(f"{self.name}: {err}") from None
            if sum(len(r) for r in runs) != len(counts):
                raise InputError(f"{self.name}: {len(counts)} images but {sum(len(r) for r in runs)} placeholder runs")
            kept = iter(k for _, k in counts)
            return [[(s, e, next(kept)) for s, e in row] for row in runs]
        n = self._plan.side * self._plan.side
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
        counts = keep.sum(1)
        width = int(counts.max())
        # gather index (B, width): left-padded again when rows drop different numbers of tokens
        index = torch.full((bsz, width), -1, dtype=torch.long)
        for r in range(bsz):
            cols = keep[r].nonzero().flatten()
            index[r, width - cols.numel() :] = cols
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
                fill = self._adapter._pad_id() if key == "input_ids" else 0
            out[key] = self._gather(value, index, fill)
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

    @staticmethod
    def _gather(value: torch.Tensor, index: torch.Tensor, fill: Any) -> torch.Tensor:
        idx = index.to(value.device)
        safe = idx.clamp(min=0)
        shape = (*safe.shape, *value.shape[2:])
        gathered = value.gather(1, safe.view(*safe.shape, *([1] * (value.dim() - 2))).expand(shape))
        pad = (idx < 0).view(*idx.shape, *([1] * (value.dim() - 2)))
        return gathered.masked_fill(pad, fill) if bool(pad.any()) else gathered

    def _rewrite_decode(self, kwargs: dict, q_len: int, past_len: int) -> dict:
        """A decode step after a pruned prompt: generate() still holds the full-length mask and positions."""
        st = self._state
        out = dict(kwargs)
        shift = st["seq"] - st["width"]
        attn = kwargs.get("attention_mask")
        if isinstance(attn, torch.Tensor) and attn.dim() == 2:
            if attn.shape[1] != past_len + q_len + shift:
                return kwargs  # the caller already feeds masks over the pruned sequence
            prompt = self._gather(attn[:, : st["seq"]], st["index"], 0)
            out["attention_mask"] = torch.cat([prompt, attn[:, st["seq"] :]], dim=1)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 2:
            out["position_ids"] = pos - st["dropped_row"].to(pos.device, pos.dtype)[:, None]
        cache_position = kwargs.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1 and int(cache_position[0]) >= st["seq"]:
            out["cache_position"] = cache_position - shift
        return out
