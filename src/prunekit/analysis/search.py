"""Prune to a quality floor: the most compressed model whose quality stays above a floor.

:func:`prune_to_floor` validates as it prunes: it climbs a ladder of budgets (sparsities) from
the low end, measuring each pruned model (after an optional ``recover`` step such as a short
fine-tune), and once a point falls below the floor it bisects between the last point above the
floor and the first below it, until the interval is narrower than ``tolerance``. Every point
tried is in the report, with its value, whether it passed, and its time. The search assumes that
quality falls as sparsity grows (it never retries below a failed point).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.compress.durable import write_text_atomic

DEFAULT_LADDER = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass
class FloorPoint:
    """One budget tried: the sparsity asked, the quality measured, and whether it passed."""

    sparsity: float
    value: float
    passed: bool
    seconds: float
    phase: str  # "ladder" or "bisect"


@dataclass
class FloorSearchReport:
    """What :func:`prune_to_floor` found: the best point, the model, and every point tried."""

    dense: float
    threshold: float
    floor: float
    relative: bool
    higher_is_better: bool
    points: list[FloorPoint] = field(default_factory=list)
    best: FloorPoint | None = None
    model: nn.Module | None = None

    @property
    def sparsity(self) -> float:
        """The highest sparsity that stayed above the floor (0 when none did)."""
        return self.best.sparsity if self.best else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense,
            "threshold": self.threshold,
            "floor": self.floor,
            "relative": self.relative,
            "higher_is_better": self.higher_is_better,
            "sparsity": self.sparsity,
            "best": vars(self.best) if self.best else None,
            "points": [vars(p) for p in self.points],
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def __str__(self) -> str:
        kind = f"{self.floor:g} of dense" if self.relative else f"{self.floor:g}"
        lines = [
            f"floor {kind}: threshold {self.threshold:.6g} (dense {self.dense:.6g})",
            f"{'#':>3}  {'phase':<7} {'sparsity':>9}  {'value':>10}  {'ok':<4} {'time s':>7}",
        ]
        for i, p in enumerate(self.points, 1):
            ok = "yes" if p.passed else "no"
            lines.append(
                f"{i:>3}  {p.phase:<7} {p.sparsity:>9.4f}  {p.value:>10.6g}  {ok:<4} {p.seconds:>7.1f}"
            )
        if self.best:
            lines.append(f"best: sparsity {self.best.sparsity:.4f}, value {self.best.value:.6g}")
        else:
            lines.append("no point tried stayed above the floor")
        return "\n".join(lines)


def prune_to_floor(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    floor: float = 0.99,
    *,
    relative: bool = True,
    higher_is_better: bool = True,
    prune_fn: Callable[[nn.Module, float], nn.Module | Any] | None = None,
    recover: Callable[[nn.Module], nn.Module | None] | None = None,
    ladder: Sequence[float] = DEFAULT_LADDER,
    tolerance: float = 0.01,
    max_points: int = 20,
    keep_model: bool = True,
    progress: bool = True,
    **prune_kwargs: Any,
) -> FloorSearchReport:
    """Find the highest sparsity whose quality stays above a floor, validating every point.

    Args:
        model: the dense model (never changed: each point prunes a copy).
        evaluate: ``evaluate(model) -> float``, the quality measured at every point.
        floor: a fraction of the dense quality (``relative=True``, e.g. 0.99), or an absolute
            value (``relative=False``).
        higher_is_better: False for losses / perplexities: the floor is then a ceiling
            (``dense / floor`` when relative).
        prune_fn: ``prune_fn(model_copy, sparsity)`` returns the pruned model (or a report with
            ``.model``); default ``prunekit.prune(copy, sparsity=..., inplace=True,
            **prune_kwargs)``.
        recover: ``recover(pruned)`` run before measuring (e.g. a short mask-keeping fine-tune);
            it may return a new model or change the one given.
        ladder: the sparsities climbed first, increasing.
        tolerance: bisection stops when the interval is narrower than this.
        max_points: at most this many points are tried.
        keep_model: keep the best pruned model in ``report.model``.

    Returns:
        A :class:`FloorSearchReport`: ``.sparsity``, ``.best``, ``.points`` (every point
        tried), ``.model``.

    Example:
        >>> report = prunekit.prune_to_floor(net, evaluate=acc, floor=0.99)  # doctest: +SKIP
        >>> print(report)                                                    # doctest: +SKIP
    """
    ladder = sorted(float(s) for s in ladder)
    if not ladder or any(not 0.0 < s < 1.0 for s in ladder):
        raise ValueError(f"ladder must hold sparsities in (0, 1), got {list(ladder)!r}")
    if not floor > 0 or (relative and floor > 1.0 and higher_is_better):
        raise ValueError(f"a relative floor is a fraction of dense in (0, 1], got {floor!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")
    if prune_fn is None:
        from prunekit.prune import prune

        def prune_fn(m: nn.Module, s: float) -> Any:
            return prune(m, sparsity=s, inplace=True, progress=False, **prune_kwargs)

    elif prune_kwargs:
        raise ValueError(f"{', '.join(prune_kwargs)}: pruning options go to prune_fn, not here")
    dense = float(evaluate(model))
    if relative:
        threshold = dense * floor if higher_is_better else dense / floor
    else:
        threshold = float(floor)
    report = FloorSearchReport(dense, threshold, floor, relative, higher_is_better)

    def ok(value: float) -> bool:
        return value >= threshold if higher_is_better else value <= threshold

    def trial(sparsity: float, phase: str) -> bool:
        started = time.perf_counter()
        pruned = prune_fn(copy.deepcopy(model), sparsity)
        pruned = getattr(pruned, "model", pruned)
        if recover is not None:
            recovered = recover(pruned)
            pruned = recovered if isinstance(recovered, nn.Module) else pruned
        value = float(evaluate(pruned))
        point = FloorPoint(sparsity, value, ok(value), time.perf_counter() - started, phase)
        report.points.append(point)
        if progress:
            print(
                f"prune_to_floor: {phase} sparsity {sparsity:.4f} -> {value:.6g} "
                f"({'above' if point.passed else 'below'} {threshold:.6g})",
                flush=True,
            )
        if point.passed and (report.best is None or sparsity > report.best.sparsity):
            report.best = point
            report.model = pruned if keep_model else None
        return point.passed

    low, high = 0.0, None
    for s in ladder:
        if len(report.points) >= max_points:
            break
        if trial(s, "ladder"):
            low = s
        else:
            high = s
            break
    if high is None:
        high = 1.0 if low == ladder[-1] else None
    while high is not None and high - low > tolerance and len(report.points) < max_points:
        mid = round((low + high) / 2, 6)
        if mid >= 1.0 or mid <= low:
            break
        if trial(mid, "bisect"):
            low = mid
        else:
            high = mid
    return report
