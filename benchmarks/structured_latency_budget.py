"""Structured pruning to a measured latency budget on the pretrained MNIST CNN, no recovery.

The default call first: ``prune_structured(model, x, target_latency=R)`` (it searches one ratio
for every group by measuring the pruned model). Then the sensitivity allocation under the same
budget: ``prune_structured(model, x, target_latency=R, allocation="sensitivity", calib=...)``,
which measures a per-group latency table on this machine (:mod:`prunekit.analysis.latency_table`)
and damage curves, and spends the budget where it hurts least. Both report the latency measured
afterwards (dense timed in the same call) and the accuracy on MNIST test images 5000-9999
(calibration uses images 0-511).

    .venv/bin/python benchmarks/structured_latency_budget.py [--ratio 0.6 0.5 0.4] [--threads 1]

With the budgets 0.6 0.5 0.4 (what ``make bench`` runs) it also prints docs/structured.md's
figure block ``structured-latency-budget``; other budgets print none.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.recipes import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import figure, md_table  # noqa: E402
from train_common import MNIST_FILES, find_folder, load_mnist, load_mnist_model  # noqa: E402

DOC_RATIOS = (0.6, 0.5, 0.4)  # the budgets of the documented table
METHODS = (
    ("default (one ratio, latency search)", {}),
    ("sensitivity allocation + latency table", {"allocation": "sensitivity"}),
)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vbmi2") if f in flags) or "no AVX2"


def doc_figure(results: dict[float, list[tuple[str, float, float, float]]]) -> str:
    """docs/structured.md's ``structured-latency-budget`` block: per budget, each method's
    measured latency ratio and accuracy."""
    rows = [
        [f"{ratio:g}", *(f"{lat:.3f}x, {100 * acc:.2f} %" for _, lat, acc, _ in results[ratio])]
        for ratio in results
    ]
    head = ["budget", "default (one ratio, latency search)", "sensitivity + latency table"]
    return figure("structured-latency-budget", md_table(head, rows))


def run_budget(folder, ratio: float, threads: int, example, calib, accuracy) -> list[tuple]:
    """Both methods under one budget: (label, measured latency ratio, accuracy, seconds)."""
    rows = []
    for label, kwargs in METHODS:
        kwargs = {**kwargs, "calib": calib} if kwargs else kwargs
        start = time.perf_counter()
        report = prunekit.prune_structured(
            load_mnist_model(folder).eval(),
            example,
            target_latency=ratio,
            threads=threads,
            progress=False,
            **kwargs,
        )
        seconds = time.perf_counter() - start
        acc = accuracy(report.model.eval())
        lat = report.latency
        rows.append((label, lat.ratio, acc, seconds))
        print(f"\n{label}: {lat}; accuracy {100 * acc:.2f} %; {seconds:.0f} s")
        predicted = report.settings.get("predicted_latency_ratio")
        if predicted is not None:
            print(f"  predicted latency ratio {predicted:.3f}, measured {lat.ratio:.3f}")
    print()
    for label, lat, acc, seconds in rows:
        print(
            f"{label:<42} latency {lat:.3f}x dense  accuracy {100 * acc:6.2f} %  {seconds:5.0f} s"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.6],
                        help="latency budgets, of dense (each a full run)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    folder = find_folder(args.data, "mnist", MNIST_FILES)
    if folder is None:
        print("SKIP: ../shared/data/mnist with the MNIST test set and mnist_cnn.pt")
        return 0
    torch.set_num_threads(args.threads)
    x, y = load_mnist(folder)
    calib = [x[i : i + 64] for i in range(0, 512, 64)]
    test = [(x[i : i + 1000], y[i : i + 1000]) for i in range(5000, 10000, 1000)]
    accuracy = metrics.accuracy(test)
    example = x[:32]
    print(f"dense accuracy {100 * accuracy(load_mnist_model(folder).eval()):.2f} %")
    results, ok = {}, True
    for ratio in args.ratio:
        print(
            f"\nMNIST CNN, budget {ratio:.2f}x dense latency at batch 32, {args.threads} "
            f"thread(s), CPU flags: {cpu_flags()}, load {os.getloadavg()[0]:.1f}"
        )
        rows = results[ratio] = run_budget(folder, ratio, args.threads, example, calib, accuracy)
        (_, r0, a0, _), (_, r1, a1, _) = rows
        within = r1 <= ratio * 1.1
        ok = ok and within
        print(
            f"{'PASS' if within else 'FAIL'}: the allocation's measured latency {r1:.3f} is within "
            f"10 % of the budget {ratio:.2f}; accuracy {100 * a1:.2f} % vs default "
            f"{100 * a0:.2f} % ({'better' if a1 > a0 else 'not better'})"
        )
    if tuple(args.ratio) == DOC_RATIOS:
        doc_figure(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
