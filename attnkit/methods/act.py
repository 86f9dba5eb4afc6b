"""ACT: attention calibration of the hidden sinks that are not the first token.

Yu, Zhang, Yao, Chen, Lin, et al. "Unveiling and Harnessing Hidden Attention Sinks: Enhancing
Large Language Models without Training through Attention Calibration." ICML 2024.
Official code: github.com/GATECH-EIC/ACT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import MethodArgumentError
from ..hooks.context import View
from .base import Method, MethodConfig, check_int, check_range
from .files import load_head_set
from .registry import register

#: Which column a head never calibrates: the row's first real token (attnkit's rule), or the first
#: column whose mean attention exceeds the threshold (the official ``indices[1:]``).
SPARE = ("first_token", "first_sink")


@dataclasses.dataclass
class ACTConfig(MethodConfig):
    """beta: factor on sink attention (1 = off); threshold: smallest mean attention of a sink column;
    layers [start_layer, L - skip_last) (skip_last=0 calibrates the last layer too); heads: {layer: [head,
    ...]} to calibrate, or the path of a head-set JSON file (None = every head of those layers); spare: the column never calibrated,
    "first_token" (the row's first real token) or "first_sink" (the official code's: the first column
    above the threshold, per head)."""

    beta: float = MethodConfig.option(0.4, help="factor on the attention to sink columns (1 = off)", lo=0.0, hi=1.0)
    threshold: float = MethodConfig.option(0.1, help="smallest mean attention of a sink column", lo=0.0, hi=1.0)
    start_layer: int = MethodConfig.option(2, help="first layer calibrated", lo=0)
    skip_last: int = MethodConfig.option(1, help="last layers left alone: layers [start_layer, L - skip_last)", lo=0)
    heads: dict[int, list[int]] | str | None = MethodConfig.option(
        None, help="{layer: [head, ...]} to calibrate, or a head-set JSON file (attnkit heads / calibrate heads) "
                   "(none = every head of those layers)", lo=0)
    spare: str = MethodConfig.option("first_token", help="the column never calibrated", choices=SPARE)

    def validate(self) -> None:
        check_range("act", "beta", self.beta, 0.0, 1.0)
        check_range("act", "threshold", self.threshold, 0.0, 1.0)
        check_int("act", "start_layer", self.start_layer, 0, None)
        check_int("act", "skip_last", self.skip_last, 0, None)
        if self.spare not in SPARE:
            raise MethodArgumentError(f"act: spare={self.spare!r} must be one of {', '.join(SPARE)}")
        if isinstance(self.heads, (str, Path)):
            self.heads = load_head_set(self.heads, "act")
        if self.heads is not None:
            if not isinstance(self.heads, dict):
                raise MethodArgumentError(f"act: heads must be a dict {{layer: [head, ...]}}, got {type(self.heads).__name__}")
            clean: dict[int, list[int]] = {}
            for layer, heads in self.heads.items():
                check_int("act", "heads layer", layer, 0, None)
                if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
                    raise MethodArgumentError(f"act: heads[{layer}]={heads!r} must be a list of head indices")
                heads = list(heads)
                for h in heads:
                    check_int("act", f"heads[{layer}]", h, 0, None)
                heads = sorted(set(heads))
                if heads:
                    clean[int(layer)] = heads
            self.heads = clean


@register
class ACT(Method):
    """Attention Calibration Technique (Yu et al., ICML 2024).

    In each selected head, a key column j other than the row's first token is a sink if its mean
    attention over the rows that can see it exceeds ``threshold``; its attention is multiplied by
    ``beta`` and the freed mass goes to the other columns of each row in proportion to their
    attention (rows still sum to 1). The column means need all rows of the layer before any row is
    rewritten: the kernel gives the column statistics first (``column_stats``). At a decode step the means
    run over every row so far (prompt and generated tokens, each counted once with the probabilities
    it had when it was the new row); the official code, evaluated on whole sequences, takes them over
    the rows of the current forward, which with a KV cache would be the new token's single row.

    Defaults: beta=0.4, threshold=0.1 (the paper's); every head of layers [start_layer, L - skip_last)
    with start_layer=2, skip_last=1: layers 2..30 of a 32-layer model, the official LLaMA-2 range
    (``range(2, 31)``), which never calibrates the last layer. Layer indices are absolute, not scaled
    with depth: a model of depth L gets layers 2..L-2 (the first two and the last one skipped);
    ``skip_last=0`` includes the last layer (the official Mistral script's ``range(2, 32)``). The
    official code calibrates a per-task head list found by a search on a calibration set; pass such a
    list as ``heads={layer: [head, ...]}`` (then start_layer and skip_last are unused), or the path of a
    head-set file (``attnkit heads`` / ``attnkit calibrate heads``: its ``"heads"``), read once, at construction.

    Deviation (``spare``): attnkit never calibrates the row's first real token (``spare="first_token"``,
    the intent: the first token is the ordinary sink ACT keeps). The official code spares instead the
    first column above the threshold in each head (``indices[1:]``), which is the first token's column
    only when that column is itself above the threshold; when it is not (e.g. a head whose first token
    gets little attention and whose sink is a later token), the official code leaves that later,
    hidden sink uncalibrated and attnkit calibrates it. ``spare="first_sink"`` follows the official rule.
    """

    name = "act"
    Config = ACTConfig
    neutral = {"beta": 1.0}
    cache_exact = False

    def __init__(self, config: ACTConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._heads: dict[int, torch.Tensor] = {}

    def attach(self, handle) -> None:
        n, n_heads = handle.adapter.num_layers, handle.adapter.num_heads
        cfg = self.config
        if cfg.heads is None:
            layers = range(cfg.start_layer, n - cfg.skip_last)
            if not len(layers):
                raise MethodArgumentError(
                    f"act: start_layer={cfg.start_layer}, skip_last={cfg.skip_last} leave no layer of this {n}-layer model"
                )
            self._heads = {layer: torch.ones(n_heads, dtype=torch.bool) for layer in layers}
            return
        self._heads = {}
        for layer, heads in cfg.heads.items():
            if layer >= n:
                raise MethodArgumentError(f"act: heads layer {layer} is out of range [0, {n - 1}]")
            if heads[-1] >= n_heads:
                raise MethodArgumentError(f"act: heads[{layer}] entry {heads[-1]} is out of range [0, {n_heads - 1}]")
            mask = torch.zeros(n_heads, dtype=torch.bool)
            mask[heads] = True
            self._heads[layer] = mask

    def layers(self, view: View) -> set[int]:
        return set(self._heads)

    def _stats(self, view: View, heads: int, device: torch.device) -> dict[str, torch.Tensor]:
        """This layer's running column sums (B, H, cap) and visible-row counts (B, 1, cap), cap >= kv_len,
        and which columns may be sinks at all (B, H, cap): the selected heads, never the first token
        (with spare="first_token")."""
        store = self.state(view)
        st = store.get(view.layer)
        kv = view.kv_len
        if st is not None and st["sum"].shape[-1] >= kv:
            return st
        cap = kv + 256
        bsz = view.batch_size
        if st is None:
            st = {"sum": torch.zeros(bsz, heads, cap, device=device), "count": torch.zeros(bsz, 1, cap, device=device)}
        else:
            grow = cap - st["sum"].shape[-1]
            st["sum"] = torch.nn.functional.pad(st["sum"], (0, grow))
            st["count"] = torch.nn.functional.pad(st["count"], (0, grow))
        allowed = self._heads[view.layer].to(device)[None, :, None].expand(bsz, heads, cap).clone()
        if self.config.spare == "first_token":  # (first_sink: each head's first sink is spared in _sinks)
            if view.attention_mask is not None:
                first = view.attention_mask.float().argmax(1).to(device)  # the row's first real token
            else:
                first = torch.zeros(bsz, dtype=torch.long, device=device)
            allowed[torch.arange(bsz, device=device), :, first] = False
        st["allowed"] = allowed
        store[view.layer] = st
        return st

    def column_stats(self, view: View, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """The running column sums: every row so far, each counted once (prompt rows at prefill, then
        each decode step's new row)."""
        width = sums.shape[-1]
        st = self._stats(view, sums.shape[1], sums.device)
        st["sum"][..., :width] += sums
        st["count"][..., :width] += counts

    def _sinks(self, st: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        """(B, H, width) bool: the calibrated columns (mean > threshold, selected heads, not the spared column)."""
        # mean > threshold, without dividing (a column no row sees has sum 0 and count 0)
        sink = st["sum"][..., :width] > self.config.threshold * st["count"][..., :width]
        sink.logical_and_(st["allowed"][..., :width])
        if self.config.spare == "first_sink":  # the official indices[1:]: each head's first sink stays
            sink.scatter_(-1, sink.float().argmax(-1, keepdim=True), False)  # (a head without sinks: no-op)
        return sink

    def columns(self, view: View) -> torch.Tensor | None:
        """The calibrated columns: every column that is a sink in some row and head."""
        st = self.state(view).get(view.layer)
        if st is None:
            return None
        sink = self._sinks(st, view.kv_len)
        cols = sink.flatten(0, 1).any(0).nonzero().flatten()
        st["sparse"] = sink[..., cols]  # (B, H, n): which of them are sinks in each head
        return cols

    def reweight(self, view: View, p_cols: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows sum to 1, so with S the row's sink mass the sinks get beta and the other columns
        (1 - beta * S) / (1 - S); a row with nothing else keeps its sinks."""
        s = self.state(view)[view.layer]["sparse"][:, :, None, :].to(p_cols.dtype)  # (B, H, 1, n)
        mass = (p_cols * s).sum(-1, keepdim=True)
        rest = 1.0 - mass
        beta = torch.where(rest > 0, self.config.beta, 1.0)
        others = (1.0 - beta * mass) / rest.clamp_min(1e-12)
        return others, p_cols * torch.addcmul(others, s, beta - others)
