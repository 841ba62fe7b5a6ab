"""prunekit.runtime.accelerate: the compiled sparse kernels (CSR, bitmap, tiles and N:M, float32
and int8 codes, one to 130 input rows, fused activations), the swap decision and the fallback
when no kernel can be built."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import pickle
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.runtime import kernels
from prunekit.runtime.accelerate import AccelerateReport, SparseLinear, accelerate

acc_mod = importlib.import_module("prunekit.runtime.accelerate")  # the module, not the function

LIB = kernels.load()
needs_kernels = pytest.mark.skipif(
    LIB is None, reason=f"compiled kernels unavailable: {kernels.why_unavailable()}"
)
# every format runs everywhere the kernels build (tiles has a plain C path), except bitmap,
# which needs AVX-512 with VBMI2
FORMATS_HERE = [
    "csr",
    "tiles",
    "nm",
    pytest.param(
        "bitmap",
        marks=pytest.mark.skipif(
            LIB is None or not LIB.has_bitmap, reason="bitmap kernel needs AVX-512 with VBMI2"
        ),
    ),
]


def sparse_linear(
    in_f: int = 512, out_f: int = 256, sparsity: float = 0.9, bias: bool = True
) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) >= sparsity)
    return layer


class Net(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = sparse_linear(512, 256, 0.9, bias)
        self.fc2 = sparse_linear(256, 512, 0.9, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def force_swap(
    model: nn.Module, x: torch.Tensor, formats: str | None = None
) -> tuple[nn.Module, AccelerateReport]:
    # min_speedup=0: swap every sparse layer regardless of timing, so outputs are tested
    return accelerate(model, x, min_speedup=0.0, formats=formats)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS_HERE)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 512), (32, 512), (1, 7, 512), (4, 9, 512)])
def test_outputs_match_dense(shape: tuple[int, ...], bias: bool, fmt: str) -> None:
    model = Net(bias).eval()
    x = torch.randn(*shape)
    fast, report = force_swap(model, x, fmt)
    assert isinstance(fast.fc1, SparseLinear) and isinstance(fast.fc2, SparseLinear)
    assert fast.fc1.format == fmt and report.row("fc1").format == f"{fmt}-f32"
    assert report.swapped == ["fc1", "fc2"]
    assert isinstance(model.fc1, nn.Linear) and not isinstance(model.fc1, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
        # other batch sizes than the example work too
        y = torch.randn(5, 512)
        torch.testing.assert_close(fast(y), model(y), atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS_HERE)
def test_sparse_linear_module_roundtrip(fmt: str) -> None:
    layer = sparse_linear(512, 256, 0.8)
    sparse = SparseLinear.from_linear(layer, format=fmt)
    assert sparse.nnz == int((layer.weight != 0).sum())
    assert "density=" in repr(sparse) and ("uint16" in repr(sparse) or fmt != "csr")
    torch.testing.assert_close(sparse.to_dense().weight, layer.weight)
    torch.testing.assert_close(sparse.to_dense().bias, layer.bias)
    x = torch.randn(3, 512)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        torch.testing.assert_close(clone(x), layer(x).detach(), atol=1e-4, rtol=1e-4)
    assert torch.equal(sparse.dense_weight(), layer.weight.detach())  # the format is lossless
    state = {k: v.clone() for k, v in sparse.state_dict().items()}
    fresh = SparseLinear(512, 256, state, state["bias"], format=fmt)
    assert torch.equal(fresh(x), sparse(x))
    # buffers replaced in place (load_state_dict) or by assignment are picked up
    other = SparseLinear.from_linear(sparse_linear(512, 256, 0.8), format=fmt)
    other.load_state_dict(sparse.state_dict())
    assert torch.equal(other(x), sparse(x))
    # inputs that need a gradient take the dense path, and gradients flow to the input
    xg = torch.randn(2, 512, requires_grad=True)
    sparse(xg).sum().backward()
    torch.testing.assert_close(xg.grad, layer.weight.detach().sum(0).expand(2, -1))
    # empty rows and an all-zero weight
    zero = SparseLinear.from_dense(torch.zeros(4, 8), torch.ones(4), format=fmt)
    torch.testing.assert_close(zero(torch.randn(3, 8)), torch.ones(3, 4))
    torch.testing.assert_close(zero(torch.randn(1, 8)), torch.ones(1, 4))


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS_HERE)
@pytest.mark.parametrize("in_f", [7, 16, 33, 100, 1000])
@pytest.mark.parametrize("batch", [1, 3, 32, 33, 130])
def test_kernel_shapes_and_int8_codes(fmt: str, in_f: int, batch: int) -> None:
    # widths that are and are not multiples of the 16-column block and of the vector width,
    # rows of every length (0 to in_f non-zeros); float32 and int8 values
    torch.manual_seed(in_f + batch)
    out_f = 37
    keep = torch.rand(out_f, in_f) < torch.linspace(0, 1, out_f).unsqueeze(1)
    w = torch.randn(out_f, in_f) * keep
    b = torch.randn(out_f)
    x = torch.randn(batch, in_f)
    sparse = SparseLinear.from_dense(w, b, format=fmt)
    torch.testing.assert_close(sparse(x), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    codes = (torch.randint(-127, 128, (out_f, in_f)) * keep).to(torch.int8)
    scale = torch.rand(out_f) * 0.01 + 1e-3
    q = SparseLinear.from_dense(codes, b, format=fmt, scale=scale)
    dequantized = codes.float() * scale.unsqueeze(1)
    assert torch.equal(q.dense_weight(), dequantized)
    assert "int8" in repr(q)
    torch.testing.assert_close(q(x), F.linear(x, dequantized, b), atol=1e-4, rtol=1e-5)


@needs_kernels
def test_quantized_model_runs_on_int8_codes() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(sparse_linear(256, 256, 0.7), nn.ReLU(), nn.Linear(256, 8))
    quantized = prunekit.quantize(net, bits=8, mode="int").model  # the head stays float
    x = torch.randn(4, 256)
    fast, report = accelerate(quantized, x, min_speedup=0.0)
    assert report.row("0").format.endswith("-i8") and fast[0].values.dtype == torch.int8
    with torch.no_grad():
        torch.testing.assert_close(fast(x), quantized(x), atol=1e-4, rtol=1e-4)
    as_float, report = accelerate(quantized, x, min_speedup=0.0, int8=False)
    assert report.row("0").format.endswith("-f32")
    # group-wise codes do not fit the per-row-scale kernel: their float values are used
    grouped = prunekit.quantize(net, bits=8, granularity="group:64", mode="int").model
    _, report = accelerate(grouped, x, min_speedup=0.0)
    assert report.row("0").format.endswith("-f32")


@needs_kernels
def test_wide_layer_int32_columns() -> None:
    w = torch.zeros(3, 70000)
    w[0, 69999] = 2.0
    w[2, 5] = -1.0
    sparse = SparseLinear.from_dense(w)
    assert sparse.col_indices.dtype == torch.int32
    x = torch.randn(2, 70000)
    torch.testing.assert_close(sparse(x), F.linear(x, w), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_dense_layer_kept_and_report() -> None:
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), sparse_linear(256, 128, 0.9))
    fast, report = force_swap(model, torch.randn(2, 512))
    assert type(fast[0]) is nn.Linear
    assert isinstance(fast[2], SparseLinear)
    row = report.row("0")
    assert not row.swapped and row.reason == "dense" and row.density == 1.0
    assert report.row("2").swapped and report.row("2").input_shape == [2, 256]
    assert report.row("2").dense_ms is not None and report.row("2").sparse_ms is not None
    text = str(report)
    assert "density" in text and "dense ms" in text and "1/2" in text and "C kernels" in text
    assert report.to_dict()["rows"][1]["swapped"] is True


@needs_kernels
def test_swap_rule_and_other_dtypes() -> None:
    model = nn.Sequential(sparse_linear(512, 256, 0.9), sparse_linear(256, 64, 0.9).double())
    x = torch.randn(1, 512)

    class Cast(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner[1](self.inner[0](x).double())

    fast, report = accelerate(Cast(model), x, min_speedup=float("inf"), threads=1)
    assert report.swapped == []
    assert report.row("inner.0").reason == "not faster"
    assert report.row("inner.1").reason == "dtype torch.float64"
    assert type(fast.inner[0]) is nn.Linear


@needs_kernels
def test_masked_model_and_inplace() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 32))
    masked = prunekit.prune(net, 0.8).model
    x = torch.randn(4, 512)
    with torch.no_grad():
        expected = masked(x)
    fast, report = force_swap(masked, x)
    # every masked layer (prune may leave the output head dense) is swapped
    assert "0" in report.swapped
    assert report.swapped == [r.name for r in report.rows if r.density < 1.0]
    assert report.row("0").density == pytest.approx(0.2, abs=0.05)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, atol=1e-4, rtol=1e-4)
    same, _ = accelerate(masked, x, min_speedup=0.0, inplace=True)
    assert same is masked and isinstance(masked[0], SparseLinear)


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PRUNEKIT_NO_KERNELS", "1")
    kernels.reset()
    yield
    monkeypatch.delenv("PRUNEKIT_NO_KERNELS")
    kernels.reset()


def test_fallback_without_kernels(no_kernels: None) -> None:
    assert kernels.load() is None and "PRUNEKIT_NO_KERNELS" in kernels.why_unavailable()
    model = Net()
    x = torch.randn(2, 512)
    fast, report = accelerate(model, x, min_speedup=0.0)
    assert report.swapped == []
    assert all(r.reason == "kernels unavailable" for r in report.rows)
    assert "PRUNEKIT_NO_KERNELS" in str(report)
    assert type(fast.fc1) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    # a SparseLinear made elsewhere still computes (dense weight rebuilt)
    layer = sparse_linear(512, 256, 0.9)
    for fmt in ("csr", "bitmap", "tiles", "nm"):
        sparse = SparseLinear.from_linear(layer, format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), layer(x), atol=1e-5, rtol=1e-5)
        fused = SparseLinear.from_dense(layer.weight, layer.bias, format=fmt, activation="gelu")
        with torch.no_grad():
            torch.testing.assert_close(fused(x), F.gelu(layer(x)), atol=1e-5, rtol=1e-5)


def test_failed_build_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    kernels.reset()
    try:
        assert kernels.load() is None
        assert "building the C kernels" in kernels.why_unavailable()
        assert not any(tmp_path.rglob("*.so"))
    finally:
        monkeypatch.undo()
        kernels.reset()
    assert (kernels.load() is None) == (LIB is None)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        accelerate("model", torch.randn(1, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads"):
        accelerate(nn.Linear(4, 4), torch.randn(1, 4), threads=0)
    with pytest.raises(ValueError, match="formats"):
        accelerate(nn.Linear(4, 4), torch.randn(1, 4), formats=("ell",))
    with pytest.raises(ValueError, match="format"):
        SparseLinear.from_dense(torch.ones(2, 2), format="coo")
    with pytest.raises(ValueError, match="scale"):
        SparseLinear.from_dense(torch.ones(2, 2, dtype=torch.int8), scale=torch.ones(3))


@needs_kernels
def test_unwritable_cache_falls_back_to_temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(blocker))  # cache_dir() cannot be created
    kernels.reset()
    try:
        lib = kernels.load()
        assert lib is not None, kernels.why_unavailable()
        assert not str(lib.path).startswith(str(blocker))
    finally:
        monkeypatch.undo()
        kernels.reset()


@pytest.mark.parametrize("fmt", ["csr", "bitmap", "tiles", "nm"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 32), (17, 33), (40, 100), (3, 70000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_formats_round_trip_exactly(fmt: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    from prunekit.runtime import sparse_formats

    torch.manual_seed(shape[0] * 7 + shape[1])
    keep = torch.rand(shape) < 0.3
    if dtype == torch.int8:
        w = (torch.randint(1, 128, shape) * torch.sign(torch.randn(shape))).to(torch.int8)
    else:
        w = torch.randn(shape)
    w = w * keep.to(w.dtype)
    w[0] = 0  # an empty row
    parts = sparse_formats.encode(w, fmt)
    assert set(parts) == {"values", *sparse_formats.index_names(fmt)}
    assert parts["values"].dtype == dtype
    decoded = sparse_formats.decode(parts, fmt, *shape)
    assert decoded.dtype == dtype and torch.equal(decoded, w)
    # stored non-zeros are exactly the weight's
    assert int((parts["values"] != 0).sum()) == int((w != 0).sum())


def test_sparser_weights_store_fewer_bytes() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    for fmt in ("csr", "bitmap", "tiles"):
        sizes = [
            SparseLinear.from_dense(w * (torch.rand_like(w) >= s), format=fmt).nbytes()
            for s in (0.5, 0.7, 0.9)
        ]
        assert sizes[0] > sizes[1] > sizes[2], (fmt, sizes)
        assert sizes[1] < w.numel() * 4  # 70 % sparse is smaller than the dense float32 weight


def sparse_conv(conv: nn.Conv2d, sparsity: float = 0.8) -> nn.Conv2d:
    torch.manual_seed(1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= sparsity)
    return conv


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS_HERE)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 5},
        {"kernel_size": (3, 2), "stride": 2, "dilation": (1, 2), "padding": (2, 1)},
        {"kernel_size": 1},
        {"kernel_size": 3, "padding": "same", "bias": False},
    ],
)
@pytest.mark.parametrize("shape", [(1, 6, 12, 12), (4, 6, 9, 11), (6, 10, 10)])
def test_conv_outputs_match_dense(kwargs: dict, shape: tuple[int, ...], fmt: str) -> None:
    conv = sparse_conv(nn.Conv2d(6, 20, **kwargs))
    x = torch.randn(*shape)
    fast, report = accelerate(conv, x, min_speedup=0.0, formats=fmt)
    assert isinstance(fast, acc_mod.SparseConv2d)
    assert report.rows[0].kind == "Conv2d" and report.rows[0].format == f"{fmt}-f32"
    with torch.no_grad():
        expected = conv(x)
        got = fast(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.to_dense().weight, conv.weight.detach())


@needs_kernels
def test_conv_network_int8_and_unsupported() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        sparse_conv(nn.Conv2d(3, 16, 3, padding=1)),
        nn.ReLU(),
        sparse_conv(nn.Conv2d(16, 16, 3, groups=4)),
        nn.ReLU(),
        sparse_conv(nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect")),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )
    quantized = prunekit.quantize(net, bits=8, mode="int").model
    x = torch.randn(2, 3, 8, 8)
    fast, report = accelerate(quantized, x, min_speedup=0.0)
    assert report.row("0").swapped and report.row("0").format.endswith("-i8")
    assert report.row("2").reason == "groups=4" and report.row("4").reason.startswith(
        "padding_mode"
    )
    with torch.no_grad():
        torch.testing.assert_close(fast(x), quantized(x), atol=1e-4, rtol=1e-4)
    assert "(Conv2d)" in str(report)


def _cpu_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


@pytest.mark.skipif(LIB is None, reason="compiled kernels unavailable")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 -march levels")
@pytest.mark.parametrize(
    "march, isa",
    [
        pytest.param(
            "x86-64-v3",
            "avx2",
            marks=pytest.mark.skipif(not _cpu_has("avx2"), reason="CPU without AVX2"),
        ),
        ("x86-64", "scalar"),
    ],
)
def test_portable_builds_compute_the_same(
    march: str, isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the AVX2 and plain-C code paths, which an AVX-512 machine never runs with -march=native
    monkeypatch.setenv("PRUNEKIT_MARCH", march)
    kernels.reset()
    try:
        lib = kernels.load()
        assert lib is not None, kernels.why_unavailable()
        assert lib.isa == isa and not lib.has_bitmap
        assert lib.vector_formats == (("csr", "tiles", "nm") if isa == "avx2" else ("csr",))
        torch.manual_seed(0)
        cases = ((7, 1), (100, 1), (100, 5), (1000, 1), (1000, 3), (70000, 2), (384, 8))
        for in_f, batch in (*cases, (384, 32), (130, 33), (66, 130), (1000, 64)):
            keep = torch.rand(37, in_f) < torch.linspace(0, 1, 37).unsqueeze(1)
            w = torch.randn(37, in_f) * keep
            b = torch.randn(37)
            x = torch.randn(batch, in_f)
            codes = (torch.randint(-127, 128, (37, in_f)) * keep).to(torch.int8)
            scale = torch.rand(37) * 0.01 + 1e-3
            for fmt in ("csr", "tiles", "bitmap", "nm"):  # bitmap: no kernel here, dense fallback
                sparse = SparseLinear.from_dense(w, b, format=fmt)
                torch.testing.assert_close(sparse(x), F.linear(x, w, b), atol=1e-3, rtol=1e-4)
                q = SparseLinear.from_dense(codes, b, format=fmt, scale=scale)
                expected = F.linear(x, codes.float() * scale.unsqueeze(1), b)
                torch.testing.assert_close(q(x), expected, atol=1e-3, rtol=1e-4)
    finally:
        monkeypatch.undo()
        kernels.reset()


@pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None, reason="ziglang not installed (prunekit[kernels])"
)
def test_registry_compiler_builds_when_the_machine_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)  # no cc, gcc or clang
    kernels.reset()
    try:
        lib = kernels.load()
        assert lib is not None, kernels.why_unavailable()
        assert "ziglang" in lib.compiler and "zig cc" in lib.describe()
        assert str(lib.path).startswith(str(tmp_path))
        torch.manual_seed(0)
        w = torch.randn(40, 300) * (torch.rand(40, 300) > 0.8)
        x = torch.randn(3, 300)
        for fmt in lib.vector_formats:
            sparse = SparseLinear.from_dense(w, format=fmt)
            torch.testing.assert_close(sparse(x), F.linear(x, w), atol=1e-4, rtol=1e-4)
    finally:
        monkeypatch.undo()
        kernels.reset()


def two_four(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A random weight with 2 non-zeros in every group of 4 columns (the last group partial)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // 4)
    top = torch.rand(rows, groups, 4, generator=g).argsort(-1)[..., 2:]
    keep = torch.zeros(rows, groups, 4).scatter_(-1, top, 1.0).reshape(rows, -1)[:, :cols]
    return torch.randn(rows, cols, generator=g) * keep


def test_nm_format_layout_and_errors() -> None:
    from prunekit.runtime import sparse_formats

    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0]])
    assert sparse_formats.nm_fit(w) == (4, 16)  # 4 slots per 16 columns beat 2 per 4
    assert sparse_formats.nm_fit(two_four(64, 256)) == (2, 4)
    parts = sparse_formats.encode(w, "nm", nm=(2, 4))
    # groups (0-3), (4-7), (8-9 + 2 zero columns): values with fillers, 2-bit positions
    assert parts["values"][:6].tolist() == [1.5, -2.0, 3.0, 0.0, 4.0, 0.0]
    slots = [1, 3, 0, 1, 1, 0]  # group 2: its non-zero at 1, then the first zero column, 0
    packed = [sum(p << (2 * i) for i, p in enumerate(slots[j : j + 4])) for j in (0, 4)]
    assert parts["nm_indices"].tolist() == packed
    assert torch.equal(sparse_formats.decode(parts, "nm", 1, 10), w)
    assert sparse_formats.nm_fit(torch.ones(3, 16)) == (4, 4)
    assert sparse_formats.nm_fit(torch.zeros(3, 8)) == (1, 16)
    eight = sparse_formats.encode(two_four(6, 40), "nm", nm=(4, 8))  # 4-bit positions
    assert eight["nm_indices"].numel() == 6 * 10 and eight["nm_shape"].tolist() == [4, 8]
    assert torch.equal(sparse_formats.decode(eight, "nm", 6, 40), two_four(6, 40))
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, columns 0-3 hold 3"):
        sparse_formats.encode(torch.ones(2, 8) * torch.tensor([1, 1, 1, 0] * 2), "nm", nm=(2, 4))
    with pytest.raises(ValueError, match="powers of two"):
        sparse_formats.encode(w, "nm", nm=(3, 4))
    with pytest.raises(ValueError, match="nm= is for"):
        sparse_formats.encode(w, "csr", nm=(2, 4))
    # 2:4 float32: 4 bytes per value + 2 bits of position, against CSR's 4 + 2 bytes
    w24 = two_four(64, 256)
    nm_bytes = SparseLinear.from_dense(w24, format="nm").nbytes()
    assert nm_bytes < 0.75 * SparseLinear.from_dense(w24, format="csr").nbytes()


@needs_kernels
@pytest.mark.parametrize("batch", [1, 7, 8, 32, 33, 64, 128, 130])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
def test_nm_and_fused_activation_match_dense(batch: int, activation: str | None) -> None:
    torch.manual_seed(batch)
    w, b = two_four(45, 130, seed=batch), torch.randn(45)
    x = torch.randn(batch, 130)
    b[3] = float("nan") if activation == "relu" else b[3]  # NaN stays NaN through relu
    dense = F.linear(x, w, b)
    expected = {
        None: dense,
        "relu": torch.relu(dense),
        "gelu": F.gelu(dense),
        "gelu_tanh": F.gelu(dense, approximate="tanh"),
    }[activation]
    for fmt in ("nm", "csr", "tiles"):
        sparse = SparseLinear.from_dense(w, b, format=fmt, activation=activation)
        torch.testing.assert_close(sparse(x), expected, atol=1e-4, rtol=1e-4, equal_nan=True)
        back = sparse.to_dense()
        if activation is not None:
            assert isinstance(back, nn.Sequential) and f"activation={activation}" in repr(sparse)
        with torch.no_grad():
            torch.testing.assert_close(back(x), expected, atol=1e-4, rtol=1e-4, equal_nan=True)
    codes = (torch.randint(-127, 128, w.shape) * (w != 0)).to(torch.int8)
    scale = torch.rand(45) * 0.01 + 1e-3
    q = SparseLinear.from_dense(codes, b, format="nm", scale=scale, activation=activation)
    assert "N:M(2:4" in repr(q)
    ref = F.linear(x, codes.float() * scale.unsqueeze(1), b)
    ref = (
        ref
        if activation is None
        else SparseLinear.from_dense(w, activation=activation)._activate(ref)
    )
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4, equal_nan=True)
    with pytest.raises(ValueError, match="activation"):
        SparseLinear.from_dense(w, format="nm", activation="tanh")


@needs_kernels
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("batch", [1, 32])
def test_fused_gelu_is_accurate_over_the_whole_range(activation: str, batch: int) -> None:
    """The kernels' own GELU (no libm, vectorised) against float64, tails included."""
    values = torch.linspace(-40.0, 40.0, 4001)
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, -1e4])])
    width = 64
    values = torch.cat([values, torch.zeros(-len(values) % width)]).view(-1, width)
    layer = SparseLinear.from_dense(torch.eye(width), torch.zeros(width), format="csr",
                                    activation=activation)  # fmt: skip
    x64 = values.double()
    if activation == "gelu":
        ref = x64 * 0.5 * torch.special.erfc(-x64 / math.sqrt(2.0))
    else:
        ref = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    rows = values.split(batch) if batch > 1 else [r.unsqueeze(0) for r in values]
    got = torch.cat([layer(r) for r in rows]).double()
    err = (got - ref).abs() / ref.abs().clamp(min=1.0)
    assert err.max().item() < 1e-6, (
        f"worst {err.max().item():.2e} at {values.flatten()[err.argmax()]}"
    )
    assert torch.isfinite(got).all()


