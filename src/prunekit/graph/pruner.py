"""``prune_structured``: remove whole channels, neurons, heads or layers, for a smaller dense model."""

from __future__ import annotations

import contextvars
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.graph import hardware as _hardware
from prunekit.graph import latency as _latency
from prunekit.graph.count import count
from prunekit.graph.depth import find_blocks, prune_layers, without_ignored
from prunekit.graph.groups import Group, build_groups
from prunekit.graph.importance import NORMALIZATIONS, REDUCTIONS, get_importance, score_groups
from prunekit.graph.importance import normalize as normalize_scores
from prunekit.graph.latency import LATENCY_TOLERANCE, LATENCY_TRIES, Latency, default_round_to
from prunekit.graph.plan import CostModel, Selection, resolve_target, restore, select
from prunekit.graph.reconstruct import ReconstructConfig, copy_changed, reconstruct_
from prunekit.graph.reconstruct import resolve as resolve_reconstruct
from prunekit.graph.report import GroupRow, StructuredReport
from prunekit.graph.surgery import StructuredPruningError, apply_removal, verify
from prunekit.graph.trace import Graph, trace
from prunekit.graph.unit_choice import (
    MEASURING_BLOCKS,
    SPEED_SHORTFALL,
    blocks_if_faster,
    falls_short,
    handed_back,
)
from prunekit.prune import refuse_nonfinite_parameters
from prunekit.runtime.accelerated import refuse_accelerated
from prunekit.runtime.copies import VERIFY_COPY, copy_model
from prunekit.targets import matches

UNITS = ("channel", "neuron", "head", "layer")
ALLOCATIONS = ("sensitivity",)
# allocation name -> allocator; "sensitivity" is registered by prunekit.analysis (no import cycle)
STRUCTURED_ALLOCATORS: dict[str, Callable[..., tuple[dict[int, float], dict[str, Any]]]] = {}
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
    if value > 1 and float(value) != int(value):
        raise ValueError(
            f"{what}={value!r} is above 1, so it would be read as an absolute count, and a count "
            "is a whole number: give a fraction of the dense model in (0, 1] (0.5: half) or a "
            "whole count"
        )
    return float(value)


# keywords that depth pruning does not use, with the values that mean "not used"
_LAYER_UNIT_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "per_layer": (None, {}),
    "round_to": (None,),
    "scope": (None, "local"),
    "reduce": ("sum",),
    "normalize": ("mean",),
    "gqa": ("kv",),
    "reconstruct": (None,),
}


