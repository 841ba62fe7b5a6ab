"""Compressed storage of one weight: its non-zero values plus the smallest index that finds them.

A tensor is viewed as a matrix (rows = first dimension, row-major; Hugging Face Conv1D as stored).
Its non-zero entries are stored, bit for bit, in row-major order, in the tensor's dtype, or as integer codes (int8; int4 packed two per
byte) with per-channel / per-group scales and zero points when the weight is quantized. The
positions are stored with whichever index is smallest for that tensor:

* ``bitmask``: one bit per entry (``np.packbits``);
* ``rle``: the run of zeros before each value (uint8, uint16 or uint32, the smallest that fits);
* ``csr``: row pointers (rows + 1) and column indices, each in the smallest unsigned dtype;
* ``dense``: no index, every value stored (chosen for dense tensors such as embeddings).

Every array is a tensor in the safetensors file (index arrays as raw bytes, their dtype in the
JSON metadata): no pickle. :func:`encode` / :func:`decode` are exact inverses, except that every
zero found through an index comes back as ``+0.0`` (``dense`` keeps every bit): a masked weight is stored by prunekit as ``raw * 0``, which is
``-0.0`` for a negative raw value, and keeping those signs would cost an index entry per zero.
``torch.equal`` and every arithmetic result are unaffected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prunekit.compress.quantize import QuantizedTensor, dequantize_codes
from prunekit.compress.validate import check_size, is_shape, numel

INDEX_KINDS = ("bitmask", "rle", "csr", "dense")
INDEX_ARRAYS = {"bitmask": ("bits",), "rle": ("gaps",), "csr": ("rowptr", "col"), "dense": ()}
INDEX_DTYPES = ("uint8", "uint16", "uint32", "uint64")
VALUE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _check_index(index: str) -> None:
    if index != "auto" and index not in INDEX_KINDS:
        raise ValueError(
            f"index={index!r} is not accepted: use 'auto' (smallest) or one of "
            f"{', '.join(INDEX_KINDS)}"
        )


def _uint_for(maximum: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if maximum <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bool tensor, True where the entry is stored (not +0.0 or -0.0; NaN is stored)."""
    return tensor != 0


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(np.prod(shape[1:]))


def index_bytes(present: np.ndarray, rows: int, cols: int) -> dict[str, int]:
    """Size in bytes of each index kind for this presence pattern (values not counted)."""
    n = present.size
    pos = np.flatnonzero(present)
    nnz = pos.size
    gaps_max = int(np.diff(pos, prepend=-1).max() - 1) if nnz else 0
    return {
        "bitmask": -(-n // 8),
        "rle": nnz * _uint_for(gaps_max).itemsize,
        "csr": (rows + 1) * _uint_for(nnz).itemsize + nnz * _uint_for(max(cols - 1, 0)).itemsize,
        "dense": 0,
    }


def _encode_index(present: np.ndarray, rows: int, cols: int, kind: str) -> dict[str, np.ndarray]:
    if kind == "bitmask":
        return {"bits": np.packbits(present)}
    pos = np.flatnonzero(present)
    if kind == "rle":
        gaps = np.diff(pos, prepend=-1) - 1
        return {"gaps": gaps.astype(_uint_for(int(gaps.max()) if gaps.size else 0))}
    if kind == "csr":
        counts = present.reshape(rows, cols).sum(1)
        rowptr = np.concatenate([[0], np.cumsum(counts)])
        return {
            "rowptr": rowptr.astype(_uint_for(pos.size)),
            "col": (pos % cols).astype(_uint_for(max(cols - 1, 0))),
        }
    return {}


def _decode_index(arrays: dict[str, np.ndarray], kind: str, rows: int, cols: int) -> np.ndarray:
    n = rows * cols
    if kind == "bitmask":
        return np.unpackbits(arrays["bits"], count=n).astype(bool)
    present = np.zeros(n, dtype=bool)
    if kind == "rle":
        pos = np.cumsum(arrays["gaps"].astype(np.int64) + 1) - 1
    elif kind == "csr":
        counts = np.diff(arrays["rowptr"].astype(np.int64))
        pos = np.repeat(np.arange(rows, dtype=np.int64) * cols, counts) + arrays["col"]
    else:
        present[:] = True
        return present
    present[pos] = True
    return present


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], 1).reshape(-1)[:count].to(torch.int8)


