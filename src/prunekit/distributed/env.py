"""Where this process stands in ``torch.distributed``: rank, world size, the device collectives
use, a rank-0 gate for output, and the launch from ``torchrun``'s environment for the CLI.

A process group counts as *active* when ``torch.distributed`` is initialised with more than one
process and the caller is not inside :func:`single_process`. Every function here works (and
returns the one-process answer) when ``torch.distributed`` is unavailable or not initialised.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_LOCAL = [0]  # depth of single_process() contexts


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when a process group of two or more processes is active (see the module doc).

    Example:
        >>> from prunekit.distributed import is_distributed
        >>> is_distributed()  # a plain Python process
        False
    """
    return _LOCAL[0] == 0 and _group_ready() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without an active process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes taking part (1 without an active process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without an active process group)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def comm_device() -> torch.device:
    """The device tensors must be on for collectives: the current CUDA device under NCCL, the
    CPU otherwise (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def single_process() -> Iterator[None]:
    """Inside this block prunekit ignores the process group: each rank works alone (no shards,
    no collectives), e.g. to compute a per-rank reference or to evaluate on rank 0 only.

    Example:
        >>> from prunekit.distributed import single_process, world_size
        >>> with single_process():
        ...     world_size()
        1
    """
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def _torchrun_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _mirror(out: str | os.PathLike, rank_: int) -> tuple[Path, Path]:
    """A private scratch folder holding a copy of ``out`` as it is now (if it exists)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"prunekit-rank{rank_}-"))
    real = Path(out)
    mirror = scratch / (real.name or "out")
    if real.is_dir():
        shutil.copytree(real, mirror, symlinks=True)
    elif real.exists():
        shutil.copy2(real, mirror)
    return scratch, mirror


@contextmanager
def launched(args: Any = None, backend: str | None = None) -> Iterator[bool]:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``), and leave it on exit: what
    the ``prunekit`` command does, so that every command runs unchanged under ``torchrun``.

    Backend: ``nccl`` when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else ``gloo``.
    On ranks other than 0 the standard output is silenced, and an ``args.out`` (the command's
    ``--out``) is replaced by a private temporary copy of it, deleted on exit: those ranks run
    the same code (and resume from the same checkpoints) while only rank 0 writes the real
    output. Yields True when a group was joined here; does nothing (yields False) when started
    without ``torchrun`` or when a group is already initialised.

    Example:
        >>> from prunekit.distributed import launched
        >>> with launched() as joined:  # python script.py: no torchrun environment
        ...     joined
        False
    """
    if _torchrun_world() <= 1 or not dist.is_available() or dist.is_initialized():
        yield False
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    me = dist.get_rank()
    saved, devnull, scratch = sys.stdout, None, None
    try:
        out = getattr(args, "out", None)
        if me != 0 and isinstance(out, (str, os.PathLike)):
            scratch, mirror = _mirror(out, me)
            args.out = mirror if isinstance(out, Path) else str(mirror)
        barrier()  # every copy is taken before rank 0 touches --out
        if me != 0:
            devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
            sys.stdout = devnull
        yield True
        # a rank that tears the group down while another still works (rank 0 writing --out)
        # can abort in gloo's teardown, and torchrun then kills rank 0 mid-write: wait for all
        barrier()
    finally:
        if devnull is not None:
            sys.stdout = saved
            devnull.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        dist.destroy_process_group()
