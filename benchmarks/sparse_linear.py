"""Sparse Linear latency: prunekit's kernels vs dense F.linear vs torch's sparse CSR.

Square Linear layers (1024, 2048, 4096) at 50/70/80/90/95 % unstructured sparsity and 2:4,
batch 1 and 32 (``--batches 8 32 128`` for issue 16's many-row targets), float32 weights and
int8 weights (per-channel symmetric codes from ``prunekit.quantize(mode="int")``), all in this
process with a fixed thread count. Per configuration these callables are timed: dense
``F.linear`` (float32; for int8, the dequantized weight), torch's own int8 dense Linear
(``torch.ao`` dynamic quantization, fbgemm: what a user would pick instead of sparsity),
torch CSR (``torch.sparse.mm`` on ``to_sparse_csr``), prunekit's ``SparseLinear`` in the format
``accelerate`` found fastest (``tiles``, ``bitmap`` or ``csr``), and the module
``prunekit.runtime.accelerate.accelerate`` returns for that layer (the kernel where it measured
faster, else the dense Linear), compared with the dense ``nn.Linear`` module (so both pay the
same module-call overhead). Each is warmed up, then timed in rounds whose order rotates; the
figure is the median of all calls.

Run:  python benchmarks/sparse_linear.py [--threads 2 1] [--quick] [--dtypes fp32 int8]
      [--batches 8 32 128] [--patterns 70% 90%] [--sizes 1024 2048]

``--threads 2 1`` with the other settings left at their defaults (what ``make bench`` runs) also
prints docs/serving.md's figure blocks ``serving-kernels`` (batch-1 speedup per size and thread
count) and ``serving-kernel-ranges`` (batch 32, torch CSR, torch int8 dense; 2 threads); a
partial run prints none. ``--march x86-64-v3 --threads 2 --patterns 70% 90% 2:4 --batches 1 8
32 128`` (the AVX2 kernels on any x86 CPU; ``--march`` sets ``PRUNEKIT_MARCH``) prints the
block ``serving-kernels-avx2`` instead.
Targets: issue 6, batch 1: kernel >= 1.5x faster than dense at 70 %, >= 3x at 90 %; issue 16,
batch 8, 32 and 128: >= 1.6x at 70 %, >= 3.5x at 90 %; the accelerated layer never slower than
dense. ``PRUNEKIT_MARCH=x86-64-v3`` builds the AVX2 kernels on an AVX-512 CPU (the CPU's flags
and the kernel build are printed first). Timings are of this machine and these shapes only.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.runtime import kernels

acc = importlib.import_module("prunekit.runtime.accelerate")  # the module, not the function
sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import figure, md_table  # noqa: E402
from structured_common import cpu_features  # noqa: E402

SIZES = (1024, 2048, 4096)
PATTERNS = ("50%", "70%", "80%", "90%", "95%", "2:4")
BATCHES = (1, 32)
FIGURE_THREADS = {1, 2}  # the documented figures need both thread counts
FIGURE_PATTERNS = ("50%", "70%", "90%", "2:4")  # the columns of serving-kernels
AVX2_PATTERNS, AVX2_BATCHES = ("70%", "90%", "2:4"), (1, 8, 32, 128)  # serving-kernels-avx2
NOISE = 1.05  # "never slower than dense" allows 5 % timing noise
TARGETS = {  # batch -> ((pattern, speedup over dense), ...)
    1: (("70%", 1.5), ("90%", 3.0)),  # issue 6
    **{b: (("70%", 1.6), ("90%", 3.5)) for b in (8, 32, 128)},  # issue 16
}


def make_weight(n: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, n, generator=gen) / n**0.5
    if pattern == "2:4":
        groups = w.abs().reshape(n, n // 4, 4)
        drop = groups.argsort(dim=-1)[..., :2]
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return w * mask.reshape(n, n)
    sparsity = float(pattern.rstrip("%")) / 100
    return w * (torch.rand(n, n, generator=gen) >= sparsity)


def time_rotating(fns: dict[str, object], rounds: int, per_round: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for name in names:  # warm-up
        for _ in range(3):
            fns[name]()
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                fn()
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def quantized_int8(linear: nn.Linear) -> nn.Linear:
    """The layer with int8 per-channel codes (prunekit.quantize mode="int"), as a model."""
    wrapper = nn.Sequential(linear)
    return prunekit.quantize(wrapper, bits=8, mode="int", targets=["0"]).model


def torch_int8(linear: nn.Linear) -> nn.Module:
    """torch's dynamically quantized int8 dense Linear (per-tensor qint8 weights, fbgemm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        wrapped = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(linear)), {nn.Linear}, dtype=torch.qint8
        )
    return wrapped[0]


