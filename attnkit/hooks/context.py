"""What a method sees of a forward: ``View``, a read-only view of one call, over ``ForwardState``.

``ForwardState`` is the handle's record of the forward in progress (prefill or one decode step).
Only the manager writes its fields: once at the start of every top-level forward, and when a token
selection drops or masks tokens (the kernel fills its two declared per-forward caches, ``seqs`` and
``padded``). Methods never see it; every callback gets a ``View``:

- the forward: ``is_prefill``, ``step``, ``batch_size`` (the contrast rows included), ``main_batch``,
  ``contrast_rows``, ``prompt_len``, the model's geometry;
- the layer's own sequence (``q_len``, ``past_len``, ``kv_len``, ``image_mask``, ``attention_mask``):
  after a drop, a later layer holds only the kept prompt tokens, and its view describes that compacted
  sequence, so key columns and query rows are indexed as the layer has them;
- during an attention callback, the call: ``layer``, ``rows`` (indices of the tensor's query rows among
  the forward's new tokens) and ``visible`` (which key columns each of those rows may see).

Positions are indices into the key/value sequence (the cache), counted from the start of the
left-padded batch: at decode step t the new token sits at ``past_len`` and image tokens keep the
positions they had at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class LayerSeq:
    """One layer's own sequence (whole, or compacted after a drop): immutable once built."""

    __slots__ = ("q_len", "past_len", "image_mask", "attention_mask", "_image_kv")

    def __init__(self, q_len: int, past_len: int, image_mask, attention_mask) -> None:
        self.q_len, self.past_len = q_len, past_len
        self.image_mask, self.attention_mask = image_mask, attention_mask
        self._image_kv = None

    @property
    def kv_len(self) -> int:
        return self.past_len + self.q_len

    def image_mask_kv(self) -> torch.Tensor | None:
        if self.image_mask is None:
            return None
        if self._image_kv is None:
            kv, img = self.past_len + self.q_len, self.image_mask
            extra = kv - img.shape[1]
            self._image_kv = img[:, :kv] if extra <= 0 else torch.cat([img, img.new_zeros(img.shape[0], extra)], 1)
        return self._image_kv