def layer_unit_problems(kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """(keyword, message) for what ``unit="layer"`` refuses among ``kwargs`` (the keywords as
    given; missing ones are at their defaults). Shared with recipe validation, so a recipe is
    refused when it is read rather than when its stage comes up."""
    problems = []
    if kwargs.get("target_latency") is not None and kwargs.get("target_params") is not None:
        problems.append(
            (
                "target_params",
                "unit='layer' with target_latency searches the number of removed blocks by "
                "measured latency alone and takes no target_params; give one of them",
            )
        )
    given = [
        name
        for name, unused in _LAYER_UNIT_DEFAULTS.items()
        if name in kwargs and not any(kwargs[name] == value for value in unused)
    ]
    if given:
        problems.append(
            (
                given[0],
                f"unit='layer' removes whole blocks and does not use {', '.join(given)}; "
                "leave them at their defaults (layers are chosen with ratio, target_macs, "
                "target_params, layers=, ignore= and importance)",
            )
        )
    return problems


# --------------------------------------------------------------------------- the verb


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.3,
    unit: str | Iterable[str] | None = None,
    importance: str | Any | None = None,
    scope: str | None = None,
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
    target_latency: float | None = None,
    measure_latency: bool = True,
    threads: int | None = None,
    reconstruct: str | ReconstructConfig | None = None,
    allocation: str | None = None,
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
            or ``"layer"`` (whole residual blocks / transformer layers: depth pruning). None
            (default): ``"channel"``; with ``target_latency``, when no channel widths reach the
            latency (fixed per-layer costs, pinned widths) and the model has removable blocks,
            whole blocks are removed instead (``unit="layer"``), with a warning and a note
            saying how close widths came. With ``target_macs``, when the widths' measured
            speedup is under 0.85 of their MAC ratio and the model has removable blocks, whole
            blocks to the same MAC target are timed beside them, and kept (with a warning and
            a note) if at least 3 % faster with outputs on ``example_inputs`` as close to the
            dense model's, within 10 % (:mod:`prunekit.graph.unit_choice`;
            ``report.settings["unit_choice"]`` holds the measurement). ``unit="channel"``
            never switches, nor does a call with an argument the depth search cannot honour
            (``target_params``, ``per_layer``, ``round_to``, ``scope="global"``, ``reduce``,
            ``normalize``, ``gqa``, ``reconstruct``, ``importance``, ``min_keep``,
            ``allocation``, ``measure_latency=False``).
        importance: channels / heads: ``"l2"`` (default without ``reconstruct``), ``"l1"``,
            ``"taylor"`` (data, loss), ``"bn_scale"``, ``"activation"`` or ``"apoz"`` (data),
            ``"fluctuation"`` (data; the default with ``reconstruct``: the variance of what a
            unit feeds the next layer, i.e. what a bias / refit cannot restore), ``"random"``,
            or a
            :class:`prunekit.graph.importance.GroupImportance`. Layers: ``"influence"`` (default;
            1 - cosine of a block's input and output on data), ``"loss"`` (loss increase when
            the block is skipped) or ``"random"``.
        scope: ``"local"`` or ``"global"`` (scores normalised per group with ``normalize``).
            None (default): ``"local"``, or ``"global"`` with ``reconstruct`` (the repair
            lets some layers lose far more than others: measured on MiniLM at 2x fewer MACs,
            fluctuation + lstsq scores 85.63 global against 83.69 local, docs/structured.md).
        round_to: keep channel counts a multiple of this; heads are not rounded. None (default):
            the multiple this device's kernels run fast (:func:`prunekit.graph.latency.
            default_round_to`: on CPU 16 with AVX-512 and 8 otherwise, 8 on CUDA; half of it for
            a group narrower than two multiples). A group is never rounded below ``min_keep``
            nor above its width; a group whose width is not a multiple may keep its full width.
            ``round_to=1`` turns rounding off. With ``target_macs`` / ``target_params``, None
            also makes the widths hardware-aware when ``measure_latency`` is on: a few
            selections that all meet the target (one ratio; whole multiples; ratios weighted
            by measured time per MAC, :mod:`prunekit.graph.hardware`) are timed beside the
            dense model on ``example_inputs`` and the fastest is kept (the one-ratio selection
            unless another is 3 % faster with outputs on ``example_inputs`` as close to the
            dense model's, within 10 %; ``report.settings["hardware"]`` lists them).
        ignore: module name patterns (glob, or ``re:`` regex) whose output units must stay:
            every group that such a module produces is left whole.
        per_layer: ``{pattern: ratio}``: groups produced by a matching module get their own
            ratio (first matching pattern wins).
        target_macs / target_params: prune until the model has at most this many MACs /
            parameters instead of using ``ratio``: a fraction of the dense model in (0, 1], or
            an absolute count above 1. The search works with the rounding: it lands at or just
            below the target (the report shows the value reached).
        min_keep: units every group keeps at least (never below 1).
        calib: batches for data-driven criteria (a tensor, a dict of model kwargs, or a tuple
            whose first item is the model input). Defaults to ``reconstruct``'s batches when
            it has some, else ``[example_inputs]``.
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
        target_latency: prune until the *measured* latency on ``example_inputs`` is this fraction
            of the dense model's, in (0, 1): channel / head units try MAC targets, and
            ``unit="layer"`` numbers of removed blocks (lowest scores first), timing the pruned
            model against dense until the ratio is within 5 % (at most 8 tries; the report
            says what was reached). Time it at the batch you will serve. Where fixed costs
            keep widths from reaching the ratio (a CIFAR ResNet-56 at 0.72x with every
            prunable channel gone), the default ``unit`` removes blocks instead (see
            ``unit``); an explicit channel / head unit raises ``LatencyOutOfReach`` (a
            ``ValueError``) saying so.
        measure_latency: time dense and pruned on ``example_inputs`` (about a second each) and
            put the result in ``report.latency``; False skips it.
        threads: torch intra-op threads for every latency measurement (None: the current
            count).
        reconstruct: repair without training (channel / head units): the layers that read
            removed units are refit on calibration data (``calib``) before surgery, layer by
            layer in forward order. ``"lstsq"``: least-squares refit of their kept columns and
            bias to their unpruned output (ridge-damped); ``"bias"``: the removed inputs' mean
            contribution goes into the bias (FLAP); a
            :class:`prunekit.graph.reconstruct.ReconstructConfig` for the damping, the
            calibration batches and one-pass mode; None (default): no repair. Give it enough
            calibration tokens (a few times the widest refit layer's input width, e.g. 4,000+
            tokens for a 1,536-wide BERT FFN).
        allocation: ``"sensitivity"`` (channel / head units, with ``target_macs`` and
            ``calib``): every group is pruned alone at a few ratios and the damage measured
            on ``calib`` (1 - cosine to the dense outputs; after the ``reconstruct`` repair
            when one is given), then per-group widths that meet ``target_macs`` with the least
            predicted damage are chosen (:mod:`prunekit.analysis.structured_sensitivity`);
            ``per_layer`` entries still win. With ``target_latency`` instead of ``target_macs``
            a per-group latency table is measured on ``example_inputs``
            (:mod:`prunekit.analysis.latency_table`) and the widths meet the predicted latency.
            None (default): ``scope`` decides.

    Returns:
        A :class:`StructuredReport` (``report.model`` is the pruned model).

    Example:
        >>> import torch, prunekit
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        >>> pruned, report = prunekit.prune_structured(net, torch.randn(1, 16), ratio=0.5)
        >>> pruned[0].out_features, report.params_after < report.params_before
        (32, True)
    """
    if unit is None:
        call = {k: v for k, v in locals().items() if k != "unit"}
        blocks = _switchable_blocks(call) if target_latency is not None and not allocation else []
        if _weighs_blocks(call):
            measuring = MEASURING_BLOCKS.set(True)  # its depth hint is replaced by a measurement
            try:
                widths_report = prune_structured(**{**call, "inplace": False}, unit="channel")
            finally:
                MEASURING_BLOCKS.reset(measuring)
            if falls_short(widths_report) and _switchable_blocks(call):
                depth_call = {k: v for k, v in call.items() if k not in _WIDTH_ONLY}
                return blocks_if_faster(call, widths_report, prune_structured, depth_call)
            return handed_back(model, widths_report, inplace)
        if not blocks:
            return prune_structured(**call, unit="channel")
        strict = _WIDTHS_MUST_REACH.set(True)  # a miss raises: blocks may do better
        try:
            return prune_structured(**call, unit="channel")
        except LatencyOutOfReach as out_of_reach:
            widths = out_of_reach
        finally:
            _WIDTHS_MUST_REACH.reset(strict)
        return _depth_instead(call, widths, len(blocks))
    refuse_accelerated(model, "prune_structured")  # sparse-kernel layers cannot be resized
    refuse_nonfinite_parameters(model, "prune_structured")  # NaN importance ranks arbitrarily
    units = _units(unit)
    ratio = _check_ratio(ratio)
    if scope is not None:
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
    if target_latency is not None:
        target_latency = _check_ratio(target_latency, "target_latency")
        if target_latency == 0.0:
            raise ValueError("target_latency must be a latency fraction in (0, 1), got 0")
        if target_macs is not None:
            raise ValueError(
                "give target_latency or target_macs, not both (target_latency searches the MACs)"
            )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    target_params = _check_target(target_params, "target_params")
    per_layer = dict(per_layer or {})
    for key, value in per_layer.items():
        _check_ratio(value, f"per_layer[{key!r}]")
    module_names = [n for n, _ in model.named_modules()]
    ignore_patterns = _patterns(ignore)
    _check_patterns("ignore", ignore_patterns, module_names)
    _check_patterns("per_layer", list(per_layer), module_names)
    repair = resolve_reconstruct(reconstruct)
    if calib is None and repair is not None and repair.calib is not None:
        calib = repair.calib  # the repair's batches score the units too
    calib_list = list(calib) if calib is not None else [example_inputs]
    if allocation is not None:
        _check_choice("allocation", allocation, ALLOCATIONS)
        if units == {"layer"} or (target_macs is None and target_latency is None) or calib is None:
            raise ValueError(
                "allocation='sensitivity' chooses channel / head widths under target_macs (or "
                "target_latency, with a measured per-group latency table) from damage measured "
                "on data: give unit='channel' / 'head', target_macs= and calib= (or "
                "target_latency= instead of target_macs=)"
            )
        if target_params is not None:
            raise ValueError(
                "allocation='sensitivity' meets target_macs or target_latency; it does not take "
                "target_params"
            )
    if repair is not None and calib is None:
        raise ValueError(
            f"reconstruct={repair.method!r} refits layers on calibration data: pass calib= "
            "(batches of model inputs, a few thousand tokens or samples) or "
            "ReconstructConfig(calib=...)"
        )
    scope_given = scope is not None
    if scope is None:
        scope = "global" if repair is not None else "local"
    settings: dict[str, Any] = {"unit": "+".join(sorted(units)), "scope": scope}

    if units == {"layer"}:
        problems = layer_unit_problems(
            {
                "per_layer": per_layer,
                "round_to": round_to,
                "scope": scope if scope_given else None,  # not the default chosen above
                "reduce": reduce,
                "normalize": normalize,
                "gqa": gqa,
                "reconstruct": reconstruct,
                "target_latency": target_latency,
                "target_params": target_params,
            }
        )
        if problems:
            raise ValueError(problems[0][1])

        dense_ms = (
            _latency.measure({"dense": model}, example_inputs, threads=threads)
            if measure_latency and inplace and target_latency is None
            else None
        )
        report = prune_layers(
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
            target_latency=target_latency,
            threads=threads,
        )
        if measure_latency and report.latency is None:
            report.latency = _latency.measure_pair(
                model, report.model, example_inputs, threads, dense_ms
            )
        return report

    # with a repair, rank units by what the repair cannot restore (FLAP's fluctuation):
    # measured on MiniLM at 2x fewer MACs (docs/structured.md), l2 + lstsq is far behind
    default = "fluctuation" if repair is not None else "l2"
    criterion = get_importance(importance or default)
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

    auto_round = round_to is None
    if round_to is None:
        round_to = default_round_to(model)
    ranked = {i: normalize_scores(v, normalize) for i, v in scores.items()}
    cost = _cost_model(graph, model)

    def choose(r: float, halve: bool = True, weights: dict[int, float] | None = None) -> Selection:
        return select(
            groups,
            scores,
            r,
            scope=scope,
            overrides=overrides
            if weights is None
            else _hardware.weighted_overrides(groups, weights, r, overrides),
            round_to=round_to,
            min_keep=min_keep,
            normalize_how=normalize,
            halve=halve,
        )

    def plan(
        macs: float | None,
        params: float | None,
        halve: bool = True,
        weights: dict[int, float] | None = None,
    ) -> tuple[Selection, float]:
        return _search_target(
            cost,
            groups,
            lambda r: choose(r, halve, weights),
            macs,
            params,
            # units put back after the search: time-expensive groups last
            ranked if weights is None else {i: v / weights[i] for i, v in ranked.items()},
            round_to=round_to,
            frozen=set(overrides),
            halve=halve,
        )

    latency = None
    if target_latency is not None and allocation is None:
        selection, latency, note = _search_latency(
            model,
            graph,
            groups,
            cost,
            plan,
            example_inputs,
            target_latency,
            target_params,
            smallest=choose(0.999),
            threads=threads,
            pin_outputs=pin_outputs,
        )
        notes.append(note)
        settings["target_latency"] = target_latency
        if target_params is not None:
            settings["target_params"] = target_params
    elif allocation is not None:
        user_overrides, cache, budget = dict(overrides), {}, target_latency
        for attempt in range(1 + (LATENCY_CORRECTIONS if target_latency is not None else 0)):
            allocated, summary = STRUCTURED_ALLOCATORS[allocation](
                model,
                graph,
                groups,
                scores,
                cost,
                calib_list,
                target_macs,
                reconstruct=repair,
                round_to=round_to,
                min_keep=min_keep,
                progress=progress,
                target_latency=budget,
                example_inputs=example_inputs,
                threads=threads,
                cache=cache,
            )
            overrides = {**allocated, **user_overrides}
            selection = choose(ratio)
            if target_latency is None:
                break
            # the table's costs are straight lines; the backend's are steps: measure what the
            # allocation gives and correct the budget the allocator aims at
            candidate = _surgery_verified(
                model, graph, selection.roots(groups), example_inputs, False, pin_outputs
            )
            measured = _latency.measure_pair(
                model, candidate, example_inputs, threads, budget_s=3.0, min_repeats=5
            )
            del candidate
            if measured.ratio <= target_latency * (1 + LATENCY_TOLERANCE / 2):
                break
            if attempt < LATENCY_CORRECTIONS:
                notes.append(
                    f"allocation aimed at latency {budget:.3f} measured {measured.ratio:.3f}; "
                    "aiming lower"
                )
                budget = max(1e-3, budget * target_latency / measured.ratio)
        settings.update(
            {
                "allocation": allocation,
                "target_macs": target_macs,
                "predicted_damage": summary["predicted_damage"],
            }
        )
        if target_latency is not None:
            settings["target_latency"] = target_latency
            settings["allocated_latency_budget"] = budget
            settings["predicted_latency_ratio"] = summary["predicted_latency_ratio"]
        notes.append(f"allocation='sensitivity': damage measured as {summary['metric']}")
    elif target_macs is not None or target_params is not None:
        selection, reached = plan(target_macs, target_params)
        if auto_round and measure_latency and groups and round_to > 1:
            selection, reached, latency = _hardware_pick(
                model,
                graph,
                groups,
                cost,
                plan,
                (selection, reached),
                example_inputs,
                (target_macs, target_params),
                threads=threads,
                pin_outputs=pin_outputs,
                settings=settings,
                notes=notes,
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
    settings["round_to"] = round_to
    removed_roots = selection.roots(groups)
    before = count(model, example_inputs)
    dense_ms = None
    if measure_latency and latency is None and inplace:
        dense_ms = _latency.measure({"dense": model}, example_inputs, threads=threads)
    prepare = None
    if repair is not None:
        settings["reconstruct"] = repair.method
        repair_calib = list(repair.calib) if repair.calib is not None else calib_list

        def prepare(candidate: nn.Module) -> dict[str, torch.Tensor]:
            changed, repair_notes = reconstruct_(
                candidate,
                graph,
                groups,
                selection.removed,
                repair_calib,
                repair,
                progress=progress,
            )
            notes.extend(repair_notes)
            return changed

    pruned = _surgery_verified(
        model, graph, removed_roots, example_inputs, inplace, pin_outputs, prepare=prepare
    )
    after = count(pruned, example_inputs)
    if measure_latency and latency is None:
        latency = _latency.measure_pair(model, pruned, example_inputs, threads, dense_ms)
    if latency is not None and after.macs > 0:
        hint = _depth_hint(pruned, example_inputs, latency, before.macs / after.macs)
        if hint:
            notes.append(hint)
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
    return StructuredReport(pruned, before, after, rows, [], settings, notes, latency)


# set while the default unit's width search runs for a model whose blocks could be removed
# instead: a latency search that ends too slow then raises rather than returning its closest
_WIDTHS_MUST_REACH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "widths_must_reach", default=False
)


class LatencyOutOfReach(ValueError):
    """``target_latency`` is out of reach of the units asked. ``exhausted``: the smallest model
    was tried, and ``fastest`` is the :class:`Latency` of the fastest model tried; False: the
    search ended too slow short of it (raised only where the default unit can remove blocks
    instead), and ``fastest`` is its closest try. Nothing was changed."""

    def __init__(
        self,
        fastest: Latency,
        message: str,
        exhausted: bool = True,
        closest: _ClosestWidths | None = None,
    ) -> None:
        super().__init__(message)
        self.fastest = fastest
        self.exhausted = exhausted  # the smallest model was tried (else: the search missed)
        self.closest = closest  # the try a search that missed keeps (to replay it)


# arguments the depth latency search does not use (target_params: it times block counts, with
# no parameter bound): given away from their defaults, no switch to depth
_WIDTH_ONLY = {
    "target_params": (None,),
    **_LAYER_UNIT_DEFAULTS,
    "importance": (None,),
    "min_keep": (1,),  # units per group there, blocks per container in depth pruning
}


def _weighs_blocks(call: dict[str, Any]) -> bool:
    """The default unit with a MAC target may compare its widths with whole blocks
    (:mod:`prunekit.graph.unit_choice`): measured latency on, no latency target or allocation,
    and no argument only width pruning takes."""
    return (
        call["target_macs"] is not None
        and call["target_latency"] is None
        and call["measure_latency"]
        and not call["allocation"]
        and all(call[name] in defaults for name, defaults in _WIDTH_ONLY.items())
    )


def _switchable_blocks(call: dict[str, Any]) -> list:
    """The blocks the default unit may remove instead of widths (prune_layers' candidates, as
    ``layers=`` and ``ignore=`` narrow them); none when the call uses an argument only width
    pruning takes."""
    if any(call[name] not in defaults for name, defaults in _WIDTH_ONLY.items()):
        return []
    try:
        blocks = find_blocks(
            call["model"], call["example_inputs"], _patterns(call["layers"]) or None
        )
    except (RuntimeError, ValueError, TypeError):
        return []
    return without_ignored(blocks, _patterns(call["ignore"]))


def _depth_instead(
    call: dict[str, Any], widths: LatencyOutOfReach, n_blocks: int
) -> StructuredReport:
    """The default unit's answer to a latency the widths did not reach: remove whole blocks.
    If blocks cannot reach it either: both reasons when widths had run out, else the widths'
    closest model (as a channel search alone returns it, with its warning)."""
    fastest = widths.fastest
    how = "reach at best" if widths.exhausted else "came no closer than"
    reason = (
        f"target_latency={call['target_latency']}: channel widths {how} a latency ratio of "
        f"{fastest.ratio:.2f} here ({fastest.pruned_ms:.3g} ms against {fastest.dense_ms:.3g} ms "
        f"dense, batch {fastest.batch}): per-layer costs and pinned widths do not shrink. "
        f"Removing whole blocks instead (unit='layer', {n_blocks} removable); pass "
        "unit='channel' to prune widths only"
    )
    keep = {k: v for k, v in call.items() if k not in _WIDTH_ONLY}
    try:
        report = prune_structured(**keep, unit="layer")
    except ValueError as depth:
        if widths.exhausted:
            raise ValueError(
                f"{widths}\nRemoving whole blocks instead failed too: {depth}"
            ) from depth
        replay = _REPLAY_WIDTHS.set(widths.closest)  # its closest model, not searched again
        try:
            report = prune_structured(**call, unit="channel")  # with the search's warning
        finally:
            _REPLAY_WIDTHS.reset(replay)
        report.notes.insert(0, f"removing whole blocks instead could not reach it either: {depth}")
        return report
    warnings.warn(f"prunekit: {reason}", UserWarning, stacklevel=3)
    report.notes.insert(0, reason)
    report.settings["unit_switched_from"] = "channel"
    return report


def _depth_hint(pruned: nn.Module, example_inputs: Any, latency: Latency, mac_x: float) -> str:
    """A note when the measured speedup falls well short of the MAC ratio and the model has
    blocks that ``unit="layer"`` could remove ("" otherwise)."""
    if MEASURING_BLOCKS.get() or mac_x < 1.25 or latency.speedup >= SPEED_SHORTFALL * mac_x:
        return ""
    try:
        blocks = find_blocks(pruned, example_inputs)
    except (RuntimeError, ValueError, TypeError):
        return ""
    if not blocks:
        return ""
    return (
        f"measured speedup {latency.speedup:.2f}x at {mac_x:.2f}x fewer MACs: much of the time "
        "(per-layer costs, layers whose width is pinned) does not shrink with the widths here. "
        f"unit='layer' removes whole blocks ({len(blocks)} removable) and their fixed costs "
        "with them; with target_latency= it searches by measured latency"
    )


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


def _cost_model(graph: Graph, model: nn.Module) -> CostModel:
    traced = {k for k, (kind, _) in graph.tensors.items() if kind == "param"}
    extra = sum(p.numel() for n, p in model.named_parameters() if n not in traced)
    return CostModel(graph, extra_params=extra)


def _search_target(
    cost: CostModel,
    groups: list[Group],
    choose: Callable[[float], Selection],
    target_macs: float | None,
    target_params: float | None,
    ranked: dict[int, np.ndarray],
    *,
    round_to: int,
    frozen: set[int],
    halve: bool = True,
) -> tuple[Selection, float]:
    """Smallest ratio whose (rounded) selection meets the targets (bisection on the analytic cost
    model), then removed units are put back, a whole rounding step at a time and best scores
    first, while the targets still hold: the result lands at or just below the target."""
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
            f"the target cannot be reached by removing {sorted({g.kind for g in groups})} units"
            f"{f' kept at multiples of round_to={round_to}' if round_to > 1 else ''}: the "
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
    best = restore(
        best,
        groups,
        ranked,
        lambda sel: ok(sel)[0],
        round_to=round_to,
        frozen=frozen,
        halve=halve,
    )
    return best, hi


def _hardware_pick(
    model: nn.Module,
    graph: Graph,
    groups: list[Group],
    cost: CostModel,
    plan: Callable[..., tuple[Selection, float]],
    uniform: tuple[Selection, float],
    example_inputs: Any,
    targets: tuple[float | None, float | None],
    *,
    threads: int | None,
    pin_outputs: bool,
    settings: dict[str, Any],
    notes: list[str],
) -> tuple[Selection, float, Latency]:
    """The hardware-aware candidates (:mod:`prunekit.graph.hardware`) for a MAC / parameter
    target, each meeting it, timed side by side with dense; the fastest is kept."""
    times = _latency.module_times(model, example_inputs, threads=threads)
    weights = _hardware.weights(groups, cost, _hardware.time_per_mac(graph, groups, cost, times))
    plans = {"uniform": uniform}
    for name, halve, weighted in _hardware.CANDIDATES:
        if name in plans:
            continue
        try:
            plans[name] = plan(*targets, halve=halve, weights=weights if weighted else None)
        except ValueError:  # out of reach at whole multiples: not a candidate
            continue
    chosen, ms, got = _hardware.pick_fastest(
        model,
        {n: p[0] for n, p in plans.items()},
        lambda sel: _surgery_verified(
            model, graph, sel.roots(groups), example_inputs, False, pin_outputs
        ),
        example_inputs,
        threads=threads,
    )
    dense_ms = float(got["ms"]["dense"])
    macs = {
        n: cost.evaluate(p[0].roots(groups))[0] / max(cost.evaluate(np.zeros(0, np.int64))[0], 1)
        for n, p in plans.items()
    }
    settings["hardware"] = {
        "chosen": chosen,
        "dense_ms": dense_ms,
        "candidates": {
            n: {"ms": ms[n], "macs_ratio": macs[n], "output_error": got["error"][n]} for n in plans
        },
    }
    shown = ", ".join(
        f"{n} {ms[n]:.3g} ms at {100 * macs[n]:.1f} % MACs (output error {got['error'][n]:.3g})"
        for n in plans
    )
    notes.append(
        f"hardware-aware widths: measured candidates (dense {dense_ms:.3g} ms): {shown}; "
        f"kept {chosen!r}"
    )
    latency = Latency.of({**got, "ms": ms}, chosen, dense_ms)
    selection, reached = plans[chosen]
    return selection, reached, latency


LATENCY_CORRECTIONS = 2  # re-allocations under a corrected budget when the measurement is over


def _search_latency(
    model: nn.Module,
    graph: Graph,
    groups: list[Group],
    cost: CostModel,
    plan: Callable[[float | None, float | None], tuple[Selection, float]],
    example_inputs: Any,
    asked: float,
    target_params: float | None,
    *,
    smallest: Selection,
    threads: int | None,
    pin_outputs: bool,
) -> tuple[Selection, Latency, str]:
    """MAC targets tried until the pruned model's measured latency ratio is within
    ``LATENCY_TOLERANCE`` of ``asked``: proportional steps until the ratio is bracketed, then
    linear interpolation between the closest tries on either side."""
    replay = _REPLAY_WIDTHS.get()
    if replay is not None and replay.n_groups == len(groups):  # the same trace: same groups
        return _latency_result(asked, replay)
    dense_macs, _ = cost.evaluate(np.zeros(0, dtype=np.int64))
    floor = cost.evaluate(smallest.roots(groups))[0] / dense_macs if dense_macs else 1.0
    tries: list[tuple[float, Latency, Selection]] = []  # (MACs ratio reached, latency, selection)
    m = min(max(asked, floor), 1.0)
    for _ in range(LATENCY_TRIES):
        selection, _ = plan(m, target_params)
        reached = cost.evaluate(selection.roots(groups))[0] / dense_macs if dense_macs else 1.0
        candidate = _surgery_verified(
            model, graph, selection.roots(groups), example_inputs, False, pin_outputs
        )
        lat = _latency.measure_pair(
            model, candidate, example_inputs, threads, budget_s=3.0, min_repeats=5
        )
        del candidate
        tries.append((reached, lat, selection))
        r = lat.ratio
        if abs(r / asked - 1) <= LATENCY_TOLERANCE:
            break
        below = [(mm, t.ratio) for mm, t, _ in tries if t.ratio < asked]
        above = [(mm, t.ratio) for mm, t, _ in tries if t.ratio > asked]
        if below and above:
            (m_lo, r_lo), (m_hi, r_hi) = max(below), min(above)
            if m_hi - m_lo < 1e-3:
                break
            m_next = m_lo + (asked - r_lo) * (m_hi - m_lo) / max(r_hi - r_lo, 1e-9)
            m_next = min(max(m_next, m_lo + 0.1 * (m_hi - m_lo)), m_hi - 0.1 * (m_hi - m_lo))
        elif above:  # still too slow: fewer MACs
            if reached <= floor + 1e-9:
                break
            m_next = max(floor, reached * asked / r)
        else:  # already faster than asked: more MACs
            if reached >= 1.0 - 1e-9:
                break
            m_next = min(1.0, reached * asked / r)
        if abs(m_next - reached) < 1e-4:
            break
        m = m_next
    best = min(tries, key=lambda t: abs(t[1].ratio / asked - 1))
    reached, lat, selection = best
    steps = ", ".join(f"{100 * mm:.1f} % -> {t.ratio:.2f}" for mm, t, _ in tries)
    too_slow = lat.ratio > asked * (1 + LATENCY_TOLERANCE)
    exhausted = any(mm <= floor + 1e-9 for mm, _, _ in tries)
    closest = _ClosestWidths(len(groups), selection, lat, reached, len(tries), steps)
    if too_slow and not exhausted and _WIDTHS_MUST_REACH.get():
        raise LatencyOutOfReach(
            lat,  # the closest try
            f"target_latency={asked} not reached by removing {sorted({g.kind for g in groups})} "
            f"units in {len(tries)} tries (MACs -> latency ratio: {steps})",
            exhausted=False,
            closest=closest,
        )
    if too_slow and exhausted:
        # the smallest model was tried and nothing came within reach (a smaller MAC count can
        # even measure slower: the closest try need not be the smallest model)
        fastest = min(tries, key=lambda t: t[1].ratio)[1]
        raise LatencyOutOfReach(
            fastest,
            f"target_latency={asked} cannot be reached by removing "
            f"{sorted({g.kind for g in groups})} units: the fastest model tried measures "
            f"{fastest.pruned_ms:.3g} ms against {fastest.dense_ms:.3g} ms dense (ratio "
            f"{fastest.ratio:.2f}, batch {fastest.batch}, {fastest.threads} thread{'' if fastest.threads == 1 else 's'}; MACs -> "
            f"latency ratio: {steps}), down to the smallest model these units allow: the "
            "rest of the time does not shrink with the widths. unit='layer' removes whole "
            "blocks, and their fixed costs with them. Nothing was changed.",
        )
    return _latency_result(asked, closest)


@dataclass(frozen=True)
class _ClosestWidths:
    """The try a width latency search keeps: its selection (of ``n_groups`` groups), measured
    latency, MAC ratio, and the search's tries in words."""

    n_groups: int
    selection: Selection
    latency: Latency
    reached: float
    n_tries: int
    steps: str


# set while the default unit falls back to the widths' closest model after whole blocks also
# missed a target_latency: the search it already ran is replayed, not run (and timed) again
_REPLAY_WIDTHS: contextvars.ContextVar[_ClosestWidths | None] = contextvars.ContextVar(
    "replay_widths", default=None
)


def _latency_result(asked: float, kept: _ClosestWidths) -> tuple[Selection, Latency, str]:
    detail = f"after {kept.n_tries} tries (MACs -> latency ratio: {kept.steps})"
    _latency.warn_if_missed(asked, kept.latency.ratio, detail, 4)
    note = (
        f"target_latency {asked}: measured latency ratio {kept.latency.ratio:.2f} at "
        f"{100 * kept.reached:.1f} % of dense MACs, {detail}"
    )
    return kept.selection, kept.latency, note


def _surgery_verified(
    model: nn.Module,
    graph: Graph,
    removed_roots: np.ndarray,
    example_inputs: Any,
    inplace: bool,
    same_shapes: bool = True,
    prepare: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Cut the units out of a copy, run it, and only then hand it back (or repeat on ``model``).
    ``prepare(copy)`` may change the copy's weights first (reconstruction) and returns the
    changed tensors by name, which are written into ``model`` too when ``inplace``."""
    from prunekit.graph.hf import note_structure, remember_original_config

    candidate = copy_model(model, "prune_structured", VERIFY_COPY)
    changed = prepare(candidate) if prepare is not None else {}
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
        copy_changed(model, changed)
        apply_removal(model, graph, removed_roots)
        note_structure(model, {"kind": "width", "changes": record})
        return model
    note_structure(candidate, {"kind": "width", "changes": record})
    return candidate
