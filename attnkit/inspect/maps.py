"""Where the answer looks: per-layer attention maps over the image, visual sinks, pruned tokens and shares.

``attention_map(model, inputs)`` runs one greedy generate of the model (or, with ``token=``, one prefill)
wrapped with a read-only observer (an attnkit Method with ``observe`` and ``select`` roles only, placed
after any ``methods`` given) and returns ``AttentionMaps``: for every layer the attention that the answer
rows pay to the prompt, laid on the family's image grid as grounding does it (``attnkit.eval.grounding``:
the adapter's global view, each cell mapped back to original-image pixels through the processor's
geometry), with the visual sinks (VAR's rule, ``attnkit.methods.var.find_sinks``) and the image tokens a
pruning method removed or masked; and ``AttentionShares``: per answer step and layer, the share of the
attention on image tokens, on text tokens and on sink tokens. Everything is a CPU fp32/bool tensor, so that
a notebook can plot it; ``attnkit.inspect.render`` draws it as PNGs (Pillow only).
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import InputError, MethodArgumentError, UnsupportedModelError
from ..methods.base import Method

__all__ = ["AttentionMaps", "AttentionShares", "MapObserver", "attention_map", "attention_shares", "sink_defaults"]


def sink_defaults() -> tuple[float, list[int] | None]:
    """VAR's own defaults for the sink rule: (tau, sink_dims) of ``VARConfig`` (20.0 and None: the table, else
    the dimensions found from the input)."""
    from ..methods.var import VARConfig

    fields = {f.name: f for f in dataclasses.fields(VARConfig)}
    return float(fields["tau"].default), fields["sink_dims"].default


class MapObserver(Method):
    """Read-only: per step and layer, the attention row of the answering query (head mean over ``heads``)
    over the whole sequence's original positions; per layer at prefill, VAR's sinks among the prompt tokens
    and which prompt tokens pruning left. Changes nothing (no role returns a rewrite)."""

    name = "attention_map_observer"

    def __init__(
        self,
        *,
        token: int | None = None,
        heads: Sequence[int] | None = None,
        sink_tau: float | None = None,
        sink_dims: Sequence[int] | str | os.PathLike | None = None,
        prompt_len: int | None = None,
    ) -> None:
        super().__init__()
        tau, dims = sink_defaults()
        self.user_prompt_len = prompt_len
        self.token = token
        self.heads = None if heads is None else torch.tensor(list(heads), dtype=torch.long)
        self.sink_tau = tau if sink_tau is None else float(sink_tau)
        self._file: tuple[str, dict[str, Any]] | None = None
        if isinstance(sink_dims, (str, os.PathLike)):  # a file of attnkit calibrate sinks, read as VAR reads it
            from ..methods.files import load_sink_dims

            dims_read, info = load_sink_dims(sink_dims, "attention maps")
            self._file = (str(sink_dims), info)
            sink_dims = dims_read
        self._explicit_dims = None if sink_dims is None else list(sink_dims)
        self._dims: torch.Tensor | None = None
        self.sink_dims_source = "unattached"

    def attach(self, handle: Any) -> None:
        from ..methods.var import table_sink_dims

        self.num_layers = handle.adapter.num_layers
        text = handle.adapter.text_config
        hidden = int(text.hidden_size)
        if self._explicit_dims is not None:
            if self._file is not None and self._file[1].get("hidden_size", hidden) != hidden:
                raise InputError(f"sink_dims file {self._file[0]} was calibrated on a model with hidden_size "
                                 f"{self._file[1]['hidden_size']}; this model's is {hidden}")
            bad = [d for d in self._explicit_dims if not 0 <= d < hidden]
            if bad:
                raise InputError(f"sink dimension {bad[0]} is out of range [0, {hidden - 1}]")
            self._dims = torch.tensor(self._explicit_dims)
            self.sink_dims_source = "explicit" if self._file is None else f"file: {self._file[0]}"
        else:
            found = table_sink_dims(text)
            if found is None:
                self._dims, self.sink_dims_source = None, "input"
            else:
                self._dims, self.sink_dims_source = torch.tensor(found[1]), f"table: {found[0]}"

    # -- per forward -----------------------------------------------------------------------------
    def begin_forward(self, view: Any) -> None:
        if view.is_prefill:
            # a contrast prompt longer than the user's (ICD) left-pads the user's rows inside the forward:
            # ``offset`` columns that the user's prompt does not have
            self.prompt_len = self.user_prompt_len or view.prompt_len
            if view.prompt_len < self.prompt_len:
                raise MethodArgumentError(
                    f"attention maps: a method shortened the prompt before the language model ({self.prompt_len} -> "
                    f"{view.prompt_len} tokens), so its image tokens no longer lie on the image grid; not supported"
                )
            self.offset = max(0, view.prompt_len - self.prompt_len)
            image = view.prompt_image_mask
            self.image = (image[0, self.offset :].cpu().bool() if image is not None
                          else torch.zeros(self.prompt_len, dtype=torch.bool))
            self.steps: list[torch.Tensor] = []
            self.seen: list[torch.Tensor] = []
            self.sinks: dict[int, torch.Tensor] = {}
            self.present: dict[int, torch.Tensor] = {}
        elif self.token is not None:
            return
        self.steps.append(torch.zeros(self.num_layers, view.kv_len - self.offset))
        self.seen.append(torch.zeros(self.num_layers, dtype=torch.bool))

    def layers(self, view: Any) -> set[int] | None:
        return None if view.is_prefill or self.token is None else set()

    def _target(self, view: Any) -> int | None:
        """The forward's query row to record at ``view.layer`` (None: the chosen token was dropped there)."""
        if not view.is_prefill or self.token is None:
            return view.q_len - 1
        pos = view.positions()
        if pos is None:
            return self.token + self.offset
        hit = (pos[0] == self.token + self.offset).nonzero()
        return int(hit[0, 0]) if hit.numel() else None

    def rows(self, view: Any) -> torch.Tensor | None:
        row = self._target(view)
        return torch.tensor([view.q_len - 1 if row is None else row])

    def _columns(self, view: Any, width: int) -> torch.Tensor:
        """Positions in the user's sequence of the layer's first ``width`` key columns (negative: the padding
        a longer contrast prompt added in front)."""
        pos = view.positions()
        if pos is None:
            return torch.arange(width) - self.offset
        pos = pos[0].cpu()
        tail = self.prompt_len + self.offset + torch.arange(max(0, width - pos.shape[0]))
        return torch.cat([pos, tail])[:width] - self.offset

    def observe(self, view: Any, probs: torch.Tensor) -> None:
        layer = view.layer
        if view.is_prefill and layer not in self.present:
            present = torch.zeros(self.prompt_len, dtype=torch.bool)
            cols = self._columns(view, view.kv_len)
            keep = view.keep_mask()
            kept = (torch.ones(cols.shape[0], dtype=torch.bool) if keep is None
                    else keep[0, : cols.shape[0]].cpu().bool())
            inside = (cols >= 0) & (cols < self.prompt_len)
            present[cols[inside]] = kept[inside]
            self.present[layer] = present
        if not self.steps:
            return
        row = self._target(view)
        index = None if row is None else view.row_index(row)
        if index is None:
            return
        p = probs[0, :, index].float()
        if self.heads is not None:
            p = p.index_select(0, self.heads.to(p.device))
        p = p.mean(0).cpu()  # (K',)
        cols = self._columns(view, p.shape[0])
        record = self.steps[-1]
        record[layer].zero_()
        record[layer, cols[cols >= 0]] = p[cols >= 0]
        self.seen[-1][layer] = True

    def select(self, view: Any, hidden: torch.Tensor) -> None:
        from ..methods.var import find_sinks

        if not view.is_prefill:
            return None
        mask = view.attention_mask
        real = mask[:1, -hidden.shape[1] :] if mask is not None else None
        sink, _ = find_sinks(hidden[:1], self._dims, self.sink_tau, real)
        out = torch.zeros(self.prompt_len, dtype=torch.bool)
        cols = self._columns(view, hidden.shape[1])
        out[cols[cols >= 0]] = sink[0].cpu()[cols >= 0]
        self.sinks[view.layer] = out
        return None


