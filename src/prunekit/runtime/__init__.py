"""Run time: sparse kernels (``accelerate``), latency and throughput (``bench``), peak memory."""

from prunekit.runtime.accelerate import (
    AccelerateReport,
    AccelerateRow,
    SparseConv2d,
    SparseLinear,
    accelerate,
    deaccelerate,
)
from prunekit.runtime.accelerated import AcceleratedModelError
from prunekit.runtime.bench import BenchReport, BenchRow, bench
from prunekit.runtime.memory import PeakMemory

__all__ = [
    "AccelerateReport",
    "AcceleratedModelError",
    "AccelerateRow",
    "BenchReport",
    "BenchRow",
    "PeakMemory",
    "SparseConv2d",
    "SparseLinear",
    "accelerate",
    "bench",
    "deaccelerate",
]
