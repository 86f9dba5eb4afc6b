"""VAR: visual attention redistribution away from sink tokens, towards the image tokens that carry content.

Kang, Kim, Kim, Hwang. "See What You Are Told: Visual Attention Sink in Large Multimodal Models."
ICLR 2025. Official code: github.com/seilk/VisAttnSink.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import MethodArgumentError
from ..hooks.context import View
from .base import Method, MethodConfig, check_int, check_range
from .files import load_sink_dims
from .registry import register

#: Sink dimensions of the base LLMs the paper measured, keyed by the language model's
#: (model_type, hidden_size, num_hidden_layers, intermediate_size).
SINK_DIMS: dict[tuple[str, int, int, int], tuple[str, tuple[int, ...]]] = {
    ("llama", 4096, 32, 11008): ("LLaMA-2-7B / Vicuna-7B", (2533, 1415)),
    ("llama", 5120, 40, 13824): ("LLaMA-2-13B / Vicuna-13B", (2100, 4743)),
    ("qwen2", 3584, 28, 18944): ("Qwen2-7B", (458, 2570)),
    ("qwen2_vl_text", 3584, 28, 18944): ("Qwen2-7B (Qwen2-VL-7B)", (458, 2570)),
    ("internlm2", 4096, 32, 14336): ("InternLM2-7B (InternVL2-8B)", (3584,)),
}

_EPS = 1e-6  # of the parameter-free RMS normalisation (the official code's)
#: Added to each image token's attention in the denominator of the visual-sink share (the official
#: ``portion = vis / sum(image_attn + 1e-6)``).
SHARE_EPS = 1e-6


@dataclasses.dataclass
class VARConfig(MethodConfig):
    """p: factor on sink attention (1 = off); tau: sink threshold on |normed hidden|; rho: largest
    visual-sink share of a row's image attention; summ: smallest image attention of a row; layers
    [start_layer, L - skip_last); sink_dims: the massive-activation dimensions, a list or the path of a
    sink-dimension file (``attnkit calibrate sinks``; None = table / input)."""

    p: float = MethodConfig.option(0.6, help="factor on the attention to sink tokens (1 = off)", lo=0.0, hi=1.0)
    tau: float = MethodConfig.option(20.0, help="sink threshold on |normed hidden| at the sink dimensions", lo=0.0)
    rho: float = MethodConfig.option(0.5, help="largest visual-sink share of a row's image attention", lo=0.0, hi=1.0)
    summ: float = MethodConfig.option(0.2, help="smallest image attention of a row", lo=0.0, hi=1.0)
    start_layer: int = MethodConfig.option(2, help="first layer rewritten", lo=0)
    skip_last: int = MethodConfig.option(1, help="last layers left alone: layers [start_layer, L - skip_last)", lo=0)
    sink_dims: list[int] | str | None = MethodConfig.option(
        None, help="massive-activation dimensions, or a JSON file of them (attnkit calibrate sinks) "
                   "(none = the table's for known models)", lo=0)

    def validate(self) -> None:
        check_range("var", "p", self.p, 0.0, 1.0)
        check_range("var", "tau", self.tau, 0.0, None)
        check_range("var", "rho", self.rho, 0.0, 1.0)
        check_range("var", "summ", self.summ, 0.0, 1.0)
        check_int("var", "start_layer", self.start_layer, 0, None)
        check_int("var", "skip_last", self.skip_last, 0, None)
        if isinstance(self.sink_dims, (str, Path)):  # a file: read once, here; where from kept for sink_report
            path = str(self.sink_dims)
            self.sink_dims, info = load_sink_dims(path, "var")
            self._sink_dims_file = (path, info)
        if self.sink_dims is not None:
            if isinstance(self.sink_dims, (str, bytes)) or not hasattr(self.sink_dims, "__iter__"):
                raise MethodArgumentError(f"var: sink_dims={self.sink_dims!r} must be a list of dimension indices")
            self.sink_dims = list(self.sink_dims)
            if not self.sink_dims:
                raise MethodArgumentError("var: sink_dims=[] must name at least one dimension (or be None)")
            for d in self.sink_dims:
                check_int("var", "sink_dims", d, 0, None)


def table_sink_dims(text_config: Any) -> tuple[str, tuple[int, ...]] | None:
    """(label, dims) of ``SINK_DIMS`` for a language model's config, matched on its (model_type, hidden_size,
    num_hidden_layers, intermediate_size); None for a model the table does not hold."""
    key = (
        str(getattr(text_config, "model_type", "")),
        int(text_config.hidden_size),
        int(getattr(text_config, "num_hidden_layers", -1)),
        int(getattr(text_config, "intermediate_size", -1) or -1),
    )
    return SINK_DIMS.get(key)


def rms_normed(hidden: torch.Tensor, dims: torch.Tensor | None = None) -> torch.Tensor:
    """|RMSNorm(hidden)| without the learned scale, in fp32, for all dimensions or only ``dims``."""
    rms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32, keepdim=True) / math.sqrt(hidden.shape[-1])
    part = hidden if dims is None else hidden.index_select(-1, dims)
    return part.float().abs() * torch.rsqrt(rms.square() + _EPS)


def find_sinks(
    hidden: torch.Tensor, dims: torch.Tensor | None, tau: float, real: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """VAR's sink rule on a layer's input hidden states (B, q, d): (sinks (B, q) bool, massive (B, d) bool or None).

    A token is a sink if ``max_{d in dims} |RMSNorm(h)_d| > tau`` (RMS norm without the learned scale). With
    ``dims=None`` the dimensions come from the input: per row, those where the first real token's normed state
    exceeds tau (returned as ``massive``). ``real`` (B, q) bool: the non-padding tokens (padding is never a sink).
    """
    massive = None
    if dims is not None:
        sink = (rms_normed(hidden, dims.to(hidden.device)) > tau).any(-1)
    else:
        first = real.float().argmax(1) if real is not None else torch.zeros(hidden.shape[0], dtype=torch.long)
        first_h = hidden[torch.arange(hidden.shape[0]), first.to(hidden.device)]
        massive = rms_normed(first_h[:, None, :])[:, 0] > tau  # (B, d)
        found = massive.any(0).nonzero().flatten()
        if found.numel():
            sink = ((rms_normed(hidden, found) > tau) & massive[:, None, found]).any(-1)
        else:
            sink = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if real is not None:
        sink = sink & real.to(sink.device)
    return sink, massive


@register
class VAR(Method):
    """Visual Attention Redistribution (Kang et al., ICLR 2025).

    1. Sinks (prefill): at the input of each layer in [start_layer, L - skip_last), after RMS
       normalisation without the learned scale (the official code's rule), a token is a sink if
       ``max_{d in sink_dims} |h_d| > tau``. Image tokens that are sinks are visual sinks; the others
       (e.g. BOS) text sinks. Positions are kept for the decode steps (generated tokens never are).
    2. Image-centric (head, query) pairs, per layer: the row's image attention is >= summ and the
       visual-sink share of it is <= rho, the share taken as the official code does,
       ``vis / sum_{image tokens}(attention + 1e-6)`` (the 1e-6 per image token tips rows at the
       boundary into the chosen set); a row whose layer has no visual sink is left alone (the
       official code does the same). Query rows: at prefill, the text tokens that follow the row's
       first image token (the official code excludes the image tokens and what precedes the image);
       at decode, the new token.
    3. In those pairs only, post-softmax: attention to every sink (visual and text) is multiplied by
       p and the freed mass goes to the non-sink image tokens in proportion to their attention, so
       rows still sum to 1. Other rows use fused sdpa; at decode only layers with a visual sink run
       the reference kernel.

    sink_dims: the explicit list if given (or read from a file that ``attnkit calibrate sinks`` wrote; a
    file that records a hidden_size other than the model's is refused); else the table ``SINK_DIMS`` (the paper's values: LLaMA-2-7B
    / Vicuna-7B {2533, 1415}, LLaMA-2-13B {2100, 4743}, Qwen2-7B {458, 2570}, InternLM2 of InternVL2-8B
    {3584}) matched on the language model's type and size; else found from the input itself: per row
    and layer, the dimensions where the first real token's normed hidden state exceeds tau (massive
    activations appear first on the first token), a model without them having no sinks.
    ``sink_dims_source`` says which ("explicit", "file: <path>", "table: <model>", "input"); ``sink_report()`` lists
    the sinks of the last prefill.

    Defaults (official configuration for LLaVA-1.5-7B): p=0.6, tau=20, rho=0.5, summ=0.2, layers 2..30
    of 32 (start_layer=2, skip_last=1). Layer indices are not scaled with depth: the first two layers
    and the last one are skipped in every model. Note that tau applies to a parameter-free RMS
    norm, whose entries are at most sqrt(hidden_size): small models need a smaller tau.

    Deviation (last layer): the released code also redistributes in the last layer, against its own
    configuration's intent: ``except_last_layer: 1`` of its LLaVA-1.5 config is set on the base class
    (``LogicEngine.activate``), but the redistribution reads it from a subclass (``VARProcessor``)
    whose own class attribute, False, shadows it. ``skip_last=1`` follows the intent;
    ``skip_last=0`` reproduces the released code (layers 2..31 of 32).
    """

    name = "var"
    Config = VARConfig
    neutral = {"p": 1.0}
    cache_exact = False

    def __init__(self, config: VARConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.sink_dims_source = "unattached"
        self._dims: torch.Tensor | None = None
        self._range = range(0)

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self, handle) -> None:
        cfg = self.config
        n = handle.adapter.num_layers
        self._range = range(cfg.start_layer, n - cfg.skip_last)
        if not len(self._range):
            raise MethodArgumentError(
                f"var: start_layer={cfg.start_layer}, skip_last={cfg.skip_last} leave no layer of this {n}-layer model"
            )
        text = handle.adapter.text_config
        hidden = int(text.hidden_size)
        if cfg.sink_dims is not None:
            file = getattr(cfg, "_sink_dims_file", None)
            if file is not None and file[1].get("hidden_size", hidden) != hidden:
                raise MethodArgumentError(
                    f"var: sink_dims file {file[0]} was calibrated on a model with hidden_size "
                    f"{file[1]['hidden_size']}; this model's is {hidden}"
                )
            bad = [d for d in cfg.sink_dims if d >= hidden]
            if bad:
                raise MethodArgumentError(f"var: sink_dims entry {bad[0]} is out of range [0, {hidden - 1}]")
            self._dims = torch.tensor(cfg.sink_dims)
            self.sink_dims_source = "explicit" if file is None else f"file: {file[0]}"
        else:
            found = table_sink_dims(text)
            if found is not None:
                label, dims = found
                self._dims, self.sink_dims_source = torch.tensor(dims), f"table: {label}"
            else:
                self._dims, self.sink_dims_source = None, "input"

    def _state(self, view: View | None = None) -> dict[str, Any]:
        state = self.state(view)
        if not state:
            state.update(sinks={}, dims={})
        return state

    def begin_forward(self, view: View) -> None:
        state = self._state(view)
        image = view.image_mask
        if image is None or not bool(image.any()):
            state["rows"] = None
            return
        has_image = image.any(1)
        q_real = view.attention_mask[:, -view.q_len :] if view.attention_mask is not None else None
        if view.is_prefill:
            first = torch.where(has_image, image.float().argmax(1), image.shape[1])
            pos = torch.arange(view.q_len, device=image.device)
            eligible = (pos[None, :] > first[:, None]) & ~image
        else:
            eligible = has_image[:, None].expand(-1, view.q_len)
        if q_real is not None:
            eligible = eligible & q_real.to(eligible.device)
        before = state.get("eligible")
        state["eligible"] = eligible
        state["rows"] = eligible.any(0).nonzero().flatten()
        # the per-layer row conditions hold while the eligible rows do (every decode step, usually)
        if view.is_prefill or before is None or before.shape != eligible.shape or not torch.equal(before, eligible):
            state["rows_ok"] = {}

    # -- routing ---------------------------------------------------------------------------
    def layers(self, view: View) -> set[int]:
        state = self._state(view)
        rows = state.get("rows")
        if rows is None or rows.numel() == 0:
            return set()
        if view.is_prefill:
            return set(self._range)
        if "decode_layers" not in state:  # the layers with a visual sink, fixed after the prefill
            image = view.image_mask
            state["decode_layers"] = {layer for layer, sink in state["sinks"].items() if bool((sink & image).any())}
        return state["decode_layers"]

    def rows(self, view: View) -> torch.Tensor | None:
        return self._state(view)["rows"]

    # -- 1. sinks ---------------------------------------------------------------------------
    def select(self, view: View, hidden: torch.Tensor) -> None:
        layer = view.layer
        if not view.is_prefill or layer not in self._range:
            return None
        real = view.attention_mask[:, -hidden.shape[1] :] if view.attention_mask is not None else None
        sink, massive = find_sinks(hidden, self._dims, self.config.tau, real)
        if massive is not None:
            self._state(view)["dims"][layer] = massive
        self._state(view)["sinks"][layer] = sink
        return None

    # -- 2. + 3. image-centric pairs, redistribution -------------------------------------------
    def _masks(self, view: View, layer: int, width: int, device: torch.device) -> tuple | None:
        """Per layer, cached for the forward: (masks (B, K, 4): image, visual sink, sink, non-sink image;
        shift (B, 2, K): sink, non-sink image; has_visual (B, 1, 1); n_image (B, 1): the row's image
        tokens, all of them whatever the width), cropped to ``width``, or None."""
        state = self._state(view)
        cache = state.setdefault("masks", {})
        hit = cache.get(layer)
        if hit is not None and hit[0] >= width:
            return None if hit[1] is None else _crop(hit[1], width)
        sink = state["sinks"].get(layer)
        image = view.image_mask
        if sink is None or image is None:
            cache[layer] = (1 << 62, None)
            return None
        capacity = max(width, sink.shape[1]) + 256  # generated tokens are never image or sink
        sink, image = _fit(sink, capacity).to(device), _fit(image, capacity).to(device)
        has_visual = (sink & image).any(-1)
        if not bool(has_visual.any()):
            cache[layer] = (1 << 62, None)
            return None
        masks = torch.stack([image, sink & image, sink, image & ~sink], dim=2).float()  # (B, K, 4)
        shift = masks[:, :, 2:].transpose(1, 2).contiguous()  # (B, 2, K)
        entry = (masks, shift, has_visual[:, None, None], image.sum(1, keepdim=True, dtype=torch.float32))
        cache[layer] = (capacity, entry)
        return _crop(entry, width)

    def probs(self, view: View, probs: torch.Tensor) -> torch.Tensor:
        if view.rows is None:
            return probs
        layer = view.layer
        found = self._masks(view, layer, probs.shape[-1], probs.device)
        if found is None:
            return probs
        masks, shift, has_visual, n_image = found
        state = self._state(view)
        p = probs.float().contiguous()  # the same tensor for fp32 probabilities: rewritten in place
        bsz, heads, rows, width = p.shape
        eligible = state["eligible"]
        if view.rows.numel() == eligible.shape[1]:  # every row of the forward (decode: the new token)
            rows_ok = state["rows_ok"].get((layer, heads))
            if rows_ok is None:
                ok = has_visual & eligible.to(probs.device)[:, None, :]
                rows_ok = state["rows_ok"][(layer, heads)] = ok.expand(bsz, heads, rows).reshape(bsz, heads * rows)
        else:
            ok = has_visual & eligible[:, view.rows.to(eligible.device)].to(probs.device)[:, None, :]
            rows_ok = ok.expand(bsz, heads, rows).reshape(bsz, heads * rows)
        flat = p.view(bsz, heads * rows, width)
        image_attn, visual_sink, sink_attn, rest = torch.bmm(flat, masks).unbind(-1)  # (B, H*r) each
        cfg = self.config
        # image attention >= summ, visual-sink share of it <= rho (and something left to receive); the
        # share as the official code computes it: vis / sum over image tokens of (attention + 1e-6)
        share_of = image_attn + SHARE_EPS * n_image
        chosen = (image_attn >= cfg.summ) & (visual_sink <= cfg.rho * share_of) & rows_ok
        if cfg.rho >= 1.0 or cfg.summ <= 0.0:  # otherwise rest >= (1 - rho) * summ > 0 already
            chosen &= rest > 0
        # factor - 1 per column: p - 1 on the sinks, the gain on the non-sink image tokens, 0 elsewhere
        # and in rows not chosen (so those rows stay exactly as they are)
        gain = sink_attn.mul_(1.0 - cfg.p).div_(rest.clamp_min(1e-12))
        coef = torch.stack([chosen * (cfg.p - 1.0), chosen * gain], dim=-1)  # (B, H*r, 2)
        flat.addcmul_(flat, torch.bmm(coef, shift))
        return p.to(probs.dtype)

    # -- report ------------------------------------------------------------------------------
    def sink_report(self) -> dict[str, Any]:
        """Where the sink dims came from (``source``; ``file``: the sink-dimension file they were read from,
        or None) and, for the last prefill, each layer's sink positions per row."""
        file = getattr(self.config, "_sink_dims_file", None)
        out: dict[str, Any] = {
            "source": self.sink_dims_source,
            "sink_dims": None if self._dims is None else self._dims.tolist(),
            "file": None if file is None else file[0],
            "sinks": {},
        }
        if getattr(self, "_states", None) is None:
            return out
        state = self._state()
        out["sinks"] = {layer: [row.nonzero().flatten().tolist() for row in s] for layer, s in state["sinks"].items()}
        if state["dims"]:
            out["input_dims"] = {
                layer: [row.nonzero().flatten().tolist() for row in d] for layer, d in state["dims"].items()
            }
        return out


def _crop(entry: tuple, width: int) -> tuple:
    masks, shift, has_visual, n_image = entry
    return masks[:, :width], shift[..., :width], has_visual, n_image


def _fit(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, S) bool cropped or False-padded to ``width`` columns."""
    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.cat([mask, mask.new_zeros(mask.shape[0], width - mask.shape[1])], dim=1)
