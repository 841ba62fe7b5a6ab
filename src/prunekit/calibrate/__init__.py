"""Calibrated one-shot pruning: calibration data, statistics hooks, the block-by-block runner,
the SparseGPT solver and the ``oneshot`` verb that ties them together."""

from prunekit.calibrate.data import CalibrationSet, calibration, pydoc_text
from prunekit.calibrate.stats import InputStats, collect_input_stats

__all__ = ["CalibrationSet", "InputStats", "calibration", "collect_input_stats", "pydoc_text"]
