"""A/B timing of two builds of the sparse C kernels in one process, for kernel work.

This VM's timings drift by 10-50 % between processes (and even between minutes), so comparing
a kernel change by running a benchmark before and after says little. This script builds the C
source of a git revision (``--base``, default ``HEAD``) and the working tree's, loads both, and
times every case by alternating the two builds in short rounds on the same weights and inputs;
the ratio is the median over rounds of (new / base) per round, so a drift hits both sides.

Cases: random-sparse ``nn.Linear`` layers (``--shapes in x out``), rows (``--rows``),
sparsity (``--sparsity``), float32 and int8 codes, format ``--format`` (default csr).

Run:  python benchmarks/kernel_ab.py [--base HEAD] [--shapes 384x384 1536x384]
      [--rows 8 32 128] [--sparsity 0.7 0.9] [--format csr] [--threads 2]
(``PRUNEKIT_MARCH=x86-64-v3`` builds both for AVX2.)
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import prunekit
from prunekit.runtime import kernels
from prunekit.runtime.accelerate import SparseLinear, accelerate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_common import cpu_features  # noqa: E402

SOURCE = "src/prunekit/runtime/csrc/sparse_kernels.c"
ROOT = Path(__file__).resolve().parent.parent


def build(source: bytes, out: Path) -> ctypes.CDLL:
    """Compile one revision's source the way prunekit does and load it."""
    cc = kernels._compiler()
    if cc is None:
        raise SystemExit("no C compiler")
    ok, log = kernels._build(cc, source, out, kernels._march())
    if not ok:
        raise SystemExit(f"build of {out.name} failed:\n{log}")
    lib = ctypes.CDLL(str(out))
    kernels._declare(lib)
    return lib


def layer(shape: tuple[int, int], sparsity: float, int8: bool, rows: int, fmt: str):
    """A random layer pruned to ``sparsity``, accelerated in ``fmt``; and an input."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(*shape))
    model = prunekit.finalize(prunekit.prune(net, sparsity, targets="0").model)
    if int8:
        model = prunekit.quantize(model, bits=8, mode="int", targets="0").model
    x = torch.randn(rows, shape[0])
    fast, _ = accelerate(model, x, formats=[fmt], min_speedup=0.0, progress=False)
    sparse = fast[0]
    if not isinstance(sparse, SparseLinear):
        raise SystemExit(f"{shape} was not swapped")
    return sparse, x


def run_with(sparse, lib: ctypes.CDLL, x: torch.Tensor, calls: int) -> float:
    """Median seconds of ``calls`` forward calls through ``lib``'s entry point."""
    key, plan, struct = sparse.__dict__["_plan"]
    sparse.__dict__["_plan"] = (key, (lib.pk_run, plan[1]), struct)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sparse(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(sparse, x, base, new, rounds: int, calls: int) -> tuple[float, float, float]:
    """(base ms, new ms, median per-round ratio new/base), builds alternating by round."""
    with torch.no_grad():
        sparse(x)  # makes the plan
        ref = sparse(x)
        run_with(sparse, new, x, 1)
        torch.testing.assert_close(sparse(x), ref, rtol=1e-4, atol=1e-4)  # same result
        run_with(sparse, base, x, calls)  # warm-up
        pairs = []
        for r in range(rounds):
            order = (base, new) if r % 2 == 0 else (new, base)
            got = {id(lib): run_with(sparse, lib, x, calls) for lib in order}
            pairs.append((got[id(base)], got[id(new)]))
    b = statistics.median(p[0] for p in pairs)
    n = statistics.median(p[1] for p in pairs)
    return 1e3 * b, 1e3 * n, statistics.median(p[1] / p[0] for p in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the base build")
    parser.add_argument("--shapes", nargs="+", default=["384x384", "384x1536", "1536x384",
                        "1024x1024", "2048x2048"])  # fmt: skip
    parser.add_argument("--rows", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.7, 0.9])
    parser.add_argument("--format", default="csr", choices=["csr", "tiles", "bitmap"],
                        help="the sparse format timed (the weights are unstructured)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_src = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=ROOT,
                              capture_output=True, check=True).stdout  # fmt: skip
    new_src = (ROOT / SOURCE).read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="kernel_ab-"))
    base, new = build(base_src, tmp / "base.so"), build(new_src, tmp / "new.so")
    print(f"CPU: {cpu_features()}; -march={kernels._march()}; {args.threads} thread(s); "
          f"base {args.base} vs working tree; {args.rounds} rounds x {args.calls} calls")  # fmt: skip
    print(f"{'case':34s} {'base ms':>9s} {'new ms':>9s} {'new/base':>9s}")
    ratios = []
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        for rows in args.rows:
            for sparsity in args.sparsity:
                for int8 in (False, True):
                    sparse, x = layer(shape, sparsity, int8, rows, args.format)
                    b, n, ratio = compare(sparse, x, base, new, args.rounds, args.calls)
                    ratios.append(ratio)
                    case = f"{text} rows {rows} {sparsity:.0%} {'int8' if int8 else 'f32'}"
                    print(f"{case:34s} {b:9.4f} {n:9.4f} {ratio:9.3f}", flush=True)
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"geometric mean new/base: {geo:.3f} over {len(ratios)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
