"""Independent measurements spread over ranks: each runs on one rank, every rank gets every
value (the allocation passes' damage measurements).

A measurement (a job) returns a float. :func:`run_shared` gives the jobs to the ranks in turn
(round robin: they cost about the same), runs this rank's share, and all-gathers the values as
float64, so every rank ends with the same list, each value computed by exactly one rank in the
same way one process computes it: the allocation chosen from them is the same on every rank
and equal to one process's. Jobs that every rank must run for their side effects (e.g. a run
whose outputs are the next step's reference) are named in ``everyone``; their value is still
taken from one rank (rank 0), so the ranks cannot disagree even where their arithmetic might.

Without an active process group the jobs simply run in order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from prunekit.distributed.env import is_distributed, rank, world_size
from prunekit.distributed.reduce import all_gather_varlen


def job_owners(n: int, everyone: Collection[int] = (), world: int | None = None) -> list[int]:
    """The rank whose value counts for each of ``n`` jobs: round robin over the jobs not in
    ``everyone``, rank 0 for those.

    Example:
        >>> job_owners(5, everyone={2}, world=2)
        [0, 1, 0, 0, 1]
    """
    w = world_size() if world is None else world
    owners, turn = [], 0
    for j in range(n):
        if j in everyone:
            owners.append(0)
        else:
            owners.append(turn % w)
            turn += 1
    return owners


def run_shared(jobs: Sequence[Callable[[], float]], everyone: Collection[int] = ()) -> list[float]:
    """Every job's value on every rank; this rank runs its own jobs and those in ``everyone``
    (in the order given). One ``all_gather`` of ``len(jobs)`` float64 values per call.

    Example:
        >>> run_shared([lambda: 1.0, lambda: 2.5])  # one process: both run here
        [1.0, 2.5]
    """
    if not is_distributed():
        return [float(job()) for job in jobs]
    everyone = set(everyone)
    owners = job_owners(len(jobs), everyone)
    me = rank()
    mine = {}
    for j, job in enumerate(jobs):
        if owners[j] == me or j in everyone:
            value = float(job())
            if owners[j] == me:
                mine[j] = value
    return gather_owned(mine, owners)


def gather_owned(mine: dict[int, float], owners: Sequence[int]) -> list[float]:
    """All values on every rank, value ``j`` taken from rank ``owners[j]`` (whose ``mine`` holds
    it): one ``all_gather`` of ``len(owners)`` float64 values.

    Example:
        >>> gather_owned({0: 1.5, 1: 2.0}, [0, 0])  # one process: its own values
        [1.5, 2.0]
    """
    if not is_distributed() or not owners:
        return [float(mine[j]) for j in range(len(owners))]
    local = torch.zeros(len(owners), dtype=torch.float64)
    for j, value in mine.items():
        local[j] = value
    every = [part.cpu() for part in all_gather_varlen(local)]
    return [float(every[owners[j]][j]) for j in range(len(owners))]
