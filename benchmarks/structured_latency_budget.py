"""Structured pruning to a measured latency budget on the pretrained MNIST CNN, no recovery.

The default call first: ``prune_structured(model, x, target_latency=R)`` (it searches one ratio
for every group by measuring the pruned model). Then the sensitivity allocation under the same
budget: ``prune_structured(model, x, target_latency=R, allocation="sensitivity", calib=...)``,
which measures a per-group latency table on this machine (:mod:`prunekit.analysis.latency_table`)
and damage curves, and spends the budget where it hurts least. Both report the latency measured
afterwards (dense timed in the same call) and the accuracy on MNIST test images 5000-9999
(calibration uses images 0-511).

    .venv/bin/python benchmarks/structured_latency_budget.py [--ratio 0.6] [--threads 1]
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
from train_common import MNIST_FILES, find_folder, load_mnist, load_mnist_model  # noqa: E402


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vbmi2") if f in flags) or "no AVX2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.6, help="latency budget, of dense")
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
    print(
        f"MNIST CNN, budget {args.ratio:.2f}x dense latency at batch 32, {args.threads} thread(s), "
        f"CPU flags: {cpu_flags()}, load {os.getloadavg()[0]:.1f}"
    )
    print(f"dense accuracy {100 * accuracy(load_mnist_model(folder).eval()):.2f} %")
    rows = []
    for label, kwargs in (
        ("default (one ratio, latency search)", {}),
        ("sensitivity allocation + latency table", {"allocation": "sensitivity", "calib": calib}),
    ):
        start = time.perf_counter()
        report = prunekit.prune_structured(
            load_mnist_model(folder).eval(),
            example,
            target_latency=args.ratio,
            threads=args.threads,
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
    for label, ratio, acc, seconds in rows:
        print(
            f"{label:<42} latency {ratio:.3f}x dense  accuracy {100 * acc:6.2f} %  {seconds:5.0f} s"
        )
    (_, r0, a0, _), (_, r1, a1, _) = rows
    within = r1 <= args.ratio * 1.1
    print(
        f"{'PASS' if within else 'FAIL'}: the allocation's measured latency {r1:.3f} is within 10 % "
        f"of the budget {args.ratio:.2f}; accuracy {100 * a1:.2f} % vs default {100 * a0:.2f} % "
        f"({'better' if a1 > a0 else 'not better'})"
    )
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
