"""Resumable training checkpoints: nested state (tensors, numbers, strings) as safetensors + JSON.

A checkpoint folder holds one sub-folder per saved point, ``epoch-000003/`` with
``state.safetensors`` (every tensor of the state) and ``state.json`` (everything else, with
``{"$tensor": key}`` where a tensor was, the SHA-256 of the tensor file and a format tag). A point
is written to a temporary folder beside it, fsynced, and renamed into place, then older points
and stale temporaries are removed: after a crash the folder holds whole points only, and the
newest one is the state to resume from. Nothing is pickled.

Example:
    >>> import tempfile, torch
    >>> from prunekit.train.checkpoint import latest_point, write_point
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_point(folder, 1, {"step": 7, "w": torch.ones(2), "betas": (0.9, 0.99)})
    >>> epoch, state = latest_point(folder)
    >>> epoch, state["step"], state["w"].tolist(), state["betas"]
    (1, 7, [1.0, 1.0], (0.9, 0.99))
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prunekit.compress.durable import fsync_path, sha256_file

FORMAT = "prunekit-train-checkpoint"
VERSION = 1
TENSORS = "state.safetensors"
META = "state.json"
POINT = re.compile(r"^epoch-(\d{6})$")


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """``obj`` as JSON-ready data; its tensors moved into ``tensors`` (cloned, on the CPU)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"$tensor": key}
    if isinstance(obj, tuple):
        return {"$tuple": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {
            "$items": [
                [flatten(k, tensors, prefix), flatten(v, tensors, f"{prefix}.{k}")]
                for k, v in obj.items()
            ]
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot checkpoint a {type(obj).__name__} at {prefix!r}: accepted are tensors, "
        "numbers, strings, None, and lists / tuples / dicts of them"
    )


def unflatten(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    if isinstance(data, dict):
        if set(data) == {"$tensor"}:
            key = data["$tensor"]
            if key not in tensors:
                raise ValueError(f"checkpoint names tensor {key!r}, which its tensor file lacks")
            return tensors[key]
        if set(data) == {"$tuple"}:
            return tuple(unflatten(v, tensors) for v in data["$tuple"])
        if set(data) == {"$items"}:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in data["$items"]}
        return {k: unflatten(v, tensors) for k, v in data.items()}
    return data


def write_point(folder: str | os.PathLike, epoch: int, state: Mapping[str, Any]) -> Path:
    """Write ``state`` as point ``epoch`` of checkpoint ``folder`` (atomically); drop older ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    data = flatten(dict(state), tensors)
    name = f"epoch-{epoch:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder))
    try:
        save_file(tensors, str(tmp / TENSORS))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "epoch": epoch,
            "sha256": sha256_file(tmp / TENSORS),
            "state": data,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, allow_nan=True) + "\n")
        for path in (tmp / TENSORS, tmp / META, tmp):
            fsync_path(path)
        final = folder / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for other in folder.iterdir():
        match = POINT.match(other.name)
        stale = other.name.startswith(".epoch-") and ".tmp-" in other.name
        if (match and int(match.group(1)) < epoch) or stale:
            shutil.rmtree(other, ignore_errors=True)
    return final


def latest_point(folder: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
    """``(epoch, state)`` of the newest point in ``folder``; None when it holds none.

    Raises ValueError naming the file when the point is not a checkpoint of this format or its
    tensor file does not match the recorded checksum.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    points = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := POINT.match(p.name)) and p.is_dir()
    )
    if not points:
        return None
    epoch, path = points[-1]
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path / META}: not a readable checkpoint ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path / META}: expected format {FORMAT!r} version {VERSION}, got "
            f"{meta.get('format') if isinstance(meta, dict) else meta!r} "
            f"version {meta.get('version') if isinstance(meta, dict) else None!r}"
        )
    if meta.get("epoch") != epoch:
        raise ValueError(f"{path / META}: records epoch {meta.get('epoch')!r}, folder says {epoch}")
    if sha256_file(path / TENSORS) != meta.get("sha256"):
        raise ValueError(f"{path / TENSORS}: checksum differs from {META} (a damaged file)")
    tensors = load_file(str(path / TENSORS))
    return epoch, unflatten(meta["state"], tensors)