@dataclasses.dataclass(frozen=True)
class AttentionShares:
    """Per answer step (rows) and layer (columns), the head-mean attention of the answering query on:
    ``image`` the image tokens, ``text`` every other token (prompt text and generated tokens; ``image + text``
    is 1), ``sink`` the sink tokens of that layer (VAR's rule; visual and text sinks, so it overlaps the
    other two), ``visual_sink`` the sink tokens among the image tokens. Each (steps, layers) fp32. Step 0 is
    the last prompt token at prefill (it yields the first answer token), step t the t-th generated token's
    row; with ``token=`` the single step of that prompt token. ``mean()`` averages over the steps."""

    image: torch.Tensor
    text: torch.Tensor
    sink: torch.Tensor
    visual_sink: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.image.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.image.shape[1])

    def mean(self) -> dict[str, torch.Tensor]:
        """{"image", "text", "sink", "visual_sink"}: (layers,) means over the steps."""
        return {k: getattr(self, k).mean(0) for k in ("image", "text", "sink", "visual_sink")}


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
    """What ``attention_map`` measured for one prompt (CPU tensors; L = the chosen layers, R x C = the grid).

    ``layers``: the chosen layers (indices of the model's decoder layers), in order; ``heads``: the heads
    averaged (None: all); ``token``: the prompt position observed (None: the answer rows); ``methods``: the
    names of the methods the model ran under (empty: the model as it is).
    ``grid`` (L, R, C): per chosen layer, the attention to the image tokens of the whole-image view (the
    adapter's ``global_view``), averaged over the answer steps (up to and including the first EOS);
    ``mean`` (R, C): ``grid`` averaged over the chosen layers; ``sinks`` (L, R, C) bool: visual sinks at the
    input of each chosen layer; ``pruned`` (L, R, C) bool: image tokens removed or masked before that layer
    by a pruning method (all False without one); ``sinks_any`` / ``pruned_any`` (R, C): over the chosen layers.
    ``prompt`` (num_layers, S): the same averaged attention over every prompt position, for every layer;
    ``image_mask`` (S,) bool: the prompt's image tokens; ``sink_mask`` / ``kept_mask`` (num_layers, S) bool:
    sinks and tokens left by pruning per layer; ``region``: (x0, y0, x1, y1) of the original image that the
    grid covers (None without ``image_size``); ``shares``: ``AttentionShares`` of the answer steps over
    every layer; ``tokens``: the generated token ids; ``logits`` (steps, V): the model's logits at each step
    (unchanged by the observation); ``answer_steps``: the steps averaged; ``sink_tau``, ``sink_dims_source``:
    the sink rule's threshold and where its dimensions came from."""

    layers: tuple[int, ...]
    heads: tuple[int, ...] | None
    token: int | None
    methods: tuple[str, ...]
    grid: torch.Tensor
    mean: torch.Tensor
    sinks: torch.Tensor
    pruned: torch.Tensor
    prompt: torch.Tensor
    image_mask: torch.Tensor
    sink_mask: torch.Tensor
    kept_mask: torch.Tensor
    region: tuple[float, float, float, float] | None
    shares: AttentionShares
    tokens: torch.Tensor
    logits: torch.Tensor
    answer_steps: int
    sink_tau: float
    sink_dims_source: str

    @property
    def sinks_any(self) -> torch.Tensor:
        return self.sinks.any(0)

    @property
    def pruned_any(self) -> torch.Tensor:
        return self.pruned.any(0)

    def to_dict(self, digits: int = 6) -> dict[str, Any]:
        """The numbers as plain JSON-ready values (grids as nested lists, rounded)."""

        def r(t: torch.Tensor) -> Any:
            return torch.round(t.double(), decimals=digits).tolist()

        return {
            "layers": list(self.layers), "heads": None if self.heads is None else list(self.heads),
            "token": self.token, "methods": list(self.methods), "answer_steps": self.answer_steps,
            "tokens": self.tokens.tolist(), "grid_shape": list(self.mean.shape),
            "region": None if self.region is None else [round(float(v), 3) for v in self.region],
            "sink_tau": self.sink_tau, "sink_dims_source": self.sink_dims_source,
            "maps": {str(layer): r(self.grid[i]) for i, layer in enumerate(self.layers)},
            "mean": r(self.mean),
            "sinks": {str(layer): self.sinks[i].nonzero().tolist() for i, layer in enumerate(self.layers)},
            "pruned": {str(layer): int(self.pruned[i].sum()) for i, layer in enumerate(self.layers)},
            "shares": {k: r(v) for k, v in self.shares.mean().items()},
        }


