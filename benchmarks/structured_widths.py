"""Which layer widths does this CPU's backend (oneDNN / MKL) run fast? A sweep for ``round_to``.

For Conv2d 3x3 (CIFAR-sized maps) and Linear (MiniLM-sized rows), every width from ``--lo`` to
``--hi`` is timed at batch 1 and 32 with a fixed thread count. The figure that matters is the
time per output unit (ms / width): a width the kernels like costs no more per unit than the
next multiple of 8 or 16 above it. The summary compares, for each width w that is not a
multiple of ``m``, the latency of w against the latency of the multiple of ``m`` just above it
(ceil(w / m) * m): a ratio >= 1 means rounding *up* to the multiple is free or faster, which is
what ``prune_structured``'s default ``round_to`` relies on.

    .venv/bin/python benchmarks/structured_widths.py            # default sweep, 2 threads
    .venv/bin/python benchmarks/structured_widths.py --threads 1 --lo 16 --hi 80

Timings hold for this machine and these shapes only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from structured_common import machine, table
from torch import nn
from torch.nn import functional as F


def fastest_ms(fn, reps: int, warmup: int = 3) -> float:
    """The fastest of ``reps`` timed calls (ms): on a shared machine, other processes only ever
    add time, so the minimum is the figure closest to what the kernel itself costs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def conv_case(width: int, batch: int, side: int, reps: int) -> float:
    """A 3x3 conv width -> width (the inner conv of a ResNet basic block) on side x side maps."""
    x = torch.randn(batch, width, side, side)
    w = torch.randn(width, width, 3, 3)
    return fastest_ms(lambda: F.conv2d(x, w, padding=1), reps)


def conv_in_case(width: int, batch: int, side: int, reps: int, fixed: int = 64) -> float:
    """A 3x3 conv fixed -> width: only the output width varies (first conv of a block)."""
    x = torch.randn(batch, fixed, side, side)
    w = torch.randn(width, fixed, 3, 3)
    return fastest_ms(lambda: F.conv2d(x, w, padding=1), reps)


def linear_case(width: int, rows: int, reps: int, fixed: int = 384) -> float:
    """fixed -> width -> fixed (an MLP with hidden ``width``) on ``rows`` token rows."""
    x = torch.randn(rows, fixed)
    up, down = nn.Linear(fixed, width), nn.Linear(width, fixed)

    def run() -> None:
        down(F.gelu(up(x)))

    return fastest_ms(run, reps)


def summary(name: str, times: dict[int, float], multiples: list[int]) -> list[list[str]]:
    rows = []
    for m in multiples:
        ratios = []
        for w, t in times.items():
            up = -(-w // m) * m
            if w % m and up in times:
                ratios.append(t / times[up])
        if ratios:
            ratios.sort()
            rows.append(
                [
                    name,
                    str(m),
                    str(len(ratios)),
                    f"{statistics.median(ratios):.2f}",
                    f"{ratios[len(ratios) // 10]:.2f}",
                    f"{sum(r >= 0.95 for r in ratios) / len(ratios):.0%}",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lo", type=int, default=8)
    parser.add_argument("--hi", type=int, default=72, help="widths lo..hi (conv); x8 for linear")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--show", action="store_true", help="print every width's latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {machine()}; threads {args.threads}")
    widths = list(range(args.lo, args.hi + 1))
    linear_widths = sorted(
        {w for base in range(8 * args.lo, 8 * args.hi + 1, 4) for w in (base, base + 1)}
    )
    cases = {
        "conv3x3 w->w 16x16 b32": (widths, lambda w: conv_case(w, 32, 16, args.reps)),
        "conv3x3 w->w 16x16 b1": (widths, lambda w: conv_case(w, 1, 16, args.reps * 4)),
        "conv3x3 64->w 16x16 b32": (widths, lambda w: conv_in_case(w, 32, 16, args.reps)),
        "linear 384->w->384 4096 rows": (linear_widths, lambda w: linear_case(w, 4096, args.reps)),
        "linear 384->w->384 128 rows": (
            linear_widths,
            lambda w: linear_case(w, 128, args.reps * 4),
        ),
    }
    rows = []
    with torch.inference_mode():
        for name, (sweep, fn) in cases.items():
            start = time.time()
            times = {w: fn(w) for w in sweep}
            if args.show:
                print(name, " ".join(f"{w}:{t:.3f}" for w, t in sorted(times.items())))
            rows += summary(name, times, [4, 8, 16, 32])
            print(f"  {name}: {time.time() - start:.0f} s", flush=True)
    print()
    print("latency(w) / latency(next multiple of m above w), over widths w that are not multiples")
    print(
        table(
            ["case", "m", "widths", "median ratio", "p10 ratio", "share >= 0.95"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
