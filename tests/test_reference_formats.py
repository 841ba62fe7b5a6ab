"""Every compressed / sparse format against a plain reference decoder written in this file.

Two families:

* ``prunekit.compress.sparse_format`` (what ``save`` writes): bitmask, RLE, CSR and dense
  indexes over a tensor's non-zeros, values in row-major order;
* ``prunekit.runtime.sparse_formats`` (what the compiled kernels read): csr, bitmap and tiles.

For each format and a set of awkward tensors (empty rows, all zeros, all dense, one element,
shapes that are not multiples of the block sizes, every value dtype), the tests assert that
``decode(encode(x))`` gives ``x`` back bit for bit, and that a decoder written here with loops
straight from the format's description reads the encoder's arrays into the same ``x``. The
second check catches an encoder and decoder that agree with each other on a wrong layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.compress import sparse_format as sf
from prunekit.runtime import sparse_formats as rf

pytestmark = pytest.mark.usefixtures("one_thread")

BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int8: torch.int8,
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and every bit (NaN payloads and signs of zeros included)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))
    )


def sparse_tensor(shape: tuple[int, ...], density: float, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g) + 0.01  # no accidental zeros among the kept
    values = torch.where(values == 0, torch.ones_like(values), values)
    keep = torch.rand(shape, generator=g) < density
    if len(shape) >= 2 and shape[0] > 2:
        keep[1] = False  # an empty row
        keep[-1] = True  # a full row
    return torch.where(keep, values, 0.0).to(dtype)  # +0.0 (-0.0 is tested on its own)


# --------------------------------------------------------------------------- compress/sparse_format

SHAPES = [(), (1,), (13,), (5, 7), (16, 16), (9, 300), (4, 3, 3, 3), (3, 2, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def reference_positions(arrays: dict, meta: dict, n: int, cols: int) -> list[int]:
    """Flat row-major positions of the stored values, read with loops from the index arrays."""

    def index(name: str) -> list[int]:
        raw = arrays[name].numpy().tobytes()
        width = np.dtype(meta["index_dtypes"][name]).itemsize
        return [int.from_bytes(raw[i : i + width], "little") for i in range(0, len(raw), width)]

    kind = meta["index"]
    if kind == "dense":
        return list(range(n))
    if kind == "bitmask":  # bit 7 of byte 0 is entry 0 (most significant bit first)
        bits = index("bits")
        return [i for i in range(n) if (bits[i // 8] >> (7 - i % 8)) & 1]
    if kind == "rle":  # the number of zeros before each value
        positions, at = [], -1
        for gap in index("gaps"):
            at += gap + 1
            positions.append(at)
        return positions
    assert kind == "csr"
    rowptr, col = index("rowptr"), index("col")
    return [
        r * cols + col[k] for r in range(len(rowptr) - 1) for k in range(rowptr[r], rowptr[r + 1])
    ]


def reference_decode(arrays: dict, meta: dict) -> torch.Tensor:
    shape = tuple(meta["shape"])
    n = int(np.prod(shape)) if shape else 1
    cols = n if len(shape) <= 1 else int(np.prod(shape[1:]))
    cols = max(cols, 1)
    out = torch.zeros(n, dtype=getattr(torch, meta["dtype"]))
    values = arrays["values"]
    positions = reference_positions(arrays, meta, n, cols)
    assert len(positions) == values.numel() == meta["count"]
    assert positions == sorted(set(positions)), "positions must be increasing (row-major order)"
    for k, pos in enumerate(positions):
        out[pos] = values[k]
    return out.reshape(shape)


@pytest.mark.parametrize("index", ["bitmask", "rle", "csr", "dense", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
def test_storage_formats_round_trip_bit_for_bit(index: str, dtype, density: float) -> None:
    for shape in SHAPES:
        x = sparse_tensor(shape, density, dtype, seed=len(shape))
        arrays, meta = sf.encode(x, index)
        decoded, quant = sf.decode(arrays, meta)
        assert quant is None
        assert same_bits(decoded, x), (index, shape)
        assert same_bits(reference_decode(arrays, meta), x), (index, shape)
        assert meta["nnz"] == int((x != 0).sum())


@pytest.mark.parametrize("index", ["bitmask", "rle", "csr"])
def test_storage_keeps_nan_inf_and_odd_bit_patterns(index: str) -> None:
    x = torch.tensor([[0.0, float("nan"), 1e-45, 0.0], [float("-inf"), 0.0, -3.5, 65504.0]])
    payload = torch.tensor([0x7FC12345], dtype=torch.int32).view(torch.float32)  # NaN payload
    x[0, 3] = payload
    arrays, meta = sf.encode(x, index)
    assert same_bits(sf.decode(arrays, meta)[0], x)
    assert same_bits(reference_decode(arrays, meta), x)


def test_storage_index_uses_wide_dtypes_when_needed() -> None:
    # a gap of 300 zeros needs uint16 in RLE; 70000 columns need uint32 columns in CSR
    x = torch.zeros(2, 70000)
    x[0, 0], x[0, 301], x[1, 69999] = 1.0, 2.0, 3.0
    for index, name, dtype in (("rle", "gaps", "uint32"), ("csr", "col", "uint32")):
        arrays, meta = sf.encode(x, index)
        assert meta["index_dtypes"][name] == dtype
        assert same_bits(sf.decode(arrays, meta)[0], x)
        assert same_bits(reference_decode(arrays, meta), x)
    y = torch.zeros(1, 400)
    y[0, 0], y[0, 301] = 1.0, 2.0
    arrays, meta = sf.encode(y, "rle")
    assert meta["index_dtypes"]["gaps"] == "uint16"
    assert same_bits(reference_decode(arrays, meta), y)


@pytest.mark.parametrize(
    "index, name, width, at, dtype",
    [
        ("rle", "gaps", 300, 255, "uint8"),  # the largest gap uint8 holds
        ("rle", "gaps", 300, 256, "uint16"),
        ("csr", "col", 256, 255, "uint8"),  # columns 0..255: uint8
        ("csr", "col", 257, 256, "uint16"),
        ("csr", "col", 65536, 65535, "uint16"),
        ("csr", "col", 65537, 65536, "uint32"),
    ],
)
def test_index_dtypes_at_their_limits(index, name, width, at, dtype) -> None:
    x = torch.zeros(1, width)
    x[0, at] = 1.5
    arrays, meta = sf.encode(x, index)
    assert meta["index_dtypes"][name] == dtype  # the smallest that holds the largest entry
    assert same_bits(sf.decode(arrays, meta)[0], x)
    assert same_bits(reference_decode(arrays, meta), x)


def test_negative_zeros_come_back_positive_as_documented() -> None:
    x = torch.tensor([[-0.0, 1.0], [2.0, -0.0]])
    for index in ("bitmask", "rle", "csr"):
        arrays, meta = sf.encode(x, index)
        decoded = sf.decode(arrays, meta)[0]
        assert torch.equal(decoded, x)
        assert not torch.signbit(decoded[0, 0]) and meta["nnz"] == 2


# --------------------------------------------------------------------------- runtime/sparse_formats

KERNEL_SHAPES = [(1, 1), (1, 40), (20, 50), (17, 33), (16, 32), (33, 65), (40, 16)]


def _index(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def reference_kernel_decode(parts: dict, fmt: str, rows: int, cols: int) -> torch.Tensor:
    """The formats as ``runtime/sparse_formats.py`` describes them, read with loops."""
    values = parts["values"]
    w = torch.zeros(rows, cols, dtype=values.dtype)
    if fmt == "csr":
        ptr = _index(parts["row_ptr"])
        col = _index(parts["col_indices"])
        if parts["col_indices"].dtype == torch.int16:  # uint16 stored as int16
            col = [c & 0xFFFF for c in col]
        for r in range(rows):
            for k in range(ptr[r], ptr[r + 1]):
                w[r, col[k]] = values[k]
        nnz = ptr[-1]
    elif fmt == "bitmap":  # bit j of mask (row, block) = column 16 * block + j
        ptr = _index(parts["row_ptr"])
        nblocks = -(-cols // 16)
        masks = [m & 0xFFFF for m in _index(parts["block_masks"])]
        for r in range(rows):
            k = ptr[r]
            for b in range(nblocks):
                for j in range(16):
                    if (masks[r * nblocks + b] >> j) & 1:
                        w[r, 16 * b + j] = values[k]
                        k += 1
            assert k == ptr[r + 1]
        nnz = ptr[-1]
    elif fmt == "nm":  # N slots per group of M columns, positions of 2 or 4 bits, low first
        n, m = _index(parts["nm_shape"])
        bits = 2 if m <= 4 else 4
        groups = -(-cols // m)
        row_bytes = -(-(groups * n * bits) // 8)
        packed = _index(parts["nm_indices"])
        assert len(packed) == rows * row_bytes
        for r in range(rows):
            for slot in range(groups * n):
                bit = slot * bits
                pos = (packed[r * row_bytes + bit // 8] >> (bit % 8)) & (m - 1)
                col = slot // n * m + pos
                value = values[r * groups * n + slot]
                if value != 0:
                    assert col < cols
                    w[r, col] = value
        nnz = rows * groups * n
    else:  # tiles: slices of 16 rows, blocks of 32 columns, steps of 16 lanes
        nslices, nblocks = -(-rows // 16), -(-cols // 32)
        steps, tcols = _index(parts["tile_steps"]), _index(parts["tile_cols"])
        slice_ptr = _index(parts["slice_ptr"])
        step = 0
        for s in range(nslices):
            assert slice_ptr[s] == step
            for b in range(nblocks):
                for _ in range(steps[s * nblocks + b]):
                    for lane in range(16):
                        slot = step * 16 + lane
                        if values[slot] != 0:
                            w[16 * s + lane, 32 * b + tcols[slot]] = values[slot]
                    step += 1
        assert slice_ptr[-1] == step
        nnz = step * 16
    # the kernels read whole vectors past the end: PAD spare zeros, nothing else
    assert values.numel() == nnz + rf.PAD and not bool(values[nnz:].any())
    return w


@pytest.mark.parametrize("fmt", rf.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_kernel_formats_round_trip_and_match_the_reference(fmt: str, dtype) -> None:
    for shape in KERNEL_SHAPES:
        for density in (0.0, 0.15, 0.6, 1.0):
            w = sparse_tensor(shape, density, torch.float32, seed=shape[1])
            if dtype == torch.int8:
                w = (w * 40).round().clamp(-127, 127).to(torch.int8)
            parts = rf.encode(w, fmt)
            assert same_bits(rf.decode(parts, fmt, *shape), w), (fmt, shape, density)
            assert same_bits(reference_kernel_decode(parts, fmt, *shape), w), (fmt, shape)


def test_csr_columns_past_int16_and_wide_layers() -> None:
    # columns 32768..65535 are stored as negative int16; above 65536 columns, int32
    for cols in (40000, 70000):
        w = torch.zeros(3, cols)
        w[0, 5], w[0, 32768], w[1, 39999], w[2, cols - 1] = 1.0, 2.0, 3.0, 4.0
        parts = rf.encode(w, "csr")
        assert parts["col_indices"].dtype == (torch.int32 if cols > 65536 else torch.int16)
        assert same_bits(rf.decode(parts, "csr", 3, cols), w)
        assert same_bits(reference_kernel_decode(parts, "csr", 3, cols), w)


def test_tiles_pack_each_row_in_column_order() -> None:
    # lane i of step t holds row i's t-th non-zero of the tile: checked on a hand-made weight
    w = torch.zeros(2, 40)
    w[0, 3], w[0, 10], w[0, 35], w[1, 7] = 1.0, 2.0, 3.0, 4.0
    parts = rf.encode(w, "tiles")
    assert _index(parts["tile_steps"]) == [2, 1]  # block 0: row 0 has two; block 1: one
    vals = parts["values"][: 3 * 16].reshape(3, 16)
    cols = parts["tile_cols"][: 3 * 16].reshape(3, 16)
    assert vals[0, :2].tolist() == [1.0, 4.0] and cols[0, :2].tolist() == [3, 7]
    assert vals[1, :2].tolist() == [2.0, 0.0] and cols[1, 0] == 10
    assert vals[2, 0] == 3.0 and cols[2, 0] == 35 - 32
