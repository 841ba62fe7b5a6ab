"""Measured latency for structured pruning, and the channel multiple the backend runs fast.

:func:`measure` times models on the example inputs with :func:`prunekit.runtime.bench.bench`
(warm-up, median of repetitions in rotating rounds, a fixed thread count); ``prune_structured``
uses it to report dense vs pruned latency and to search for a ``target_latency``. Tests replace
:func:`measure` (``monkeypatch.setattr(prunekit.graph.latency, "measure", fake)``), so the
search can be checked without timing anything.

:func:`default_round_to` is the width multiple ``prune_structured`` keeps channel counts at when
``round_to`` is not given. The figures behind it come from ``benchmarks/structured_widths.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunekit.runtime.bench import bench

# Channel multiple per device type. CPU (oneDNN / MKL, measured with
# benchmarks/structured_widths.py on a 2-core AMD EPYC, 1 and 2 threads): a 3x3 conv or an MLP
# whose width is a multiple of 8 runs at least as fast as any narrower width that is not, at
# batch 1 and 32 (see the table in docs/structured.md). GPU: 8 (fp16 / bf16 tensor-core tiles)
# is the common recommendation; nothing was measured here.
DEFAULT_ROUND_TO: dict[str, int] = {"cpu": 8, "cuda": 8}
FALLBACK_ROUND_TO = 8


def default_round_to(model: nn.Module) -> int:
    """The channel multiple used when ``prune_structured`` gets no ``round_to``: by the device of
    the model's first parameter (8 on CPU and CUDA; 8 where nothing was measured).

    Example:
        >>> import torch
        >>> default_round_to(torch.nn.Linear(4, 4))
        8
    """
    param = next(iter(model.parameters()), None)
    kind = param.device.type if param is not None else "cpu"
    return DEFAULT_ROUND_TO.get(kind, FALLBACK_ROUND_TO)


@dataclass
class Latency:
    """Dense and pruned latency on the example inputs (median ms of ``repeats`` calls)."""

    dense_ms: float
    pruned_ms: float
    batch: int
    threads: int
    repeats: int
    device: str

    @property
    def ratio(self) -> float:
        """Pruned / dense latency (below 1 is faster)."""
        return self.pruned_ms / self.dense_ms if self.dense_ms > 0 else float("nan")

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms if self.pruned_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "speedup": self.speedup}

    def __str__(self) -> str:
        return (
            f"latency {self.dense_ms:.3g} ms -> {self.pruned_ms:.3g} ms "
            f"({self.speedup:.2f}x faster; median of {self.repeats}, batch {self.batch}, "
            f"{self.threads} threads, {self.device})"
        )


def _call(model: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        model(*inputs)
    else:
        model(inputs)


def _repeats_for(models: dict[str, nn.Module], inputs: Any, budget_s: float, lo: int, hi: int):
    """As many repetitions as fit ``budget_s`` (one timed call per model decides), in [lo, hi]."""
    was = {name: m.training for name, m in models.items()}
    took = 0.0
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()
                start = time.perf_counter()
                _call(m, inputs)
                took += time.perf_counter() - start
    finally:
        for name, m in models.items():
            m.train(was[name])
    if took <= 0:
        return hi
    return max(lo, min(hi, int(budget_s / took)))


def measure(
    models: dict[str, nn.Module],
    example_inputs: Any,
    *,
    threads: int | None = None,
    budget_s: float = 1.0,
    min_repeats: int = 5,
    max_repeats: int = 30,
) -> dict[str, Any]:
    """Median latency (ms) of each model on ``example_inputs``, timed side by side.

    Warm-up (2 calls), then as many repetitions as fit ``budget_s`` in all (at least
    ``min_repeats``, at most ``max_repeats``), in rotating rounds so that drift hits every model
    alike; ``threads`` fixes torch's intra-op threads (None: the current count).

    Returns ``{"ms": {name: median ms}, "batch": int, "threads": int, "repeats": int,
    "device": str}``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(8, 8)
        >>> out = measure({"dense": net}, torch.randn(2, 8), budget_s=0.01)
        >>> sorted(out["ms"]), out["batch"]
        (['dense'], 2)
    """
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        repeats = _repeats_for(models, example_inputs, budget_s, min_repeats, max_repeats)
        report = bench(
            models,
            example_inputs,
            threads=threads,
            warmup=2,
            repeats=repeats,
            rounds=min(3, repeats),
            progress=False,
        )
    finally:
        torch.set_num_threads(previous)
    return {
        "ms": {r.model: r.median_ms for r in report.rows},
        "batch": report.rows[0].batch,
        "threads": report.settings["threads"],
        "repeats": repeats,
        "device": report.settings["device"],
    }
