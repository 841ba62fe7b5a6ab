"""Allocation under a budget: per-layer sparsities that minimise the predicted total damage.

Given one damage curve per layer (damage measured at a few sparsities, linearly interpolated in
between, 0 at sparsity 0) and a budget, :func:`allocate` chooses how many weights each layer
loses so that the sum of the predicted damages is smallest and the budget is met exactly:

* ``sparsity=`` a global sparsity of the layers together (``round(sparsity * total)`` weights
  go), ``nonzeros=`` the exact number of weights kept, or ``removed=`` the number removed;
* ``cost="params"`` (every weight costs 1), ``"macs"`` or ``"bytes"`` (per-weight costs measured
  by :func:`prunekit.sensitivity`), or a dict ``{layer: cost of one weight}`` (for example from
  a latency table: seconds per weight); with a cost other than params the budget is
  ``keep=`` the fraction of the layers' total cost that stays.

The solver is a multiple-choice knapsack: every layer's options are its measured points plus the
interpolated points on a grid of ``resolution`` cost buckets, and a dynamic programme picks one
option per layer with the bucket total equal to the budget. A Lagrangian solution (greedy over
the lower convex hulls of the curves, exact when the curves are convex) is computed too, and the
better of the two is kept. The remainder left by the bucket rounding is then moved, weight by
weight, to the layers where it costs least, so the budget is met to one weight (to one weight's
cost for weighted budgets). When the total cost is at most ``resolution`` units the buckets are
single weights and the programme is exact.

Per-layer sparsities come out as ``removed / size``, so ``round(s_i * n_i)`` is exactly the
number of weights chosen for layer ``i`` (this is how ``prune`` and ``oneshot`` count).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.compress.durable import write_text_atomic

Curve = Sequence[tuple[float, float]]


@dataclass
class Allocation:
    """Per-layer sparsities chosen under a budget.

    ``per_layer`` (``{layer: sparsity}``) is accepted by ``prunekit.prune(per_layer=...)`` and
    ``prunekit.oneshot(per_layer=...)``; ``removed`` holds the exact weight counts.
    """

    per_layer: dict[str, float]
    removed: dict[str, int]
    sizes: dict[str, int]
    predicted_damage: float
    budget: dict[str, Any] = field(default_factory=dict)
    solver: str = ""

    @property
    def sparsity(self) -> float:
        """Sparsity of the allocated layers together."""
        return sum(self.removed.values()) / max(1, sum(self.sizes.values()))

    @property
    def nonzeros(self) -> int:
        """Weights kept in the allocated layers (existing zeros not subtracted)."""
        return sum(self.sizes.values()) - sum(self.removed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "prunekit-allocation",
            "per_layer": self.per_layer,
            "removed": self.removed,
            "sizes": self.sizes,
            "sparsity": self.sparsity,
            "nonzeros": self.nonzeros,
            "predicted_damage": self.predicted_damage,
            "budget": self.budget,
            "solver": self.solver,
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the allocation as JSON (``prunekit prune/oneshot --per-layer FILE`` read it)."""
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def __str__(self) -> str:
        width = max([len(n) for n in self.per_layer] + [5])
        lines = [f"{'layer':<{width}}  {'size':>10}  {'removed':>10}  sparsity"]
        for name, s in self.per_layer.items():
            lines.append(
                f"{name:<{width}}  {self.sizes[name]:>10,}  {self.removed[name]:>10,}  {s:.4f}"
            )
        lines.append(
            f"total: sparsity {self.sparsity:.4f}, {self.nonzeros:,} non-zeros kept, predicted "
            f"damage {self.predicted_damage:.6g} ({self.solver})"
        )
        return "\n".join(lines)