@dataclass
class ForwardState:
    """The forward in progress, written by the manager only (see the module docstring)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    is_prefill: bool = True
    step: int = 0
    batch_size: int = 0
    #: whole-sequence new tokens and cached tokens of this forward
    q_len: int = 0
    past_len: int = 0
    #: (B, S_prompt) bool image tokens of the prompt (pads are False); (B, S_kv) bool padding mask
    image_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    prompt_len: int = 0
    #: contrast rows appended to the user's batch: rows [batch_size - contrast_rows, batch_size)
    contrast_rows: int = 0
    #: a packed prefill (branch.Packed): (q_len, twin width): each attention call holds q_len + width tokens
    #: per user row, which the dispatcher presents to the methods as 2B rows of q_len (None: not packed)
    packed: tuple[int, int] | None = None
    packed_masks: tuple | None = None  # per-forward cache of dispatch._packed_masks
    #: mask-mode pruning: (from_layer, keep (B, prompt_len) bool over original positions)
    keep: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    #: drop-mode pruning: (from_layer, positions (B, n) long: original prompt positions present from that
    #: layer on, in the layer's order; each a subset of the last)
    drops: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    #: first layer whose kept prompt tokens are renumbered 0..n-1 (a method with renumbers_positions)
    renumber_from: int | None = None
    #: per-generation state of each method (Method.state), emptied at every prefill
    states: dict[Any, dict] = field(default_factory=dict)
    #: per-forward caches: the layer sequences by drop stage (-1: whole) and the padded-prefill check
    seqs: dict[int, LayerSeq] = field(default_factory=dict)
    padded: tuple | None = None

    def __post_init__(self) -> None:
        self.begin()

    @property
    def kv_len(self) -> int:
        return self.past_len + self.q_len

    def begin(self) -> None:
        """Start of a forward (after the manager set its fields): drop the per-forward caches."""
        self.seqs = {-1: LayerSeq(self.q_len, self.past_len, self.image_mask, self.attention_mask)}
        self.padded = None
        self.packed_masks = None

    def stage(self, layer: int) -> int:
        """Index into ``drops`` of the drop in effect at ``layer`` (-1: none)."""
        out = -1
        for i, (from_layer, _) in enumerate(self.drops):
            if from_layer <= layer:
                out = i
        return out

    def positions_for_layer(self, layer: int) -> torch.Tensor | None:
        """(B, n) original prompt positions present at ``layer`` (drop mode), or None (all of them)."""
        i = self.stage(layer)
        return None if i < 0 else self.drops[i][1]

    def renumbered(self, layer: int) -> bool:
        return self.renumber_from is not None and self.renumber_from <= layer

    def seq(self, layer: int) -> LayerSeq:
        """The sequence ``layer`` holds (compacted after a drop), built once per forward and drop stage."""
        i = self.stage(layer)
        hit = self.seqs.get(i)
        if hit is not None:
            return hit
        whole, pos = self.seqs[-1], self.drops[i][1]
        n, s = pos.shape[1], self.prompt_len
        generated = self.kv_len - s  # tokens after the prompt, this forward's included
        q_len, past_len = (n, 0) if self.is_prefill else (self.q_len, n + generated - self.q_len)
        image, attn = whole.image_mask, whole.attention_mask
        if image is not None:
            image = image.gather(1, pos.to(image.device))
        if attn is not None:
            attn = torch.cat([attn[:, :s].gather(1, pos.to(attn.device)), attn[:, s:]], dim=1)
        hit = self.seqs[i] = LayerSeq(q_len, past_len, image, attn)
        return hit

    def kv_index(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, kv) indices into the whole sequence's keys of a layer holding prompt positions ``pos``."""
        tail = torch.arange(self.prompt_len, self.kv_len, device=pos.device).expand(pos.shape[0], -1)
        return torch.cat([pos, tail], dim=1)

    def keep_for_layer(self, layer: int) -> torch.Tensor | None:
        """(B, kv) bool of the key columns of ``layer`` still visible after mask-mode pruning, or None
        (over the layer's own, possibly compacted, key sequence)."""
        mask = None
        for from_layer, keep in self.keep:
            if from_layer <= layer:
                mask = keep if mask is None else mask & keep
        if mask is None:
            return None
        pos = self.positions_for_layer(layer)
        if pos is not None:
            mask = mask.gather(1, pos.to(mask.device))
        kv = self.seq(layer)
        kv = kv.past_len + kv.q_len
        extra = kv - mask.shape[1]
        if extra > 0:  # tokens generated after the selection are always kept
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)
        return mask[:, :kv]


