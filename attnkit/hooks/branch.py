"""The image-free branch: the same prompts without their images, run as extra rows of the batch.

A decoding-level method that contrasts the model with and without the image (PAI's CFG step)
needs the image-free next-token distribution at every step. Rather than a second model call per
step, the manager appends the image-free prompts to the batch on the forward pre-hook of the
model (left-padded to the prompt length), so one forward computes both halves and the KV cache
holds the branch's own rows. At every decode step the branch rows receive the token the user's
row received. The output hook drops the branch rows from the logits after the ``logits``
callbacks have used them, so ``generate`` never sees them.

Per-row inputs the model receives from ``generate`` are extended for the branch: token ids or
embeddings, the 2-D attention mask, position ids (2-D, or 3-D for mRoPE, rebuilt from the
branch's own mask as ``generate`` does), token-type ids (zeros: no image tokens) and
``batch_num_images`` (zeros). Everything else (vision features, grids) only concerns image rows
and passes through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..models.base import compact_left, gather_left

if TYPE_CHECKING:
    from ..models.base import Adapter

TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Padding-aware position ids of a 2-D mask, as ``generate`` builds them (pads at 0)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def _left_pad(x: torch.Tensor, width: int, fill: float | int) -> torch.Tensor:
    """(B, w, ...) -> (B, width, ...) with ``fill`` on the left."""
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([pad, x], dim=1)


def _cache_batch(cache: Any) -> int | None:
    try:
        layers = getattr(cache, "layers", None)
        keys = getattr(layers[0], "keys", None) if layers else None
        return int(keys.shape[0]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else None
    except (AttributeError, IndexError, TypeError):
        return None


class TextBranch:
    """Builds the doubled inputs of each forward and remembers the branch's attention mask."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.mask: torch.Tensor | None = None  # (B, kv) mask of the branch rows so far
        self.rows = 0

    def expand(self, kwargs: dict[str, Any], past_len: int, cache: Any = None) -> dict[str, Any]:
        """``kwargs`` of one forward with the branch rows appended (a new dict); ``cache`` is the KV
        cache the forward carries (found by type, see compat.find_cache)."""
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise InputError("the image-free branch (PAI cfg_gamma) needs input_ids or inputs_embeds")
        attn = kwargs.get("attention_mask")
        if attn is not None and (not isinstance(attn, torch.Tensor) or attn.dim() != 2):
            raise InputError("the image-free branch (PAI cfg_gamma) needs a 2-D attention_mask (use a dynamic cache)")
        batch, q_len = ref.shape[:2]
        main_mask = attn if attn is not None else torch.ones(batch, past_len + q_len, dtype=torch.long, device=ref.device)
        if past_len == 0:
            branch_ref, branch_mask = self._prefill_rows(ids, embeds, main_mask, kwargs)
        else:
            if self.mask is None or self.rows != batch:
                raise InputError("the image-free branch has no prefill for this batch: start with the whole prompt")
            cached = _cache_batch(cache)
            if cached is not None and cached != 2 * batch:
                raise InputError(
                    f"the image-free branch expects a KV cache of {2 * batch} rows, got {cached} "
                    "(beam search and cache reordering are not supported with PAI cfg_gamma)"
                )
            branch_ref = ref
            branch_mask = torch.cat([self.mask, self.mask.new_ones(batch, q_len)], dim=1)
            if branch_mask.shape[1] != main_mask.shape[1]:
                raise InputError("the image-free branch lost track of the sequence length (restart from the prompt)")
        self.mask, self.rows = branch_mask, batch

        out = dict(kwargs)
        out["input_ids" if ids is not None else "inputs_embeds"] = torch.cat([ref, branch_ref], dim=0)
        out["attention_mask"] = torch.cat([main_mask, branch_mask.to(main_mask.dtype)], dim=0)
        for key in TOKEN_TYPE_KEYS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor):
                out[key] = torch.cat([value, torch.zeros_like(value)], dim=0)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            branch_pos = positions(branch_mask)[:, -pos.shape[-1] :].to(pos.dtype)
            if pos.dim() == 3:  # mRoPE (k, B, q): an image-free row has the text position in every part
                branch_pos = branch_pos[None].expand(pos.shape[0], -1, -1)
            out["position_ids"] = torch.cat([pos, branch_pos], dim=pos.dim() - 2)
        per_row = kwargs.get("batch_num_images")
        if isinstance(per_row, torch.Tensor) and per_row.dim() == 1 and per_row.shape[0] == batch:
            out["batch_num_images"] = torch.cat([per_row, torch.zeros_like(per_row)])
        return out

    def _prefill_rows(
        self, ids: torch.Tensor | None, embeds: torch.Tensor | None, main_mask: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(branch ids or embeddings, branch mask), left-padded to the prompt length."""
        batch, q_len = main_mask.shape
        if ids is not None:
            source = {"input_ids": ids, "attention_mask": main_mask}
            for key in TOKEN_TYPE_KEYS:
                if isinstance(kwargs.get(key), torch.Tensor):
                    source[key] = kwargs[key]
            text = self.adapter.text_only_inputs(source)
            branch = _left_pad(text["input_ids"], q_len, self.adapter.pad_id)
            mask = _left_pad(text["attention_mask"].to(main_mask.dtype), q_len, 0)
            return branch, mask
        image = self.adapter.image_mask_from_layout(main_mask, batch, q_len)
        if image is None:
            raise InputError(f"{self.adapter.family}: cannot find the image tokens in inputs_embeds for the image-free branch")
        index = compact_left(main_mask.bool() & ~image.to(main_mask.device), width=q_len)
        return gather_left(embeds, index, 0), (index >= 0).to(main_mask.dtype)