@needs_kernels
def test_accelerate_tries_nm_only_where_the_weight_fits() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), sparse_linear(128, 64, 0.5))
    with torch.no_grad():
        net[0].weight.copy_(two_four(128, 256))
    x = torch.randn(32, 256)
    fast, report = accelerate(net, x, min_speedup=0.0, formats="nm")
    assert report.row("0").format == "nm-f32" and fast[0].nm_shape.tolist() == [2, 4]
    assert not report.row("2").swapped and "no format fits" in report.row("2").reason
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)
    _, report = accelerate(net, x, min_speedup=0.0)  # default: every vectorised format
    assert "nm-f32" in report.row("0").candidates_ms or LIB is None or LIB.isa == "scalar"
    assert "nm-f32" not in report.row("2").candidates_ms


@needs_kernels
def test_sparse_linear_takes_any_input_layout_as_linear_does() -> None:
    """1-D inputs, several leading dims, non-contiguous views and empty batches give
    F.linear's result and shape (the kernel reads rows of in_features from memory)."""
    torch.manual_seed(0)
    w = torch.randn(12, 40) * (torch.rand(12, 40) > 0.7)
    b = torch.randn(12)
    layer = SparseLinear.from_dense(w, b, format="csr")
    base = torch.randn(3, 40, 5)
    inputs = [
        torch.randn(40),
        torch.randn(2, 3, 40),
        base.transpose(1, 2),  # (3, 5, 40), not contiguous
        torch.randn(6, 80)[:, ::2],  # strided rows
        torch.randn(0, 40),
        torch.randn(2, 0, 40),
    ]
    with torch.no_grad():
        for x in inputs:
            got, expected = layer(x), F.linear(x, w, b)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
