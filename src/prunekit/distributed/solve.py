"""Layer solves spread over ranks by cost, results broadcast so every rank holds them.

SparseGPT's work on a layer with an (out x in) weight is about ``out * in**2`` for the column
sweep plus ``in**3`` for the Hessian factorisation. :func:`assign` gives each layer of a block to
a rank with the longest-processing-time greedy rule (largest first, to the least loaded rank),
which is at most 4/3 of the best possible makespan; it is deterministic, so every rank computes
the same assignment without talking. :func:`share_result` then broadcasts the owner's updated
weight, keep-mask and fallback note.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunekit.distributed.env import rank, world_size
from prunekit.distributed.reduce import broadcast_object, broadcast_tensor_
from prunekit.masks import apply_mask, get_mask, raw_parameter
from prunekit.targets import Target


def sparsegpt_cost(rows: int, cols: int) -> float:
    """Relative cost of one SparseGPT layer solve: sweep ``rows * cols**2`` + factor ``cols**3``.

    Example:
        >>> sparsegpt_cost(8, 16)
        6144.0
    """
    return float(rows) * cols * cols + float(cols) ** 3


def assign(costs: Sequence[float], world: int | None = None) -> list[int]:
    """The rank that solves each job: largest cost first, to the least loaded rank (ties: the
    lowest rank). Identical on every rank.

    Example:
        >>> assign([4.0, 3.0, 3.0, 2.0], world=2)
        [0, 1, 1, 0]
    """
    w = world_size() if world is None else world
    loads = [0.0] * w
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        best = min(range(w), key=lambda r: (loads[r], r))
        owners[i] = best
        loads[best] += costs[i]
    return owners


def sparsegpt_owners(
    targets: Sequence[Target],
    groups: Sequence[Sequence[str]] | None = None,
    world: int | None = None,
) -> dict[str, int]:
    """``{layer name: rank}`` for SparseGPT solves of ``targets`` (one block's layers).

    ``groups``: names of layers that read one input (``InputStats.input_groups``); each group
    goes to one rank, which sweeps its layers together (one factorisation, the cost of the
    stacked rows). Without it every layer is a job of its own."""
    shapes = {t.name: t.as_matrix(t.weight()).shape for t in targets}
    jobs = [list(g) for g in groups] if groups is not None else [[n] for n in shapes]
    missing = set(shapes) - {n for job in jobs for n in job}
    jobs = [[n for n in job if n in shapes] for job in jobs] + [[n] for n in shapes if n in missing]
    jobs = [job for job in jobs if job]
    costs = [sparsegpt_cost(sum(shapes[n][0] for n in job), shapes[job[0]][1]) for job in jobs]
    return {n: r for job, r in zip(jobs, assign(costs, world), strict=True) for n in job}


def share_result(target: Target, owner: int, note: str | None) -> str | None:
    """Broadcast the owner's pruned weight, keep-mask and fallback ``note`` of ``target``;
    every rank ends with the owner's values. Returns the owner's note."""
    weight = raw_parameter(target.module, target.param_name)
    with torch.no_grad():
        broadcast_tensor_(weight.data, src=owner)
    keep = get_mask(target.module, target.param_name)
    if rank() == owner:
        shape = torch.ones(weight.shape, dtype=torch.bool) if keep is None else keep
        keep = shape
    else:
        keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    keep = broadcast_tensor_(keep.clone(), src=owner)
    apply_mask(target.module, target.param_name, keep.to(weight.device))
    return broadcast_object(note, src=owner)
