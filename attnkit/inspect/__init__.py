"""Inspection tools: what a model's attention does, measured without changing it.

``heads``: VHR's vision-aware head divergence per head (``head_divergence``, ``head_report``), saved as a
head-set file (``save_heads_json``) and drawn as a heat map (``render_heatmap``)."""

from __future__ import annotations

from .heads import HeadReport, head_divergence, head_report, render_heatmap, save_heads_json

__all__ = ["HeadReport", "head_divergence", "head_report", "render_heatmap", "save_heads_json"]