def speedup_range(rows: list[dict], num: str, den: str = "kernel") -> str:
    """``lo-hi x`` of ``num / den`` latency over ``rows`` (``-`` when there are none)."""
    ratios = [r[num] / r[den] for r in rows]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"


def print_figures(results: list[dict]) -> None:
    """docs/serving.md's figure blocks from a full run's rows (``--threads 2 1``, defaults)."""
    threads = sorted({r["threads"] for r in results}, reverse=True)
    sizes = sorted({r["n"] for r in results})
    by_key = {(r["threads"], r["n"], r["pattern"], r["dtype"], r["batch"]): r for r in results}
    columns = [(p, "fp32") for p in FIGURE_PATTERNS] + [
        (p, "int8") for p in FIGURE_PATTERNS if p != "2:4"
    ]
    rows = []
    for t in threads:
        for n in sizes:
            cells = []
            for pattern, dtype in columns:
                r = by_key[(t, n, pattern, dtype, 1)]
                cells.append(f"{r['dense'] / r['kernel']:.1f}x")
            rows.append([f"{n}, {t} thread{'s' if t > 1 else ''}", *cells])
    head = ["layer", *(p.replace("%", " %") + (" int8" if d == "int8" else "") for p, d in columns)]
    figure(
        "serving-kernels",
        md_table(head, rows)
        + "\n\nSpeedup of the kernel `accelerate` chose over dense `F.linear` at batch 1 (float32"
        ' weights on the dense side; "int8": the sparse side runs on int8 codes); median of'
        " rotating rounds.",
    )
    t = max(threads)
    at = [r for r in results if r["threads"] == t]

    def pick(batch: int, dtype: str | None, patterns: tuple[str, ...] | None) -> list[dict]:
        return [
            r
            for r in at
            if r["batch"] == batch
            and (dtype is None or r["dtype"] == dtype)
            and (patterns is None or r["pattern"] in patterns)
        ]

    swapped = [r for r in at if r["swapped"]]
    worst = max((r["accel"] / r["dense_module"] for r in swapped), default=float("nan"))
    low = ("50%", "2:4")
    rows = [
        *(
            [f"kernel vs dense `F.linear`, batch 32, float32, {p.replace('%', ' %')}",
             speedup_range(pick(32, "fp32", (p,)), "dense")]
            for p in ("50%", "70%", "90%")
        ),
        ["kernel vs torch CSR (`torch.sparse.mm`), batch 1", speedup_range(pick(1, None, None), "csr")],
        ["kernel vs torch CSR, batch 32", speedup_range(pick(32, None, None), "csr")],
        ["int8 kernel vs torch int8 dense Linear (fbgemm), batch 1, 80-95 %",
         speedup_range(pick(1, "int8", ("80%", "90%", "95%")), "qdense")],
        ["same, batch 1, 70 %", speedup_range(pick(1, "int8", ("70%",)), "qdense")],
        ["same, batch 1, 50 % and 2:4", speedup_range(pick(1, "int8", low), "qdense")],
        ["same, batch 32, 95 %", speedup_range(pick(32, "int8", ("95%",)), "qdense")],
        ["same, batch 32, 50-90 % and 2:4",
         speedup_range(pick(32, "int8", ("50%", "70%", "80%", "90%", "2:4")), "qdense")],
        ["worst latency of a swapped layer / dense `nn.Linear` module", f"{worst:.2f}"],
    ]  # fmt: skip
    figure(
        "serving-kernel-ranges",
        md_table([f"comparison ({t} threads, 1024-4096 wide)", "speedup of the kernel"], rows),
    )


