"""Every code path of the compiled sparse kernels against the plain-C (scalar) build.

``csrc/sparse_kernels.c`` has one code path per CPU class, chosen at compile time by
``-march``: plain C, AVX2 (+FMA), AVX-512 (F/BW/VL) and AVX-512 with VBMI2 (which adds the
bitmap kernel). ``-march=native`` only ever builds the widest one, so this file builds each path
the CPU can run (``PRUNEKIT_MARCH``), runs the kernels *directly* (the return code proves the
kernel ran and did not fall back to dense), and compares every vectorised result with the scalar
build's on the same weights: csr, tiles, bitmap and N:M (2:4 and 2:8 weights), float32 and
int8 codes, batch 1 and the batched loops (tile widths 1-4 and a remainder; the many-row
kernels' blocks of 8-64 input rows with 1-4 vectors and a partial last block, up to 130 rows),
rows and columns that are not multiples of the vector widths or of M, one and two threads, and
the fused activations. The scalar build is itself checked against a float64 ``F.linear``. Paths the CPU cannot run are skipped with the missing CPU
flag in the reason (``pytest -rs``); ``pytest -s`` prints which paths and formats ran.

The aarch64 (NEON) path cannot be loaded here: ``tests/csrc/kernel_harness.c`` is
cross-compiled with zig and run under qemu-user when both are installed, and the same harness
runs natively as a check of itself.

``tests/test_accelerate.py::test_portable_builds_compute_the_same`` checks the AVX2 and scalar
builds against ``F.linear`` through the module; this file adds the AVX-512 paths and the
path-against-scalar comparison.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from prunekit.runtime import kernels
from prunekit.runtime.accelerate import SparseLinear

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 -march levels only"),
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


FLAGS = cpu_flags()
AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512cd", "avx512dq")
# (name, -march, the isa string the build reports, CPU flags it needs)
PATHS = [
    ("scalar", "x86-64", "scalar", ()),
    ("avx2", "x86-64-v3", "avx2", ("avx2", "fma")),
    ("avx512", "x86-64-v4", "avx512", AVX512),
    # no -march level means "AVX-512 + VBMI2" alone: native builds it on a CPU that has it
    ("avx512+vbmi2", "native", "avx512+vbmi2", (*AVX512, "avx512_vbmi2")),
]


def _missing(flags: tuple[str, ...]) -> list[str]:
    return [f for f in flags if f not in FLAGS]


def _cases() -> list[tuple[int, int, int, int]]:
    """(rows, in_features, batch, threads): tails of every vector width and batch tile."""
    return [
        (37, 7, 1, 1),
        (37, 100, 1, 1),
        (37, 100, 5, 1),  # AVX-512 tiles: a tile of 4 and one of 1
        (37, 1000, 2, 1),
        (37, 1000, 3, 2),
        (16, 64, 4, 1),
        (5, 300, 1, 2),
        # many input rows: the packed blocks of 8 (AVX2) / 16 (AVX-512) lanes, 1-4 vectors
        (37, 100, 8, 2),
        (19, 130, 33, 1),
        (64, 384, 32, 2),
        (37, 1000, 65, 2),
        (23, 66, 130, 1),
        # several blocks of 64 output rows and epilogue tiles of 16 with a remainder
        (150, 300, 20, 2),
    ]


# The many-row kernels cut the packed inputs into column chunks that fit L1; the chunks are
# forced (64 columns each, pk_set_chunk_bytes) on these batched cases, whose widths give 2 to
# 16 chunks with a partial last one, and must give the unchunked scalar result.
CHUNK_BYTES = 256


def _chunked_cases() -> list[tuple[int, int, int, int]]:
    return [c for c in _cases() if c[2] > 1 and c[1] > 64]


ACTS = (None, "relu", "gelu")  # the epilogue; one per case, in turn


def _weights(rows: int, in_f: int, fmt_is_nm: bool = False):
    g = torch.Generator().manual_seed(rows * 1000 + in_f)
    keep = torch.rand(rows, in_f, generator=g) < torch.linspace(0, 1, rows).unsqueeze(1)
    w = torch.randn(rows, in_f, generator=g) * keep
    codes = (torch.randint(-127, 128, (rows, in_f), generator=g) * keep).to(torch.int8)
    scale = torch.rand(rows, generator=g) * 0.01 + 1e-3
    bias = torch.randn(rows, generator=g)
    x = torch.randn(130, in_f, generator=g)
    # N:M weights for the nm format: 2:4 on even rows, 2:8 on odd ones is not one N:M, so
    # 2:4 when in_f is even and 2:8 when odd (both with a partial last group when in_f % M)
    m = 4 if in_f % 2 == 0 else 8
    groups = -(-in_f // m)
    score = torch.rand(rows, groups, m, generator=g)
    top = score.argsort(-1)[..., m - 2 :]
    nm_keep = torch.zeros(rows, groups, m).scatter_(-1, top, 1.0).reshape(rows, -1)[:, :in_f]
    w_nm = torch.randn(rows, in_f, generator=g) * nm_keep
    codes_nm = (torch.randint(-127, 128, (rows, in_f), generator=g) * nm_keep).to(torch.int8)
    if fmt_is_nm:
        return w_nm, codes_nm, scale, bias, x
    return w, codes, scale, bias, x


def run_kernel(layer: SparseLinear, x: torch.Tensor, threads: int) -> torch.Tensor | None:
    """The kernel's output, or None when this build has no kernel for the format (rc -1)."""
    plan = layer._kernel_plan()
    assert plan is not None, "the kernels are loaded but no plan was made"
    run, address = plan
    x = x.contiguous()
    n = x.shape[0]
    y = torch.full((n, layer.out_features), float("nan"))
    xt = x.t().contiguous() if n > 1 and layer.format == "csr" else None
    rc = run(address, n, x.data_ptr(), None if xt is None else xt.data_ptr(), y.data_ptr(), threads)
    if rc == -1:
        return None
    assert rc == 0, f"pk_run returned {rc}"
    return y


