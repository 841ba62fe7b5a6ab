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
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunekit.distributed.decide import decided_by_main
from prunekit.runtime.bench import bench

# Channel multiples. CPU: oneDNN keeps conv activations in blocked layouts whose block is the
# vector width (nChw16c with AVX-512, nChw8c with AVX2), so a channel count is in effect padded
# up to the next multiple of 16 / 8. benchmarks/structured_widths.py on a 2-core AMD EPYC with
# AVX-512 (torch 2.13, 1 thread, fastest of 20 calls, batch 32, 16x16 maps) shows the steps: a
# 3x3 conv 64 -> w costs 1.5-1.8 ms for every w in 8..16, 3.0-3.7 ms for 17..32, 4.7-9.2 ms for
# 33..48, 9.9-14.8 ms for 49..63; w -> w: 0.21 ms at 8, 0.40 ms at 16, 2.5 ms at 17, 3.6 ms at
# 32. At batch 1 the cost is proportional to the width (no steps). GPU: 8 (fp16 / bf16
# tensor-core tiles) is the common recommendation; nothing was measured here.
CPU_LANES = {"AVX512": 16, "AVX2": 8}
DEFAULT_ROUND_TO: dict[str, int] = {"cuda": 8}
FALLBACK_ROUND_TO = 8

LATENCY_TOLERANCE = 0.05  # relative distance to the asked latency ratio that ends a search
LATENCY_TRIES = 8  # pruned models built and timed by a target_latency search, at most


def cpu_round_to() -> int:
    """16 where torch's CPU kernels use AVX-512, 8 otherwise (AVX2 and anything unmeasured)."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch without the query
        return FALLBACK_ROUND_TO
    for name, lanes in CPU_LANES.items():
        if name in capability.upper():
            return lanes
    return FALLBACK_ROUND_TO


def default_round_to(model: nn.Module) -> int:
    """The channel multiple used when ``prune_structured`` gets no ``round_to``, by the device of
    the model's first parameter: on CPU the vector width of torch's kernels (16 with AVX-512,
    8 otherwise), 8 on CUDA and anywhere nothing was measured. Groups narrower than twice the
    multiple use half of it (see :func:`prunekit.graph.plan.group_multiple`).

    Example:
        >>> import torch
        >>> default_round_to(torch.nn.Linear(4, 4)) in (8, 16)
        True
    """
    param = next(iter(model.parameters()), None)
    kind = param.device.type if param is not None else "cpu"
    if kind == "cpu":
        return cpu_round_to()
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

    @classmethod
    def of(cls, got: dict[str, Any], pruned: str, dense_ms: float | None = None) -> Latency:
        """Model ``pruned`` against ``"dense"`` (or ``dense_ms``) in a :func:`measure` result."""
        return cls(
            dense_ms=float(got["ms"]["dense"] if dense_ms is None else dense_ms),
            pruned_ms=float(got["ms"][pruned]),
            batch=got["batch"],
            threads=got["threads"],
            repeats=got["repeats"],
            device=got["device"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "speedup": self.speedup}

    def __str__(self) -> str:
        return (
            f"latency {self.dense_ms:.3g} ms -> {self.pruned_ms:.3g} ms "
            f"({self.speedup:.2f}x faster; median of {self.repeats}, batch {self.batch}, "
            f"{self.threads} thread{'' if self.threads == 1 else 's'}, {self.device})"
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


@decided_by_main  # the same figures on every rank (prunekit.distributed.decide)
def measure(
    models: dict[str, nn.Module],
    example_inputs: Any,
    *,
    threads: int | None = None,
    budget_s: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 30,
) -> dict[str, Any]:
    """Median latency (ms) of each model on ``example_inputs``, timed side by side.

    Warm-up (bench's untimed first call, then 2 more calls for a fast model, 1 or 0 for a
    slow one), then as many repetitions as fit ``budget_s`` in all (at least
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
            warmup=2 if repeats > 10 else (1 if repeats > min_repeats else 0),
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


def warn_if_missed(asked: float, reached: float, detail: str, stacklevel: int) -> None:
    """Warn that a ``target_latency`` search ended farther than ``LATENCY_TOLERANCE`` from the
    asked ratio; ``detail`` says what was tried."""
    if abs(reached / asked - 1) > LATENCY_TOLERANCE:
        warnings.warn(
            f"prunekit: target_latency={asked} not reached within "
            f"{100 * LATENCY_TOLERANCE:.0f} %: the closest measured ratio is {reached:.2f} "
            f"{detail}",
            stacklevel=stacklevel + 1,
        )


def measure_pair(
    dense: nn.Module,
    pruned: nn.Module,
    example_inputs: Any,
    threads: int | None,
    dense_alone: dict[str, Any] | None = None,
    budget_s: float = 1.0,
    min_repeats: int = 3,
) -> Latency:
    """Dense and pruned timed side by side (or the pruned alone, when ``dense`` was pruned in
    place and ``dense_alone`` holds its earlier :func:`measure` of it).

    Example:
        >>> import torch
        >>> lat = measure_pair(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.randn(2, 8),
        ...                    threads=1, budget_s=0.01)
        >>> lat.batch, lat.threads
        (2, 1)
    """
    if dense_alone is not None:
        got = measure({"pruned": pruned}, example_inputs, threads=threads)
        dense_ms = dense_alone["ms"]["dense"]
    else:
        got = measure(
            {"dense": dense, "pruned": pruned},
            example_inputs,
            threads=threads,
            budget_s=budget_s,
            min_repeats=min_repeats,
        )
        dense_ms = got["ms"]["dense"]
    return Latency.of(got, "pruned", dense_ms)


@decided_by_main
def module_times(
    model: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    repeats: int = 5,
    budget_s: float = 1.0,
) -> dict[str, float]:
    """Median milliseconds each leaf module spends in a forward pass on ``example_inputs``.

    Forward pre- and post-hooks time every module without children (one untimed call first,
    then up to ``repeats`` timed calls, fewer when they would not fit ``budget_s``); the hooks
    are removed afterwards. Time spent between modules (functional ops, Python) is not in any
    entry. ``prune_structured`` uses it to weigh a group's measured time against its MACs.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> sorted(module_times(net, torch.randn(2, 8), repeats=2))
        ['0', '1']
    """
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
    samples: dict[str, list[float]] = {n: [] for n, _ in leaves}
    started: dict[str, float] = {}
    hooks = []
    for name, module in leaves:
        hooks.append(
            module.register_forward_pre_hook(
                lambda _m, _i, n=name: started.__setitem__(n, time.perf_counter())
            )
        )
        hooks.append(
            module.register_forward_hook(
                lambda _m, _i, _o, n=name: samples[n].append(time.perf_counter() - started[n])
            )
        )
    previous, was = torch.get_num_threads(), model.training
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.inference_mode():
            start = time.perf_counter()
            _call(model, example_inputs)  # untimed warm-up; decides how many calls fit
            one = time.perf_counter() - start
            for values in samples.values():
                values.clear()
            for _ in range(max(1, min(repeats, int(budget_s / max(one, 1e-9))))):
                _call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
        torch.set_num_threads(previous)
    return {n: 1000 * float(sorted(v)[len(v) // 2]) for n, v in samples.items() if v}
