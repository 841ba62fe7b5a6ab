"""``prune_structured``: remove whole channels, neurons, heads or layers, for a smaller dense model."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.graph.count import count
from prunekit.graph.depth import prune_layers
from prunekit.graph.groups import Group, build_groups
from prunekit.graph.importance import NORMALIZATIONS, REDUCTIONS, get_importance, score_groups
from prunekit.graph.importance import normalize as normalize_scores
from prunekit.graph.plan import CostModel, Selection, resolve_target, select
from prunekit.graph.report import GroupRow, StructuredReport
from prunekit.graph.surgery import StructuredPruningError, apply_removal, verify
from prunekit.graph.trace import Graph, trace
from prunekit.targets import matches

UNITS = ("channel", "neuron", "head", "layer")
SCOPES = ("local", "global")
GQA_MODES = ("kv", "q")

# re-exported: these lived here before graph/report.py and graph/surgery.py held them
__all__ = [
    "GroupRow",
    "StructuredPruningError",
    "StructuredReport",
    "prune_structured",
    "verify",
]


# --------------------------------------------------------------------------- validation


def _check_ratio(value: Any, what: str = "ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, accepted: Iterable[str]) -> str:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")
    return value


def _units(unit: str | Iterable[str]) -> set[str]:
    units = {unit} if isinstance(unit, str) else set(unit)
    for u in units:
        _check_choice("unit", u, UNITS)
    if "neuron" in units:
        units = (units - {"neuron"}) | {"channel"}
    if "layer" in units and len(units) > 1:
        raise ValueError(
            "unit='layer' (depth pruning) cannot be combined with other units in one call"
        )
    if not units:
        raise ValueError(f"unit must name at least one of {', '.join(map(repr, UNITS))}")
    return units


def _patterns(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_patterns(kind: str, patterns: list[str], names: list[str]) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{kind} patterns must be strings, got {pattern!r}")
        if not any(matches(pattern, n) for n in names):
            shown = ", ".join(n for n in names if n)[:2000]
            raise ValueError(
                f"{kind} pattern {pattern!r} matches no module. Modules: {shown}. Patterns are "
                "globs, or regular expressions with a 're:' prefix."
            )


def _check_target(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
        raise ValueError(
            f"{what} must be a positive number: a fraction of the dense model in (0, 1], or an "
            f"absolute count above 1; got {value!r}"
        )
    return float(value)


# --------------------------------------------------------------------------- the verb


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.3,
    unit: str | Iterable[str] = "channel",
    importance: str | Any | None = None,
    scope: str = "local",
    round_to: int | None = None,
    ignore: str | Iterable[str] | None = None,
    per_layer: dict[str, float] | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    min_keep: int = 1,
    calib: Iterable[Any] | None = None,
    *,
    reduce: str = "sum",
    normalize: str = "mean",
    gqa: str = "kv",
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    layers: str | Iterable[str] | None = None,
    pin_outputs: bool = True,
    seed: int = 0,
    inplace: bool = False,
    progress: bool = True,
) -> StructuredReport:
    """Remove whole channels, neurons, attention heads or layers; the result is a smaller dense model.

    Args:
        model: any ``nn.Module`` (Hugging Face models included).
        example_inputs: what to call the model with for tracing: a tensor, a tuple of positional
            inputs or a dict of keyword inputs. Small is fine (batch 1, a few tokens).
        ratio: fraction of units to remove, in [0, 1): per group (``scope="local"``) or over all
            groups together (``"global"``). Ignored when a target is given.
        unit: ``"channel"`` (conv channels, linear neurons, embedding / hidden channels, RNN hidden
            units; ``"neuron"`` is a synonym), ``"head"`` (whole attention heads), a list of both,
            or ``"layer"`` (whole residual blocks / transformer layers: depth pruning).
        importance: channels / heads: ``"l2"`` (default), ``"l1"``, ``"taylor"`` (data, loss),
            ``"bn_scale"``, ``"activation"`` or ``"apoz"`` (data), ``"random"``, or a
            :class:`prunekit.graph.importance.GroupImportance`. Layers: ``"influence"`` (default;
            1 - cosine of a block's input and output on data), ``"loss"`` (loss increase when
            the block is skipped) or ``"random"``.
        scope: ``"local"`` or ``"global"`` (scores normalised per group with ``normalize``).
        round_to: keep channel counts a multiple of this (e.g. 8); heads are not rounded.
        ignore: module name patterns (glob, or ``re:`` regex) whose output units must stay:
            every group that such a module produces is left whole.
        per_layer: ``{pattern: ratio}``: groups produced by a matching module get their own
            ratio (first matching pattern wins).
        target_macs / target_params: prune until the model has at most this many MACs /
            parameters instead of using ``ratio``: a fraction of the dense model in (0, 1], or
            an absolute count above 1.
        min_keep: units every group keeps at least (never below 1).
        calib: batches for data-driven criteria (a tensor, a dict of model kwargs, or a tuple
            whose first item is the model input). Defaults to ``[example_inputs]``.
        reduce: how a unit's slices across the group combine: ``"sum"``, ``"mean"``, ``"max"``.
        normalize: per-group score normalisation for global scope: ``"mean"``, ``"max"``,
            ``"l2"``, ``"none"``.
        gqa: grouped-query attention: ``"kv"`` removes whole key/value groups (with their query
            heads); ``"q"`` removes query heads, the same number from every group.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for ``taylor`` and ``loss``; default: the
            model output's ``.loss`` (Hugging Face models given ``labels``).
        layers: depth pruning: name patterns of the candidate blocks (default: every block of a
            ``nn.ModuleList`` / ``nn.Sequential`` whose output has its input's shape).
        pin_outputs: keep the model's output dims (default True).
        seed: seed of ``random``.
        inplace: change ``model`` itself (after the pruned copy was verified).
        progress: progress bars for data passes.

    Returns:
        A :class:`StructuredReport` (``report.model`` is the pruned model).

    Example:
        >>> import torch, prunekit
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        >>> pruned, report = prunekit.prune_structured(net, torch.randn(1, 16), ratio=0.5)
        >>> pruned[0].out_features, report.params_after < report.params_before
        (32, True)
    """
    units = _units(unit)
    ratio = _check_ratio(ratio)
    _check_choice("scope", scope, SCOPES)
    _check_choice("reduce", reduce, REDUCTIONS)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_choice("gqa", gqa, GQA_MODES)
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an integer >= 1, got {min_keep!r}")
    target_macs = _check_target(target_macs, "target_macs")
    target_params = _check_target(target_params, "target_params")
    per_layer = dict(per_layer or {})
    for key, value in per_layer.items():
        _check_ratio(value, f"per_layer[{key!r}]")
    module_names = [n for n, _ in model.named_modules()]
    ignore_patterns = _patterns(ignore)
    _check_patterns("ignore", ignore_patterns, module_names)
    _check_patterns("per_layer", list(per_layer), module_names)
    calib_list = list(calib) if calib is not None else [example_inputs]
    settings: dict[str, Any] = {"unit": "+".join(sorted(units)), "scope": scope}

    if units == {"layer"}:
        unused = {
            "per_layer": bool(per_layer),
            "round_to": round_to is not None,
            "scope": scope != "local",
            "reduce": reduce != "sum",
            "normalize": normalize != "mean",
            "gqa": gqa != "kv",
        }
        given = [name for name, set_ in unused.items() if set_]
        if given:
            raise ValueError(
                f"unit='layer' removes whole blocks and does not use {', '.join(given)}; "
                "leave them at their defaults (layers are chosen with ratio, target_macs, "
                "target_params, layers=, ignore= and importance)"
            )

        return prune_layers(
            model,
            example_inputs,
            ratio=ratio,
            importance=importance or "influence",
            layers=_patterns(layers),
            ignore=ignore_patterns,
            target_macs=target_macs,
            target_params=target_params,
            min_keep=min_keep,
            calib=calib_list,
            loss_fn=loss_fn,
            seed=seed,
            inplace=inplace,
            progress=progress,
            settings=settings,
        )

    criterion = get_importance(importance or "l2")
    settings["importance"] = criterion.name
    graph = trace(model, example_inputs, gqa=gqa, pin_outputs=pin_outputs)
    groups = [g for g in build_groups(graph) if g.kind in units and not (gqa == "q" and g.kv)]
    groups = _drop_ignored(groups, ignore_patterns)
    overrides = _overrides(groups, per_layer)
    notes = list(graph.notes)
    if not groups:
        notes.append("no prunable group: every unit is pinned, ignored or of another kind")
    scores, score_notes = (
        score_groups(
            criterion,
            model,
            graph,
            groups,
            reduce=reduce,
            calib=calib_list,
            loss_fn=loss_fn,
            seed=seed,
            progress=progress,
        )
        if groups
        else ({}, [])
    )
    notes.extend(score_notes)

    def choose(r: float) -> Selection:
        return select(
            groups,
            scores,
            r,
            scope=scope,
            overrides=overrides,
            round_to=round_to,
            min_keep=min_keep,
            normalize_how=normalize,
        )

    if target_macs is not None or target_params is not None:
        ranked = (
            None if round_to else {i: normalize_scores(v, normalize) for i, v in scores.items()}
        )
        selection, reached = _search_target(
            graph, groups, choose, model, target_macs, target_params, fill=ranked
        )
        settings.update(
            {
                k: v
                for k, v in (("target_macs", target_macs), ("target_params", target_params))
                if v is not None
            }
        )
        settings["ratio"] = round(reached, 4)
    else:
        selection = choose(ratio)
        settings["ratio"] = ratio
    if round_to:
        settings["round_to"] = round_to
    removed_roots = selection.roots(groups)
    before = count(model, example_inputs)
    pruned = _surgery_verified(model, graph, removed_roots, example_inputs, inplace, pin_outputs)
    after = count(pruned, example_inputs)
    rows = [
        GroupRow(
            g.name,
            g.kind,
            g.n_units,
            g.n_units - len(selection.removed.get(g.index, ())),
            g.modules,
            g.exact,
        )
        for g in groups
    ]
    return StructuredReport(pruned, before, after, rows, [], settings, notes)


def _drop_ignored(groups: list[Group], patterns: list[str]) -> list[Group]:
    if not patterns:
        return groups
    kept = []
    for g in groups:
        producers = {k.rpartition(".")[0] for k, _ in g.producers}
        if not any(matches(p, m) for p in patterns for m in producers):
            kept.append(g)
    return kept


def _overrides(groups: list[Group], per_layer: dict[str, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for g in groups:
        producers = [k.rpartition(".")[0] for k, _ in g.producers]
        for pattern, value in per_layer.items():
            if any(matches(pattern, m) for m in producers) or matches(pattern, g.name):
                out[g.index] = value
                break
    return out


def _search_target(
    graph, groups, choose, model, target_macs, target_params, fill=None
) -> tuple[Selection, float]:
    """Smallest ratio whose selection meets the targets (bisection on the analytic cost model),
    then the most important of the removed units are put back while the targets still hold."""
    traced = {k for k, (kind, _) in graph.tensors.items() if kind == "param"}
    extra = sum(p.numel() for n, p in model.named_parameters() if n not in traced)
    cost = CostModel(graph, extra_params=extra)
    dense_macs, dense_params = cost.evaluate(np.zeros(0, dtype=np.int64))
    want_macs = resolve_target(target_macs, dense_macs)
    want_params = resolve_target(target_params, dense_params)

    def ok(selection: Selection) -> tuple[bool, float, float]:
        macs, params = cost.evaluate(selection.roots(groups))
        good = (want_macs is None or macs <= want_macs + 1e-6) and (
            want_params is None or params <= want_params + 1e-6
        )
        return good, macs, params

    hi_sel = choose(0.999)
    good, macs, params = ok(hi_sel)
    if not good:
        raise ValueError(
            f"the target cannot be reached by removing {sorted({g.kind for g in groups})} units: the "
            f"smallest reachable model has {macs:,.0f} MACs and {params:,.0f} params (dense: "
            f"{dense_macs:,.0f} MACs, {dense_params:,.0f} params). Nothing was changed."
        )
    lo, hi = 0.0, 0.999
    best = hi_sel
    if ok(choose(0.0))[0]:
        return choose(0.0), 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        sel = choose(mid)
        if ok(sel)[0]:
            hi, best = mid, sel
        else:
            lo = mid
    if fill is not None:
        best = _fill(best, groups, fill, lambda sel: ok(sel)[0])
    return best, hi


def _fill(
    selection: Selection, groups: list[Group], ranked: dict[int, np.ndarray], ok
) -> Selection:
    """Restore removed units, best score first, while ``ok``; give up after 64 misses in a row."""
    by_index = {g.index: g for g in groups}
    candidates = [
        (float(ranked[i][u]), i, int(u))
        for i, removed in selection.removed.items()
        if i in ranked and by_index[i].parents is None
        for u in removed
    ]
    candidates.sort(key=lambda c: -c[0])
    removed = {i: set(map(int, r)) for i, r in selection.removed.items()}
    misses = 0
    for _, i, u in candidates:
        removed[i].discard(u)
        trial = Selection({k: np.array(sorted(v), dtype=np.int64) for k, v in removed.items()})
        if ok(trial):
            selection, misses = trial, 0
        else:
            removed[i].add(u)
            misses += 1
            if misses >= 64:
                break
    return selection


def _surgery_verified(
    model: nn.Module,
    graph: Graph,
    removed_roots: np.ndarray,
    example_inputs: Any,
    inplace: bool,
    same_shapes: bool = True,
) -> nn.Module:
    """Cut the units out of a copy, run it, and only then hand it back (or repeat on ``model``)."""
    from prunekit.graph.hf import note_structure, remember_original_config

    candidate = copy.deepcopy(model)
    remember_original_config(candidate)
    record = apply_removal(candidate, graph, removed_roots)
    verify(
        candidate,
        model,
        example_inputs,
        graph=graph,
        removed_roots=removed_roots,
        same_shapes=same_shapes,
    )
    if inplace:
        remember_original_config(model)
        apply_removal(model, graph, removed_roots)
        note_structure(model, {"kind": "width", "changes": record})
        return model
    note_structure(candidate, {"kind": "width", "changes": record})
    return candidate