def encode(
    tensor: torch.Tensor, index: str = "auto", quant: QuantizedTensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode one dense tensor (or its quantized codes); returns (arrays, JSON-able metadata).

    ``index`` forces one index kind (``bitmask``, ``rle``, ``csr``, ``dense``); ``"auto"``
    picks the smallest total (values + index).
    """
    _check_index(index)
    tensor = tensor.detach().cpu().contiguous()
    shape = tuple(tensor.shape)
    meta: dict[str, Any] = {"shape": list(shape), "dtype": str(tensor.dtype).replace("torch.", "")}
    if quant is not None:
        codes = quant.codes
        rows, cols = codes.shape
        zero_full = _expand_groups(quant.zero_point, quant.group, cols)
        present_t = (codes != zero_full).reshape(-1)
        flat_values = codes.reshape(-1)
        value_bits = quant.bits
        meta["quant"] = {
            "bits": quant.bits,
            "group": quant.group,
            "transposed": quant.transposed,
            "codes_shape": [rows, cols],
        }
    else:
        rows, cols = _matrix_shape(shape)
        flat_values = tensor.reshape(-1)
        present_t = nonzero_bits(flat_values)
        value_bits = 8 * tensor.element_size()
    present = present_t.numpy()
    nnz = int(present.sum())
    sizes = index_bytes(present, rows, cols)
    totals = {
        kind: size + -(-(present.size if kind == "dense" else nnz) * value_bits // 8)
        for kind, size in sizes.items()
    }
    kind = min(totals, key=totals.get) if index == "auto" else index
    values = flat_values if kind == "dense" else flat_values[present_t]
    arrays: dict[str, torch.Tensor] = {}
    if quant is not None:
        arrays["values"] = _pack_int4(values) if quant.bits == 4 else values.to(torch.int8)
        arrays["scale"] = quant.scale.float().contiguous()
        if bool(quant.zero_point.any()):  # symmetric codes need no zero points
            arrays["zero_point"] = quant.zero_point.to(torch.int8).contiguous()
    else:
        arrays["values"] = values.contiguous()
    index_dtypes = {}
    for name, array in _encode_index(present, rows, cols, kind).items():
        index_dtypes[name] = array.dtype.name
        arrays[name] = torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())
    meta.update({"index": kind, "index_dtypes": index_dtypes, "nnz": nnz, "count": len(values)})
    return arrays, meta


def _expand_groups(per_group: torch.Tensor, group: int | None, cols: int) -> torch.Tensor:
    if group is None:
        return per_group.expand(-1, cols)
    return per_group.repeat_interleave(group, dim=1)[:, :cols]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_entry(arrays: dict[str, torch.Tensor], meta: Any) -> None:
    """Check one encoded tensor whole (its JSON entry and its arrays) before decoding it.

    Raises ``ValueError`` naming the field and what was expected: unknown index kinds or
    dtypes, arrays of the wrong dtype or length, index positions outside the tensor, counts
    that do not add up, or a declared tensor larger than this machine's memory.

    Example:
        >>> arrays, meta = encode(torch.tensor([[0.0, 2.0], [3.0, 0.0]]), "csr")
        >>> check_entry(arrays, meta)  # fine
        >>> check_entry(arrays, {**meta, "index": "zstd"})
        Traceback (most recent call last):
        ...
        ValueError: index: 'zstd' is not one of bitmask, rle, csr, dense
    """

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"{field}: {problem}")

    if not isinstance(meta, dict):
        raise bad("entry", f"expected an object, got {type(meta).__name__}")
    shape = meta.get("shape")
    if not is_shape(shape):
        raise bad("shape", f"expected a list of integers >= 0, got {shape!r}")
    dtype = meta.get("dtype")
    if dtype not in VALUE_DTYPES:
        raise bad("dtype", f"{dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    kind = meta.get("index")
    if kind not in INDEX_KINDS:
        raise bad("index", f"{kind!r} is not one of {', '.join(INDEX_KINDS)}")
    for key in ("nnz", "count"):
        if not _is_count(meta.get(key)):
            raise bad(key, f"expected an integer >= 0, got {meta.get(key)!r}")
    index_dtypes = meta.get("index_dtypes")
    if not (
        isinstance(index_dtypes, dict)
        and sorted(index_dtypes) == sorted(INDEX_ARRAYS[kind])
        and all(v in INDEX_DTYPES for v in index_dtypes.values())
    ):
        raise bad(
            "index_dtypes",
            f"index {kind!r} needs {{{', '.join(INDEX_ARRAYS[kind])}}} each one of "
            f"{', '.join(INDEX_DTYPES)}, got {index_dtypes!r}",
        )
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    check_size("", "shape", numel(shape) * itemsize)
    quant = meta.get("quant")
    allowed = {"values", *INDEX_ARRAYS[kind]}
    if quant is not None:
        if not (
            isinstance(quant, dict)
            and quant.get("bits") in (4, 8)
            and not isinstance(quant.get("bits"), bool)
            and (quant.get("group") is None or (_is_count(quant["group"]) and quant["group"] > 0))
            and isinstance(quant.get("transposed"), bool)
            and is_shape(quant.get("codes_shape"))
            and len(quant["codes_shape"]) == 2
        ):
            raise bad(
                "quant",
                "expected {'bits': 4 or 8, 'group': null or a positive integer, 'transposed': "
                f"true/false, 'codes_shape': [rows, cols]}}, got {quant!r}",
            )
        rows, cols = quant["codes_shape"]
        if quant["transposed"]:
            expected = (shape[1], shape[0]) if len(shape) == 2 else None
        else:
            expected = _matrix_shape(tuple(shape))
        if expected != (rows, cols):
            raise bad(
                "quant.codes_shape", f"{[rows, cols]} does not fit the tensor's shape {shape}"
            )
        allowed |= {"scale", "zero_point"}
    else:
        rows, cols = _matrix_shape(tuple(shape))
    n = rows * cols
    extra = sorted(set(arrays) - allowed)
    missing = sorted(a for a in allowed - {"scale", "zero_point"} if a not in arrays)
    if quant is not None and "scale" not in arrays:
        missing.append("scale")
    if extra or missing:
        raise bad("arrays", f"missing {missing}, unexpected {extra} (index {kind!r})")
    nnz, count = meta["nnz"], meta["count"]
    if count != (n if kind == "dense" else nnz) or nnz > n:
        raise bad(
            "count",
            f"{count} values with {nnz} non-zeros in {n} entries do not fit index {kind!r}",
        )

    def check_array(name: str, want_dtype: torch.dtype, length: int, shape_: tuple | None = None):
        array = arrays[name]
        want_shape = shape_ if shape_ is not None else (length,)
        if array.dtype != want_dtype or tuple(array.shape) != want_shape:
            raise bad(
                name,
                f"expected {str(want_dtype)[6:]} of shape {list(want_shape)}, got "
                f"{str(array.dtype)[6:]} of shape {list(array.shape)}",
            )

    if quant is None:
        check_array("values", getattr(torch, dtype), count)
    elif quant["bits"] == 8:
        check_array("values", torch.int8, count)
    else:
        check_array("values", torch.uint8, -(-count // 2))
    if quant is not None:
        groups = 1 if quant["group"] is None else -(-cols // quant["group"])
        check_array("scale", torch.float32, 0, (rows, groups))
        if "zero_point" in arrays:
            check_array("zero_point", torch.int8, 0, (rows, groups))
    lengths = {"bits": -(-n // 8), "gaps": nnz, "rowptr": rows + 1, "col": nnz}
    index: dict[str, np.ndarray] = {}
    for name, dt in index_dtypes.items():
        size = np.dtype(dt).itemsize
        array = arrays[name]
        if array.dtype != torch.uint8 or array.dim() != 1 or array.numel() != lengths[name] * size:
            raise bad(
                name,
                f"expected {lengths[name]} {dt} entries ({lengths[name] * size} bytes), got "
                f"{array.numel()} {'bytes' if array.dtype == torch.uint8 else str(array.dtype)}",
            )
        index[name] = array.numpy().view(np.dtype(dt))
    if kind == "bitmask":
        found = int(np.unpackbits(index["bits"], count=n).sum())
        if found != nnz:
            raise bad("bits", f"marks {found} entries, nnz says {nnz}")
    elif kind == "rle":
        last = int(np.sum(index["gaps"].astype(np.uint64) + 1, dtype=np.uint64)) - 1
        if nnz and last >= n:
            raise bad("gaps", f"run lengths reach entry {last} of a tensor of {n}")
    elif kind == "csr":
        rowptr = index["rowptr"].astype(np.int64)
        if rowptr[0] != 0 or rowptr[-1] != nnz or bool((np.diff(rowptr) < 0).any()):
            raise bad("rowptr", f"expected non-decreasing row pointers from 0 to nnz={nnz}")
        if nnz and int(index["col"].max()) >= cols:
            raise bad("col", f"column {int(index['col'].max())} of a matrix with {cols} columns")


def decode(
    arrays: dict[str, torch.Tensor], meta: dict[str, Any]
) -> tuple[torch.Tensor, QuantizedTensor | None]:
    """Inverse of :func:`encode`: the dense tensor, and its quantized codes if it was quantized.
    ``arrays`` and ``meta`` are checked first (:func:`check_entry`)."""
    check_entry(arrays, meta)
    shape = tuple(meta["shape"])
    dtype = getattr(torch, meta["dtype"])
    kind = meta["index"]
    quant = meta.get("quant")
    rows, cols = quant["codes_shape"] if quant else _matrix_shape(shape)
    index_arrays = {
        name: arrays[name].numpy().view(np.dtype(dt)) for name, dt in meta["index_dtypes"].items()
    }
    present = torch.from_numpy(_decode_index(index_arrays, kind, rows, cols))
    values = arrays["values"]
    if quant is None:
        out = torch.zeros(rows * cols, dtype=dtype)
        out[present] = values
        return out.reshape(shape), None
    if quant["bits"] == 4:
        values = _unpack_int4(values, int(meta["count"]))
    zero_point = arrays.get("zero_point")
    if zero_point is None:
        zero_point = torch.zeros(arrays["scale"].shape, dtype=torch.int8)
    codes = _expand_groups(zero_point, quant["group"], cols).reshape(-1).clone()
    codes[present] = values
    codes = codes.reshape(rows, cols)
    q = QuantizedTensor(
        codes=codes,
        scale=arrays["scale"],
        zero_point=zero_point,
        bits=quant["bits"],
        group=quant["group"],
        shape=shape,
        dtype=dtype,
        transposed=quant["transposed"],
    )
    return dequantize_codes(codes, q.scale, zero_point, q.group, shape, dtype, q.transposed), q
