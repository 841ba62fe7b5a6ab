"""No silent copies of large models: the verbs that leave the caller's model untouched
(``inplace=False``) copy it through :func:`copy_model`, which refuses, with a message that says
what to do, when the copy would not fit in the memory this process can still use.

The memory available is the smaller of the system's ``MemAvailable`` (``/proc/meminfo``) and
the room left under a cgroup limit (``memory.max`` minus ``memory.current``, cgroup v2), so a
container's cap counts. A copy may take at most :data:`COPY_FRACTION` of it. Where neither can
be read (not Linux) nothing is refused. ``PRUNEKIT_ALLOW_COPY=1`` copies anyway.

Verbs that copy whatever ``inplace`` says (``compress`` keeps the dense model as its reference
beside the working one and starts every search trial from a copy; ``prune_structured`` cuts
the units out of a copy and verifies it before touching the model) pass the ``reason``, and the
message then says why the copy is needed instead of advising ``inplace=True``.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(4, 4)
    >>> copy_model(net, "prune") is not net
    True
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

COPY_FRACTION = 0.8
ALLOW_ENV = "PRUNEKIT_ALLOW_COPY"
VERIFY_COPY = (
    "cuts the units out of a copy of the model and verifies it before changing yours "
    "(inplace=True too)"
)
"""The reason ``prune_structured`` copies whatever ``inplace`` says."""


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors once, meta tensors none)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_meta:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory this process can still take (None where it cannot be read)."""
    known = [b for b in (_meminfo_available(), _cgroup_room()) if b is not None]
    return min(known) if known else None


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_copy(model: nn.Module, verb: str, reason: str | None = None) -> None:
    """Raise ``MemoryError`` when a copy of ``model`` would not fit in the memory left (see the
    module doc); :func:`copy_model` calls it before copying.

    ``reason`` says why ``verb`` copies when it is not ``inplace=False`` (e.g. a reference kept
    beside the working model); without it the message advises ``inplace=True``.

    Example:
        >>> from torch import nn
        >>> check_copy(nn.Linear(4, 4), "prune")  # a few bytes: fits
    """
    if os.environ.get(ALLOW_ENV) == "1":
        return
    need, room = model_bytes(model), available_bytes()
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    if room is None or not on_cpu or need <= COPY_FRACTION * room:
        return
    if reason is None:
        raise MemoryError(
            f"{verb}(inplace=False) would copy the model ({_gb(need)}) to leave yours "
            f"untouched, but only {_gb(room)} of memory is available; pass inplace=True to "
            f"change the model itself (save it first with prunekit.save if you need the "
            f"original), free memory, or set {ALLOW_ENV}=1 to copy anyway"
        )
    raise MemoryError(
        f"{verb} {reason}: a copy of the model ({_gb(need)}), but only {_gb(room)} of memory "
        f"is available; free memory, use a machine with at least {_gb(int(need / COPY_FRACTION))} "
        f"free, or set {ALLOW_ENV}=1 to copy anyway"
    )


def copy_model(model: nn.Module, verb: str, reason: str | None = None) -> nn.Module:
    """A deep copy of ``model`` for ``verb(..., inplace=False)`` (or, with ``reason``, for a copy
    ``verb`` needs whatever ``inplace`` says), or a ``MemoryError`` saying what to do when the
    copy would not fit (:func:`check_copy`)."""
    check_copy(model, verb, reason)
    return copy.deepcopy(model)
