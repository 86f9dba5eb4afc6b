"""ForwardContext: what a method needs to know about the forward pass it is rewriting.

One context object lives per Handle. The manager refreshes it at the start of every
top-level forward (prefill, or one decode step of generate) and sets ``layer`` before
each attention call, so methods never look at transformers internals themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardContext:
    """State of the current forward pass, seen by every method callback.

    Positions are indices into the key/value sequence (the cache), counted from the
    start of the left-padded batch: at decode step t the new token sits at
    ``past_len`` and image tokens keep the positions they had at prefill.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: True for the first forward over the prompt, False for a KV-cached decode step.
    is_prefill: bool = True
    #: Number of decode steps done so far (0 at prefill).
    step: int = 0
    batch_size: int = 0
    #: Number of new (query) tokens in this forward.
    q_len: int = 0
    #: Number of tokens already in the KV cache before this forward.
    past_len: int = 0
    #: Layer index of the attention call in progress (set by the dispatcher).
    layer: int = -1
    #: (B, S_prompt) bool: which prompt positions are image tokens (padding-aware: pads are False).
    image_mask: torch.Tensor | None = None
    #: (B, S_kv) bool 2-D padding mask of the whole sequence so far (True = real token), or None.
    attention_mask: torch.Tensor | None = None
    #: Token pruning in mask mode: list of (from_layer, keep) with keep (B, S) bool over the prompt's
    #: original positions (tokens generated later are always kept).
    keep: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    #: Token pruning in drop mode: list of (from_layer, positions), positions (B, n) long, the original
    #: prompt positions still present from that layer on, in the layer's sequence order (each entry a
    #: subset of the last; sorted unless a method with renumbered positions reorders them, e.g.
    #: SparseVLM's merged tokens with positions="official").
    drops: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    #: The first layer from which the kept prompt tokens are renumbered 0..n-1 (a drop by a method with
    #: ``renumbers_positions``), or None: kept tokens keep their original positions.
    renumber_from: int | None = None
    #: Prompt length of the last prefill (original positions are indices below it).
    prompt_len: int = 0
    #: Image-free rows appended to the batch for a method that asked for them (PAI's CFG step):
    #: rows [batch_size - branch_rows, batch_size) are the same prompts without their images.
    branch_rows: int = 0
    #: During an attention callback: the query indices (into this forward's q_len new tokens) of the
    #: rows of the tensor the callback receives (sorted; the eager path works in row chunks).
    query_rows: torch.Tensor | None = None
    #: During an attention callback: (B|1, 1, r, K') bool, True where a row may attend to a key
    #: column (causal, padding, pruning and sliding-window masks), or None when every key is visible.
    visible: torch.Tensor | None = None
    #: The whole-sequence values of q_len, past_len, image_mask and attention_mask, which
    #: ``enter_layer`` swaps for a layer's own view when tokens were dropped before it.
    full: dict[str, Any] = field(default_factory=dict)
    #: Per-handle scratch space for methods (e.g. sink positions found at prefill); emptied at
    #: every prefill, kept across the decode steps that follow it.
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def main_batch(self) -> int:
        """Rows of the user's own batch (without the image-free branch rows)."""
        return self.batch_size - self.branch_rows

    @property
    def kv_len(self) -> int:
        return self.past_len + self.q_len

    @property
    def image_positions(self) -> list[torch.Tensor]:
        """Per row, the sorted positions of the image tokens (a list because rows may differ)."""
        if self.image_mask is None:
            return [torch.empty(0, dtype=torch.long) for _ in range(self.batch_size)]
        return [row.nonzero().flatten() for row in self.image_mask]

    def image_mask_kv(self) -> torch.Tensor | None:
        """Image mask over the current key length (tokens generated after the prompt are text)."""
        if self.image_mask is None:
            return None
        cached = self.__dict__.get("_image_kv")
        if cached is not None and cached[0] is self.image_mask and cached[1] == self.kv_len:
            return cached[2]
        extra = self.kv_len - self.image_mask.shape[1]
        if extra <= 0:
            out = self.image_mask[:, : self.kv_len]
        else:
            out = torch.cat([self.image_mask, self.image_mask.new_zeros(self.image_mask.shape[0], extra)], dim=1)
        self.__dict__["_image_kv"] = (self.image_mask, self.kv_len, out)
        return out

    # -- token dropping: per-layer views ---------------------------------------------------------
    def begin(self) -> None:
        """Record the whole-sequence view (called by the manager once per forward, after it set it)."""
        self.full = {
            "q_len": self.q_len,
            "past_len": self.past_len,
            "image_mask": self.image_mask,
            "attention_mask": self.attention_mask,
        }
        self.__dict__.pop("_views", None)
        self.__dict__.pop("_padded", None)
        self.__dict__["_view_pos"] = None

    def renumbered(self, layer: int) -> bool:
        """Whether ``layer`` sees its prompt tokens renumbered 0..n-1 (and decode positions shifted to
        follow its own length) rather than at their original positions."""
        return self.renumber_from is not None and self.renumber_from <= layer

    def positions_for_layer(self, layer: int) -> torch.Tensor | None:
        """(B, n) original prompt positions present at ``layer`` (drop mode), or None (all of them)."""
        pos = None
        for from_layer, kept in self.drops:
            if from_layer <= layer:
                pos = kept
        return pos

    def enter_layer(self, layer: int) -> None:
        """Set q_len, past_len, image_mask and attention_mask to what ``layer`` sees.

        A layer after a drop holds fewer prompt tokens in its hidden states and KV cache; for it these
        fields describe its own, compacted sequence (kept prompt tokens in order, then the tokens
        generated since), so methods index key columns and query rows as the layer has them."""
        self.layer = layer
        pos = self.positions_for_layer(layer)
        full = self.full
        if pos is None:
            if self.__dict__.get("_view_pos") is not None:
                self.q_len, self.past_len = full["q_len"], full["past_len"]
                self.image_mask, self.attention_mask = full["image_mask"], full["attention_mask"]
                self.__dict__["_view_pos"] = None
            return
        if self.__dict__.get("_view_pos") is pos:
            return
        views = self.__dict__.setdefault("_views", {})
        view = views.get(id(pos))
        if view is None:
            n, s = pos.shape[1], self.prompt_len
            generated = full["past_len"] + full["q_len"] - s  # tokens after the prompt, this one included
            if self.is_prefill:
                q_len, past_len = n, 0
            else:
                q_len, past_len = full["q_len"], n + generated - full["q_len"]
            image = full["image_mask"]
            if image is not None:
                image = image.gather(1, pos.to(image.device))
            attn = full["attention_mask"]
            if attn is not None:
                attn = torch.cat([attn[:, :s].gather(1, pos.to(attn.device)), attn[:, s:]], dim=1)
            view = views[id(pos)] = (q_len, past_len, image, attn)
        self.q_len, self.past_len, self.image_mask, self.attention_mask = view
        self.__dict__["_view_pos"] = pos

    def live_image_mask(self) -> torch.Tensor | None:
        """(B, q) image tokens among the current layer's prompt rows that pruning has not removed or
        masked yet (call at prefill, e.g. from ``select``): what a pruning stage may still rank."""
        if self.image_mask is None:
            return None
        keep = self.keep_for_layer(self.layer) if self.keep else None
        return self.image_mask if keep is None else self.image_mask & keep[:, : self.image_mask.shape[1]]

    def kv_index(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, kv) indices into the whole sequence's keys of a layer holding prompt positions ``pos``."""
        total = self.full["past_len"] + self.full["q_len"]
        tail = torch.arange(self.prompt_len, total, device=pos.device).expand(pos.shape[0], -1)
        return torch.cat([pos, tail], dim=1)

    def keep_for_layer(self, layer: int) -> torch.Tensor | None:
        """(B, kv) bool of the key positions of ``layer`` still visible after mask-mode pruning, or None.

        Over the layer's own key sequence: compacted after a drop (see ``enter_layer``)."""
        mask = None
        for from_layer, keep in self.keep:
            if from_layer <= layer:
                mask = keep if mask is None else mask & keep
        if mask is None:
            return None
        pos = self.positions_for_layer(layer)
        if pos is not None:
            mask = mask.gather(1, pos.to(mask.device))
        extra = self.kv_len - mask.shape[1]
        if extra > 0:  # tokens generated after the selection are always kept
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)
        return mask[:, : self.kv_len]
