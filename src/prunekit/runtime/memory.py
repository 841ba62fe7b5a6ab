"""Peak memory of a piece of work: process RSS sampled in a thread, and CUDA's own counter.

Example:
    >>> with PeakMemory() as mem:
    ...     x = bytearray(50_000_000)
    >>> mem.peak_mb > 0
    True
"""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every ``interval`` seconds.

    ``peak_mb`` is the CPU figure (RSS growth); ``cuda_peak_mb`` is the growth of CUDA's
    allocated memory (peak minus the level at entry) when CUDA is in use, else None. RSS growth
    understates in a process that already freed memory it can reuse: measure in a fresh one.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.cuda_peak_mb: float | None = None
        self._cuda_start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = current_rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
        if torch.cuda.is_available():
            self.cuda_peak_mb = (torch.cuda.max_memory_allocated() - self._cuda_start) / 2**20

    @property
    def peak_mb(self) -> float:
        """Largest RSS growth over the level at entry, in MiB."""
        return (self.peak - self.start) / 2**20