def outputs_of_build(march: str) -> tuple[str, dict]:
    """Build with ``-march``, run every case and format; (isa reported, {case: output})."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_MARCH", march)
        mp.delenv("PRUNEKIT_NO_KERNELS", raising=False)
        kernels.reset()
        try:
            lib = kernels.load()
            assert lib is not None, f"-march={march}: {kernels.why_unavailable()}"
            results = {}
            for i, (rows, in_f, batch, threads) in enumerate(_cases()):
                _run_case(results, i, rows, in_f, batch, threads, ())
            before = lib.lib.pk_set_chunk_bytes(CHUNK_BYTES)
            try:
                for rows, in_f, batch, threads in _chunked_cases():
                    i = _cases().index((rows, in_f, batch, threads))
                    _run_case(results, i, rows, in_f, batch, threads, ("chunked",))
            finally:
                lib.lib.pk_set_chunk_bytes(before)
            return lib.isa, results
        finally:
            kernels.reset()


def _run_case(results: dict, i: int, rows: int, in_f: int, batch: int, threads: int, tag) -> None:
    act = ACTS[i % len(ACTS)]
    for fmt in ("csr", "tiles", "bitmap", "nm"):
        w, codes, scale, bias, x = _weights(rows, in_f, fmt == "nm")
        nm = (2, 4 if in_f % 2 == 0 else 8) if fmt == "nm" else None
        for kind in ("f32", "i8"):
            if kind == "f32":
                layer = SparseLinear.from_dense(w, bias, format=fmt, nm=nm, activation=act)
            else:
                layer = SparseLinear.from_dense(
                    codes, bias, format=fmt, scale=scale, nm=nm, activation=act
                )
            key = (rows, in_f, batch, threads, fmt, kind, *tag)
            results[key] = run_kernel(layer, x[:batch], threads)


@pytest.fixture(scope="module")
def scalar() -> dict:
    if kernels.load() is None:
        pytest.skip(f"compiled kernels unavailable: {kernels.why_unavailable()}")
    isa, results = outputs_of_build("x86-64")
    assert isa == "scalar"
    return results


def dense_reference(key: tuple) -> torch.Tensor:
    rows, in_f, batch, threads, fmt, kind = key[:6]
    w, codes, scale, bias, x = _weights(rows, in_f, fmt == "nm")
    weight = w if kind == "f32" else codes.double() * scale.double().unsqueeze(1)
    y = x[:batch].double() @ weight.double().T + bias.double()
    act = ACTS[_cases().index((rows, in_f, batch, threads)) % len(ACTS)]
    if act == "relu":
        y = torch.relu(y)
    elif act == "gelu":
        y = torch.nn.functional.gelu(y)
    return y.float()


def test_scalar_build_matches_float64(scalar: dict, capsys) -> None:
    ran = sorted({k[4] for k, y in scalar.items() if y is not None})
    assert ran == ["csr", "nm", "tiles"]  # no bitmap kernel in plain C
    for key, y in scalar.items():
        if y is not None:
            torch.testing.assert_close(y, dense_reference(key), atol=1e-4, rtol=1e-5)
    with capsys.disabled():
        print(f"\nkernel path scalar (-march=x86-64): ran {', '.join(ran)} x f32/int8")


@pytest.mark.parametrize(
    "name, march, isa, needs",
    [
        pytest.param(
            name,
            march,
            isa,
            needs,
            marks=pytest.mark.skipif(
                bool(_missing(needs)),
                reason=f"CPU lacks {', '.join(_missing(needs))} for the {name} path",
            ),
            id=name,
        )
        for name, march, isa, needs in PATHS[1:]
    ],
)
def test_vector_path_matches_scalar(name: str, march: str, isa: str, needs, scalar, capsys) -> None:
    built, results = outputs_of_build(march)
    assert built == isa, f"-march={march} built the {built} path, expected {isa}"
    ran = []
    for key, y in results.items():
        fmt = key[4]
        if y is None:
            assert fmt == "bitmap" and isa != "avx512+vbmi2", f"{key}: no kernel ran"
            continue
        ran.append(fmt)
        # the scalar build has no bitmap kernel: its csr result is the reference for bitmap;
        # a chunked result is held to the unchunked one
        ref = scalar[(*key[:4], "csr" if fmt == "bitmap" else fmt, key[5])]
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    expected = {"csr", "tiles", "nm", "bitmap"} if isa == "avx512+vbmi2" else {"csr", "tiles", "nm"}
    assert set(ran) == expected
    with capsys.disabled():
        print(
            f"\nkernel path {name} (-march={march}): ran {', '.join(sorted(set(ran)))} "
            f"x f32/int8 on {len(_cases())} shapes ({len(_chunked_cases())} also in forced "
            "column chunks), equal to the scalar build"
        )


HARNESS = Path(__file__).resolve().parent / "csrc" / "kernel_harness.c"
KERNEL_SOURCE_DIR = Path(kernels.__file__).resolve().parent / "csrc"


def _zig() -> list[str] | None:
    import importlib.util
    import sys

    if importlib.util.find_spec("ziglang") is None:
        return None
    return [sys.executable, "-m", "ziglang", "cc"]


@pytest.mark.skipif(
    _zig() is None or shutil.which("qemu-aarch64") is None,
    reason="needs the ziglang package (cross compiler) and qemu-user's qemu-aarch64",
)
def test_neon_path_under_qemu(capsys) -> None:
    """The aarch64 build (NEON vectors in the many-row kernels) cross-compiled with zig and run
    under qemu-user: csr and N:M, float32 and int8, batch 1 and 3-130 rows, every activation,
    against a float64 loop (``tests/csrc/kernel_harness.c``)."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "harness"
        cmd = [*_zig(), "-target", "aarch64-linux-musl", "-O2", "-std=c11"]
        cmd += [f"-I{KERNEL_SOURCE_DIR}", str(HARNESS), "-o", str(exe), "-lm"]
        build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stderr[-2000:]
        run = subprocess.run(
            ["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=300
        )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("isa=neon cases=312 "), run.stdout
    with capsys.disabled():
        print(f"\nkernel path neon (aarch64, zig cc, qemu-user): {run.stdout.strip()}")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_harness_on_this_machine(march: str) -> None:
    """The same C harness built for this CPU (plain C and AVX2) must pass too: it checks the
    harness itself as well as the paths."""
    if march == "x86-64-v3" and _missing(("avx2", "fma")):
        pytest.skip("CPU without AVX2")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "harness"
        cmd = ["cc", "-O2", f"-march={march}", "-std=c11", f"-I{KERNEL_SOURCE_DIR}"]
        build = subprocess.run(
            [*cmd, str(HARNESS), "-o", str(exe), "-lm"], capture_output=True, text=True
        )
        assert build.returncode == 0, build.stderr[-2000:]
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    isa = "scalar" if march == "x86-64" else "avx2"
    assert run.stdout.startswith(f"isa={isa} cases=312 "), run.stdout