def print_avx2_figure(results: list[dict]) -> str:
    """docs/serving.md's ``serving-kernels-avx2`` block: speedup over dense per size and batch
    (float32 and int8 codes), and the float32 kernel at 90 % against torch's int8 dense Linear."""
    by_key = {(r["n"], r["pattern"], r["dtype"], r["batch"]): r for r in results}
    columns = [(p, "fp32") for p in AVX2_PATTERNS] + [(p, "int8") for p in ("70%", "90%")]
    rows = []
    for n in sorted({r["n"] for r in results}):
        for batch in AVX2_BATCHES:
            cells = []
            for pattern, dtype in columns:
                r = by_key[(n, pattern, dtype, batch)]
                cells.append(
                    f"{r['dense'] / r['kernel']:.1f}x" + ("" if r["swapped"] else " (kept)")
                )
            q = by_key[(n, "90%", "fp32", batch)]
            rows.append([f"{n}, batch {batch}", *cells, f"{q['qdense'] / q['kernel']:.1f}x"])
    head = ["layer", *(p.replace("%", " %") + (" int8" if d == "int8" else "") for p, d in columns),
            "90 % vs torch int8 dense"]  # fmt: skip
    return figure(
        "serving-kernels-avx2",
        md_table(head, rows) + "\n\nKernels built for AVX2 (`PRUNEKIT_MARCH=x86-64-v3`), 2 "
        'threads; speedup of the kernel over dense `F.linear` ("(kept)": `accelerate` kept the '
        "layer dense); last column: the float32 kernel at 90 % against torch's dynamically "
        "quantized int8 dense Linear (fbgemm).",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[2],
                        help="thread counts, each a full pass (2 1: the documented table)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1024 and 2048 only")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--sizes", nargs="+", type=int, default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--march", default=None,
                        help="build the kernels for this -march (sets PRUNEKIT_MARCH)")  # fmt: skip
    args = parser.parse_args()
    if args.march:
        os.environ["PRUNEKIT_MARCH"] = args.march
    lib = kernels.load()
    if lib is None:
        raise SystemExit(f"needs the compiled kernels: {kernels.why_unavailable()}")
    load = os.getloadavg()
    print(
        f"sparse_linear: torch {torch.__version__}, {lib.describe()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs), thread count(s) {args.threads}"
    )
    print(f"CPU: {cpu_features()}")
    march = os.environ.get("PRUNEKIT_MARCH") or "native"
    print(f"kernel build: -march={march} -> {lib.isa} path")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    start = time.perf_counter()
    print(f"kernel build (or cache hit): {lib.build_s:.2f} s")
    gen = torch.Generator().manual_seed(0)
    header = (
        f"{'size':>5} {'pattern':>7} {'dtype':>5} {'batch':>5} {'dense ms':>9} {'csr ms':>9} "
        f"{'kernel ms':>9} {'format':>10} {'accel ms':>9} {'swap':>4} {'dense/kern':>10} "
        f"{'csr/kern':>8} {'accel/dense':>11} {'qdense/kern':>11}"
    )
    results = []
    sizes = args.sizes or (SIZES[:2] if args.quick else SIZES)
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s):\n{header}\n" + "-" * len(header), flush=True)
        results += run_pass(args, sizes, threads, gen)
    report(results)
    full = (
        not args.quick
        and args.sizes is None
        and set(args.threads) == FIGURE_THREADS
        and set(args.patterns) == set(PATTERNS)
        and set(args.dtypes) == {"fp32", "int8"}
        and set(BATCHES) <= set(args.batches)
    )
    if full and not args.march:
        print_figures(results)
    avx2 = (
        args.march == "x86-64-v3"
        and args.threads == [2]
        and args.sizes is None
        and not args.quick
        and set(AVX2_PATTERNS) <= set(args.patterns)
        and set(AVX2_BATCHES) <= set(args.batches)
        and set(args.dtypes) == {"fp32", "int8"}
    )
    if avx2:
        print_avx2_figure(results)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"total {time.perf_counter() - start:.0f} s")


