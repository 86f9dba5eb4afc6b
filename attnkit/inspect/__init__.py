"""Inspection tools: what a model's attention does, measured without changing it.

``heads``: VHR's vision-aware head divergence per head (``head_divergence``, ``head_report``), saved as a
head-set file (``save_heads_json``) and drawn as a heat map (``render_heatmap``).
``calibrate``: a model's sink dimensions (``calibrate_sinks``, for VAR) and a per-head table (``calibrate_heads``,
a head set for VHR and ACT), saved as files the methods read. ``report``: a run directory as one HTML file
(``write_report``)."""

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
from .report import render_report, write_report

__all__ = [
    "HeadCalibration", "HeadReport", "SinkCalibration", "calibrate_heads", "calibrate_sinks", "head_divergence",
    "head_report", "render_heatmap", "render_report", "save_calibration_heads_json", "save_heads_json",
    "save_sinks_json", "write_report",
]
