"""Calibration statistics summed over ranks, and the small collectives prunekit uses.

Each rank runs its contiguous share of the calibration samples (:mod:`.shard`) and gathers the
statistics of :class:`prunekit.calibrate.stats.InputStats`. Then:

* ``"norm"`` (Wanda's ||X_j||^2, OWL's outlier scores): every rank keeps its per-call
  sum-of-squares vectors; they are all-gathered and folded in rank order, which is the order of
  the samples in one process, so the sum has the same bits as one process computes (two
  collectives a block: the counts, then all the vectors of the block in one flat tensor).
* ``"hessian"`` (SparseGPT): the float64 sums of ``x^T x`` are summed over ranks (``reduce`` to
  the rank that solves the layer, or ``all_reduce`` when every rank needs it), then scaled by
  2 / rows and cast to float32 as one process does. The float32 products carry at most 48
  significant bits, so these float64 sums are exact unless the products span an extreme range
  of magnitudes: the Hessian, hence SparseGPT's weights and masks, then has the same bits as in
  one process (tests and ``benchmarks/distributed_oneshot.py`` check it).

``traffic()`` counts the bytes this rank contributed to collectives (for benchmarks).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from prunekit.calibrate.stats import hessian_from_sum
from prunekit.distributed.env import comm_device, is_distributed, rank, world_size

_TRAFFIC = {"bytes": 0, "calls": 0}


def traffic(reset: bool = False) -> dict[str, int]:
    """Bytes and calls this rank has put into prunekit's collectives so far (``reset`` zeroes
    the counters after reading them).

    Example:
        >>> from prunekit.distributed.reduce import traffic
        >>> sorted(traffic())
        ['bytes', 'calls']
    """
    out = dict(_TRAFFIC)
    if reset:
        _TRAFFIC.update(bytes=0, calls=0)
    return out


def _count(tensor: torch.Tensor) -> None:
    _TRAFFIC["bytes"] += tensor.numel() * tensor.element_size()
    _TRAFFIC["calls"] += 1


def all_gather_varlen(local: torch.Tensor) -> list[torch.Tensor]:
    """All ranks' 1-D tensors (lengths may differ), in rank order, on every rank."""
    device = comm_device()
    flat = local.reshape(-1).to(device)
    size = torch.tensor([flat.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=flat.dtype, device=device)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in lengths]
    _count(padded)
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, lengths, strict=True)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small Python values)."""
    if not is_distributed():
        return obj
    box = [obj]
    if rank() == src:
        _TRAFFIC["bytes"] += len(pickle.dumps(obj))
        _TRAFFIC["calls"] += 1
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def broadcast_tensor_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` (any device, bool included) with rank ``src``'s values, in place."""
    if not is_distributed():
        return tensor
    device = comm_device()
    wire = tensor.detach()
    if wire.dtype == torch.bool:
        wire = wire.to(torch.uint8)
    wire = wire.to(device).contiguous()
    if rank() == src:
        _count(wire)
    dist.broadcast(wire, src=src)
    with torch.no_grad():
        tensor.copy_(wire.to(tensor.device, tensor.dtype))
    return tensor


def reduce_input_stats(
    names: Sequence[str],
    in_features: Mapping[str, int],
    stats: Mapping[str, Mapping[str, torch.Tensor]],
    rows: Mapping[str, int],
    norm_parts: Mapping[str, Sequence[torch.Tensor]],
    need: set[str],
    owners: Mapping[str, int] | None = None,
    hessian_sums: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """The statistics of ``names`` over every rank's samples, and their total row counts.

    Args:
        names: the layers, in the same order on every rank.
        in_features: each layer's input width (a rank that never ran a layer has no tensor).
        stats, rows, norm_parts: this rank's ``InputStats.stats``, ``.rows`` and ``.norm_parts``
            (the per-call sum-of-squares vectors; needed for ``"norm"``).
        hessian_sums: this rank's ``InputStats.hessian_sums`` (float64 sums of x^T x; needed
            for ``"hessian"``).
        need: ``{"norm", "hessian"}`` or a part of it.
        owners: layer -> the rank that needs its Hessian (others get none); default: every rank
            gets every Hessian.

    Returns:
        ``(stats, rows)`` as one process would have computed them on all the samples (norms
        bit-identical; Hessians from float64 sums, which are exact for all but extreme inputs,
        so they too come out bit-identical).
    """
    names = list(names)
    device = comm_device()
    counts = torch.tensor(
        [[rows.get(n, 0) for n in names], [len(norm_parts.get(n, ())) for n in names]],
        dtype=torch.int64,
        device=device,
    )
    every = [torch.zeros_like(counts) for _ in range(world_size())]
    _count(counts)
    dist.all_gather(every, counts)
    total_rows = {n: int(sum(c[0, i] for c in every)) for i, n in enumerate(names)}
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    home = {n: _home_device(stats.get(n, {})) for n in names}

    if "norm" in need:
        local = [torch.stack(list(norm_parts[n])).reshape(-1) for n in names if norm_parts.get(n)]
        flat = torch.cat(local) if local else torch.zeros(0)
        gathered = all_gather_varlen(flat.float())
        for r, data in enumerate(gathered):
            offset = 0
            for i, n in enumerate(names):
                k, width = int(every[r][1, i]), in_features[n]
                for j in range(k):
                    part = data[offset + j * width : offset + (j + 1) * width]
                    entry = out[n]
                    entry["norm"] = entry["norm"] + part if "norm" in entry else part.clone()
                offset += k * width
        for n in names:
            if "norm" in out[n]:
                out[n]["norm"] = out[n]["norm"].to(home[n])

    if "hessian" in need:
        for n in names:
            width = in_features[n]
            local_sum = (hessian_sums or {}).get(n)
            if local_sum is None:
                summed = torch.zeros(width, width, dtype=torch.float64, device=device)
            else:
                summed = local_sum.to(device, torch.float64)
            _count(summed)
            if owners is None:
                dist.all_reduce(summed)
            else:
                dist.reduce(summed, dst=owners[n])
                if rank() != owners[n]:
                    continue
            if total_rows[n]:
                out[n]["hessian"] = hessian_from_sum(summed, total_rows[n]).to(home[n])
    return out, total_rows


def _home_device(entry: Mapping[str, torch.Tensor]) -> torch.device:
    for value in entry.values():
        return value.device
    return comm_device()


def reduce_collected(
    collected: Any, targets: Sequence[Any], owners: Mapping[str, int] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`reduce_input_stats` of an ``InputStats`` (built with ``keep_parts=True``) over
    ``targets``; raises ``ValueError`` naming the layers that ran on no rank's samples."""
    names = [t.name for t in targets]
    widths = {t.name: int(t.as_matrix(t.weight()).shape[1]) for t in targets}
    stats, rows = reduce_input_stats(
        names,
        widths,
        collected.stats,
        collected.rows,
        collected.norm_parts,
        collected.need,
        owners,
        collected.hessian_sums,
    )
    missing = [n for n in names if rows[n] == 0]
    if missing:
        raise ValueError(f"these layers never ran on the calibration data: {', '.join(missing)}")
    return stats
