"""Shared helpers of the structured-pruning benchmarks: data location, latency, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def data_root(override: str | None = None) -> Path | None:
    """``--data`` / ``PRUNEKIT_DATA``, else ``../shared/data`` next to the repository."""
    chosen = override or os.environ.get("PRUNEKIT_DATA")
    root = (
        Path(chosen).expanduser()
        if chosen
        else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
    return root.resolve() if root.is_dir() else None


def latency(
    models: dict[str, nn.Module],
    run: Callable[[nn.Module], Any],
    *,
    threads: int,
    reps: int = 30,
    rounds: int = 5,
    warmup: int = 5,
) -> dict[str, float]:
    """Median seconds of one call per model: warm-up, then ``rounds`` rounds (model order rotated
    every round) of ``reps`` timed calls each; the result is the median of the round medians."""
    torch.set_num_threads(threads)
    names = list(models)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                run(models[name])
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    run(models[name])
                    times.append(time.perf_counter() - start)
                per_round[name].append(statistics.median(times))
    return {n: statistics.median(v) for n, v in per_round.items()}


def cpu_features() -> str:
    """The CPU model, the flags that pick torch's kernel paths and torch's own capability."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.partition(":")[2].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
    shown = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = "unknown"
    return f"{model}, flags {shown}, torch CPU capability {capability}"


def machine() -> str:
    """CPU features, cores, torch version and the load average now (print it with each figure)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_features()}; {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average {load:.2f} at start"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def macs_params(model: nn.Module, inputs: Any) -> tuple[int, int]:
    from prunekit.graph import count

    report = count(model, inputs)
    return report.macs, report.params


def comparison_rows(
    by: dict[str, dict], picks: list[tuple[str, str]], dense_macs: int, quality: str, note: str
) -> list[list[str]]:
    """Rows of a structured comparison figure: label, MACs / dense, batch-32 latency / dense and
    the quality figure ``by[key][quality]`` (4 decimals when below 1, else 2), ``note`` after
    the dense row's quality."""
    dense32 = by["dense"]["latency_b32_s"]

    def shown(value: float) -> str:
        return f"{value:.4f}" if value < 1 else f"{value:.2f}"

    return [
        [
            label,
            f"{by[key]['macs'] / dense_macs:.3f}",
            f"{by[key]['latency_b32_s'] / dense32:.3f}",
            shown(by[key][quality]) + (f" ({note})" if key == "dense" else ""),
        ]
        for label, key in picks
    ]
