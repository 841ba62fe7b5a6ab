"""Checks a saved model's files pass before anything is loaded from them.

Every reader of prunekit's folders (:func:`prunekit.load`, :func:`prunekit.load_state`,
:func:`prunekit.from_pretrained`) goes through these: a JSON file is parsed into a dict or
refused, a safetensors header is checked whole (known dtypes, shapes of non-negative integers,
data offsets that tile the data area exactly and match ``dtype size x numel`` for every tensor,
no tensor larger than this machine's memory) before a single tensor is allocated, and the
checksums prunekit recorded at save time are compared. Every problem is a
:class:`SavedModelError` (a ``ValueError``) that names the file, the field and what was expected.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"w": torch.zeros(2, 3)}, path)
    >>> read_header(path)["w"]
    TensorInfo(dtype='float32', shape=(2, 3), nbytes=24)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# safetensors dtype code -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself applies
INTEGRITY_KEY = "integrity"


class SavedModelError(ValueError):
    """A saved model file that cannot be loaded as it is: the message names the file, the field
    and what was expected. Raised before the target model is touched."""


class TensorInfo(NamedTuple):
    """One tensor of a safetensors header: torch dtype name, shape and byte length."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def fail(source: Any, field: str, problem: str) -> SavedModelError:
    """The error for ``field`` of the file ``source``: ``raise fail(path, "masks", "...")``."""
    return SavedModelError(f"{source}: {field}: {problem}")


def memory_bytes() -> int:
    """This machine's physical memory in bytes (a bound no declared tensor may pass)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_size(source: Any, field: str, nbytes: int) -> None:
    """Refuse a declared tensor larger than this machine's memory, before allocating it."""
    limit = memory_bytes()
    if nbytes > limit:
        raise fail(
            source,
            field,
            f"declares {human_bytes(nbytes)}, more than this machine's memory "
            f"({human_bytes(limit)}); the file is corrupt or not meant for this machine",
        )


