"""Calibration data, statistics hooks and the layer-by-layer (sequential) runner."""

from prunekit.calibrate.data import CalibrationSet, calibration, pydoc_text
from prunekit.calibrate.stats import InputStats, collect_input_stats

__all__ = ["CalibrationSet", "InputStats", "calibration", "collect_input_stats", "pydoc_text"]
