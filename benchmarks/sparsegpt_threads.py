"""SparseGPT determinism across thread counts, and what it costs.

One square layer per size (random weight, Hessian 2 X^T X / n from 2n random inputs with uneven
feature scales), 50 % unstructured. For each size:

* **determinism**: ``sparsegpt_prune`` (default, ``deterministic=True``) on 1 thread and on
  ``--threads`` threads: masks and weights must be bit-identical. The same comparison with
  ``deterministic=False`` shows what LAPACK's multi-threaded factorisation does (for reference).
* **cost**: the two calls differ only in the thread count of the Hessian factorisation, so the
  cost is measured there: ``extra`` = median time of the factorisation on 1 thread minus on
  ``--threads`` threads, relative to the median time of the whole ``deterministic=False`` call
  on ``--threads`` threads (``est. ratio``). The whole calls' own median ratio is printed too,
  but it is as noisy as the machine (alternating rounds, median).

Run:  python benchmarks/sparsegpt_threads.py [--threads N] [--sizes 512 1024 2048] [--reps 3]
Target (issue 14): identical masks and weights; the estimated ratio of the default call to
``deterministic=False`` at most 1.25. Timings are of this machine and these shapes only; on a busy machine
run with fewer threads than free cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from prunekit.calibrate.sparsegpt import inverse_hessian_factor, sparsegpt_prune

TARGET_RATIO = 1.25


def problem(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    weight = torch.randn(n, n, generator=g)
    x = torch.randn(2 * n, n, generator=g) * (0.1 + 3 * torch.rand(n, generator=g))
    return weight, 2 * x.T @ x / len(x)


def on_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads vs 1, 50 % unstructured")
    print(
        f"{'size':>6} {'same (det)':>11} {'same (non-det)':>15} {'det s':>8} {'non-det s':>10} "
        f"{'ratio':>6} {'fac 1t s':>9} {'fac Nt s':>9} {'est. ratio':>11}"
    )
    ok = True
    for n in args.sizes:
        weight, hessian = problem(n)

        def run(det: bool, weight=weight, hessian=hessian):
            return sparsegpt_prune(weight, hessian, 0.5, deterministic=det)

        same = {}
        for det in (True, False):
            one = on_threads(1, lambda det=det: run(det))
            many = on_threads(args.threads, lambda det=det: run(det))
            same[det] = torch.equal(one.keep, many.keep) and torch.equal(one.weight, many.weight)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.reps):
            for det in (False, True):
                times[det].append(on_threads(args.threads, lambda det=det: timed(lambda: run(det))))
        det_s, free_s = statistics.median(times[True]), statistics.median(times[False])
        factor = {1: [], args.threads: []}
        for _ in range(args.reps):
            for threads in factor:
                factor[threads].append(
                    on_threads(
                        threads, lambda h=hessian: timed(lambda: inverse_hessian_factor(h, 0.01))
                    )
                )
        fac_one, fac_many = statistics.median(factor[1]), statistics.median(factor[args.threads])
        estimate = (free_s + max(0.0, fac_one - fac_many)) / free_s
        ok &= same[True] and estimate <= TARGET_RATIO
        print(
            f"{n:>6} {str(same[True]):>11} {str(same[False]):>15} {det_s:>8.3f} {free_s:>10.3f} "
            f"{det_s / free_s:>6.2f} {fac_one:>9.3f} {fac_many:>9.3f} {estimate:>11.3f}"
        )
    print(
        "PASS" if ok else "FAIL",
        f"(identical with deterministic=True, estimated time ratio <= {TARGET_RATIO})",
    )


if __name__ == "__main__":
    main()
