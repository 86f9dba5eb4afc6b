"""Inspection tools: what a model's attention does, measured without changing it.

``heads``: VHR's vision-aware head divergence per head (``head_divergence``, ``head_report``), saved as a
head-set file (``save_heads_json``) and drawn as a heat map (``render_heatmap``).
``calibrate``: a model's sink dimensions (``calibrate_sinks``, for VAR) and a per-head table (``calibrate_heads``,
a head set for VHR and ACT), saved as files the methods read. ``report``: a run directory as one HTML file
(``write_report``).
``maps``: the answer's attention over the image per layer, with VAR's visual sinks and pruned tokens
(``attention_map`` -> ``AttentionMaps``), and its shares on image / text / sink tokens
(``attention_shares`` -> ``AttentionShares``), under methods or not; ``render``: their PNGs
(``render_maps``, ``render_shares``)."""

from __future__ import annotations

from .calibrate import (
    HeadCalibration,
    SinkCalibration,
    calibrate_heads,
    calibrate_sinks,
    save_calibration_heads_json,
    save_sinks_json,
)
from .heads import HeadReport, head_divergence, head_report, render_heatmap, save_heads_json
from .maps import AttentionMaps, AttentionShares, attention_map, attention_shares
from .render import render_maps, render_shares
from .report import render_report, write_report

__all__ = [
    "AttentionMaps", "AttentionShares", "HeadCalibration", "HeadReport", "SinkCalibration", "attention_map",
    "attention_shares", "calibrate_heads", "calibrate_sinks", "head_divergence", "head_report", "render_heatmap",
    "render_maps", "render_report", "render_shares", "save_calibration_heads_json", "save_heads_json",
    "save_sinks_json", "write_report",
]
