"""Hardware-aware widths for ``prune_structured``'s MAC / parameter targets: candidates, measured.

Removing half the MACs does not halve the time: the backend pads channel counts to its vector
block (oneDNN's nChw16c with AVX-512), and some layers cost more time per MAC than others
(depthwise convs, narrow early layers, per-op overhead at batch 1). With a target and no
``round_to``, ``prune_structured`` builds a few selections that all meet the target (each with
the same rounding-aware search) and keeps the one that measures fastest on the example inputs:

* ``uniform``: one ratio for every group, widths at multiples of the backend's vector width,
  halved for narrow groups (the static default, used without measurement);
* ``whole``: the same with the full multiple everywhere (a group narrower than two multiples
  stays whole or loses whole multiples);
* ``time``: groups whose units cost more measured time per MAC (:func:`time_per_mac`, from one
  hook-timed forward pass) lose more of them: group g keeps ``(1 - r) ** w_g`` of its units,
  with ``w_g`` its time per MAC over the MAC-weighted mean, clipped to
  [:data:`MIN_WEIGHT`, :data:`MAX_WEIGHT`]; ``time-whole``: the same at full multiples.

A candidate whose widths cannot reach the target is left out.

A candidate replaces ``uniform`` only when it measures at least :data:`MIN_GAIN` faster (the
uniform one spreads the damage most evenly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from prunekit.graph import latency as _latency
from prunekit.graph.groups import Group
from prunekit.graph.plan import CostModel, Selection
from prunekit.graph.trace import Graph

# (name, halve narrow groups' multiple, weigh ratios by measured time per MAC)
CANDIDATES = (
    ("uniform", True, False),
    ("whole", False, False),
    ("time", True, True),
    ("time-whole", False, True),
)
MIN_WEIGHT, MAX_WEIGHT = 0.5, 2.0
MIN_GAIN = 0.03  # a candidate must measure this much faster than "uniform" to replace it


def time_per_mac(
    graph: Graph,
    groups: list[Group],
    cost: CostModel,
    times: dict[str, float],
) -> dict[int, float]:
    """Measured ms per MAC of one unit of each group: the share of every module's time that one
    unit represents (its indices over the module's dim), summed over the group's modules, over
    the MACs the unit carries. Groups without MACs or without timed modules are left out."""
    dense_macs = cost.evaluate(np.zeros(0, dtype=np.int64))[0]
    out: dict[int, float] = {}
    for g in groups:
        share: dict[str, float] = {}
        for (key, dim), per_unit in g.slices.items():
            module = key.rpartition(".")[0]
            if module not in times or key not in graph.tensors:
                continue
            size = graph.tensors[key][1][dim]
            if size:
                share[module] = max(share.get(module, 0.0), len(per_unit[0]) / size)
        ms = sum(times[m] * f for m, f in share.items())
        macs = (dense_macs - cost.evaluate(g.roots)[0]) / max(g.n_units, 1)
        if ms > 0 and macs > 0:
            out[g.index] = ms / macs
    return out


def weights(groups: list[Group], cost: CostModel, per_mac: dict[int, float]) -> dict[int, float]:
    """Each group's time per MAC over the MAC-weighted mean, clipped (1 where unmeasured)."""
    dense_macs = cost.evaluate(np.zeros(0, dtype=np.int64))[0]
    macs = {g.index: dense_macs - cost.evaluate(g.roots)[0] for g in groups}
    total = sum(macs[i] for i in per_mac)
    if not per_mac or total <= 0:
        return {g.index: 1.0 for g in groups}
    mean = sum(per_mac[i] * macs[i] for i in per_mac) / total
    return {
        g.index: float(np.clip(per_mac[g.index] / mean, MIN_WEIGHT, MAX_WEIGHT))
        if g.index in per_mac and mean > 0
        else 1.0
        for g in groups
    }


def weighted_overrides(
    groups: list[Group], w: dict[int, float], ratio: float, fixed: dict[int, float]
) -> dict[int, float]:
    """Per-group ratios for one search ratio: group g keeps ``(1 - ratio) ** w[g]`` of its units;
    ``fixed`` (the user's ``per_layer`` entries) wins."""
    out = {g.index: 1.0 - (1.0 - ratio) ** w.get(g.index, 1.0) for g in groups}
    out.update(fixed)
    return out


def pick_fastest(
    model: nn.Module,
    candidates: dict[str, Selection],
    build: Callable[[Selection], nn.Module],
    example_inputs: Any,
    *,
    threads: int | None,
) -> tuple[str, dict[str, float], dict[str, Any]]:
    """Build every distinct candidate, time them all beside the dense model in one measurement
    (rotating rounds), and return the chosen name, every candidate's ms and the measurement.
    Candidates that remove the same units are built and timed once."""
    distinct: dict[str, Selection] = {}
    same: dict[str, str] = {}
    for name, sel in candidates.items():
        key = next((k for k, s in distinct.items() if _same(s, sel)), None)
        if key is None:
            distinct[name] = sel
        else:
            same[name] = key
    models: dict[str, nn.Module] = {"dense": model}
    for name, sel in distinct.items():
        models[name] = build(sel)
    got = _latency.measure(
        models,
        example_inputs,
        threads=threads,
        budget_s=0.75 * len(models),
        min_repeats=5,
    )
    ms = {n: float(got["ms"][n]) for n in distinct}
    for name, key in same.items():
        ms[name] = ms[key]
    first = next(iter(candidates))
    best = min(ms, key=ms.__getitem__)
    chosen = best if ms[best] < ms[first] * (1 - MIN_GAIN) else first
    got["built"] = {n: models[n] for n in distinct}
    got["same"] = same
    return chosen, ms, got


def _same(a: Selection, b: Selection) -> bool:
    keys = {i for i, r in a.removed.items() if len(r)} | {i for i, r in b.removed.items() if len(r)}
    return all(
        np.array_equal(
            np.sort(a.removed.get(i, np.zeros(0, dtype=np.int64))),
            np.sort(b.removed.get(i, np.zeros(0, dtype=np.int64))),
        )
        for i in keys
    )