def run_pass(args: argparse.Namespace, sizes, threads: int, gen: torch.Generator) -> list[dict]:
    """Time every size x pattern x dtype x batch at ``threads`` threads; one dict per row."""
    results = []
    for n in sizes:
        rounds, per_round = {1024: (6, 15), 2048: (6, 6), 4096: (4, 3)}.get(n, (4, 3))
        for pattern in args.patterns:
            w32 = make_weight(n, pattern, gen)
            b = torch.randn(n, generator=gen) * 0.1
            for dtype in args.dtypes:
                linear = nn.Linear(n, n)
                with torch.no_grad():
                    linear.weight.copy_(w32)
                    linear.bias.copy_(b)
                model = quantized_int8(linear) if dtype == "int8" else nn.Sequential(linear)
                w = model[0].weight.detach().clone()  # dequantized for int8: the reference
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                    w_csr = w.to_sparse_csr()
                # torch's own int8 dense Linear (fbgemm), the int8 baseline for either dtype
                qlinear = torch_int8(linear)
                for batch in args.batches:
                    x = torch.randn(batch, n, generator=gen)
                    accel, report = acc.accelerate(model, x, threads=threads, progress=False)
                    row = report.rows[0]
                    kernel, _ = acc.accelerate(
                        model, x, min_speedup=0.0, formats=row.format.split("-")[0], progress=False
                    )
                    with torch.inference_mode():
                        y = F.linear(x, w, b)
                        err = (kernel(x) - y).abs().max().item()
                        assert err < 1e-3 * (1 + y.abs().max().item()), f"kernel mismatch {err}"
                        fns = {
                            "dense": lambda x=x, w=w, b=b: F.linear(x, w, b),
                            "csr": lambda x=x, w_csr=w_csr, b=b: (
                                torch.sparse.mm(w_csr, x.t()).t() + b
                            ),
                            "kernel": lambda x=x, k=kernel[0]: k(x),
                            "accel": lambda x=x, a=accel[0]: a(x),
                            "dense_module": lambda x=x, m=model[0]: m(x),
                        }
                        fns["qdense"] = lambda x=x, q=qlinear: q(x)
                        t = time_rotating(fns, rounds, per_round)
                    result = {
                        "n": n, "pattern": pattern, "dtype": dtype, "batch": batch,
                        "threads": threads, "swapped": row.swapped, "format": row.format, **t,
                    }  # fmt: skip
                    results.append(result)
                    print(
                        f"{n:>5} {pattern:>7} {dtype:>5} {batch:>5} {t['dense']:>9.3f} "
                        f"{t['csr']:>9.3f} {t['kernel']:>9.3f} {row.format:>10} {t['accel']:>9.3f} "
                        f"{'yes' if row.swapped else 'no':>4} {t['dense'] / t['kernel']:>9.2f}x "
                        f"{t['csr'] / t['kernel']:>7.2f}x {t['accel'] / t['dense_module']:>11.2f} "
                        + (
                            f"{t['qdense'] / t['kernel']:>10.2f}x"
                            if "qdense" in t
                            else f"{'-':>11}"
                        ),
                        flush=True,
                    )
    return results


def report(results: list[dict]) -> None:
    """The verdicts against issue 6 / 16's targets, for every row of every thread count."""
    print(
        "dense/kern, csr/kern: speedup of the prunekit kernel (above 1 = kernel faster); "
        "accel/dense: latency of the module accelerate() returned, relative to the dense nn.Linear "
        "module (same module-call overhead; below 1 = faster). qdense/kern: speedup over torch's "
        "dynamically quantized int8 dense Linear (torch.ao, fbgemm) of the same layer."
    )
    print("\nTargets (batch 1: issue 6; batch 8/32/128: issue 16):")
    for r in results:
        for pattern, target in TARGETS.get(r["batch"], ()):
            if r["pattern"] != pattern:
                continue
            speedup = r["dense"] / r["kernel"]
            verdict = "PASS" if speedup >= target else "MISS"
            print(
                f"  {verdict}  {r['dtype']} {r['n']} @ {pattern} batch {r['batch']}, "
                f"{r['threads']} thread(s): kernel "
                f"({r['format']}) {speedup:.2f}x faster than dense (>= {target}x)"
            )
    print("\nAgainst torch's int8 dense Linear (fbgemm), int8 codes at >= 70 % (issue 16):")
    for r in results:
        if r["dtype"] == "int8" and r["pattern"] in ("70%", "80%", "90%", "95%"):
            ratio = r["qdense"] / r["kernel"]
            verdict = "PASS" if ratio > 1.0 else "MISS"
            print(
                f"  {verdict}  {r['n']} @ {r['pattern']} batch {r['batch']}, {r['threads']} "
                f"thread(s): sparse int8 "
                f"({r['format']}) {ratio:.2f}x the speed of torch int8 dense"
            )
    swapped = [r for r in results if r["swapped"]]
    kept = [r for r in results if not r["swapped"]]
    if swapped:
        worst = max(swapped, key=lambda r: r["accel"] / r["dense_module"])
        ratio = worst["accel"] / worst["dense_module"]
        verdict = "PASS" if ratio <= NOISE else "MISS"
        print(
            f"  {verdict}  swapped layers never slower than dense: worst accel/dense {ratio:.2f} "
            f"at {worst['n']} {worst['pattern']} {worst['dtype']} batch {worst['batch']} "
            f"({len(swapped)} swapped, {NOISE - 1:.0%} noise allowed)"
        )
    if kept:
        ratios = [r["accel"] / r["dense_module"] for r in kept]
        print(
            f"  info  {len(kept)} layer(s) kept dense: the returned module is the dense nn.Linear "
            f"itself; accel/dense there ranges {min(ratios):.2f}-{max(ratios):.2f} "
            "(timing noise between two identical modules)"
        )


if __name__ == "__main__":
    main()
