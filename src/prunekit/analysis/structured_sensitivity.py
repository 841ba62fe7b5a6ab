"""Structured sensitivity: how much each group (a layer's heads, an MLP's neurons, a conv's
channels) can lose, and the per-group widths that meet a MAC budget with the least damage.

:func:`structured_sensitivity` prunes one dependency group at a time (the others stay dense) at
a few ratios, lowest-importance units first (the ranking ``prune_structured`` would use), and
records the damage: label-free, the mean ``1 - cos`` between the pruned and the dense model's
output vectors on calibration data (padding tokens left out), or ``base - evaluate(model)`` with
a user metric. With ``reconstruct=`` the damage is measured after the repair
(:mod:`prunekit.graph.reconstruct`, refit on the dense model's statistics), so the curves
describe what a repaired prune will do.

:func:`allocate_widths` turns the curves into per-group ratios under a MAC budget with
:func:`prunekit.analysis.allocate` (knapsack over the measured points, every unit costing the
MACs it removes, channel groups in whole ``round_to`` steps), then trims one step at a time
until the exact MAC count (from the traced cost model) is at or below the target.

``prune_structured(..., allocation="sensitivity", target_macs=...)`` runs both. Under
``torch.distributed`` the measured points are spread over the ranks (each measured by one rank
on all of ``calib``, every rank gets every value: :mod:`prunekit.distributed.jobs`), so every
rank allocates the same widths as one process.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.analysis.allocate import allocate
from prunekit.analysis.latency_table import LatencyTable, measure_table
from prunekit.compress.durable import write_text_atomic
from prunekit.distributed import is_distributed, is_main, rank
from prunekit.distributed.jobs import job_owners, run_shared
from prunekit.graph.groups import Group, build_groups
from prunekit.graph.importance import batch_input, get_importance, score_groups
from prunekit.graph.plan import CostModel, group_multiple, resolve_target
from prunekit.graph.pruner import STRUCTURED_ALLOCATORS
from prunekit.graph.reconstruct import (
    ReconstructConfig,
    collect_stats,
    find_consumers,
    refit_consumer,
    zero_columns,
)
from prunekit.graph.reconstruct import resolve as resolve_reconstruct
from prunekit.graph.surgery import apply_removal
from prunekit.graph.trace import Graph, call_model, iter_tensors, trace

RATIOS = (0.25, 0.5, 0.75, 0.9)


@dataclass
class StructuredSensitivity:
    """Damage curves of every dependency group, and what one unit of each costs.

    ``curves[name]`` is ``[(ratio removed, damage), ...]``; ``sizes[name]`` the group's units;
    ``unit_macs[name]`` the MACs one unit costs (on ``example_inputs``); ``steps[name]`` the
    units a group is pruned by at a time (its ``round_to`` multiple); ``patterns[name]`` a
    module name that ``prune_structured(per_layer=...)`` matches to this group.
    """

    curves: dict[str, list[tuple[float, float]]]
    sizes: dict[str, int]
    unit_macs: dict[str, float]
    steps: dict[str, int]
    patterns: dict[str, str]
    dense_macs: float
    metric: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "curves": {k: [list(p) for p in v] for k, v in self.curves.items()},
            "sizes": self.sizes,
            "unit_macs": self.unit_macs,
            "steps": self.steps,
            "patterns": self.patterns,
            "dense_macs": self.dense_macs,
            "metric": self.metric,
            "settings": self.settings,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the curves as JSON (atomically)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))

    def table(self) -> str:
        ratios = sorted({r for c in self.curves.values() for r, _ in c})
        head = ["group", "units"] + [f"r={r:g}" for r in ratios]
        rows = [head]
        for name, curve in self.curves.items():
            got = dict(curve)
            rows.append(
                [name, str(self.sizes[name])]
                + [f"{got[r]:.4g}" if r in got else "" for r in ratios]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        )

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------- damage


def _mask_of(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, dict):
        m = inputs.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.ndim == 2:
            return m.bool()
    return None


def _first(out: Any) -> torch.Tensor:
    """The first floating-point output with a feature dimension (logits, hidden states); a
    scalar loss, returned first when the batch holds labels, is skipped."""
    for t in iter_tensors(getattr(out, "to_tuple", lambda: out)()):
        if t.is_floating_point() and t.ndim >= 1:
            return t
    raise ValueError(
        "the model returns no floating-point tensor with a feature dimension to compare with "
        "the dense one"
    )


class _CosineDamage:
    """Mean 1 - cos between output vectors (last dim) and the dense model's, on real tokens."""

    def __init__(self, model: nn.Module, calib: list[Any]) -> None:
        self.calib = calib
        self.dense = [self._rows(model, b) for b in calib]

    def _rows(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs = batch_input(batch)
        with torch.no_grad():
            y = _first(call_model(model, inputs)).float()
        mask = _mask_of(inputs)
        if mask is not None and y.ndim >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
            y = y[mask]
        return y.reshape(-1, y.shape[-1])

    def __call__(self, model: nn.Module) -> float:
        total, n = 0.0, 0
        for batch, ref in zip(self.calib, self.dense, strict=True):
            cos = F.cosine_similarity(self._rows(model, batch), ref, dim=-1)
            total += float((1 - cos).sum())
            n += cos.numel()
        return total / max(n, 1)


# --------------------------------------------------------------------------- curves


def _unit_costs(cost: CostModel, groups: list[Group]) -> tuple[float, dict[int, float]]:
    dense, _ = cost.evaluate(np.zeros(0, dtype=np.int64))
    out = {}
    for g in groups:
        k = max(1, g.n_units // 2)
        macs, _ = cost.evaluate(g.roots[:k])
        out[g.index] = (dense - macs) / k
    return dense, out


def _step(g: Group, round_to: int) -> int:
    if g.kind != "channel" or round_to <= 1:
        return 1
    m = group_multiple(max(g.n_units, g.layer_width), round_to)
    return m if g.n_units % m == 0 else 1


def _count(g: Group, ratio: float, step: int, min_keep: int) -> int:
    k = int(round(ratio * g.n_units / step)) * step
    return max(0, min(k, g.n_units - max(min_keep, 1)))


def measure_curves(
    model: nn.Module,
    graph: Graph,
    groups: list[Group],
    scores: dict[int, np.ndarray],
    calib: list[Any],
    *,
    ratios: Iterable[float] = RATIOS,
    evaluate: Callable[[nn.Module], float] | None = None,
    reconstruct: ReconstructConfig | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    progress: bool = True,
) -> tuple[dict[int, list[tuple[float, float]]], str]:
    """Damage of each scored group pruned alone at each ratio (the model is left as it was)."""
    ratios = sorted({float(r) for r in ratios})
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be numbers in (0, 1), got {ratios!r}")
    if evaluate is None:
        damage_of = _CosineDamage(model, calib)
        metric = "1 - cos(output, dense output)"
    else:
        base = float(evaluate(model))
        damage_of = lambda m: base - float(evaluate(m))  # noqa: E731
        metric = "evaluate(dense) - evaluate(pruned)"
    modules = dict(model.named_modules())
    stats = {}
    if reconstruct is not None:
        all_consumers, _ = find_consumers(
            model, graph, groups, {g.index: np.arange(g.n_units) for g in groups}
        )
        stats = collect_stats(model, all_consumers, calib, gram=reconstruct.method == "lstsq")
    todo = [g for g in groups if g.index in scores]
    jobs: list[tuple[Group, int]] = []  # (group, units removed): one measured point each
    for g in todo:
        step, fractions = _step(g, round_to), set()
        for r in ratios:
            k = _count(g, r, step, min_keep)
            if k == 0 or k / g.n_units in fractions:
                continue
            fractions.add(k / g.n_units)
            jobs.append((g, k))

    def point(g: Group, k: int) -> float:
        order = np.argsort(scores[g.index], kind="stable")
        removed = {g.index: np.sort(order[:k])}
        consumers, notes = find_consumers(model, graph, [g], removed)
        bar.update(1)
        if not consumers or notes:  # the units run through more than Linear / conv readers
            candidate = copy.deepcopy(model)
            apply_removal(candidate, graph, g.roots[removed[g.index]])
            return float(damage_of(candidate))
        saved = {
            c.module: (
                modules[c.module].weight.detach().clone(),
                None if modules[c.module].bias is None else modules[c.module].bias.detach().clone(),
            )
            for c in consumers
        }
        try:
            for c in consumers:
                if reconstruct is None:
                    zero_columns(modules[c.module], c)
                else:
                    refit_consumer(modules[c.module], c, stats[c.module], reconstruct)
            return float(damage_of(model))
        finally:
            with torch.no_grad():
                for name, (w, b) in saved.items():
                    modules[name].weight.copy_(w)
                    if b is not None:
                        modules[name].bias.copy_(b)

    was = model.training
    model.eval()
    # under torch.distributed the points are spread over the ranks (one rank measures each,
    # every rank gets every value: the curves, hence the allocation, are one process's)
    mine = len(jobs) if not is_distributed() else job_owners(len(jobs)).count(rank())
    show = progress and is_main()
    bar = tqdm(total=mine, desc="structured sensitivity", disable=not show)
    try:
        values = run_shared([partial(point, g, k) for g, k in jobs])
    finally:
        bar.close()
        model.train(was)
    curves: dict[int, list[tuple[float, float]]] = {}
    for (g, k), value in zip(jobs, values, strict=True):
        curves.setdefault(g.index, []).append((k / g.n_units, value))
    # a group too narrow to lose a unit at any ratio stays out
    curves = {i: sorted(points) for i, points in curves.items()}
    return curves, metric


def structured_sensitivity(
    model: nn.Module,
    example_inputs: Any,
    calib: Iterable[Any],
    *,
    unit: str | Iterable[str] = ("channel", "head"),
    importance: str | Any = "l2",
    ratios: Iterable[float] = RATIOS,
    evaluate: Callable[[nn.Module], float] | None = None,
    reconstruct: str | ReconstructConfig | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    reduce: str = "sum",
    gqa: str = "kv",
    progress: bool = True,
) -> StructuredSensitivity:
    """Prune one dependency group at a time at several ratios and record the damage.

    Args:
        model: the dense model (left unchanged).
        example_inputs: inputs for tracing and MAC counting (as for ``prune_structured``).
        calib: batches the damage is measured on (and statistics for ``reconstruct``).
        unit: ``"channel"``, ``"head"`` or both.
        importance: which units of a group go first (``prune_structured``'s criteria).
        ratios: fractions of a group's units removed, each in (0, 1).
        evaluate: ``evaluate(model) -> float``, higher is better; damage = dense - pruned.
            None: label-free, mean ``1 - cos`` between output vectors and the dense ones.
        reconstruct: measure after the repair (``"bias"``, ``"lstsq"`` or a config).
        loss_fn: for ``importance="taylor"``.
        round_to: channel groups are pruned in steps of this multiple (as ``prune_structured``
            rounds); 1: any count.

    Example:
        >>> import torch
        >>> from prunekit.analysis.structured_sensitivity import structured_sensitivity
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> result = structured_sensitivity(net, torch.randn(1, 8), [torch.randn(32, 8)], progress=False)
        >>> list(result.curves), len(result.curves["0"])
        (['0'], 4)
    """
    units = {unit} if isinstance(unit, str) else set(unit)
    units = {"channel" if u == "neuron" else u for u in units}
    if not units or not units <= {"channel", "head"}:
        raise ValueError(f"unit must be 'channel', 'head' or both, got {unit!r}")
    calib = list(calib)
    if not calib:
        raise ValueError("calib must hold at least one batch")
    repair = resolve_reconstruct(reconstruct)
    if repair is not None:
        repair = ReconstructConfig(repair.method, repair.damp, False, None)
    graph = trace(model, example_inputs, gqa=gqa)
    groups = [g for g in build_groups(graph) if g.kind in units and not (gqa == "q" and g.kv)]
    criterion = get_importance(importance)
    scores, _ = score_groups(
        criterion,
        model,
        graph,
        groups,
        reduce=reduce,
        calib=calib,
        loss_fn=loss_fn,
        progress=progress,
    )
    curves, metric = measure_curves(
        model,
        graph,
        groups,
        scores,
        calib,
        ratios=ratios,
        evaluate=evaluate,
        reconstruct=repair,
        round_to=round_to,
        min_keep=min_keep,
        progress=progress,
    )
    traced = {k for k, (kind, _) in graph.tensors.items() if kind == "param"}
    extra = sum(p.numel() for n, p in model.named_parameters() if n not in traced)
    dense, unit_macs = _unit_costs(CostModel(graph, extra_params=extra), groups)
    by = {g.index: g for g in groups}
    return StructuredSensitivity(
        curves={by[i].name: c for i, c in curves.items()},
        sizes={by[i].name: by[i].n_units for i in curves},
        unit_macs={by[i].name: unit_macs[i] for i in curves},
        steps={by[i].name: _step(by[i], round_to) for i in curves},
        patterns={by[i].name: by[i].producers[0][0].rpartition(".")[0] for i in curves},
        dense_macs=dense,
        metric=metric,
        settings={
            "importance": criterion.name,
            "ratios": sorted({float(r) for r in ratios}),
            "reconstruct": repair.method if repair else None,
            "round_to": round_to,
        },
    )


# --------------------------------------------------------------------------- allocation


def _interp(curve: list[tuple[float, float]], r: float) -> float:
    xs = [0.0] + [p[0] for p in curve]
    ys = [0.0] + [p[1] for p in curve]
    return float(np.interp(r, xs, ys))


def allocate_widths(
    result: StructuredSensitivity,
    target_macs: float,
    *,
    macs_of: Callable[[dict[str, int]], float] | None = None,
    cost: LatencyTable | None = None,
) -> dict[str, float]:
    """Per-group ratios (``{group name: ratio}``) that meet ``target_macs`` (a fraction of the
    dense MACs in (0, 1], or an absolute count) with the least predicted damage.

    ``macs_of({group: units removed}) -> MACs`` checks the exact count (default: the linear
    per-unit costs); one step of the group whose next step adds the least predicted damage per
    MAC is removed while the count is above the target.

    ``cost``: a :class:`prunekit.analysis.latency_table.LatencyTable` measured on this machine;
    then ``target_macs`` is a fraction of the dense *latency* in (0, 1], every unit costs the
    milliseconds its group's slope says, and the predicted latency (dense minus the units' saved
    ms) is brought to at or below the target (``macs_of`` is not used).

    Example:
        >>> r = StructuredSensitivity({"a": [(0.5, 1.0)], "b": [(0.5, 0.1)]}, {"a": 10, "b": 10},
        ...     {"a": 1.0, "b": 1.0}, {"a": 1, "b": 1}, {"a": "a", "b": "b"}, 20.0, "")
        >>> allocate_widths(r, 0.75)
        {'a': 0.0, 'b': 0.5}
    """
    names = list(result.curves)
    if cost is None:
        unit_cost, dense, what = result.unit_macs, result.dense_macs, "MACs"
        want = resolve_target(target_macs, dense)
    else:
        missing = [n for n in names if n not in cost.ms_per_unit]
        if missing:
            raise ValueError(
                f"the latency table has no entry for groups {missing}: measure it on the same "
                f"model and units as the sensitivity (it has {sorted(cost.ms_per_unit)})"
            )
        if isinstance(target_macs, bool) or not 0.0 < float(target_macs) <= 1.0:
            raise ValueError(
                f"with a latency table the target is a fraction of the dense latency in (0, 1], "
                f"got {target_macs!r}"
            )
        unit_cost = {n: cost.ms_per_unit[n] for n in names}
        dense, what, macs_of = cost.dense_ms, "ms", None
        want = float(target_macs) * dense
    prunable = sum(result.sizes[n] * unit_cost[n] for n in names)
    fixed = dense - prunable
    if want is None or want < fixed + 1e-9:
        raise ValueError(
            f"target {target_macs!r} is below what the groups can reach: the {what} outside "
            f"them alone are {fixed:,.6g} of {dense:,.6g}"
        )
    keep = min(1.0, (want - fixed) / prunable) if prunable else 1.0
    blocks = {n: result.sizes[n] // result.steps[n] for n in names}
    top = {n: max(r for r, _ in result.curves[n]) for n in names}
    alloc = allocate(
        {n: result.curves[n] for n in names},
        sizes=blocks,
        cost={n: unit_cost[n] * result.steps[n] for n in names},
        keep=keep,
    )
    removed = {
        n: min(
            alloc.removed[n] * result.steps[n],
            int(math.floor(top[n] * result.sizes[n] / result.steps[n])) * result.steps[n],
        )
        for n in names
    }

    def total(rem: dict[str, int]) -> float:
        if macs_of is not None:
            return macs_of(rem)
        return dense - sum(rem[n] * unit_cost[n] for n in names)

    for _ in range(sum(blocks.values())):
        if total(removed) <= want + 1e-6:
            break
        best, best_cost = None, math.inf
        for n in names:
            nxt = removed[n] + result.steps[n]
            if nxt > result.sizes[n] - 1 or nxt / result.sizes[n] > top[n] + 1e-9:
                continue
            extra = _interp(result.curves[n], nxt / result.sizes[n]) - _interp(
                result.curves[n], removed[n] / result.sizes[n]
            )
            per = extra / max(unit_cost[n] * result.steps[n], 1e-12)
            if per < best_cost:
                best, best_cost = n, per
        if best is None:
            break
        removed[best] += result.steps[best]
    return {n: removed[n] / result.sizes[n] for n in names}


def _allocator(
    model: nn.Module,
    graph: Graph,
    groups: list[Group],
    scores: dict[int, np.ndarray],
    cost: CostModel,
    calib: list[Any],
    target_macs: float,
    *,
    reconstruct: ReconstructConfig | None,
    round_to: int,
    min_keep: int,
    progress: bool,
    target_latency: float | None = None,
    example_inputs: Any = None,
    threads: int | None = None,
    cache: dict[str, Any] | None = None,
) -> tuple[dict[int, float], dict[str, Any]]:
    """``prune_structured(allocation="sensitivity")``: group ratios by index, and a summary.

    With ``target_latency`` (a fraction of the dense latency) a per-group latency table is
    measured on ``example_inputs`` and the widths are allocated with its per-unit costs.
    ``cache`` (a dict, filled on the first call) keeps the damage curves and the latency table,
    so a second call with a corrected budget measures nothing again."""
    cache = {} if cache is None else cache
    repair = (
        ReconstructConfig(reconstruct.method, reconstruct.damp, False, None)
        if reconstruct is not None
        else None
    )
    scored = [g for g in groups if g.index in scores]
    if "curves" not in cache:
        cache["curves"] = measure_curves(
            model,
            graph,
            scored,
            scores,
            calib,
            reconstruct=repair,
            round_to=round_to,
            min_keep=min_keep,
            progress=progress,
        )
    curves, metric = cache["curves"]
    scored = [g for g in scored if g.index in curves]
    dense, unit_macs = _unit_costs(cost, scored)
    by_name = {g.name: g for g in scored}
    result = StructuredSensitivity(
        curves={g.name: curves[g.index] for g in scored},
        sizes={g.name: g.n_units for g in scored},
        unit_macs={g.name: unit_macs[g.index] for g in scored},
        steps={g.name: _step(g, round_to) for g in scored},
        patterns={},
        dense_macs=dense,
        metric=metric,
    )

    def macs_of(removed: dict[str, int]) -> float:
        roots = [
            by_name[n].roots[np.argsort(scores[by_name[n].index], kind="stable")[:k]]
            for n, k in removed.items()
            if k
        ]
        return cost.evaluate(np.concatenate(roots) if roots else np.zeros(0, dtype=np.int64))[0]

    table = None
    if target_latency is not None:
        if "table" not in cache:
            cache["table"] = measure_table(
                model,
                graph,
                scored,
                example_inputs,
                order={g.index: np.argsort(scores[g.index], kind="stable") for g in scored},
                round_to=round_to,
                min_keep=min_keep,
                threads=threads,
            )
        table = cache["table"]
        ratios = allocate_widths(result, target_latency, cost=table)
    else:
        ratios = allocate_widths(result, target_macs, macs_of=macs_of)
    summary = {
        "metric": metric,
        "curves": {n: [list(p) for p in c] for n, c in result.curves.items()},
        "predicted_damage": sum(_interp(result.curves[n], r) for n, r in ratios.items()),
    }
    if table is not None:
        saved = sum(
            round(r * result.sizes[n]) * table.ms_per_unit.get(n, 0.0) for n, r in ratios.items()
        )
        summary["predicted_latency_ratio"] = (table.dense_ms - saved) / table.dense_ms
        summary["latency_table"] = table.to_dict()
    return {by_name[n].index: r for n, r in ratios.items()}, summary


STRUCTURED_ALLOCATORS["sensitivity"] = _allocator
