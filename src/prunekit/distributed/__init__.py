"""prunekit on ``torch.distributed``: the same script runs with one process or many (``torchrun``).

* :mod:`prunekit.distributed.env`: rank / world helpers, rank-0-only output, launching from
  ``torchrun``'s environment (the CLI), and :func:`single_process` to opt out locally.
* :mod:`prunekit.distributed.shard`: each rank's contiguous share of the calibration samples.
* :mod:`prunekit.distributed.reduce`: calibration statistics summed over ranks (Wanda's input
  norms in the single-process order, so masks are bit-identical; SparseGPT's Hessians reduced to
  the rank that solves the layer).
* :mod:`prunekit.distributed.solve`: layer solves spread over ranks by cost, results broadcast.
* :mod:`prunekit.distributed.train`: data-parallel fine-tuning (batch split, gradient averaging,
  identical masks on every rank).

Nothing here starts a process group by itself except :func:`launched` (used by the ``prunekit``
command); a library user calls ``torch.distributed.init_process_group`` as usual.
"""

from prunekit.distributed.env import (
    barrier,
    comm_device,
    is_distributed,
    is_main,
    launched,
    rank,
    single_process,
    world_size,
)
from prunekit.distributed.shard import shard_bounds, shard_samples

__all__ = [
    "barrier",
    "comm_device",
    "is_distributed",
    "is_main",
    "launched",
    "rank",
    "shard_bounds",
    "shard_samples",
    "single_process",
    "world_size",
]
