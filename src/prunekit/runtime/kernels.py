"""Build and load prunekit's compiled sparse kernels (``csrc/sparse_kernels.c``).

The C source ships with the package and is compiled on first use with the machine's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``; without one, the compiler of the ``ziglang``
package, ``pip install 'prunekit[kernels]'``, builds them single-threaded) as
``-O3 -march=native`` (so it uses the widest vector instructions this CPU has) with OpenMP when
the compiler supports it, then loaded with :mod:`ctypes`. The shared library is cached under
``$PRUNEKIT_CACHE`` (default ``~/.cache/prunekit/kernels``), keyed by the source, the flags,
the compiler and the CPU, so the build (about a second) happens once per machine. torch is
imported first, so the kernels share torch's OpenMP runtime and thread pool.

Nothing here is required: when no compiler is found or the build fails, :func:`load` returns
None and :func:`why_unavailable` says why; :func:`prunekit.accelerate` then keeps layers dense.
Set ``PRUNEKIT_NO_KERNELS=1`` to turn the kernels off, and ``PRUNEKIT_MARCH`` to build for
another ``-march`` than ``native`` (``x86-64-v3`` = AVX2, ``x86-64`` = plain C), for example to
build for an older CPU class or to test the portable code paths.

Example:
    >>> from prunekit.runtime import kernels
    >>> lib = kernels.load()
    >>> lib is None or lib.isa in ("avx512+vbmi2", "avx512", "avx2", "neon", "scalar")
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch  # noqa: F401  imported first: the kernels then bind to torch's OpenMP runtime

__all__ = ["KernelLibrary", "load", "why_unavailable", "cache_dir"]

_ABI_VERSION = 7
_SOURCE = "sparse_kernels.c"
# -fno-trapping-math: no FP exception is ever read, and without it GCC will not vectorise loops
# with float compares (the activations' clamps and selects). Part of the cache key.
_FLAGS = ("-O3", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11")
_lock = threading.Lock()
_state: dict[str, object] = {}


@dataclass(frozen=True)
class KernelLibrary:
    """The loaded kernels and how they were built."""

    lib: ctypes.CDLL
    path: Path
    compiler: str
    isa: str
    openmp: bool
    has_bitmap: bool
    build_s: float

    @property
    def vector_formats(self) -> tuple[str, ...]:
        """The formats whose kernels are vectorised on this CPU (the others run scalar code)."""
        if self.has_bitmap:
            return ("csr", "bitmap", "tiles", "nm")
        if self.isa in ("avx512", "avx2"):
            return ("csr", "tiles", "nm")
        return ("csr", "nm") if self.isa == "neon" else ("csr",)

    def describe(self) -> str:
        omp = "OpenMP" if self.openmp else "single-threaded (no OpenMP)"
        cc = "zig cc" if "ziglang" in self.compiler else Path(self.compiler.split()[0]).name
        return f"C kernels ({self.isa}, {omp}, {cc})"


def cache_dir() -> Path:
    """Where built kernels are kept (``$PRUNEKIT_CACHE/kernels``, default ~/.cache/prunekit)."""
    root = os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit"
    return Path(root) / "kernels"


def _compiler() -> list[str] | None:
    """The C compiler command: $CC, cc, gcc or clang on the PATH, else the one the ``ziglang``
    package ships (``pip install 'prunekit[kernels]'``: a compiler from the package registry)."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name:
            found = shutil.which(name)
            if found:
                return [found]
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "cc"]
    return None


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def _run(cmd: list[str]) -> tuple[bool, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


def _march() -> str:
    march = os.environ.get("PRUNEKIT_MARCH", "") or "native"
    if not all(c.isalnum() or c in "-_." for c in march):
        raise ValueError(f"PRUNEKIT_MARCH={march!r} is not a -march value (e.g. native, x86-64-v3)")
    return march


def _build(cc: list[str], source: bytes, out: Path, march: str) -> tuple[bool, str]:
    """Compile to ``out``: with OpenMP if the compiler takes it, else without."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        lib = Path(tmp) / out.name
        if any("ziglang" in part for part in cc):  # zig names CPUs x86_64_v3, skylake_avx512
            march = march.replace("-", "_")
        base = [*cc, *_FLAGS, f"-march={march}", str(src), "-o", str(lib), "-lm"]
        ok, log = _run([*base, "-fopenmp"])
        if not ok:  # e.g. zig's clang has no OpenMP runtime: single-threaded kernels
            ok, log_plain = _run(base)
            log = f"with -fopenmp: {log}\nwithout: {log_plain}"
        if not ok:
            return False, log
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(lib, staged)
        os.replace(staged, out)  # atomic: concurrent builders never load a half-written file
    return True, ""


class Plan(ctypes.Structure):
    """The fixed arguments of one weight (``pk_plan`` in the C source)."""

    _fields_ = [
        ("format", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("int8", ctypes.c_int64),
        ("wide", ctypes.c_int64),
        ("index0", ctypes.c_void_p),
        ("index1", ctypes.c_void_p),
        ("index2", ctypes.c_void_p),
        ("vals", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("lgn", ctypes.c_int64),
        ("lgm", ctypes.c_int64),
        ("act", ctypes.c_int64),
    ]


FORMAT_CODES = {"csr": 0, "bitmap": 1, "tiles": 2, "nm": 3}
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.pk_abi_version.restype = i32
    lib.pk_isa.restype = ctypes.c_char_p
    lib.pk_openmp.restype = i32
    lib.pk_has_bitmap.restype = i32
    csr = [i64, i64, i64, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, i32]
    lib.pk_csr_f32.argtypes = csr
    lib.pk_csr_f32.restype = i32
    lib.pk_csr_i8.argtypes = [*csr[:7], ptr, *csr[7:]]
    lib.pk_csr_i8.restype = i32
    lib.pk_bitmap.argtypes = [i64, i64, i64, ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, i32]
    lib.pk_bitmap.restype = i32
    lib.pk_tiles.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, i32]
    lib.pk_tiles.restype = None
    lib.pk_plan_size.restype = i64
    lib.pk_run.argtypes = [ptr, i64, ptr, ptr, ptr, i32]
    lib.pk_run.restype = i32
    lib.pk_set_chunk_bytes.argtypes = [i64]
    lib.pk_set_chunk_bytes.restype = i64


def _library_path(cc: list[str], source: bytes, march: str) -> tuple[Path | None, str]:
    """The built library (from the cache, or built now), or None and the build log."""
    _, version = _run([*cc, "--version"])
    parts = [source, " ".join(cc), version, _cpu_fingerprint(), f"{' '.join(_FLAGS)} {march} omp"]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts))
    name = f"sparse_kernels-{key.hexdigest()[:16]}.so"
    fallback = Path(tempfile.gettempdir()) / f"prunekit-kernels-{os.getuid()}" / name
    log = ""
    for path in (cache_dir() / name, fallback):  # a read-only home falls back to the temp dir
        if path.is_file():
            return path, ""
        try:
            ok, log = _build(cc, source, path, march)
        except OSError as exc:
            ok, log = False, f"{type(exc).__name__}: {exc}"
        if ok:
            return path, ""
    return None, log


def _load_uncached() -> KernelLibrary | str:
    if os.environ.get("PRUNEKIT_NO_KERNELS", "") not in ("", "0"):
        return "turned off by PRUNEKIT_NO_KERNELS"
    if platform.system() != "Linux":
        return f"the compiled kernels are built on Linux only (this is {platform.system()})"
    cc = _compiler()
    if cc is None:
        return (
            "no C compiler found ($CC, cc, gcc or clang): install one, or "
            "pip install 'prunekit[kernels]' (a compiler from the package registry)"
        )
    try:
        march = _march()
    except ValueError as exc:
        return str(exc)
    source = resources.files("prunekit.runtime").joinpath("csrc", _SOURCE).read_bytes()
    start = time.perf_counter()
    path, log = _library_path(cc, source, march)
    if path is None:
        return f"building the C kernels with {' '.join(cc)} failed:\n{log[-2000:]}"
    build_s = time.perf_counter() - start
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except OSError as exc:
        return f"loading {path} failed: {exc}"
    if lib.pk_abi_version() != _ABI_VERSION or lib.pk_plan_size() != ctypes.sizeof(Plan):
        return f"{path} has ABI {lib.pk_abi_version()}, expected {_ABI_VERSION}; delete it"
    return KernelLibrary(
        lib=lib,
        path=path,
        compiler=" ".join(cc),
        isa=lib.pk_isa().decode(),
        openmp=bool(lib.pk_openmp()),
        has_bitmap=bool(lib.pk_has_bitmap()),
        build_s=build_s,
    )


def load() -> KernelLibrary | None:
    """The compiled kernels (built on first call), or None when they cannot be had here."""
    with _lock:
        if "result" not in _state:
            _state["result"] = _load_uncached()
        result = _state["result"]
    return result if isinstance(result, KernelLibrary) else None


def why_unavailable() -> str:
    """Why :func:`load` returns None ("" when the kernels are available)."""
    load()
    result = _state["result"]
    return "" if isinstance(result, KernelLibrary) else str(result)


def reset() -> None:
    """Forget the loaded state, so the next :func:`load` looks again (for tests)."""
    with _lock:
        _state.clear()
