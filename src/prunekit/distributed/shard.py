"""Each rank's share of the calibration samples: contiguous, in order, sizes differing by at
most one (rank r gets ``[r * n // W, (r + 1) * n // W)``).

Contiguous shares matter: concatenated in rank order they are the samples in their original
order, so statistics gathered per sample and folded in rank order add up exactly as one process
adds them (:mod:`prunekit.distributed.reduce`). Nothing is padded or repeated (a
``DistributedSampler`` pads; calibration statistics must count each sample once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prunekit.distributed.env import rank, world_size


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of ``rank_``'s share of ``n`` samples (default: this process's).

    Example:
        >>> shard_bounds(10, 0, 3), shard_bounds(10, 1, 3), shard_bounds(10, 2, 3)
        ((0, 3), (3, 6), (6, 10))
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is outside a world of {w} processes")
    return r * n // w, (r + 1) * n // w


def shard_samples(samples: Sequence[Any]) -> list[Any]:
    """This process's share of ``samples`` (all of them without an active process group).

    Raises ``ValueError`` when there are fewer samples than processes (a rank would be idle and
    its statistics empty): use more calibration samples or fewer processes.

    Example:
        >>> shard_samples(list(range(5)))  # one process: everything
        [0, 1, 2, 3, 4]
    """
    w = world_size()
    if w > 1 and len(samples) < w:
        raise ValueError(
            f"{len(samples)} calibration samples for {w} processes: every process needs at "
            "least one; use more samples (n_samples=) or fewer processes"
        )
    start, stop = shard_bounds(len(samples))
    return [samples[i] for i in range(start, stop)]