def load_per_layer(path: str | os.PathLike) -> dict[str, float]:
    """Read ``{layer: sparsity}`` from an allocation JSON file (or a plain JSON mapping)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    table = data.get("per_layer", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in table.items()
    ):
        raise ValueError(
            f"{path}: expected an allocation file ({{'per_layer': {{layer: sparsity}}}}) or a "
            "JSON object mapping layer names to sparsities"
        )
    return {k: float(v) for k, v in table.items()}


class _Layer:
    """One layer's curve in count space: damage(k) for k removed weights, k in [lo, hi]."""

    def __init__(self, name: str, points: Curve, size: int, cost: float, lo_s: float, hi_s: float):
        pts = sorted((float(s), float(d)) for s, d in points)
        if not pts or pts[0][0] > 0:
            pts.insert(0, (0.0, 0.0))
        for s, d in pts:
            if not (0.0 <= s <= 1.0) or not math.isfinite(d):
                raise ValueError(
                    f"curve of {name!r}: points must be (sparsity in [0, 1], finite damage), "
                    f"got ({s!r}, {d!r})"
                )
        self.name, self.size, self.cost = name, int(size), float(cost)
        self.xs = np.array([s * size for s, _ in pts])
        self.ys = np.array([d for _, d in pts])
        top = min(hi_s, pts[-1][0])
        self.lo = int(math.ceil(lo_s * size - 1e-9))
        self.hi = int(math.floor(top * size + 1e-9))
        if self.lo > self.hi:
            raise ValueError(
                f"layer {name!r}: min_sparsity {lo_s:g} is above the largest measured or allowed "
                f"sparsity {top:g}"
            )

    def damage(self, k: float | np.ndarray) -> Any:
        return np.interp(k, self.xs, self.ys)

    def breakpoints(self) -> list[int]:
        return sorted({int(round(x)) for x in self.xs if self.lo <= round(x) <= self.hi})


def _layers_from(curves: Any, sizes: Mapping[str, int] | None, cost: Any, lo: float, hi: float):
    if hasattr(curves, "curves") and callable(curves.curves):
        sizes = sizes or curves.sizes
        if isinstance(cost, str) and cost != "params":
            table = {"macs": curves.macs_per_weight, "bytes": curves.bytes_per_weight}.get(cost)
            if table is None:
                raise ValueError(
                    f"unknown cost {cost!r}; accepted: 'params', 'macs', 'bytes' or a dict"
                )
            cost = table
        curves = curves.curves()
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(
            "curves must be a SensitivityResult or a non-empty {layer: [(sparsity, damage), ...]}"
        )
    if sizes is None or set(sizes) < set(curves):
        raise ValueError("sizes must give the number of weights of every layer in curves")
    if isinstance(cost, str):
        if cost not in ("params", "macs", "bytes"):
            raise ValueError(
                f"unknown cost {cost!r}; accepted: 'params', 'macs', 'bytes' or a dict"
            )
        if cost != "params":
            raise ValueError(
                f"cost={cost!r} needs a SensitivityResult (it measures per-weight costs)"
            )
        cost = {}
    missing = [n for n in curves if cost and n not in cost]
    if missing:
        raise ValueError(f"cost has no entry for {', '.join(missing)}")
    for name, c in cost.items():
        if not (isinstance(c, (int, float)) and c > 0):
            raise ValueError(f"cost of {name!r} must be a positive number, got {c!r}")
    return [
        _Layer(n, pts, sizes[n], cost.get(n, 1.0) if cost else 1.0, lo, hi)
        for n, pts in curves.items()
    ], bool(cost)


def _total(layers: list[_Layer], counts: Sequence[float]) -> float:
    return float(sum(layer.damage(k) for layer, k in zip(layers, counts, strict=True)))


def _knapsack(layers: list[_Layer], budget: float, resolution: int) -> list[int] | None:
    """Multiple-choice knapsack over bucketed costs; None when the bucket target is unreachable."""
    span = sum(layer.cost * (layer.hi - layer.lo) for layer in layers)
    unit = max(span / resolution, min(layer.cost for layer in layers))
    base = sum(layer.cost * layer.lo for layer in layers)
    target = int(round((budget - base) / unit))
    if target < 0:
        return None
    dp = np.zeros(target + 1)
    dp[1:] = np.inf
    choices = []
    for layer in layers:
        step = max(1, int(unit / layer.cost))
        ks = sorted(
            set(range(layer.lo, layer.hi + 1, step)) | {layer.hi} | set(layer.breakpoints())
        )
        ks = np.array(ks)
        buckets = np.rint(layer.cost * (ks - layer.lo) / unit).astype(np.int64)
        damages = layer.damage(ks.astype(float))
        new = np.full(target + 1, np.inf)
        pick = np.full(target + 1, -1, dtype=np.int64)
        for j, (b, d) in enumerate(zip(buckets, damages, strict=True)):
            if b > target:
                continue
            cand = dp[: target + 1 - b] + d
            better = cand < new[b:]
            new[b:][better] = cand[better]
            pick[b:][better] = j
        dp = new
        choices.append((ks, buckets, pick))
    if not np.isfinite(dp[target]):
        return None
    counts, b = [], target
    for ks, buckets, pick in reversed(choices):
        j = int(pick[b])
        counts.append(int(ks[j]))
        b -= int(buckets[j])
    return counts[::-1]


