"""Measurements that steer a run, taken once: rank 0 times, every rank gets its figures.

Timings differ from process to process. Where a latency decides something (the widths of a
``target_latency`` search, a recipe goal's verdict, which search trial is next), ranks that
each timed for themselves would take different decisions and fall out of step: different
model shapes, or collectives that no longer match, which hang. :func:`main_decides` runs the
measurement on rank 0 alone (the other ranks wait, so they do not compete for the CPU while it
times) and hands its result to all. Nested calls inside that region run as they are, on rank 0
only. An error on rank 0 is raised on every rank, not left for the others to wait on.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch.distributed as dist

from prunekit.distributed.env import comm_device, is_distributed, is_main

T = TypeVar("T")
P = ParamSpec("P")

_INSIDE = contextvars.ContextVar("prunekit_main_decides", default=False)


class MeasurementFailed(RuntimeError):
    """Rank 0's measurement raised; on the other ranks, this carries its message."""


def main_decides(measure: Callable[[], T]) -> T:
    """``measure()`` run on rank 0 only, its result on every rank (just ``measure()`` without a
    process group, or inside another such call).

    Example:
        >>> main_decides(lambda: 3)  # one process: simply called
        3
    """
    if not is_distributed() or _INSIDE.get():
        return measure()
    token = _INSIDE.set(True)
    box: list[Any] = [None]
    try:
        if is_main():
            try:
                box[0] = ("ok", measure())
            except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised
                box[0] = ("error", f"{type(exc).__name__}: {exc}")
                failure = exc
    finally:
        _INSIDE.reset(token)
    dist.broadcast_object_list(box, src=0, device=comm_device())
    status, value = box[0]
    if status == "error":
        if is_main():
            raise failure
        raise MeasurementFailed(f"rank 0's measurement failed: {value}")
    return value


def decided_by_main(function: Callable[P, T]) -> Callable[P, T]:
    """Decorator: every call of ``function`` goes through :func:`main_decides`.

    Example:
        >>> @decided_by_main
        ... def timed() -> float:
        ...     return 1.5
        >>> timed()
        1.5
    """

    @functools.wraps(function)
    def on_main(*args: P.args, **kwargs: P.kwargs) -> T:
        return main_decides(lambda: function(*args, **kwargs))

    return on_main
