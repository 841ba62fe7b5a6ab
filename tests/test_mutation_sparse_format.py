"""``prunekit.compress.sparse_format`` byte for byte: the arrays and metadata ``encode`` writes
for small tensors worked out by hand, the index chosen by ``"auto"`` against sizes computed here,
quantized codes (int8, int4 nibbles, zero points, groups), and every refusal of
:func:`check_entry` with its field and message.

``test_reference_formats.py`` proves the round trips and reads the arrays with a decoder written
from the format's description; this file pins the exact layout and the validation, and is part
of the fast test selection that ``make mutation`` runs for ``compress/sparse_format.py``.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from prunekit.compress import sparse_format as sf
from prunekit.compress.quantize import QuantizedTensor
from prunekit.compress.validate import SavedModelError

X = torch.tensor([[0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0]])


def raw(arrays: dict, name: str, dtype: str) -> list[int]:
    return arrays[name].numpy().view(np.dtype(dtype)).tolist()


def nbytes(arrays: dict) -> int:
    return sum(a.numel() * a.element_size() for a in arrays.values())


def fails(field: str, message: str, arrays: dict, meta) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(f'{field}: {message}')}$"):
        sf.check_entry(arrays, meta)


# --------------------------------------------------------------------------- helpers


def test_constants() -> None:
    assert sf.INDEX_KINDS == ("bitmask", "rle", "csr", "dense")
    assert sf.INDEX_ARRAYS == {
        "bitmask": ("bits",),
        "rle": ("gaps",),
        "csr": ("rowptr", "col"),
        "dense": (),
    }
    assert sf.INDEX_DTYPES == ("uint8", "uint16", "uint32", "uint64")
    assert sf.VALUE_DTYPES == ("float32", "float16", "bfloat16", "float64")


@pytest.mark.parametrize(
    ("maximum", "dtype"),
    [(0, "uint8"), (255, "uint8"), (256, "uint16"), (65535, "uint16"), (65536, "uint32"),
     (2**32 - 1, "uint32"), (2**32, "uint64"), (2**40, "uint64")],
)  # fmt: skip
def test_uint_for_picks_the_smallest(maximum: int, dtype: str) -> None:
    assert sf._uint_for(maximum) == np.dtype(dtype)


def test_nonzero_bits_and_matrix_shape() -> None:
    t = torch.tensor([0.0, -0.0, float("nan"), 1e-45, float("-inf")])
    assert sf.nonzero_bits(t).tolist() == [False, False, True, True, True]
    assert sf._matrix_shape(()) == (1, 1)
    assert sf._matrix_shape((7,)) == (1, 7)
    assert sf._matrix_shape((2, 3, 4)) == (2, 12)
    assert sf._matrix_shape((3, 0)) == (3, 0)
    assert sf._matrix_shape((0, 5, 2)) == (0, 10)


def test_index_bytes_by_hand() -> None:
    present = np.zeros(2 * 300, dtype=bool)
    present[[0, 2, 301, 599]] = True  # gaps 0, 1, 298, 297 -> uint16
    assert sf.index_bytes(present, 2, 300) == {
        "bitmask": 75,
        "rle": 4 * 2,
        "csr": 3 * 1 + 4 * 2,  # row pointers up to 4 (uint8), columns up to 299 (uint16)
        "dense": 0,
    }
    present = np.zeros(9, dtype=bool)
    assert sf.index_bytes(present, 1, 9) == {"bitmask": 2, "rle": 0, "csr": 2, "dense": 0}
    present = np.ones(300, dtype=bool)
    assert sf.index_bytes(present, 300, 1) == {
        "bitmask": 38,
        "rle": 300,
        "csr": 301 * 2 + 300 * 1,  # 300 non-zeros need uint16 pointers; column 0: uint8
        "dense": 0,
    }
    assert sf.index_bytes(np.zeros(0, dtype=bool), 0, 0)["csr"] == 1


def test_expand_groups_and_int4_packing() -> None:
    per = torch.tensor([[1], [2]], dtype=torch.int8)
    assert sf._expand_groups(per, None, 3).tolist() == [[1, 1, 1], [2, 2, 2]]
    grouped = torch.tensor([[1, 2, 3]], dtype=torch.int8)
    assert sf._expand_groups(grouped, 2, 5).tolist() == [[1, 1, 2, 2, 3]]
    codes = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int8)
    packed = sf._pack_int4(codes)  # nibble = code + 8; low nibble first; odd count padded
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0 | (15 << 4), 8 | (7 << 4), 11]
    out = sf._unpack_int4(packed, 5)
    assert out.dtype == torch.int8 and out.tolist() == codes.tolist()
    assert sf._unpack_int4(packed, 6).tolist() == [*codes.tolist(), -8]


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize(
    ("index", "index_dtypes", "index_arrays"),
    [
        ("bitmask", {"bits": "uint8"}, {"bits": [0b01001001]}),  # 0100 1001, first entry = MSB
        ("rle", {"gaps": "uint8"}, {"gaps": [1, 2, 2]}),
        ("csr", {"rowptr": "uint8", "col": "uint8"}, {"rowptr": [0, 1, 3], "col": [1, 0, 3]}),
        ("dense", {}, {}),
    ],
)
def test_encode_writes_these_arrays(index: str, index_dtypes: dict, index_arrays: dict) -> None:
    arrays, meta = sf.encode(X, index)
    count = 8 if index == "dense" else 3
    assert meta == {
        "shape": [2, 4],
        "dtype": "float32",
        "index": index,
        "index_dtypes": index_dtypes,
        "nnz": 3,
        "count": count,
    }
    assert set(arrays) == {"values", *index_arrays}
    values = X.reshape(-1).tolist() if index == "dense" else [2.0, 3.0, 4.0]
    assert arrays["values"].dtype == torch.float32 and arrays["values"].tolist() == values
    for name, want in index_arrays.items():
        assert arrays[name].dtype == torch.uint8 and arrays[name].dim() == 1  # raw bytes
        assert raw(arrays, name, index_dtypes[name]) == want
    decoded, q = sf.decode(arrays, meta)
    assert q is None and torch.equal(decoded, X)


def test_encode_wide_index_bytes_are_little_endian() -> None:
    x = torch.zeros(1, 70000, dtype=torch.float16)
    x[0, 5], x[0, 69999] = 1.0, -2.0
    arrays, meta = sf.encode(x, "csr")
    assert meta["index_dtypes"] == {"rowptr": "uint8", "col": "uint32"}
    assert arrays["col"].tolist() == [5, 0, 0, 0, 0x6F, 0x11, 0x01, 0]  # 69999 = 0x1116F
    arrays, meta = sf.encode(x, "rle")
    assert meta["index_dtypes"] == {"gaps": "uint32"} and raw(arrays, "gaps", "uint32") == [
        5,
        69993,
    ]


def test_encode_refuses_an_unknown_index() -> None:
    message = (
        "index='zstd' is not accepted: use 'auto' (smallest) or one of bitmask, rle, csr, dense"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sf.encode(X, "zstd")


def test_encode_of_a_non_contiguous_tensor_with_grad() -> None:
    base = torch.tensor([[0.0, 3.0], [2.0, 0.0], [0.0, 5.0]], requires_grad=True)
    arrays, meta = sf.encode(base.t(), "csr")  # [[0, 2, 0], [3, 0, 5]]
    assert meta["shape"] == [2, 3] and arrays["values"].tolist() == [2.0, 3.0, 5.0]
    assert not arrays["values"].requires_grad
    assert raw(arrays, "col", "uint8") == [1, 0, 2]


def auto_sizes(x: torch.Tensor) -> dict[str, int]:
    """Bytes of each index kind plus its values, worked out here with loops."""
    flat = x.reshape(-1).tolist()
    rows = x.shape[0] if x.dim() >= 2 else 1
    cols = len(flat) // rows
    pos = [i for i, v in enumerate(flat) if v != 0]
    width = x.element_size()

    def uint(m: int) -> int:
        return 1 if m < 256 else 2 if m < 65536 else 4

    gaps = [p - (pos[k - 1] if k else -1) - 1 for k, p in enumerate(pos)]
    return {
        "bitmask": -(-len(flat) // 8) + len(pos) * width,
        "rle": len(pos) * uint(max(gaps, default=0)) + len(pos) * width,
        "csr": (rows + 1) * uint(len(pos)) + len(pos) * uint(cols - 1) + len(pos) * width,
        "dense": len(flat) * width,
    }


@pytest.mark.parametrize(
    ("density", "expected"),
    [(1.0, "dense"), (0.6, "bitmask"), (0.02, "rle"), (0.0, "rle")],
)
def test_auto_picks_the_smallest_total(density: float, expected: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 300, generator=g) + 10.0
    x[torch.rand(40, 300, generator=g) >= density] = 0.0
    sizes = auto_sizes(x)
    arrays, meta = sf.encode(x)
    assert meta["index"] == expected == min(sizes, key=sizes.get)
    assert nbytes(arrays) == sizes[expected]


def test_auto_prefers_csr_for_few_long_rows_and_counts_value_bytes() -> None:
    x = torch.zeros(1, 4000, dtype=torch.float64)
    x[0, 3999] = 1.0  # rle: gap 3999 needs uint16 (2 bytes); csr: 2 pointers + a uint16 column
    sizes = auto_sizes(x)
    assert sizes == {"bitmask": 508, "rle": 10, "csr": 12, "dense": 32000}
    assert sf.encode(x)[1]["index"] == "rle"
    x[0, 0] = 2.0  # rle 2 x 2 + 16 = 20; csr 2 + 4 + 16 = 22
    assert sf.encode(x)[1]["index"] == "rle"
    y = torch.zeros(1, 70000, dtype=torch.float16)
    y[0, 69999] = 1.0  # rle: one uint32 gap (4) ; csr: 2 uint8 pointers + one uint32 column (6)
    assert auto_sizes(y)["rle"] == 6 and sf.encode(y)[1]["index"] == "rle"


def test_auto_on_int4_codes_counts_half_bytes() -> None:
    # 16 codes, 15 of them stored: bitmask 2 + ceil(15 / 2) = 10 bytes; dense 8; rle 15 + 8
    q = QuantizedTensor(
        codes=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 1]], dtype=torch.int8),
        scale=torch.ones(1, 1),
        zero_point=torch.zeros(1, 1, dtype=torch.int8),
        bits=4,
        group=None,
        shape=(1, 16),
        dtype=torch.float32,
    )
    arrays, meta = sf.encode(q.dequantize(), quant=q)
    assert meta["index"] == "dense" and arrays["values"].numel() == 8
    q.bits = 8  # int8: bitmask 2 + 15 = 17 > dense 16
    assert sf.encode(q.dequantize(), quant=q)[1]["index"] == "dense"
    q.codes[0, :6] = 0  # 10 stored: bitmask 2 + 10 = 12 < dense 16 < rle 10 + 10
    assert sf.encode(q.dequantize(), quant=q)[1]["index"] == "bitmask"


# --------------------------------------------------------------------------- quantized


def quantized(bits: int, group: int | None, zero: bool, transposed: bool = False):
    codes = torch.tensor([[0, 5, -3, 0, 7], [2, 2, 0, -8, 1]], dtype=torch.int8)
    groups = 1 if group is None else -(-5 // group)
    zp = torch.tensor([[2, 0, 1][:groups], [0, 1, 2][:groups]], dtype=torch.int8)
    if not zero:
        zp = torch.zeros_like(zp)
    scale = torch.tensor([[0.5, 0.25, 2.0][:groups], [1.0, 4.0, 0.125][:groups]])
    shape = (5, 2) if transposed else (2, 5)
    return QuantizedTensor(codes, scale, zp, bits, group, shape, torch.float16, transposed)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 2])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_quantized_entries(bits: int, group, zero: bool, transposed: bool) -> None:
    q = quantized(bits, group, zero, transposed)
    zfull = q.zero_point.repeat_interleave(group or 5, dim=1)[:, :5]
    stored = [(r, c) for r in range(2) for c in range(5) if q.codes[r, c] != zfull[r, c]]
    arrays, meta = sf.encode(q.dequantize(), "rle", q)
    assert meta["quant"] == {
        "bits": bits,
        "group": group,
        "transposed": transposed,
        "codes_shape": [2, 5],
    }
    assert meta["dtype"] == "float16" and meta["shape"] == list(q.shape)
    assert meta["nnz"] == meta["count"] == len(stored)
    positions, at = [], -1
    for gap in raw(arrays, "gaps", meta["index_dtypes"]["gaps"]):
        at += gap + 1
        positions.append(at)
    assert positions == [r * 5 + c for r, c in stored]
    codes = [int(q.codes[r, c]) for r, c in stored]
    if bits == 8:
        assert arrays["values"].dtype == torch.int8 and arrays["values"].tolist() == codes
    else:
        nib = [c + 8 for c in codes] + [0] * (len(codes) % 2)
        packed = [nib[i] | (nib[i + 1] << 4) for i in range(0, len(nib), 2)]
        assert arrays["values"].dtype == torch.uint8 and arrays["values"].tolist() == packed
    assert arrays["scale"].dtype == torch.float32 and torch.equal(arrays["scale"], q.scale)
    assert ("zero_point" in arrays) == zero
    if zero:
        assert torch.equal(arrays["zero_point"], q.zero_point)
    assert set(arrays) == {"values", "gaps", "scale", *(["zero_point"] if zero else [])}
    restored, q2 = sf.decode(arrays, meta)
    assert torch.equal(restored, q.dequantize()) and restored.dtype == torch.float16
    assert torch.equal(q2.codes, q.codes) and torch.equal(q2.zero_point, q.zero_point)
    assert (q2.bits, q2.group, q2.transposed, q2.shape, q2.dtype) == (
        bits, group, transposed, q.shape, torch.float16
    )  # fmt: skip
    assert torch.equal(q2.scale, q.scale)


def test_quantized_scale_is_stored_as_contiguous_float32() -> None:
    q = quantized(8, 2, True)
    q.scale = q.scale.double().t().contiguous().t()  # float64, not contiguous
    q.zero_point = q.zero_point.t().contiguous().t()
    arrays, meta = sf.encode(q.dequantize(), "csr", q)
    assert arrays["scale"].dtype == torch.float32 and arrays["scale"].is_contiguous()
    assert arrays["zero_point"].is_contiguous()
    sf.check_entry(arrays, meta)


# --------------------------------------------------------------------------- check_entry


def entry(index: str = "csr", x: torch.Tensor = X) -> tuple[dict, dict]:
    return sf.encode(x, index)


def with_(meta: dict, **changes) -> dict:
    out = copy.deepcopy(meta)
    out.update(changes)
    return out


def test_check_entry_accepts_what_encode_writes() -> None:
    for index in sf.INDEX_KINDS:
        sf.check_entry(*entry(index))
    q = quantized(4, 2, True)
    sf.check_entry(*sf.encode(q.dequantize(), "bitmask", q))
    sf.check_entry(*entry("rle", torch.zeros(3, 3)))  # nothing stored
    sf.check_entry(*entry("csr", torch.zeros(0, 4)))  # no rows


def test_check_entry_refuses_bad_fields() -> None:
    arrays, meta = entry()
    fails("entry", "expected an object, got list", arrays, [meta])
    for shape in (None, [2, -1], [2, True], (2, 4), [2.0, 4]):
        fails(
            "shape",
            f"expected a list of integers >= 0, got {shape!r}",
            arrays,
            with_(meta, shape=shape),
        )
    for dtype in ("int32", None, "torch.float32"):
        fails(
            "dtype",
            f"{dtype!r} is not one of float32, float16, bfloat16, float64",
            arrays,
            with_(meta, dtype=dtype),
        )
    for index in ("zstd", None):
        fails(
            "index",
            f"{index!r} is not one of bitmask, rle, csr, dense",
            arrays,
            with_(meta, index=index),
        )
    for key in ("nnz", "count"):
        for value in (-1, True, 2.0, None):
            fails(
                key, f"expected an integer >= 0, got {value!r}", arrays, with_(meta, **{key: value})
            )
    for dtypes in (
        None,
        {"rowptr": "uint8"},
        {"rowptr": "uint8", "col": "int8"},
        {"rowptr": "uint8", "col": "uint8", "bits": "uint8"},
    ):
        fails(
            "index_dtypes",
            f"index 'csr' needs {{rowptr, col}} each one of uint8, uint16, "
            f"uint32, uint64, got {dtypes!r}",
            arrays,
            with_(meta, index_dtypes=dtypes),
        )
    a, m = entry("dense")
    fails(
        "index_dtypes",
        "index 'dense' needs {} each one of uint8, uint16, uint32, uint64, got {'bits': 'uint8'}",
        a,
        with_(m, index_dtypes={"bits": "uint8"}),
    )


def test_check_entry_refuses_a_tensor_larger_than_memory() -> None:
    arrays, meta = entry()
    with pytest.raises(SavedModelError, match=r"^: shape: declares 8\.0 EiB|^: shape: declares"):
        sf.check_entry(arrays, with_(meta, shape=[2**31, 2**31]))
    with pytest.raises(SavedModelError, match="more than this machine's memory"):
        sf.check_entry(arrays, with_(meta, dtype="float64", shape=[2**30, 2**30]))


def test_check_entry_refuses_arrays_and_counts_that_do_not_fit() -> None:
    arrays, meta = entry("csr")
    fails(
        "arrays",
        "missing ['col'], unexpected [] (index 'csr')",
        {k: v for k, v in arrays.items() if k != "col"},
        meta,
    )
    fails(
        "arrays",
        "missing [], unexpected ['bits', 'scale'] (index 'csr')",
        {**arrays, "bits": arrays["col"], "scale": torch.ones(1)},
        meta,
    )
    fails(
        "count",
        "4 values with 3 non-zeros in 8 entries do not fit index 'csr'",
        arrays,
        with_(meta, count=4),
    )
    fails(
        "count",
        "9 values with 9 non-zeros in 8 entries do not fit index 'csr'",
        arrays,
        with_(meta, count=9, nnz=9),
    )
    a, m = entry("dense")
    fails(
        "count",
        "3 values with 3 non-zeros in 8 entries do not fit index 'dense'",
        a,
        with_(m, count=3),
    )
    sf.check_entry(a, with_(m, nnz=8))  # dense: count = every entry, nnz only informative
    fails(
        "values",
        "expected float32 of shape [3], got float16 of shape [3]",
        {**arrays, "values": arrays["values"].half()},
        meta,
    )
    fails(
        "values",
        "expected float32 of shape [3], got float32 of shape [1, 3]",
        {**arrays, "values": arrays["values"][None]},
        meta,
    )
    fails(
        "values",
        "expected float16 of shape [3], got float32 of shape [3]",
        arrays,
        with_(meta, dtype="float16"),
    )


def test_check_entry_refuses_bad_index_arrays() -> None:
    arrays, meta = entry("csr")
    fails(
        "col",
        "expected 3 uint8 entries (3 bytes), got 4 bytes",
        {**arrays, "col": torch.tensor([1, 0, 3, 0], dtype=torch.uint8)},
        meta,
    )
    fails(
        "col",
        "expected 3 uint16 entries (6 bytes), got 3 bytes",
        arrays,
        with_(meta, index_dtypes={"rowptr": "uint8", "col": "uint16"}),
    )
    fails(
        "col",
        "expected 3 uint8 entries (3 bytes), got 3 torch.int32",
        {**arrays, "col": arrays["col"].int()},
        meta,
    )
    fails(
        "col",
        "expected 3 uint8 entries (3 bytes), got 3 bytes",
        {**arrays, "col": arrays["col"][None]},
        meta,
    )
    bad = torch.tensor([1, 0, 3], dtype=torch.uint8)
    for rowptr in ([1, 1, 3], [0, 1, 2], [0, 2, 1]):
        fails(
            "rowptr",
            "expected non-decreasing row pointers from 0 to nnz=3",
            {**arrays, "rowptr": torch.tensor(rowptr, dtype=torch.uint8)},
            meta,
        )
    sf.check_entry({**arrays, "col": bad}, meta)
    fails(
        "col",
        "column 4 of a matrix with 4 columns",
        {**arrays, "col": torch.tensor([1, 4, 3], dtype=torch.uint8)},
        meta,
    )
    fails(
        "col",
        "column 9 of a matrix with 4 columns",
        {**arrays, "col": torch.tensor([9, 0, 3], dtype=torch.uint8)},
        meta,
    )

    arrays, meta = entry("bitmask")
    fails(
        "bits",
        "marks 4 entries, nnz says 3",
        {**arrays, "bits": torch.tensor([0b01001011], dtype=torch.uint8)},
        meta,
    )
    fails(
        "bits",
        "marks 2 entries, nnz says 3",
        {**arrays, "bits": torch.tensor([0b01001000], dtype=torch.uint8)},
        meta,
    )

    arrays, meta = entry("rle")
    sf.check_entry(arrays, meta)  # gaps 1, 2, 2: the last value is entry 7 of 8
    for gaps, last in (([1, 2, 3], 8), ([1, 2, 4], 9), ([255, 255, 255], 767)):
        fails(
            "gaps",
            f"run lengths reach entry {last} of a tensor of 8",
            {**arrays, "gaps": torch.tensor(gaps, dtype=torch.uint8)},
            meta,
        )


def test_check_entry_refuses_bad_quantization_fields() -> None:
    q = quantized(8, 2, True)
    arrays, meta = sf.encode(q.dequantize(), "csr", q)
    good = meta["quant"]
    shape_msg = (
        "expected {'bits': 4 or 8, 'group': null or a positive integer, 'transposed': "
        "true/false, 'codes_shape': [rows, cols]}, got "
    )
    for bad in (
        [good],
        {**good, "bits": 3},
        {**good, "bits": True},
        {**good, "bits": None},
        {**good, "group": 0},
        {**good, "group": -2},
        {**good, "group": True},
        {**good, "group": 2.0},
        {**good, "transposed": 0},
        {**good, "codes_shape": [2, -5]},
        {**good, "codes_shape": [10]},
        {**good, "codes_shape": [1, 2, 5]},
    ):
        fails("quant", shape_msg + repr(bad), arrays, with_(meta, quant=bad))
    fails(
        "quant.codes_shape",
        "[5, 2] does not fit the tensor's shape [2, 5]",
        arrays,
        with_(meta, quant={**good, "codes_shape": [5, 2]}),
    )
    fails(
        "quant.codes_shape",
        "[2, 5] does not fit the tensor's shape [2, 5]",
        arrays,
        with_(meta, quant={**good, "transposed": True}),
    )
    fails(
        "quant.codes_shape",
        "[2, 5] does not fit the tensor's shape [1, 2, 5]",
        arrays,
        with_(meta, shape=[1, 2, 5], quant={**good, "transposed": True}),
    )
    fails(
        "quant.codes_shape",
        "[2, 5] does not fit the tensor's shape [10]",
        arrays,
        with_(meta, shape=[10]),
    )
    sf.check_entry(arrays, with_(meta, shape=[2, 5, 1]))  # any shape whose matrix is 2 x 5
    fails(
        "arrays",
        "missing ['scale'], unexpected [] (index 'csr')",
        {k: v for k, v in arrays.items() if k != "scale"},
        meta,
    )
    fails(
        "values",
        "expected int8 of shape [9], got uint8 of shape [9]",
        {**arrays, "values": arrays["values"].view(torch.uint8)},
        meta,
    )
    fails(
        "scale",
        "expected float32 of shape [2, 3], got float32 of shape [2, 1]",
        {**arrays, "scale": torch.ones(2, 1)},
        meta,
    )
    fails(
        "scale",
        "expected float32 of shape [2, 1], got float32 of shape [2, 3]",
        arrays,
        with_(meta, quant={**good, "group": None}),
    )
    fails(
        "scale",
        "expected float32 of shape [2, 3], got float64 of shape [2, 3]",
        {**arrays, "scale": arrays["scale"].double()},
        meta,
    )
    fails(
        "zero_point",
        "expected int8 of shape [2, 3], got uint8 of shape [2, 3]",
        {**arrays, "zero_point": arrays["zero_point"].view(torch.uint8)},
        meta,
    )
    fails(
        "zero_point",
        "expected int8 of shape [2, 3], got int8 of shape [2, 2]",
        {**arrays, "zero_point": arrays["zero_point"][:, :2]},
        meta,
    )
    fails(
        "scale",
        "expected float32 of shape [2, 2], got float32 of shape [2, 3]",
        arrays,
        with_(meta, quant={**good, "group": 3}),
    )  # ceil(5 / 3) = 2 groups
    fails(
        "values",
        "expected uint8 of shape [5], got int8 of shape [9]",
        arrays,
        with_(meta, quant={**good, "bits": 4}),
    )  # int4: ceil(9 / 2) bytes


def test_check_entry_sizes_the_declared_tensor_by_its_dtype() -> None:
    from prunekit.compress.validate import memory_bytes

    arrays, meta = entry()
    rows = memory_bytes() // 48  # rows x 8 entries: 2/3 of memory in float32, 4/3 in float64
    with pytest.raises(SavedModelError, match=r"^: shape: declares .* more than this machine's"):
        sf.check_entry(arrays, with_(meta, dtype="float64", shape=[rows, 8]))
    with pytest.raises(ValueError, match="^rowptr: expected "):  # fits: the next check speaks
        sf.check_entry(arrays, with_(meta, dtype="float32", shape=[rows, 8]))


def test_check_entry_quantization_edge_cases() -> None:
    q = quantized(8, 2, True)
    q.group, q.scale = 1, torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) + 0.5
    q.zero_point = torch.tensor([[1, 0, 2, 0, 1], [0, 3, 0, 1, 0]], dtype=torch.int8)
    arrays, meta = sf.encode(q.dequantize(), "csr", q)  # groups of one column are allowed
    sf.check_entry(arrays, meta)
    assert meta["quant"]["group"] == 1 and arrays["scale"].shape == (2, 5)
    # transposed codes need a 2-D tensor, even one whose first two dims would fit
    q = quantized(8, 2, True, transposed=True)
    arrays, meta = sf.encode(q.dequantize(), "csr", q)
    sf.check_entry(arrays, meta)
    fails(
        "quant.codes_shape",
        "[2, 5] does not fit the tensor's shape [5, 2, 1]",
        arrays,
        with_(meta, shape=[5, 2, 1]),
    )


def test_check_entry_row_pointers_must_not_decrease_and_padding_bits_are_ignored() -> None:
    arrays, meta = entry("csr")
    fails(
        "rowptr",
        "expected non-decreasing row pointers from 0 to nnz=3",
        {**arrays, "rowptr": torch.tensor([0, 4, 3], dtype=torch.uint8)},
        meta,
    )
    x = torch.tensor([[0.0, 1.5, 0.0], [2.5, 0.0, 0.0]])  # 6 entries: 2 padding bits
    arrays, meta = sf.encode(x, "bitmask")
    assert arrays["bits"].tolist() == [0b01010000]
    padded = {**arrays, "bits": torch.tensor([0b01010011], dtype=torch.uint8)}
    sf.check_entry(padded, meta)  # bits past the last entry are not read
    assert torch.equal(sf.decode(padded, meta)[0], x)
