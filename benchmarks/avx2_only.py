"""Run a benchmark as on an AVX2-only CPU: every library it times held to AVX2.

On an AVX-512 machine, ``PRUNEKIT_MARCH=x86-64-v3`` builds prunekit's kernels for AVX2, but the
baselines (torch's own kernels, oneDNN's convolutions and matmuls, MKL, and fbgemm's int8 GEMM
with AVX-512 VNNI) still use AVX-512. :func:`restart` re-executes the script with each of them
limited by its own switch, read when the library loads, so the whole comparison is one an
AVX2-only CPU would see (the caches, clocks and memory stay this machine's).
"""

from __future__ import annotations

import os
import sys

AVX2_ONLY = {
    "PRUNEKIT_MARCH": "x86-64-v3",  # prunekit's C kernels
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised CPU kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: convolutions, matmuls
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL GEMMs
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",  # fbgemm: torch's int8 dense Linear
}


def restart() -> None:
    """Re-run this process's command with AVX2_ONLY in the environment (no-op once it is)."""
    if all(os.environ.get(k) == v for k, v in AVX2_ONLY.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})


def describe() -> str:
    """Which of the libraries are held to AVX2 in this process, for a benchmark's header."""
    held = [k for k, v in AVX2_ONLY.items() if os.environ.get(k) == v]
    if len(held) == len(AVX2_ONLY):
        return "every library held to AVX2 (" + ", ".join(f"{k}={AVX2_ONLY[k]}" for k in held) + ")"
    if not held:
        return "every instruction set this CPU has"
    return "held to AVX2: " + ", ".join(held)