def _hull(layer: _Layer) -> list[tuple[float, float]]:
    """Lower convex hull of the layer's points inside [lo, hi], in count space."""
    xs = sorted(
        {float(layer.lo), float(layer.hi), *(x for x in layer.xs if layer.lo < x < layer.hi)}
    )
    pts = [(x, float(layer.damage(x))) for x in xs]
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _lagrangian(layers: list[_Layer], budget: float) -> list[float]:
    """Greedy over hull segments by damage per unit cost (the Lagrangian solution)."""
    counts = [float(layer.lo) for layer in layers]
    left = budget - sum(layer.cost * layer.lo for layer in layers)
    segments = []
    for i, layer in enumerate(layers):
        hull = _hull(layer)
        for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
            segments.append(((y2 - y1) / ((x2 - x1) * layer.cost), i, x2 - x1))
    for _, i, width in sorted(segments, key=lambda s: s[0]):
        if left <= 0:
            break
        take = min(width, left / layers[i].cost)
        counts[i] += take
        left -= take * layers[i].cost
    return counts


def _integerise(layers: list[_Layer], counts: list[float], budget: float) -> list[int]:
    """Integer counts, then the remaining budget moved where it costs least (exact to one weight)."""
    ints = [
        min(layer.hi, max(layer.lo, int(math.floor(c + 1e-9))))
        for layer, c in zip(layers, counts, strict=True)
    ]

    def spent() -> float:
        return sum(layer.cost * k for layer, k in zip(layers, ints, strict=True))

    for _ in range(10 * len(layers) + 10):
        left = budget - spent()
        if abs(left) < 0.5 * min(layer.cost for layer in layers):
            break
        best = None
        for i, layer in enumerate(layers):
            if left > 0:
                room = layer.hi - ints[i]
                move = min(room, max(1, int(round(left / layer.cost))))
            else:
                room = ints[i] - layer.lo
                move = -min(room, max(1, int(round(-left / layer.cost))))
            if move == 0:
                continue
            rate = (float(layer.damage(ints[i] + move)) - float(layer.damage(ints[i]))) / abs(
                move * layer.cost
            )
            if left < 0:
                rate = -rate
            if best is None or rate < best[0]:
                best = (rate, i, move)
        if best is None:
            break
        ints[best[1]] += best[2]
    return ints