def is_shape(value: Any) -> bool:
    """A list of non-negative integers (bools excluded)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def numel(shape: list[int] | tuple[int, ...]) -> int:
    return math.prod(shape) if len(shape) else 1


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding an object, or :class:`SavedModelError` saying why not."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise fail(path, "the whole file", f"is not UTF-8 text ({exc.reason})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(
            path, f"line {exc.lineno} column {exc.colno}", f"is not valid JSON ({exc.msg})"
        ) from exc
    except RecursionError as exc:
        raise fail(path, "the whole file", "is nested too deeply to be a prunekit record") from exc
    if not isinstance(data, dict):
        raise fail(path, "the whole file", f"expected a JSON object, got {type(data).__name__}")
    return data


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Read and check the header of a safetensors file without reading its tensors.

    Checked: the header length fits the file, the header is a JSON object, every entry has a
    known dtype, a shape of non-negative integers and ``data_offsets`` whose length is exactly
    ``dtype size x numel``, the tensors tile the data area with no gap, overlap or trailing
    bytes, and no tensor is larger than this machine's memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the saved model's weights are missing)")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail(path, "header", f"the file has {size} bytes, too short for safetensors")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise fail(
                path,
                "header length",
                f"declares a {length:,}-byte header in a {size:,}-byte file (truncated or corrupt)",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise fail(path, "header", f"is not a JSON object ({exc})") from exc
    if not isinstance(header, dict):
        raise fail(path, "header", f"expected a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise fail(path, "header __metadata__", "expected an object of strings")
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        field = f"header entry {name!r}"
        if not isinstance(entry, dict):
            raise fail(path, field, f"expected an object, got {type(entry).__name__}")
        code = entry.get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise fail(
                path, f"{field} dtype", f"{code!r} is not one of {', '.join(SAFETENSORS_DTYPES)}"
            )
        shape = entry.get("shape")
        if not is_shape(shape):
            raise fail(path, f"{field} shape", f"expected a list of integers >= 0, got {shape!r}")
        offsets = entry.get("data_offsets")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and is_shape(offsets)
            and offsets[0] <= offsets[1]
        ):
            raise fail(
                path,
                f"{field} data_offsets",
                f"expected [begin, end], 0 <= begin <= end, got {offsets!r}",
            )
        dtype, itemsize = SAFETENSORS_DTYPES[code]
        nbytes = numel(shape) * itemsize
        if offsets[1] - offsets[0] != nbytes:
            check_size(path, f"{field} shape", nbytes)
            raise fail(
                path,
                f"{field}",
                f"dtype {code} x shape {shape} is {nbytes:,} bytes but data_offsets {offsets} "
                f"hold {offsets[1] - offsets[0]:,}",
            )
        check_size(path, f"{field} shape", nbytes)
        infos[name] = TensorInfo(dtype, tuple(shape), nbytes)
        spans.append((offsets[0], offsets[1], name))
    data = size - 8 - length
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise fail(path, f"header entry {name!r} data_offsets", f"{what} at byte {position:,}")
        position = end
    if position != data:
        raise fail(
            path,
            "data",
            f"the header describes {position:,} bytes of tensors, the file holds {data:,} "
            "(truncated or with trailing bytes)",
        )
    return infos


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, TensorInfo]]:
    """The tensors of a safetensors file, its header checked first (:func:`read_header`)."""
    infos = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:  # pragma: no cover
        raise fail(path, "tensors", f"cannot be read ({exc})") from exc
    return tensors, infos


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_fields(meta: dict[str, Any], fields: list[str]) -> str:
    """Checksum of ``fields`` of a JSON record (canonical JSON; a missing field counts)."""
    chosen = {k: meta.get(k, "<missing>") for k in fields}
    text = json.dumps(chosen, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def integrity_record(
    folder: Path, files: list[str], meta: dict[str, Any], fields: list[str]
) -> dict:
    """The ``"integrity"`` entry of a record: sha256 of ``files`` (in ``folder``) and of the
    record's ``fields`` (those that decide what loads), checked by :func:`check_integrity`."""
    return {
        "algorithm": "sha256",
        "files": {name: sha256_file(folder / name) for name in files},
        "fields": list(fields),
        "fields_sha256": sha256_fields(meta, fields),
    }


def check_integrity(folder: Path, meta: dict[str, Any], meta_path: Path) -> None:
    """Compare the checksums recorded at save time (if any) with the folder as it is now."""
    record = meta.get(INTEGRITY_KEY)
    if record is None:
        return  # written by an older prunekit: the other checks still apply
    field = INTEGRITY_KEY
    if not (
        isinstance(record, dict)
        and record.get("algorithm") == "sha256"
        and isinstance(record.get("files"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in record["files"].items())
        and isinstance(record.get("fields"), list)
        and all(isinstance(k, str) for k in record["fields"])
        and isinstance(record.get("fields_sha256"), str)
    ):
        raise fail(
            meta_path,
            field,
            "expected {'algorithm': 'sha256', 'files': {name: hex}, 'fields': [names], "
            f"'fields_sha256': hex}}, got {json.dumps(record)[:200]}",
        )
    if sha256_fields(meta, record["fields"]) != record["fields_sha256"]:
        raise fail(
            meta_path,
            f"{field}.fields_sha256",
            f"the fields {record['fields']} were changed after saving (checksum mismatch); "
            "save the model again",
        )
    for name, digest in record["files"].items():
        file = folder / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise fail(meta_path, f"{field}.files", f"{name!r} is not a file name in the folder")
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: missing (listed in {meta_path} {field}.files); the save is incomplete"
            )
        if sha256_file(file) != digest:
            raise fail(
                file,
                "contents",
                f"changed or damaged after saving (sha256 differs from {meta_path} "
                f"{field}.files); save the model again",
            )
