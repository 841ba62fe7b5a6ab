"""Measurement at run time: latency and throughput (``bench``) and peak memory."""

from prunekit.runtime.bench import BenchReport, BenchRow, bench
from prunekit.runtime.memory import PeakMemory

__all__ = ["BenchReport", "BenchRow", "PeakMemory", "bench"]
