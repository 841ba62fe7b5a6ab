"""Measurement at run time: memory today; latency and fast sparse inference later."""

from prunekit.runtime.memory import PeakMemory

__all__ = ["PeakMemory"]