class View:
    """Read-only view of a forward (and, in attention callbacks, of one call) given to every method callback.

    Attributes (all read-only):

    - ``layer``: the layer of the call (-1 outside a layer: ``begin_forward``, ``layers``, ``logits``);
    - ``rows``: during an attention callback, the (r,) long indices, among this forward's new tokens, of
      the query rows of the tensor the callback receives (sorted); else None;
    - ``visible``: during an attention callback, (B|1, 1, r, K') bool, True where a row may attend to a key
      column (causal, padding, pruning and sliding-window masks), or None when every key is visible;
    - ``is_prefill``, ``step`` (decode steps done), ``batch_size`` (contrast rows included), ``main_batch``
      (the user's rows), ``contrast_rows``, ``prompt_len``, ``num_layers``, ``num_heads``,
      ``num_kv_heads``, ``head_dim``;
    - the layer's own sequence: ``q_len``, ``past_len``, ``kv_len``, ``image_mask`` (B, q_prompt) bool,
      ``attention_mask`` (B, kv) bool padding mask or None, ``image_mask_kv()`` (B, kv_len) bool;
    - ``prompt_image_mask``: the whole prompt's image tokens (before any drop);
    - ``live_image_mask()``, ``keep_mask()``, ``positions()``: what pruning left (see each);
    - ``row_index(row)``: where the forward's query row ``row`` sits in the callback's tensor (None: not in
      this block of rows).
    """

    __slots__ = ("_f", "_s", "_layer", "_rows", "_visible", "_attend")

    def __init__(self, state: ForwardState, layer: int = -1, rows=None, visible=None, attend=None) -> None:
        self._f = state
        self._s = state.seq(layer)
        self._layer, self._rows, self._visible, self._attend = layer, rows, visible, attend

    layer = property(lambda self: self._layer)
    rows = property(lambda self: self._rows)
    visible = property(lambda self: self._visible)
    is_prefill = property(lambda self: self._f.is_prefill)
    step = property(lambda self: self._f.step)
    batch_size = property(lambda self: self._f.batch_size)
    contrast_rows = property(lambda self: self._f.contrast_rows)
    main_batch = property(lambda self: self._f.batch_size - self._f.contrast_rows)
    prompt_len = property(lambda self: self._f.prompt_len)
    num_layers = property(lambda self: self._f.num_layers)
    num_heads = property(lambda self: self._f.num_heads)
    num_kv_heads = property(lambda self: self._f.num_kv_heads)
    head_dim = property(lambda self: self._f.head_dim)
    q_len = property(lambda self: self._s.q_len)
    past_len = property(lambda self: self._s.past_len)
    kv_len = property(lambda self: self._s.past_len + self._s.q_len)
    image_mask = property(lambda self: self._s.image_mask)
    attention_mask = property(lambda self: self._s.attention_mask)
    prompt_image_mask = property(lambda self: self._f.image_mask)

    def image_mask_kv(self) -> torch.Tensor | None:
        """(B, kv_len) bool image mask over the layer's keys (tokens generated after the prompt are text)."""
        return self._s.image_mask_kv()

    @property
    def image_positions(self) -> list[torch.Tensor]:
        """Per row, the sorted positions of the image tokens (a list because rows may differ)."""
        if self.image_mask is None:
            return [torch.empty(0, dtype=torch.long) for _ in range(self.batch_size)]
        return [row.nonzero().flatten() for row in self.image_mask]

    def positions(self, layer: int | None = None) -> torch.Tensor | None:
        """(B, n) original prompt positions the layer holds after drops, in its order; None = all of them."""
        return self._f.positions_for_layer(self._layer if layer is None else layer)

    def keep_mask(self) -> torch.Tensor | None:
        """(B, kv_len) bool: the layer's key columns mask-mode pruning left visible, or None (all)."""
        return self._f.keep_for_layer(self._layer) if self._f.keep else None

    def live_image_mask(self) -> torch.Tensor | None:
        """(B, q) image tokens among the layer's prompt rows that pruning has not removed or masked yet
        (at prefill, e.g. from ``select``): what a pruning stage may still rank."""
        if self.image_mask is None:
            return None
        keep = self.keep_mask()
        return self.image_mask if keep is None else self.image_mask & keep[:, : self.image_mask.shape[1]]

    def attention(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """From ``select`` only: (B, H, r, K) fp32 attention probabilities of the query ``rows`` that the layer
        about to run would compute for ``hidden`` (its own Q/K, mask and RoPE, keys masked by earlier
        mask-mode pruning). Computes no attention output and writes no cache."""
        if self._attend is None:
            raise RuntimeError("View.attention() can only be called from a select() callback, before any drop")
        return self._attend(hidden, rows)

    def row_index(self, row: int) -> int | None:
        """During an attention callback: the index, in the tensor the callback got, of the forward's query row
        ``row`` (e.g. ``view.q_len - 1``, the answering row); None when this block of rows does not hold it."""
        if self._rows is None:
            return row
        hit = (self._rows == row).nonzero()
        return int(hit[0, 0]) if hit.numel() else None

    def at(self, rows=None, visible=None) -> View:
        """The same view for other query rows (what the dispatcher hands each row block)."""
        out = View.__new__(View)
        out._f, out._s, out._layer, out._rows, out._visible, out._attend = self._f, self._s, self._layer, rows, visible, None
        return out

    def __repr__(self) -> str:
        phase = "prefill" if self.is_prefill else f"decode step {self.step}"
        return f"View({phase}, layer={self.layer}, q_len={self.q_len}, past_len={self.past_len})"
