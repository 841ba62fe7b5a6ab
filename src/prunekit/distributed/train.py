"""Data-parallel training pieces for ``finetune`` and ``GradualPruner`` (what DDP does, in a few
visible steps, with prunekit's masks kept identical on every rank).

* :func:`broadcast_module_`: rank 0's parameters and buffers (masks included) on every rank.
* :func:`split_batch`: this rank's contiguous rows of a global batch and its share of the rows,
  so every rank can iterate the same data and together compute the global batch's step.
* :func:`average_gradients_`: gradients weighted by each rank's share of the batch and summed
  (one ``all_reduce`` for all of them, the step's loss riding along), so the step equals one
  process's step on the whole batch when the loss is a mean over the batch's rows.
* :func:`sync_masks_`: rank 0's keep-masks on every rank, zeros re-applied.
* :func:`broadcast_rng_`: rank 0's torch generator states (the global one and a data loader's),
  so shuffles agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from prunekit.distributed.env import comm_device, is_distributed, rank, world_size
from prunekit.distributed.reduce import _count, all_gather_varlen, broadcast_tensor_
from prunekit.distributed.shard import shard_bounds
from prunekit.masks import MASK_SUFFIX, masked_parameters


def broadcast_module_(model: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``model`` with rank ``src``'s (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            broadcast_tensor_(tensor.data, src=src)


def sync_masks_(model: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s keep-masks of every masked parameter, then zeros re-applied."""
    if not is_distributed():
        return
    with torch.no_grad():
        for _, module, name in masked_parameters(model):
            mask = module._buffers[name + MASK_SUFFIX]
            broadcast_tensor_(mask, src=src)
            module._parameters[name].mul_(mask)


def broadcast_rng_(generators: Iterable[torch.Generator] = (), src: int = 0) -> None:
    """Rank ``src``'s state of the global torch generator and of ``generators`` on every rank."""
    if not is_distributed():
        return
    for gen in [None, *generators]:
        state = torch.get_rng_state() if gen is None else gen.get_state()
        state = broadcast_tensor_(state.clone(), src=src)
        if gen is None:
            torch.set_rng_state(state)
        else:
            gen.set_state(state)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(batch, (Mapping, tuple, list)):
        for value in values:
            size = _batch_size(value)
            if size is not None:
                return size
    return None


def _take(batch: Any, start: int, stop: int, size: int) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        if batch.shape[0] != size:
            raise ValueError(
                f"a batch holds tensors of {size} and {batch.shape[0]} rows; under "
                "torch.distributed finetune splits every tensor of a batch along its first "
                "dimension, which needs one batch size (or per-rank data: a DataLoader with a "
                "DistributedSampler)"
            )
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: _take(v, start, stop, size) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_take(v, start, stop, size) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, start, stop, size) for v in batch)
    return batch


def split_batch(batch: Any) -> tuple[Any, float]:
    """This rank's contiguous rows of ``batch`` (tensors split along dim 0, other values kept)
    and its share of the rows (1.0 without an active process group).

    Example:
        >>> split_batch((torch.arange(4), "tag"))  # one process: the whole batch
        ((tensor([0, 1, 2, 3]), 'tag'), 1.0)
    """
    if not is_distributed():
        return batch, 1.0
    size = _batch_size(batch)
    if size is None:
        raise ValueError("finetune under torch.distributed found no tensor rows in a batch")
    if size < world_size():
        raise ValueError(
            f"a batch of {size} rows cannot be split over {world_size()} processes; use "
            "batches of at least one row per process"
        )
    start, stop = shard_bounds(size)
    return _take(batch, start, stop, size), (stop - start) / size


def average_gradients_(
    params: Sequence[nn.Parameter], share: float, loss: torch.Tensor | None = None
) -> float | None:
    """Sum ``share * grad`` over ranks into every parameter's ``.grad`` (in place); returns the
    summed ``share * loss`` (the global batch's loss) when ``loss`` is given.

    A parameter that has a gradient on some rank gets one on every rank (zeros where it had
    none), so optimizers step the same parameters everywhere.
    """
    if not is_distributed():
        return None if loss is None else float(loss.detach())
    device = comm_device()
    flags = torch.tensor(
        [0.0 if p.grad is None else 1.0 for p in params], device=device, dtype=torch.float32
    )
    _count(flags)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    live = [p for p, f in zip(params, flags.tolist(), strict=True) if f > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    total = None
    for i, (dtype, group) in enumerate(by_dtype.items()):
        parts = [p.grad.detach().reshape(-1).to(device) for p in group]
        if i == 0 and loss is not None:
            parts.append(loss.detach().reshape(1).to(device, dtype))
        flat = torch.cat(parts) * share
        _count(flat)
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        if i == 0 and loss is not None:
            total = float(flat[offset])
    if total is None and loss is not None:  # no gradient at all: the loss alone
        summed = (loss.detach().float().reshape(1) * share).to(device)
        dist.all_reduce(summed)
        total = float(summed)
    return total


def check_same_batch(batch: Any) -> None:
    """Raise on every rank when the ranks hold different global batches (split mode needs
    every rank to iterate the same data in the same order)."""
    if not is_distributed():
        return
    digest = hashlib.sha256()
    _digest(batch, digest)
    mine = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
    every = all_gather_varlen(mine)
    if any(not torch.equal(every[0], other) for other in every[1:]):
        raise ValueError(
            f"rank {rank()}: the ranks iterate different batches; under torch.distributed "
            "finetune splits each batch over the ranks, so every rank must pass the same data "
            "in the same order (shuffle with a seeded generator), or pass per-rank data as a "
            "DataLoader with a DistributedSampler"
        )


def _digest(obj: Any, digest: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            digest.update(repr(key).encode())
            _digest(obj[key], digest)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _digest(item, digest)
    else:
        digest.update(repr(obj).encode())


def per_rank_data(data: Any) -> bool:
    """True when ``data`` already gives each rank its own batches (a ``DataLoader`` whose
    sampler, or batch sampler's sampler, is a ``DistributedSampler``)."""
    from torch.utils.data.distributed import DistributedSampler

    batch_sampler = getattr(data, "batch_sampler", None)
    samplers = (getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)