def _check_index(what: str, value: Any, size: int, unit: str) -> int:
    """``value`` as an index into ``size`` items (negative: from the end); InputError naming it otherwise."""
    if isinstance(value, bool):
        raise InputError(f"{what} {value!r} is not an integer")
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{what} {value!r} is not an integer") from None
    if not -size <= value < size:
        raise InputError(f"{what} {value} is out of range [0, {size - 1}] for this {unit}")
    return value % size


def _prepare(model: Any, inputs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    import attnkit

    adapter = attnkit.get_adapter(model)
    if not adapter.has_image_grid:
        raise UnsupportedModelError(f"attention maps need image tokens on a grid; {adapter.family} has none")
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("attention maps: the inputs need input_ids of shape (1, tokens)")
    if ids.shape[0] != 1:
        raise InputError(f"attention maps: the inputs hold {ids.shape[0]} prompts; give one (a batch of 1)")
    if not bool(adapter.image_mask(ids).any()):
        raise InputError("attention maps: the prompt holds no image tokens")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return adapter, batch


def attention_map(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    token: int | None = None,
    methods: Sequence[Any] | None = None,
    processor: Any = None,
    image_size: tuple[int, int] | None = None,
    max_new_tokens: int = 8,
    sink_tau: float | None = None,
    sink_dims: Sequence[int] | str | os.PathLike | None = None,
) -> AttentionMaps:
    """Attention from the answer (or prompt position ``token``) to the image, per layer, on the image grid.

    ``inputs``: one prompt with its image, as the processor gives it (``attnkit.eval.inputs.make_batch``).
    The model, unwrapped, is wrapped for the call with ``methods`` (Method objects or registered names, in
    order; None or []: the model as it is) followed by a read-only ``MapObserver``, then unwrapped again, also
    when the call raises. With ``token=None`` it runs a greedy ``generate`` of ``max_new_tokens`` and observes
    the answering rows (the last prompt token, then each generated token up to and including the first EOS,
    as grounding does); with ``token=p`` (a prompt position, negative from the end) one prefill, observing
    that token's row (a token that pruning dropped at a layer has an all-zero map there).
    ``layers``: the decoder layers to return as panels (None: all; negative from the end); ``heads``: the
    heads averaged (None: all). Sinks: VAR's rule at the input of each layer, ``max_{d in sink dims}
    |RMSNorm(h)_d| > sink_tau``, with VAR's defaults (``sink_defaults()``: tau 20 and its table of sink
    dimensions for the models the paper measured, else the dimensions found from the input); small models
    need a smaller tau (RMS-normed entries are at most sqrt(hidden size)); ``sink_dims`` may also be the path
    of a file of ``attnkit calibrate sinks`` (read as VAR reads it, refused for a model of another width).
    ``processor`` and ``image_size`` (width, height of the original image) give ``region``, the image pixels
    the grid covers (``attnkit.eval.grounding.view_region``). Methods that rewrite logits through contrast
    rows (VCD, ICD) leave the user's row as it is, and the map shows it; vision-side pruning (VisionZip,
    HiPrune), which hands the language model fewer, merged image tokens, raises MethodArgumentError. Bad
    layers, heads or tokens raise InputError; a model that is already wrapped raises AlreadyWrappedError.
    See ``AttentionMaps`` for the fields."""
    import attnkit

    from ..eval.grounding import _answer_lengths, view_region

    adapter, batch = _prepare(model, inputs)
    num_layers, num_heads = adapter.num_layers, adapter.num_heads
    chosen = tuple(range(num_layers)) if layers is None else tuple(
        _check_index("layer", x, num_layers, f"{num_layers}-layer model") for x in layers
    )
    if not chosen:
        raise InputError("layers: give at least one layer (or None: all)")
    head_list = None if heads is None else tuple(
        _check_index("head", h, num_heads, f"{num_heads}-head model") for h in heads
    )
    if head_list is not None and not head_list:
        raise InputError("heads: give at least one head (or None: all)")
    prompt_len = batch["input_ids"].shape[1]
    position = None if token is None else _check_index("token", token, prompt_len, f"{prompt_len}-token prompt")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    made = [attnkit.make_method(m) for m in (methods or [])]
    from ..methods.vision_side import VisionPruner

    for m in made:
        if isinstance(m, VisionPruner):
            raise MethodArgumentError(
                f"attention maps: {m.name} prunes inside the vision encoder (the language model gets fewer, merged "
                "image tokens, off the image grid); not supported"
            )
    if processor is not None:
        for m in made:
            m.use_processor(processor)
    observer = MapObserver(token=position, heads=head_list, sink_tau=sink_tau, sink_dims=sink_dims,
                           prompt_len=prompt_len)
    with attnkit.wrap(model, [*made, observer]), torch.no_grad():
        if position is None:
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
            tokens = out.sequences[0, prompt_len:].cpu()
            logits = torch.stack([step[0] for step in out.logits]).float().cpu()
            n = min(_answer_lengths(tokens[None], model)[0], len(observer.steps))
        else:
            logits = model(**batch, use_cache=False).logits[0, -1:].float().cpu()
            tokens = torch.empty(0, dtype=torch.long)
            n = 1
    if not observer.steps or not bool(observer.seen[0].any()):
        raise InputError("attention maps: the forward did not reach the observer (is the model's forward its own?)")

    steps = observer.steps[:n]
    prompt = sum(s[:, :prompt_len] for s in steps) / n  # (num_layers, S)
    image = observer.image
    empty = torch.zeros(prompt_len, dtype=torch.bool)
    sink_mask = torch.stack([observer.sinks.get(i, empty) for i in range(num_layers)])
    full = torch.ones(prompt_len, dtype=torch.bool)
    kept_mask = torch.stack([observer.present.get(i, full) for i in range(num_layers)])

    shares = {k: torch.zeros(n, num_layers) for k in ("image", "text", "sink", "visual_sink")}
    for t, s in enumerate(steps):
        head = s[:, :prompt_len]
        shares["image"][t] = head[:, image].sum(-1)
        shares["text"][t] = s.sum(-1) - shares["image"][t]
        shares["sink"][t] = (head * sink_mask).sum(-1)
        shares["visual_sink"][t] = (head * (sink_mask & image)).sum(-1)

    grids = adapter.image_grids(batch)
    if grids is None or not grids[0]:
        raise UnsupportedModelError(f"attention maps need an image grid; {adapter.family} gave none")
    grid = grids[0][adapter.global_view]
    pos = grid.positions()
    pick = list(chosen)
    cells = prompt[pick][:, pos]
    region = None
    if image_size is not None:
        width, height = image_size
        image_processor = getattr(processor, "image_processor", None)
        region = view_region(image_processor, width, height, adapter.global_view_cropped)
    return AttentionMaps(
        layers=chosen, heads=head_list, token=position,
        methods=tuple(m.name for m in made),
        grid=cells, mean=cells.mean(0), sinks=sink_mask[pick][:, pos] & image[pos],
        pruned=~kept_mask[pick][:, pos], prompt=prompt, image_mask=image, sink_mask=sink_mask,
        kept_mask=kept_mask, region=region, shares=AttentionShares(**shares), tokens=tokens, logits=logits,
        answer_steps=n, sink_tau=observer.sink_tau, sink_dims_source=observer.sink_dims_source,
    )


def attention_shares(model: torch.nn.Module, inputs: Mapping[str, Any], **kwargs: Any) -> AttentionShares:
    """Per answer step and layer, the attention shares on image, text and sink tokens (``AttentionShares``),
    measured as ``attention_map`` measures (same arguments: ``heads``, ``token``, ``methods``,
    ``max_new_tokens``, ``sink_tau``, ``sink_dims``; ``layers`` does not apply: every layer is returned)."""
    kwargs.pop("layers", None)
    return attention_map(model, inputs, **kwargs).shares
