"""The weight layouts the compiled sparse kernels read (see ``csrc/sparse_kernels.c``).

Each format turns an ``(out, in)`` weight (float32, or int8 codes) into a few flat tensors and
back, losslessly. Only the non-zeros of the weight are stored; ``values`` keeps the weight's
dtype and carries :data:`PAD` spare zero elements, because the kernels load whole vectors.

* ``"csr"``: ``values`` row by row, ``col_indices`` (int16 holding uint16 when
  ``in <= 65536``, else int32), ``row_ptr`` (int64, ``out + 1``).
* ``"bitmap"``: ``values`` row by row, ``block_masks`` (int16 holding one uint16 mask per row
  and block of 16 columns: bit j set = column ``16 * block + j`` is non-zero), ``row_ptr``.
* ``"tiles"``: rows in slices of 16, columns in blocks of 32. For each (slice, block) tile,
  ``tile_steps`` (uint8) vectors of 16 lanes, lane i for row ``16 * slice + i``: ``values``
  (zero in unused lanes) and ``tile_cols`` (uint8: the column inside the block);
  ``slice_ptr`` (int64, ``slices + 1``) counts the steps before each slice.
* ``"nm"``: N:M (2:4, 1:4, 2:8, 4:8, ...; N and M powers of two, M <= 16). Every group of M
  consecutive columns of a row keeps N slots (the last group is padded with zero columns):
  ``values`` row by row, N per group (0 in a slot the group does not need), and
  ``nm_indices`` (uint8) the position of each slot inside its group, packed ``bits`` = 2
  (M <= 4) or 4 (M = 8, 16) bits each, low bits first, each row starting on a new byte;
  ``nm_shape`` (int64) holds ``[N, M]``. No column numbers are stored: 2:4 float32 takes
  4.25 bytes per kept weight instead of CSR's 6.

Example:
    >>> import torch
    >>> from prunekit.runtime.sparse_formats import encode, decode
    >>> w = torch.randn(20, 50) * (torch.rand(20, 50) > 0.7)
    >>> all(torch.equal(decode(encode(w, f), f, 20, 50), w) for f in FORMATS)
    True
    >>> encode(torch.tensor([[0.0, 1.5, 0.0, -2.0]]), "nm")["nm_shape"].tolist()  # 2:4 fits
    [2, 4]
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FORMATS", "PAD", "encode", "decode", "index_names", "nm_fit"]

FORMATS = ("csr", "bitmap", "tiles", "nm")
PAD = 64
BITMAP_BLOCK = 16
SLICE = 16
TILE_COLS = 32

_INDEX = {
    "csr": ("col_indices", "row_ptr"),
    "bitmap": ("block_masks", "row_ptr"),
    "tiles": ("tile_cols", "tile_steps", "slice_ptr"),
    "nm": ("nm_indices", "nm_shape"),
}
NM_GROUPS = (4, 8, 16)  # the M that :func:`nm_fit` tries


def _nm_bits(m: int) -> int:
    return 2 if m <= 4 else 4


def _check_nm(n: int, m: int) -> None:
    if m not in (2, 4, 8, 16) or n < 1 or n > m or n & (n - 1):
        raise ValueError(f"N:M needs N and M powers of two with 1 <= N <= M <= 16, got {n}:{m}")


def _group_counts(keep: torch.Tensor, m: int) -> torch.Tensor:
    out_f, in_f = keep.shape
    groups = -(-in_f // m)
    padded = torch.zeros(out_f, groups * m, dtype=torch.int32)
    padded[:, :in_f] = keep.to(torch.int32)
    return padded.reshape(out_f, groups, m).sum(-1)


def nm_fit(weight: torch.Tensor) -> tuple[int, int]:
    """The N:M that stores ``weight`` with the fewest slots: for each M of 4, 8 and 16 the
    smallest power of two N at least the most non-zeros of any group of M columns; ties go
    to the smaller M. A 2:4-pruned weight gives ``(2, 4)``, a dense one ``(4, 4)``.

    Example:
        >>> nm_fit(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]]))
        (1, 4)
    """
    if weight.dim() != 2:
        raise ValueError(f"a sparse weight must be 2-D, got shape {tuple(weight.shape)}")
    keep = weight.detach().cpu() != 0
    best: tuple[int, int] | None = None
    for m in NM_GROUPS:
        most = int(_group_counts(keep, m).max()) if keep.numel() else 0
        n = 1
        while n < most:
            n *= 2
        if best is None or n * best[1] < best[0] * m:
            best = (n, m)
    assert best is not None
    return best


def index_names(format: str) -> tuple[str, ...]:
    """The index tensors of ``format``, in the order :func:`encode` returns them."""
    check_format(format)
    return _INDEX[format]


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"sparse format {format!r} is not one of {FORMATS}")


def _padded(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.reshape(-1), values.new_zeros(PAD)]).contiguous()


def _row_ptr(keep: torch.Tensor) -> torch.Tensor:
    row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(keep.sum(dim=1), 0)
    return row_ptr


def _as_uint16_in_int16(values: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(values.numpy().astype(np.uint16).view(np.int16)).contiguous()


def encode(
    weight: torch.Tensor, format: str, *, nm: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """``{"values": ..., <index tensors>}`` of a 2-D CPU weight (float32 or int8).

    ``nm`` (format ``"nm"`` only) is the ``(N, M)`` to store; None picks :func:`nm_fit`.
    A group holding more than N non-zeros is a ``ValueError``.
    """
    check_format(format)
    if weight.dim() != 2:
        raise ValueError(f"a sparse weight must be 2-D, got shape {tuple(weight.shape)}")
    if nm is not None and format != "nm":
        raise ValueError(f"nm= is for the 'nm' format, not {format!r}")
    w = weight.detach().cpu().contiguous()
    keep = w != 0
    if format == "tiles":
        return _encode_tiles(w, keep)
    if format == "nm":
        return _encode_nm(w, keep, nm or nm_fit(w))
    parts = {"values": _padded(w[keep])}  # row-major order
    if format == "bitmap":
        out_f, in_f = w.shape
        nblocks = -(-in_f // BITMAP_BLOCK)
        padded = torch.zeros(out_f, nblocks * BITMAP_BLOCK, dtype=torch.int32)
        padded[:, :in_f] = keep.to(torch.int32)
        bit = torch.tensor([1 << j for j in range(BITMAP_BLOCK)], dtype=torch.int32)
        parts["block_masks"] = _as_uint16_in_int16(
            (padded.reshape(out_f, nblocks, -1) * bit).sum(-1)
        )
    else:
        cols = keep.nonzero()[:, 1]
        wide = w.shape[1] > 65536
        parts["col_indices"] = cols.to(torch.int32) if wide else _as_uint16_in_int16(cols)
    parts["row_ptr"] = _row_ptr(keep)
    return parts


def _encode_tiles(w: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    out_f, in_f = w.shape
    nslices, nblocks = -(-out_f // SLICE), -(-in_f // TILE_COLS)
    grid = torch.zeros(nslices * SLICE, nblocks * TILE_COLS, dtype=torch.bool)
    grid[:out_f, :in_f] = keep
    tiles = grid.reshape(nslices, SLICE, nblocks, TILE_COLS).permute(0, 2, 1, 3)  # s, b, lane, col
    steps = tiles.sum(-1).amax(-1)  # the longest row of each tile
    flat_steps = steps.reshape(-1)
    tile_start = torch.cumsum(flat_steps, 0) - flat_steps
    slice_ptr = torch.zeros(nslices + 1, dtype=torch.int64)
    slice_ptr[1:] = torch.cumsum(steps.sum(1), 0)
    rank = torch.cumsum(tiles.to(torch.int32), -1) - 1  # place of each non-zero in its row
    s, b, lane, col = tiles.nonzero(as_tuple=True)
    step = tile_start[s * nblocks + b] + rank[s, b, lane, col]
    slot = step * SLICE + lane
    total = int(slice_ptr[-1]) * SLICE
    values = torch.zeros(total + PAD, dtype=w.dtype)
    values[slot] = w[s * SLICE + lane, b * TILE_COLS + col]
    cols = torch.zeros(total + PAD, dtype=torch.uint8)
    cols[slot] = col.to(torch.uint8)
    return {
        "values": values,
        "tile_cols": cols,
        "tile_steps": flat_steps.to(torch.uint8).contiguous(),
        "slice_ptr": slice_ptr,
    }


def _encode_nm(w: torch.Tensor, keep: torch.Tensor, nm: tuple[int, int]) -> dict:
    n, m = int(nm[0]), int(nm[1])
    _check_nm(n, m)
    out_f, in_f = w.shape
    counts = _group_counts(keep, m)
    if counts.numel() and int(counts.max()) > n:
        r, g = divmod(int(counts.argmax()), counts.shape[1])
        raise ValueError(
            f"the weight is not {n}:{m} sparse: row {r}, columns {g * m}-{g * m + m - 1} hold "
            f"{int(counts.max())} non-zeros"
        )
    groups = counts.shape[1]
    padded = torch.zeros(out_f, groups * m, dtype=w.dtype)
    padded[:, :in_f] = w
    kept = torch.zeros(out_f, groups * m, dtype=torch.bool)
    kept[:, :in_f] = keep
    # per group: its non-zeros in column order, then zero columns to fill the N slots
    order = torch.argsort((~kept).reshape(out_f, groups, m).to(torch.int8), dim=-1, stable=True)
    slots = order[..., :n]  # (out, groups, n) positions inside the group
    values = torch.gather(padded.reshape(out_f, groups, m), -1, slots)
    bits = _nm_bits(m)
    per_byte = 8 // bits
    idx = slots.reshape(out_f, groups * n).to(torch.int32)
    width = -(-(groups * n) // per_byte) * per_byte
    idx = torch.cat([idx, idx.new_zeros(out_f, width - groups * n)], 1)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    packed = (idx.reshape(out_f, -1, per_byte) << shifts).sum(-1).to(torch.uint8)
    return {
        "values": _padded(values),
        "nm_indices": packed.reshape(-1).contiguous(),
        "nm_shape": torch.tensor([n, m], dtype=torch.int64),
    }


def _decode_nm(parts: dict, out_f: int, in_f: int) -> torch.Tensor:
    n, m = (int(v) for v in parts["nm_shape"].tolist())
    _check_nm(n, m)
    values = parts["values"].cpu()
    groups = -(-in_f // m)
    bits = _nm_bits(m)
    per_byte = 8 // bits
    row_bytes = -(-(groups * n) // per_byte)
    packed = parts["nm_indices"].cpu().to(torch.int32).reshape(out_f, row_bytes, 1)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    idx = ((packed >> shifts) & (m - 1)).reshape(out_f, -1)[:, : groups * n].to(torch.int64)
    vals = values[: out_f * groups * n].reshape(out_f, groups * n)
    cols = (torch.arange(groups * n) // n * m).unsqueeze(0) + idx
    w = torch.zeros(out_f, groups * m, dtype=values.dtype)
    w.scatter_(1, cols, vals)  # filler slots write 0 onto columns that hold no non-zero
    return w[:, :in_f].contiguous()


def decode(
    parts: dict[str, torch.Tensor], format: str, out_features: int, in_features: int
) -> torch.Tensor:
    """The dense ``(out, in)`` weight, in the dtype of ``parts["values"]``."""
    check_format(format)
    if format == "nm":
        return _decode_nm(parts, out_features, in_features)
    values = parts["values"].cpu()
    w = torch.zeros(out_features, in_features, dtype=values.dtype)
    if format == "tiles":
        nblocks = -(-in_features // TILE_COLS)
        steps = parts["tile_steps"].cpu().to(torch.int64)
        total = int(steps.sum())
        tile = torch.repeat_interleave(torch.arange(steps.numel()), steps)
        lanes = values[: total * SLICE].reshape(total, SLICE)
        step, lane = (lanes != 0).nonzero(as_tuple=True)
        cols = parts["tile_cols"].cpu()[: total * SLICE].reshape(total, SLICE).to(torch.int64)
        rows = (tile[step] // nblocks) * SLICE + lane
        w[rows, (tile[step] % nblocks) * TILE_COLS + cols[step, lane]] = lanes[step, lane]
        return w
    row_ptr = parts["row_ptr"].cpu()
    nnz = int(row_ptr[-1])
    if format == "bitmap":
        bits = parts["block_masks"].cpu().to(torch.int32) & 0xFFFF
        shifts = torch.arange(BITMAP_BLOCK, dtype=torch.int32)
        keep = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(out_features, -1)[:, :in_features]
        w[keep.bool()] = values[:nnz]
        return w
    rows = torch.repeat_interleave(torch.arange(out_features), row_ptr[1:] - row_ptr[:-1])
    cols = parts["col_indices"].cpu().to(torch.int64)
    if parts["col_indices"].dtype == torch.int16:
        cols = cols & 0xFFFF  # stored as uint16
    w[rows, cols] = values[:nnz]
    return w
