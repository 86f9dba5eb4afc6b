"""Inspection tools: what a model's attention does, measured without changing it.

``heads``: VHR's vision-aware head divergence per head (``head_divergence``, ``head_report``), saved as a
head-set file (``save_heads_json``) and drawn as a heat map (``render_heatmap``).
``maps``: the answer's attention over the image per layer, with VAR's visual sinks and pruned tokens
(``attention_map`` -> ``AttentionMaps``), and its shares on image / text / sink tokens
(``attention_shares`` -> ``AttentionShares``), under methods or not; ``render``: their PNGs
(``render_maps``, ``render_shares``)."""

from __future__ import annotations

from .heads import HeadReport, head_divergence, head_report, render_heatmap, save_heads_json
from .maps import AttentionMaps, AttentionShares, attention_map, attention_shares
from .render import render_maps, render_shares

__all__ = ["AttentionMaps", "AttentionShares", "HeadReport", "attention_map", "attention_shares", "head_divergence",
           "head_report", "render_heatmap", "render_maps", "render_shares", "save_heads_json"]
