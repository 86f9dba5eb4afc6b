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
an int ``vision_feature_layer``) and ``gemma3`` (SigLIP, no [CLS]; the 4x4 average pool of the
projector makes one LLM token per pooled cell, so the per-patch statistics are averaged over each
cell, as HiPrune's Qwen2.5-VL code averages over each 2x2 merge group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, UnsupportedModelError
from .base import Method
from .pruning import LayerShape, PruneReport

SUPPORTED_FAMILIES = ("llava", "gemma3")


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


@dataclass(frozen=True)
class VisionPlan:
    """Where a family's vision features go and how they map to LLM tokens."""

    family: str
    layers: list[torch.nn.Module]  # the vision encoder layers, in order (each has .self_attn)
    feature_layer: int  # index of the encoder layer whose output the projector takes
    has_cls: bool
    side: int  # LLM-side tokens per image side
    pool: int  # patches per LLM token side (1: one token per patch)


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
    if family == "llava":
        fl = cfg.vision_feature_layer
        if not isinstance(fl, int) or isinstance(fl, bool):
            raise UnsupportedModelError(f"{method}: llava with several vision_feature_layer values is not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"{method}: llava with vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
                "is not supported (only 'default')"
            )
        index = fl % (len(layers) + 1) - 1  # hidden_states[i] is the output of encoder layer i - 1
        if index < 0:
            raise UnsupportedModelError(f"{method}: llava vision_feature_layer={fl} takes the embeddings, not a layer")
        return VisionPlan(family, layers, index, True, patches, 1)
    side = math.isqrt(int(cfg.mm_tokens_per_image))
    return VisionPlan(family, layers, len(layers) - 1, False, side, patches // side)


class VisionPruner(Method):
    """Base of the vision-side pruning methods: hooks, input shrinking and the report.

    Subclasses implement ``keep_count(n)``, ``stat_layers(plan)`` and ``reduce(...)``.
    """

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.report: PruneReport | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._plan: VisionPlan | None = None
        self._adapter: Any = None
        self._stats: dict[int, VisionStats] = {}  # from the vision tower's last forward
        self._cls: torch.Tensor | None = None  # (B, D) [CLS] hidden state at the feature layer
        self._state: dict[str, Any] | None = None  # the last pruned prompt, for its decode steps

    # -- subclass interface ----------------------------------------------------------------
    def keep_count(self, n: int) -> int:
        """LLM tokens an image of ``n`` tokens keeps (>= n: the image is left unchanged)."""
        raise NotImplementedError

    def stat_layers(self, plan: VisionPlan) -> list[int]:
        """Encoder layer indices whose attention statistics ``reduce`` needs."""
        raise NotImplementedError

    def check_plan(self, plan: VisionPlan) -> None:
        """Validate arguments that depend on the model (MethodArgumentError)."""

    def reduce(
        self, tokens: torch.Tensor, cls: torch.Tensor | None, stats: dict[int, VisionStats], plan: VisionPlan
    ) -> torch.Tensor:
        """(B, N, D) image tokens (and (B, D) [CLS] or None) -> (B, keep_count(N), D) tokens for the LLM."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self, handle) -> None:
        adapter = handle.adapter
        plan = make_plan(self.name, adapter)
        self.check_plan(plan)
        self._plan, self._adapter = plan, adapter
        self._stats, self._state, self._cls, self.report = {}, None, None, None
        model = handle.model
        prunes = self.keep_count(plan.side * plan.side) < plan.side * plan.side
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
        self._stats, self._state, self._cls = {}, None, None

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
        """LLaVA: keep the [CLS] hidden state of the feature layer (the projector never sees it)."""
        states = getattr(output, "hidden_states", None)
        fl = self._adapter.config.vision_feature_layer
        if states is not None and -len(states) <= fl < len(states) and states[fl] is not None:
            self._cls = states[fl][:, 0]

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
        past = kwargs.get("past_key_values")
        past_len = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
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

    def _shrink_prompt(self, kwargs: dict) -> dict:
        input_ids = kwargs["input_ids"]
        bsz, seq = input_ids.shape
        n = self._plan.side * self._plan.side
        # runs of placeholders; back-to-back images (one run) are cut into images of n tokens each
        runs = self._adapter.split_spans(input_ids, None)
        bad = sorted({e - s for row in runs for s, e in row if (e - s) % n})
        if bad:
            raise InputError(f"{self.name}: image runs of {bad} tokens, expected multiples of {n} (one image = {n})")
        spans = [[(p, p + n) for s, e in row for p in range(s, e, n)] for row in runs]
        kept = self.keep_count(n)
        lm_layers = self._adapter.num_layers
        real = kwargs.get("attention_mask")
        real = torch.ones_like(input_ids, dtype=torch.bool) if real is None else real.bool()
        img_row = max((len(r) for r in spans), default=0)
        if kept >= n:  # nothing to prune: the model runs unchanged
            self.report = PruneReport(
                self.name, seq, n * img_row, [seq] * lm_layers, [n * img_row] * lm_layers
            ).finish(LayerShape.from_adapter(self._adapter))
            return kwargs
        keep = torch.ones(bsz, seq, dtype=torch.bool)
        for r, row in enumerate(spans):
            for s, e in row:
                keep[r, s + kept : e] = False
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
            n * img_row,
            [width] * lm_layers,
            [kept * img_row] * lm_layers,
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