def _polish(layers: list[_Layer], counts: list[int]) -> list[int]:
    """Pairwise exchanges of equal weight counts between layers while they lower the damage
    (params budgets: the total stays exact). Steps halve from a large move down to one weight."""
    counts = list(counts)
    step = max(1, max(layer.hi - layer.lo for layer in layers) // 8)
    while step >= 1:
        improved = True
        while improved:
            improved = False
            up = [
                float(lay.damage(k + step)) - float(lay.damage(k))
                if k + step <= lay.hi
                else math.inf
                for lay, k in zip(layers, counts, strict=True)
            ]
            down = [
                float(lay.damage(k)) - float(lay.damage(k - step))
                if k - step >= lay.lo
                else -math.inf
                for lay, k in zip(layers, counts, strict=True)
            ]
            i = int(np.argmin(up))
            j = int(np.argmax(down))
            if i != j and up[i] - down[j] < -1e-15:
                counts[i] += step
                counts[j] -= step
                improved = True
        step //= 2
    return counts


def allocate(
    curves: Any,
    sparsity: float | None = None,
    *,
    sizes: Mapping[str, int] | None = None,
    nonzeros: int | None = None,
    removed: int | None = None,
    cost: str | Mapping[str, float] = "params",
    keep: float | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    resolution: int = 4000,
) -> Allocation:
    """Choose per-layer sparsities that minimise the predicted damage under an exact budget.

    Args:
        curves: a :class:`prunekit.analysis.SensitivityResult`, or ``{layer: [(sparsity,
            damage), ...]}`` with ``sizes``.
        sparsity: global sparsity of the layers together.
        sizes: weights per layer (taken from a SensitivityResult).
        nonzeros, removed: the exact number of weights kept / removed (instead of sparsity).
        cost: what the budget counts: ``"params"``, ``"macs"``, ``"bytes"`` or ``{layer: cost
            of one weight}``; with a cost other than params give ``keep``.
        keep: fraction of the layers' total cost that stays (weighted budgets).
        min_sparsity, max_sparsity: bounds of every layer (a layer never goes past its last
            measured sparsity either).
        resolution: cost buckets of the knapsack (exact when the total cost is smaller).

    Example:
        >>> curves = {"a": [(0.5, 1.0), (0.9, 9.0)], "b": [(0.5, 0.1), (0.9, 0.5)]}
        >>> alloc = allocate(curves, 0.5, sizes={"a": 100, "b": 100})
        >>> alloc.per_layer
        {'a': 0.1, 'b': 0.9}
    """
    if not 0.0 <= min_sparsity <= max_sparsity <= 1.0:
        raise ValueError(
            f"need 0 <= min_sparsity <= max_sparsity <= 1, got {min_sparsity!r}, {max_sparsity!r}"
        )
    if not isinstance(resolution, int) or resolution < 10:
        raise ValueError(f"resolution must be an integer >= 10, got {resolution!r}")
    layers, weighted = _layers_from(curves, sizes, cost, min_sparsity, max_sparsity)
    total_weights = sum(layer.size for layer in layers)
    given = [v is not None for v in (sparsity, nonzeros, removed, keep)]
    if sum(given) != 1:
        raise ValueError("give exactly one budget: sparsity=, nonzeros=, removed= or keep=")
    if weighted and keep is None:
        raise ValueError(
            "a weighted cost (macs, bytes, dict) needs keep=<fraction of the cost kept>"
        )
    if keep is not None:
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep must be a fraction in [0, 1], got {keep!r}")
        budget = (1.0 - keep) * sum(layer.cost * layer.size for layer in layers)
        kind = {"kind": str(cost) if isinstance(cost, str) else "custom", "keep": keep}
    else:
        if sparsity is not None:
            if not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
            removed = int(round(sparsity * total_weights))
        elif nonzeros is not None:
            removed = total_weights - int(nonzeros)
        if not 0 <= removed <= total_weights:
            raise ValueError(
                f"the budget removes {removed} of {total_weights} weights: out of range"
            )
        budget = float(removed)
        kind = {"kind": "params", "removed": removed}
    low = sum(layer.cost * layer.lo for layer in layers)
    high = sum(layer.cost * layer.hi for layer in layers)
    if not low - 1e-6 <= budget <= high + 1e-6:
        raise ValueError(
            f"budget not reachable: the layers can remove between {low:g} and {high:g} (cost "
            f"units) within their measured / allowed sparsities, and {budget:g} was asked; "
            "measure higher sparsities or relax min_sparsity / max_sparsity"
        )

    candidates = []
    knap = _knapsack(layers, budget, resolution)
    if knap is not None:
        candidates.append(("knapsack", _integerise(layers, knap, budget)))
    candidates.append(("lagrangian", _integerise(layers, _lagrangian(layers, budget), budget)))
    if not weighted:
        candidates = [(name + "+exchange", _polish(layers, c)) for name, c in candidates]
    solver, counts = min(candidates, key=lambda c: _total(layers, c[1]))
    spent = sum(layer.cost * k for layer, k in zip(layers, counts, strict=True))
    kind["achieved"] = spent
    return Allocation(
        per_layer={layer.name: k / layer.size for layer, k in zip(layers, counts, strict=True)},
        removed={layer.name: k for layer, k in zip(layers, counts, strict=True)},
        sizes={layer.name: layer.size for layer in layers},
        predicted_damage=_total(layers, counts),
        budget=kind,
        solver=solver,
    )
