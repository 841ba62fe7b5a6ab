"""Per-group latency table: how many milliseconds one unit of each dependency group costs on this
machine, measured, for allocating widths under a latency budget.

:func:`latency_table` traces the model, builds the dependency groups ``prune_structured`` sees
(channels / neurons, heads), and for each group times the dense model and copies with that group
alone pruned at a few ratios, all in one :func:`prunekit.graph.latency.measure` call (rotating
rounds, so drift hits every copy alike). A group's cost is the least-squares slope (through the
origin) of the milliseconds saved against the units removed, floored at :data:`MIN_MS_PER_UNIT`
so that a group whose removal measures no gain still costs something.

:func:`prunekit.analysis.allocate_widths` accepts the table as ``cost=`` (a budget given as a
fraction of the dense latency), and ``prune_structured(allocation="sensitivity",
target_latency=r)`` measures one and allocates with it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.compress.durable import write_text_atomic
from prunekit.graph import latency as _latency
from prunekit.graph.groups import Group, build_groups
from prunekit.graph.plan import group_multiple
from prunekit.graph.surgery import apply_removal
from prunekit.graph.trace import Graph, trace

TABLE_RATIOS = (0.25, 0.5, 0.75)
MIN_MS_PER_UNIT = 1e-6  # floor of a slope: a unit never costs nothing (nor less)


@dataclass
class LatencyTable:
    """Measured latency saved per unit removed, per dependency group.

    ``ms_per_unit[name]`` is the slope (ms saved per unit, floored at :data:`MIN_MS_PER_UNIT`);
    ``points[name]`` the ``[(units removed, ms saved), ...]`` it was fitted on; ``sizes[name]``
    the group's units; ``dense_ms`` the dense model's median latency in the same measurements
    (the median over groups); ``cpu`` / ``threads`` / ``device`` / ``batch`` where it ran.
    """

    ms_per_unit: dict[str, float]
    points: dict[str, list[tuple[int, float]]]
    sizes: dict[str, int]
    dense_ms: float
    threads: int
    device: str
    cpu: str
    batch: int
    settings: dict[str, Any] = field(default_factory=dict)

    def ranked(self) -> list[str]:
        """Group names, the most time saved per unit first."""
        return sorted(self.ms_per_unit, key=lambda n: -self.ms_per_unit[n])

    def to_dict(self) -> dict[str, Any]:
        return {
            "ms_per_unit": self.ms_per_unit,
            "points": {k: [list(p) for p in v] for k, v in self.points.items()},
            "sizes": self.sizes,
            "dense_ms": self.dense_ms,
            "threads": self.threads,
            "device": self.device,
            "cpu": self.cpu,
            "batch": self.batch,
            "settings": self.settings,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON (atomically)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by :meth:`save`."""
        with open(path) as f:
            d = json.load(f)
        d["points"] = {k: [(int(a), float(b)) for a, b in v] for k, v in d["points"].items()}
        return cls(**d)

    def table(self) -> str:
        head = ["group", "units", "ms/unit", "points (units removed: ms saved)"]
        rows = [head]
        for name in self.ranked():
            pts = ", ".join(f"{k}: {s:.3g}" for k, s in self.points[name])
            rows.append([name, str(self.sizes[name]), f"{self.ms_per_unit[name]:.4g}", pts])
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            "  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3]])
            for r in rows
        ]
        lines.append(
            f"dense {self.dense_ms:.4g} ms, batch {self.batch}, {self.threads} thread{'' if self.threads == 1 else 's'}, "
            f"{self.device}, {self.cpu}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope through the origin (no units removed saves nothing), floored."""
    k = np.array([p[0] for p in points], dtype=np.float64)
    s = np.array([p[1] for p in points], dtype=np.float64)
    denom = float((k * k).sum())
    slope = float((k * s).sum()) / denom if denom > 0 else 0.0
    return max(slope, MIN_MS_PER_UNIT)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_table(
    model: nn.Module,
    graph: Graph,
    groups: list[Group],
    example_inputs: Any,
    *,
    ratios: Iterable[float] = TABLE_RATIOS,
    order: dict[int, np.ndarray] | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    threads: int | None = None,
    budget_s: float = 1.0,
) -> LatencyTable:
    """The table for ``groups`` of an already traced ``graph`` (``order[g.index]``: which units
    go first, default the first ones; which units does not change the shapes, only the count)."""
    ratios = sorted({float(r) for r in ratios})
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be numbers in (0, 1), got {ratios!r}")
    points: dict[str, list[tuple[int, float]]] = {}
    sizes: dict[str, int] = {}
    dense_seen: list[float] = []
    got: dict[str, Any] = {}
    for g in groups:
        step = 1
        if g.kind == "channel" and round_to > 1:
            m = group_multiple(max(g.n_units, g.layer_width), round_to)
            step = m if g.n_units % m == 0 else 1
        counts = []
        for r in ratios:
            k = int(round(r * g.n_units / step)) * step
            k = max(0, min(k, g.n_units - max(min_keep, 1)))
            if k > 0 and k not in counts:
                counts.append(k)
        if not counts:
            continue  # too narrow to lose a unit
        units = order[g.index] if order is not None and g.index in order else np.arange(g.n_units)
        models: dict[str, nn.Module] = {"dense": model}
        for k in counts:
            candidate = copy.deepcopy(model)
            apply_removal(candidate, graph, g.roots[np.sort(units[:k])])
            models[f"k={k}"] = candidate
        got = _latency.measure(models, example_inputs, threads=threads, budget_s=budget_s)
        dense_ms = float(got["ms"]["dense"])
        dense_seen.append(dense_ms)
        points[g.name] = [(k, dense_ms - float(got["ms"][f"k={k}"])) for k in counts]
        sizes[g.name] = g.n_units
        del models
    if not points:
        raise ValueError(
            "no dependency group can lose a unit (all pinned, ignored, or narrower than min_keep)"
        )
    return LatencyTable(
        ms_per_unit={n: _slope(p) for n, p in points.items()},
        points=points,
        sizes=sizes,
        dense_ms=float(np.median(dense_seen)),
        threads=int(got.get("threads", torch.get_num_threads())),
        device=str(got.get("device", "cpu")),
        cpu=_cpu_name(),
        batch=int(got.get("batch", 0)),
        settings={"ratios": ratios, "round_to": round_to, "budget_s": budget_s},
    )


def latency_table(
    model: nn.Module,
    example_inputs: Any,
    *,
    unit: str | Iterable[str] = ("channel", "head"),
    ratios: Iterable[float] = TABLE_RATIOS,
    round_to: int = 1,
    min_keep: int = 1,
    threads: int | None = None,
    budget_s: float = 1.0,
    gqa: str = "kv",
) -> LatencyTable:
    """Time the model with each dependency group pruned alone at ``ratios``, against dense.

    Args:
        model: the dense model (left unchanged; a copy per ratio and group is timed).
        example_inputs: the inputs latency is measured on (batch and shapes matter).
        unit: ``"channel"``, ``"head"`` or both.
        ratios: fractions of a group's units removed, each in (0, 1).
        round_to: channel groups lose whole multiples of this (as ``prune_structured``).
        threads: torch intra-op threads while timing (None: the current count).
        budget_s: timing budget of each group's measurement (dense + its copies).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> t = latency_table(net, torch.randn(2, 8), budget_s=0.01)
        >>> list(t.ms_per_unit), t.sizes
        (['0'], {'0': 16})
    """
    units = {unit} if isinstance(unit, str) else set(unit)
    units = {"channel" if u == "neuron" else u for u in units}
    if not units or not units <= {"channel", "head"}:
        raise ValueError(f"unit must be 'channel', 'head' or both, got {unit!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    graph = trace(model, example_inputs, gqa=gqa)
    groups = [g for g in build_groups(graph) if g.kind in units and not (gqa == "q" and g.kv)]
    return measure_table(
        model,
        graph,
        groups,
        example_inputs,
        ratios=ratios,
        round_to=round_to,
        min_keep=min_keep,
        threads=threads,
        budget_s=budget_s,
    )
