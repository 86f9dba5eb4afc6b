"""Contrast rows: a variant of the user's batch (see methods.base.Contrast) run as extra rows of the same batch.

A decoding-level method that contrasts the model with a variant of its input (PAI's image-free CFG step,
VCD's noised images, ICD's disturbed instruction) needs the variant's next-token distribution at every
step. Rather than a second model call per step, the manager appends the variant's rows to the batch on
the forward pre-hook of the model, so one forward computes both halves and the KV cache holds the
variant's own rows. At every decode step the contrast rows receive the token the user's row received.
The output hook drops the contrast rows from the output after the ``logits`` callbacks have used them,
so ``generate`` never sees them.

The variants, at prefill: ``no_image`` the prompts without their image tokens, left-padded to the prompt
length; ``pixels`` the user's rows repeated; ``prompt`` the altered prompt, left-padded to the prompt
length, or, when it is longer, the user's rows left-padded to its length (``extra`` columns, which every
decode step's user mask gets too, and which the output hook takes off the user's outputs). Per-row inputs are extended for the contrast rows: token ids or embeddings, the 2-D attention
mask, position ids (copies for ``pixels``; else 2-D, or 3-D for mRoPE, rebuilt from the rows' own mask as
``generate`` does), token-type ids (zeros for ``no_image``; copies for ``pixels``; the user's values at
the image tokens for ``prompt``) and ``batch_num_images``. For ``pixels`` and ``prompt`` the rows carry
images: the per-image inputs are repeated by the adapter (``repeat_image_inputs``), the repeat altered
by the ``pixels`` function, both where the forward receives them and in the model's
``get_image_features`` (shadowed on the instance while wrapped), where ``generate`` encodes the images
before the first forward.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, TransformersCompatError, UnsupportedModelError
from ..models.base import IMAGE_INPUT_KEYS, compact_left, gather_left

if TYPE_CHECKING:
    from ..methods.base import Contrast
    from ..models.base import Adapter
    from .manager import Handle

TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")
#: The vision encoder's entry point that generate() and the model's forward call (public in transformers >= 5).
ENCODER = "get_image_features"


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


#: Per-token inputs the packed layout knows how to extend (any other (B, q) tensor input: the padded layout).
_PACKED_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position") + TOKEN_TYPE_KEYS


@dataclass
class Packed:
    """A packed prefill: each user row carries its image-free twin as ``width`` extra tokens after its ``q_len``
    prompt tokens (the twin left-padded to ``width``), so that the projections and MLP run on the real
    length. ``ids`` / ``mask`` (2B, q_len) describe the same forward in the padded-rows layout (the user's
    rows, then the twins left-padded to q_len), which is what the ForwardState and the methods see.
    ``keep`` the ``logits_to_keep`` the caller asked for (None: every position)."""

    q_len: int
    width: int
    ids: torch.Tensor | None
    mask: torch.Tensor
    keep: int | None


class ContrastBranch:
    """Builds the extended inputs of each forward for one Contrast and remembers the rows' attention mask."""

    def __init__(self, adapter: Adapter, contrast: Contrast, owners: tuple[str, ...] = ()) -> None:
        self.adapter = adapter
        self.contrast = contrast
        self.owners = owners  # the names of the methods that asked for the rows (for messages)
        self.kind = contrast.kind
        self.mask: torch.Tensor | None = None  # (B, kv) mask of the contrast rows so far
        self.rows = 0
        self._encoder: Any = None  # the unshadowed get_image_features, while it is shadowed
        self._passthrough = False  # this forward's image inputs are repeated already
        self._encoded = False  # get_image_features encoded the repeated images since the last prefill
        self.packed: Packed | None = None  # the forward in progress is a packed prefill
        #: left padding added to the user's rows at the last prefill, for a longer altered prompt (q' > q): every
        #: forward of the generation carries it (the cache holds it), the user's own mask and outputs do not
        self.extra = 0

    @property
    def image_free(self) -> bool:
        """Whether the contrast rows hold no image."""
        return self.kind == "no_image"

    @property
    def _what(self) -> str:
        return f"the {self.kind} contrast rows"

    def attach(self, handle: Handle) -> None:
        """For rows that carry images: check the family, and shadow the model's ``get_image_features``
        (through ``handle.set_attr``) so that every encoding also encodes the contrast rows' images. For every
        kind, shadow the model's ``generate`` to refuse beam search up front (one line)."""
        self._refuse_beams(handle)
        if self.image_free:
            return
        self.adapter.repeat_image_inputs({}, self.contrast.pixels)  # UnsupportedModelError where it cannot
        if self.kind == "prompt" and not self.adapter.positions_1d:
            raise UnsupportedModelError(
                f"{self.adapter.family}: contrast rows with an altered prompt need their own mRoPE positions "
                "(not supported); use kind='pixels' or 'no_image'"
            )
        owner = getattr(self.adapter.model, "base_model", None)
        original = getattr(owner, ENCODER, None)
        if not callable(original):
            raise TransformersCompatError(
                f"{type(self.adapter.model).__name__}: no base_model.{ENCODER}; attnkit cannot repeat its images"
            )
        params = inspect.signature(original).parameters
        rest = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        if "pixel_values" not in params:
            raise TransformersCompatError(f"{type(owner).__name__}.{ENCODER} takes no pixel_values")

        @functools.wraps(original)  # generate() picks the encoder's inputs by its signature
        def encode(*args: Any, **kwargs: Any) -> Any:
            if self._passthrough:  # the forward's own inputs, repeated by the pre-hook
                self._passthrough = False
                return original(*args, **kwargs)
            call = dict(inspect.signature(original).bind_partial(*args, **kwargs).arguments)
            call.update(call.pop(rest, None) or {})
            self._encoded = True
            return original(**self.adapter.repeat_image_inputs(call, self.contrast.pixels))

        self._encoder = original
        handle.set_attr(owner, ENCODER, encode)

    def _refuse_beams(self, handle: Handle) -> None:
        """Shadow ``model.generate`` (on the instance, through ``handle.set_attr``) to raise InputError for beam
        search before it runs: beams reorder the KV cache, which the contrast rows cannot follow (and with images
        in the rows, generate's expanded image inputs would fail inside the model with a less clear message)."""
        model = handle.model
        original = getattr(model, "generate", None)
        if not callable(original):
            return
        owners = " / ".join(self.owners) or "contrast rows"

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
            beams = kwargs.get("num_beams", getattr(config, "num_beams", 1))
            if isinstance(beams, int) and beams > 1:
                raise InputError(
                    f"beam search (num_beams={beams}) is not supported with {owners}, which run contrast rows "
                    "alongside the user's (use greedy decoding or sampling)"
                )
            return original(*args, **kwargs)

        handle.set_attr(model, "generate", generate)

    def done(self) -> None:
        """The forward ended (its output hook)."""
        self._passthrough = False

    @property
    def decodes(self) -> bool:
        """Whether the rows go on through the decode steps (else they run at prefill only)."""
        return self.contrast.decode

    def drop_rows(self, cache: Any, main: int) -> None:
        """After a prefill of a ``Contrast(decode=False)``: keep only the user's ``main`` rows in the KV cache
        (``Cache.batch_select_indices``) and in the family's per-batch state (``Adapter.keep_batch_rows``)."""
        if cache is not None:
            select = getattr(cache, "batch_select_indices", None)
            if not callable(select):
                raise TransformersCompatError(
                    f"{type(cache).__name__} has no batch_select_indices(); attnkit cannot drop {self._what} "
                    "from the KV cache after the prefill"
                )
            layers = getattr(cache, "layers", None) or []
            keys = getattr(layers[0], "keys", None) if layers else None
            device = keys.device if isinstance(keys, torch.Tensor) else None
            select(torch.arange(main, device=device))
            got = _cache_batch(cache)
            if got is not None and got != main:
                raise TransformersCompatError(
                    f"{type(cache).__name__}.batch_select_indices left {got} rows, not {main}: attnkit cannot drop "
                    f"{self._what} from the KV cache"
                )
        self.adapter.keep_batch_rows(main)
        self.mask, self.rows = None, 0

    def expand(
        self, kwargs: dict[str, Any], past_len: int, cache: Any = None, pack_limit: int | None = None
    ) -> dict[str, Any]:
        """``kwargs`` of one forward with the contrast rows appended (a new dict); ``cache`` is the KV
        cache the forward carries (found by type, see compat.find_cache). ``pack_limit``: the longest
        packed prefill the model allows (0: no packing; None: any length); see ``packs``."""
        self._passthrough = False
        self.packed = None
        if past_len == 0 and pack_limit != 0 and self._packable(kwargs):
            out = self._pack(kwargs, pack_limit)
            if out is not None:
                return out
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise InputError(f"{self._what} need input_ids or inputs_embeds")
        attn = kwargs.get("attention_mask")
        if attn is not None and (not isinstance(attn, torch.Tensor) or attn.dim() != 2):
            raise InputError(f"{self._what} need a 2-D attention_mask (use a dynamic cache)")
        batch, q_len = ref.shape[:2]
        if past_len == 0:
            self.extra = 0
        extra = self.extra
        main_mask = attn if attn is not None else torch.ones(batch, past_len - extra + q_len, dtype=torch.long, device=ref.device)
        if extra:  # a decode step after a widened prefill: the user's mask covers the cache's extra padding too
            main_mask = _left_pad(main_mask, main_mask.shape[1] + extra, 0)
        types: dict[str, torch.Tensor] = {}
        if past_len == 0:
            branch_ref, branch_mask, types = self._prefill_rows(ids, embeds, main_mask, kwargs)
            if branch_mask.shape[1] > q_len:  # a longer altered prompt: the user's rows left-padded to its length
                kwargs, ref, main_mask = self._widen(kwargs, ref, main_mask, branch_mask.shape[1])
                ids, q_len = ref, ref.shape[1]
        else:
            if self.mask is None or self.rows != batch:
                raise InputError(f"{self._what} have no prefill for this batch: start with the whole prompt")
            cached = _cache_batch(cache)
            if cached is not None and cached != 2 * batch:
                raise InputError(
                    f"{self._what} expect a KV cache of {2 * batch} rows, got {cached} "
                    f"(beam search and cache reordering are not supported with {' / '.join(self.owners) or 'contrast rows'}: "
                    "they run contrast rows, e.g. PAI cfg_gamma, VCD, ICD)"
                )
            branch_ref = ref
            branch_mask = torch.cat([self.mask, self.mask.new_ones(batch, q_len)], dim=1)
            if branch_mask.shape[1] != main_mask.shape[1]:
                raise InputError(f"{self._what} lost track of the sequence length (restart from the prompt)")
        self.mask, self.rows = branch_mask, batch

        out = dict(kwargs)
        out["input_ids" if ids is not None else "inputs_embeds"] = torch.cat([ref, branch_ref], dim=0)
        out["attention_mask"] = torch.cat([main_mask, branch_mask.to(main_mask.dtype)], dim=0)
        for key in TOKEN_TYPE_KEYS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor):
                twin = types.get(key, torch.zeros_like(value) if self.image_free else value)
                out[key] = torch.cat([value, twin], dim=0)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            if self.kind == "pixels":
                branch_pos = pos  # the same rows
            else:
                branch_pos = positions(branch_mask)[:, -pos.shape[-1] :].to(pos.dtype)
                if pos.dim() == 3:  # mRoPE (k, B, q): an image-free row has the text position in every part
                    branch_pos = branch_pos[None].expand(pos.shape[0], -1, -1)
            out["position_ids"] = torch.cat([pos, branch_pos], dim=pos.dim() - 2)
        per_row = kwargs.get("batch_num_images")  # rows with images: repeated with the image inputs, below
        if self.image_free and isinstance(per_row, torch.Tensor) and per_row.dim() == 1 and per_row.shape[0] == batch:
            out["batch_num_images"] = torch.cat([per_row, torch.zeros_like(per_row)])
        if not self.image_free:
            out = self._repeat_images(out, past_len)
        return out

    def _widen(
        self, kwargs: dict[str, Any], ids: torch.Tensor, main_mask: torch.Tensor, width: int
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """The user's prefill left-padded to ``width`` tokens (ids with the pad id, mask, position ids and token
        types with 0, as ``generate`` pads), for an altered prompt longer than the user's: extra left padding
        leaves the user's rows unchanged (up to rounding). ``self.extra`` remembers the width added, so that
        the decode steps widen the user's mask the same way and the output hook returns the user's positions."""
        if not self.decodes:
            raise InputError(
                f"{self._what}: an altered prompt longer than the prompt ({width} > {ids.shape[1]} tokens) needs "
                "Contrast(decode=True)"
            )
        q_len = ids.shape[1]
        self.extra = width - q_len
        out = dict(kwargs, input_ids=_left_pad(ids, width, self.adapter.pad_id))
        for key, value in kwargs.items():
            if key != "input_ids" and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == q_len:
                if key == "position_ids" or (value.dim() == 2 and value.shape[0] == ids.shape[0]):
                    pad = value.new_zeros(*value.shape[:-1], self.extra)
                    out[key] = torch.cat([pad, value], dim=-1)
        return out, out["input_ids"], _left_pad(main_mask, width, 0)

    def _packable(self, kwargs: dict[str, Any]) -> bool:
        """Whether this prefill can run packed: image-free rows (their KV cache is turned into rows after the
        prefill when they go on decoding), position ids given (the twins get their own, and the model must not
        derive the user's from the packed row), an int
        ``logits_to_keep`` (or none), and no per-token input the packed layout does not know."""
        if not self.image_free:
            return False
        pos, ref = kwargs.get("position_ids"), kwargs.get("input_ids")
        ref = ref if ref is not None else kwargs.get("inputs_embeds")
        if not isinstance(pos, torch.Tensor) or not isinstance(ref, torch.Tensor) or pos.shape[-1] != ref.shape[1]:
            return False
        keep = kwargs.get("logits_to_keep")
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0):
            return False
        attn = kwargs.get("attention_mask")
        if attn is not None and (not isinstance(attn, torch.Tensor) or attn.dim() != 2):
            return False
        batch, q_len = ref.shape[:2]
        for key, value in kwargs.items():
            if key not in _PACKED_KEYS and isinstance(value, torch.Tensor) and value.shape[:2] == (batch, q_len):
                return False
        return True

    def _pack(self, kwargs: dict[str, Any], limit: int | None) -> dict[str, Any] | None:
        """The packed prefill's inputs (see Packed), or None when it would exceed ``limit`` tokens."""
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, q_len = ref.shape[:2]
        attn = kwargs.get("attention_mask")
        main_mask = attn if attn is not None else torch.ones(batch, q_len, dtype=torch.long, device=ref.device)
        if ids is not None:
            text = self.adapter.text_only_inputs({"input_ids": ids, "attention_mask": main_mask})
            twin, twin_mask = text["input_ids"], text["attention_mask"].to(main_mask.dtype)
        else:
            image = self.adapter.image_mask_from_layout(main_mask, batch, q_len)
            if image is None:
                raise InputError(f"{self.adapter.family}: cannot find the image tokens in inputs_embeds for the image-free branch")
            index = compact_left(main_mask.bool() & ~image.to(main_mask.device))
            twin, twin_mask = gather_left(embeds, index, 0), (index >= 0).to(main_mask.dtype)
        width = twin.shape[1]
        if width == 0 or width > q_len or (limit is not None and q_len + width > limit):
            return None
        keep = kwargs.get("logits_to_keep")
        keep = None if keep is None or keep == 0 or keep >= q_len else int(keep)
        out = dict(kwargs)
        out["input_ids" if ids is not None else "inputs_embeds"] = torch.cat([ref, twin.to(ref.dtype)], dim=1)
        if attn is not None or not bool(twin_mask.all()):
            out["attention_mask"] = torch.cat([main_mask, twin_mask], dim=1)
        pos = kwargs["position_ids"]
        twin_pos = positions(twin_mask).to(pos.device, pos.dtype)
        if pos.dim() == 3:
            twin_pos = twin_pos[None].expand(pos.shape[0], -1, -1)
        elif pos.shape[0] != batch:
            pos = pos.expand(batch, -1)
        out["position_ids"] = torch.cat([pos, twin_pos], dim=-1)
        cache_pos = kwargs.get("cache_position")
        if isinstance(cache_pos, torch.Tensor) and cache_pos.dim() == 1 and cache_pos.shape[0] == q_len:
            out["cache_position"] = torch.arange(q_len + width, device=cache_pos.device, dtype=cache_pos.dtype)
        for key in TOKEN_TYPE_KEYS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor):
                out[key] = torch.cat([value, value.new_zeros(batch, width)], dim=1)
        if keep is not None:
            rows = torch.arange(keep, device=ref.device)
            out["logits_to_keep"] = torch.cat([rows + q_len - keep, rows + q_len + width - keep])
        padded_ids = None
        if ids is not None:
            padded_ids = torch.cat([ids, _left_pad(twin, q_len, self.adapter.pad_id)], dim=0)
        mask = torch.cat([main_mask, _left_pad(twin_mask, q_len, 0)], dim=0)
        self.packed = Packed(q_len, width, padded_ids, mask, keep)
        self.mask, self.rows = mask[batch:], batch
        return out

    def unpack_output(self, output: Any, main: int) -> torch.Tensor | None:
        """After a packed prefill: the user's logits, hidden states and attentions put back in ``output``
        (in place); returns the twins' logits (B, q, V) left-padded (or their last ``keep`` positions)."""
        packed = self.packed
        q_len, width, keep = packed.q_len, packed.width, packed.keep
        hidden = getattr(output, "hidden_states", None)
        if hidden:
            output.hidden_states = tuple(h[:, :q_len] if h is not None and h.dim() == 3 else h for h in hidden)
        weights = getattr(output, "attentions", None)
        if weights:
            output.attentions = tuple(w[:main] if w is not None else w for w in weights)
        logits = getattr(output, "logits", None)
        if logits is None:
            return None
        got = logits.shape[1]
        if keep is not None and got == 2 * keep:
            output.logits = logits[:, :keep]
            return logits[:, keep:]
        if keep is None and got == q_len + width:
            output.logits = logits[:, :q_len]
            return _left_pad(logits[:, q_len:], q_len, 0.0)
        raise TransformersCompatError(
            f"the packed prefill returned logits for {got} positions, attnkit expected "
            f"{2 * keep if keep is not None else q_len + width} ({type(self.adapter.model).__name__})"
        )

    def unpack_cache(self, cache: Any) -> None:
        """After a packed prefill whose rows go on decoding: the KV cache rewritten from (B, h, q + w, D) packed
        rows to the rows layout the decode steps use, (2B, h, q, D): the user's rows, then the twins
        left-padded with zero keys (masked by the rows' own mask, ``self.mask``). Writes each cache layer's
        ``keys`` / ``values`` (checked to be there with the packed shape, else TransformersCompatError)."""
        packed = self.packed
        self.packed = None
        if cache is None:
            return
        q_len, width = packed.q_len, packed.width
        layers = getattr(cache, "layers", None)
        if not layers:
            raise TransformersCompatError(
                f"{type(cache).__name__} has no layers; attnkit cannot turn the packed prefill into {self._what}"
            )
        for i, layer in enumerate(layers):
            new = {}
            for name in ("keys", "values"):
                x = getattr(layer, name, None)
                if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != q_len + width:
                    raise TransformersCompatError(
                        f"cache layer {i} has no {name} of {q_len + width} tokens (got "
                        f"{None if not isinstance(x, torch.Tensor) else tuple(x.shape)}); attnkit cannot turn the packed "
                        f"prefill into {self._what}"
                    )
                bsz = x.shape[0]
                rows = x.new_zeros(2 * bsz, x.shape[1], q_len, x.shape[3])
                rows[:bsz] = x[:, :, :q_len]
                rows[bsz:, :, q_len - width :] = x[:, :, q_len:]
                new[name] = rows
            layer.keys, layer.values = new["keys"], new["values"]
        length = getattr(cache, "get_seq_length", None)
        if callable(length) and length() != q_len:
            raise TransformersCompatError(
                f"{type(cache).__name__} reports {length()} tokens after attnkit rewrote it to {q_len}"
            )

    def crop_packed(self, cache: Any) -> None:
        """After a packed prefill: the twins' tokens removed from the end of the KV cache (``Cache.crop``)."""
        packed = self.packed
        self.packed = None
        self.mask, self.rows = None, 0
        if cache is None:
            return
        crop = getattr(cache, "crop", None)
        length = getattr(cache, "get_seq_length", None)
        if not callable(crop) or not callable(length):
            raise TransformersCompatError(
                f"{type(cache).__name__} has no crop()/get_seq_length(); attnkit cannot drop {self._what} from the KV cache"
            )
        total = packed.q_len + packed.width
        if length() != total:
            raise TransformersCompatError(
                f"after the packed prefill the KV cache holds {length()} tokens, attnkit expected {total}"
            )
        crop(-packed.width)  # negative: remove that many tokens (the only form every 5.x release accepts)
        if length() != packed.q_len:
            raise TransformersCompatError(
                f"{type(cache).__name__}.crop(-{packed.width}) left {length()} tokens, not {packed.q_len}"
            )

    def _repeat_images(self, out: dict[str, Any], past_len: int) -> dict[str, Any]:
        """The forward's image inputs for the contrast rows: raw ones repeated here (and passed through the
        shadowed encoder as they are); features encoded by generate() checked to hold the repeat."""
        if any(isinstance(out.get(k), torch.Tensor) for k in IMAGE_INPUT_KEYS):
            out = self.adapter.repeat_image_inputs(out, self.contrast.pixels)
            self._passthrough = isinstance(out.get("pixel_values"), torch.Tensor)
        if past_len == 0 and not self._passthrough:
            encoded = out.get("mm_encoder_outputs")
            if isinstance(encoded, dict) and encoded.get("image") is not None and not self._encoded:
                raise InputError(f"{self._what}: the images were encoded outside the wrap (pass pixel_values)")
        if past_len == 0:
            self._encoded = False
        return out

    def _prefill_rows(
        self, ids: torch.Tensor | None, embeds: torch.Tensor | None, main_mask: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(contrast ids or embeddings, their mask, their token types where not derived), at the prompt length."""
        if self.kind == "pixels":
            if ids is None:
                raise InputError(f"{self._what} need input_ids (inputs_embeds already hold the images)")
            return ids, main_mask, {}
        if self.kind == "prompt":
            return self._prompt_rows(ids, main_mask, kwargs)
        batch, q_len = main_mask.shape
        if ids is not None:
            source = {"input_ids": ids, "attention_mask": main_mask}
            for key in TOKEN_TYPE_KEYS:
                if isinstance(kwargs.get(key), torch.Tensor):
                    source[key] = kwargs[key]
            text = self.adapter.text_only_inputs(source)
            branch = _left_pad(text["input_ids"], q_len, self.adapter.pad_id)
            mask = _left_pad(text["attention_mask"].to(main_mask.dtype), q_len, 0)
            return branch, mask, {}
        image = self.adapter.image_mask_from_layout(main_mask, batch, q_len)
        if image is None:
            raise InputError(f"{self.adapter.family}: cannot find the image tokens in inputs_embeds for the image-free branch")
        index = compact_left(main_mask.bool() & ~image.to(main_mask.device), width=q_len)
        return gather_left(embeds, index, 0), (index >= 0).to(main_mask.dtype), {}

    def _prompt_rows(
        self, ids: torch.Tensor | None, main_mask: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The altered prompt, checked and left-padded to the prompt length; its token types carry the user's
        values at the image tokens."""
        if ids is None:
            raise InputError(f"{self._what} need input_ids")
        batch, q_len = main_mask.shape
        got = self.contrast.prompt(ids, main_mask)
        if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            raise InputError(f"the contrast's prompt function must return (input_ids, attention_mask), got {type(got).__name__}")
        alt_ids, alt_mask = got
        if alt_ids.dim() != 2 or alt_ids.shape[0] != batch or alt_mask.shape != alt_ids.shape:
            raise InputError(
                f"the contrast's prompt function returned input_ids {tuple(alt_ids.shape)} and attention_mask "
                f"{tuple(alt_mask.shape)}; both must be ({batch}, any length)"
            )
        width = max(q_len, alt_ids.shape[1])  # a longer one: expand() pads the user's rows to its length
        alt_ids = _left_pad(alt_ids.to(ids.device, ids.dtype), width, self.adapter.pad_id)
        alt_mask = _left_pad(alt_mask.to(main_mask.device, main_mask.dtype), width, 0)
        user = self.adapter.image_mask(ids) & main_mask.bool()
        alt = self.adapter.image_mask(alt_ids) & alt_mask.bool()
        if not torch.equal(user.sum(1), alt.sum(1)):
            raise InputError(
                f"the altered prompt holds {alt.sum(1).tolist()} image tokens per row, the prompt "
                f"{user.sum(1).tolist()}: the contrast rows keep the same images"
            )
        types = {}
        for key in TOKEN_TYPE_KEYS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor):
                twin = value.new_zeros(value.shape[0], width)
                twin[alt] = value[user]
                types[key] = twin
        return alt_ids, alt_mask, types

