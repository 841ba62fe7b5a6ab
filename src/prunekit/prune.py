"""The ``prune`` verb: score, pattern and scope, composed; masks applied all at once."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.masks import apply_mask
from prunekit.patterns import NM, Pattern, Unstructured, parse_pattern
from prunekit.report import PruneReport, layer_stats, model_counts
from prunekit.runtime.accelerated import refuse_accelerated
from prunekit.runtime.copies import copy_model
from prunekit.scope import (
    NORMALIZATIONS,
    SCOPES,
    count_to_remove,
    normalize_scores,
    select_global,
    select_local,
    select_rows,
)
from prunekit.scores import Criterion, LayerContext, get_criterion
from prunekit.targets import Target, per_layer_overrides, resolve_targets

DEFAULT_SPARSITY = 0.5

# Per-layer allocators for prune(allocation=...), registered by the package that computes them
# (prunekit.analysis registers "sensitivity" when prunekit is imported): prune needs no import
# of analysis, which itself builds on prune.
ALLOCATORS: dict[str, Callable[..., dict[str, float]]] = {}


def _check_sparsity(value: Any, what: str = "sparsity") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    if isinstance(pattern, NM):
        if sparsity is not None and abs(_check_sparsity(sparsity) - pattern.sparsity) > 1e-9:
            raise ValueError(
                f"pattern {pattern} implies sparsity {pattern.sparsity:g}, but sparsity={sparsity!r} "
                "was given; leave sparsity out (or equal to 1 - N/M) for N:M patterns"
            )
        return pattern.sparsity
    return DEFAULT_SPARSITY if sparsity is None else _check_sparsity(sparsity)


def _check_choice(name: str, value: Any, accepted: Iterable[str]) -> str:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")
    return value


def _element_scores(criterion: Criterion, target: Target, stats: dict, generator) -> torch.Tensor:
    """Scores shaped like the weight; entries that are already zero get -inf (removed first)."""
    weight = target.weight()
    _refuse_nonfinite(target)
    context = LayerContext(target, weight, stats.get(target.name, {}), generator)
    scores = criterion.score(context).detach().float()
    if scores.shape != weight.shape:
        raise ValueError(
            f"criterion {criterion.name!r} returned shape {tuple(scores.shape)} for "
            f"{target.name} of shape {tuple(weight.shape)}"
        )
    scores = scores.masked_fill(weight == 0, float("-inf"))
    if bool(scores.isnan().any()):
        raise ValueError(
            f"criterion {criterion.name!r} gave {int(scores.isnan().sum())} NaN scores for "
            f"{target.name}: check the calibration data and loss for NaN / inf"
        )
    return scores


def _refuse_nonfinite(target: Target) -> None:
    """NaN / inf weights cannot be ranked (NaN compares false with everything): refuse them."""
    weight = target.weight()
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        nan, inf = int(weight.isnan().sum()), int(weight.isinf().sum())
        raise ValueError(
            f"{target.name} holds {nan} NaN and {inf} inf of its {weight.numel()} values; "
            "pruning ranks weights and cannot rank those. Fix the weights (reload the "
            f"checkpoint, check the training run) or leave the layer out with "
            f"ignore=[{target.module_name!r}]"
        )


def refuse_nonfinite_parameters(model: nn.Module, verb: str) -> None:
    """Raise ValueError naming every parameter of ``model`` that holds NaN or inf.

    For verbs that rank or train the whole model (``prune_structured``, ``finetune``): a NaN
    ranks arbitrarily and spreads to every weight at the first optimizer step.

    Example:
        >>> refuse_nonfinite_parameters(torch.nn.Linear(2, 2), "finetune")  # finite: no error
    """
    bad = []
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            nan, inf = int(p.isnan().sum()), int(p.isinf().sum())
            bad.append(f"{name} ({nan} NaN, {inf} inf of {p.numel()} values)")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"{verb}: the model holds non-finite parameters: {shown}. NaN / inf cannot be "
            "ranked and spread through training; fix the weights (reload the checkpoint, check "
            "the training run) first. Nothing was changed."
        )


def _warn_if_already_sparser(what: str, unit_scores: list[torch.Tensor], sparsity: float) -> None:
    """Zeros are never revived: say so when more units are already zero than the call removes."""
    units = sum(s.numel() for s in unit_scores)
    dead = sum(int(torch.isneginf(s).sum()) for s in unit_scores)
    if dead > count_to_remove(sparsity, units):
        warnings.warn(
            f"prunekit: {what} is already sparser ({dead / units:.4f}) than asked "
            f"({sparsity:.4f}); its zeros stay zero",
            stacklevel=3,
        )


def _plan_masks(
    targets: list[Target],
    scores: dict[str, torch.Tensor],
    pattern: Pattern,
    sparsity: float,
    overrides: dict[str, float],
    scope: str,
    normalize: str,
) -> dict[str, torch.Tensor]:
    """Keep-masks (weight-shaped, bool) for every target; touches no weight.

    Units that are already zero (score -inf: a zero weight, a tile of zeros) are never kept,
    even when there are more of them than the sparsity removes: the mask then holds every
    zero, so training after the call cannot revive one.
    """
    matrices = {t.name: t.as_matrix(scores[t.name]) for t in targets}
    if isinstance(pattern, NM):
        return {
            t.name: t.from_matrix(
                pattern.keep_mask(matrices[t.name]) & ~torch.isneginf(matrices[t.name]),
                scores[t.name].shape,
            )
            for t in targets
        }
    if scope == "row":
        out = {}
        for t in targets:
            wanted = overrides.get(t.name, sparsity)
            _warn_if_already_sparser(t.name, [matrices[t.name]], wanted)
            keep = select_rows(matrices[t.name], wanted) & ~torch.isneginf(matrices[t.name])
            out[t.name] = t.from_matrix(keep, scores[t.name].shape)
        return out
    unit_scores = {t.name: pattern.unit_scores(matrices[t.name]) for t in targets}
    unit_keep: dict[str, torch.Tensor] = {}
    pool = [t for t in targets if scope == "global" and t.name not in overrides]
    for t in targets:
        if t not in pool:
            wanted = overrides.get(t.name, sparsity)
            _warn_if_already_sparser(t.name, [unit_scores[t.name]], wanted)
            unit_keep[t.name] = select_local(unit_scores[t.name], wanted)
    pooled = [normalize_scores(unit_scores[t.name], normalize) for t in pool]
    if pool:
        _warn_if_already_sparser("the global pool", pooled, sparsity)
    for t, keep in zip(pool, select_global(pooled, sparsity), strict=True):
        unit_keep[t.name] = keep
    for t in targets:  # a unit already zero stays out of the mask's kept set
        unit_keep[t.name] = unit_keep[t.name] & ~torch.isneginf(unit_scores[t.name])
    return {
        t.name: t.from_matrix(
            pattern.expand(unit_keep[t.name], tuple(matrices[t.name].shape)), scores[t.name].shape
        )
        for t in targets
    }


def split_by_pattern(
    targets: list[Target], pattern: Pattern
) -> tuple[list[Target], dict[str, str]]:
    """Targets that can take ``pattern``, and the reasons for those that cannot (with a warning)."""
    skipped: dict[str, str] = {}
    usable = []
    for t in targets:
        reason = pattern.skip_reason(tuple(t.as_matrix(t.weight()).shape))
        if reason:
            skipped[t.name] = reason
            warnings.warn(
                f"prunekit: skipping {t.name} for pattern {pattern}: {reason}", stacklevel=3
            )
        else:
            usable.append(t)
    if not usable:
        raise ValueError(
            f"no targeted layer can take pattern {pattern}: "
            + "; ".join(f"{n}: {r}" for n, r in skipped.items())
        )
    return usable, skipped


def compute_masks(
    targets: list[Target],
    criterion: Criterion,
    stats: dict[str, dict[str, torch.Tensor]],
    pattern: Pattern,
    sparsity: float,
    overrides: dict[str, float],
    scope: str,
    normalize: str = "auto",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Score every target and turn the scores into keep-masks; changes no weight.

    The shared core of :func:`prune`, ``oneshot`` and the train-time pruner.
    """
    if normalize == "auto":
        normalize = "none" if criterion.comparable_across_layers else "mean"
    generator = generator or torch.Generator().manual_seed(0)
    scores = {t.name: _element_scores(criterion, t, stats, generator) for t in targets}
    return _plan_masks(targets, scores, pattern, sparsity, overrides, scope, normalize)


def prune(
    model: nn.Module,
    sparsity: float | None = None,
    method: str | Criterion = "magnitude",
    pattern: str | Pattern = "unstructured",
    scope: str = "global",
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    per_layer: dict[str, float] | None = None,
    *,
    allocation: Any = None,
    normalize: str = "auto",
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    seed: int = 0,
    inplace: bool = False,
    progress: bool = True,
) -> PruneReport:
    """Prune the weights of a model with masks, and report what was removed.

    Args:
        model: any ``nn.Module``.
        sparsity: fraction of zeros in the targeted weights after the call, in [0, 1) (absolute,
            not "of what remains"; default 0.5). Global scope: over all targeted weights
            together; local: in each layer. Implied by N:M patterns.
        method: importance criterion: ``"magnitude"`` (|w|), ``"random"`` (seeded),
            ``"taylor"`` (|w * grad| summed over ``data`` batches, needs ``loss_fn``), or any
            registered :class:`prunekit.scores.Criterion`.
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``) or ``"block:RxC"``.
        scope: ``"global"`` (one ranking over all targeted layers), ``"local"`` (each layer its
            own sparsity) or ``"row"`` (each output row of each layer its own sparsity, as Wanda
            compares weights; unstructured only).
        targets: name patterns (glob, or ``re:`` regex) of the layers to prune. Default: every
            Linear / Conv weight except the output head (see :mod:`prunekit.targets`).
            ``nn.Embedding`` tables are pruned only when a pattern names them (data-free
            methods only); their rows are tokens.
        ignore: name patterns of layers to leave alone.
        per_layer: ``{pattern: sparsity}`` overrides; matching layers get their own (local)
            sparsity, the first matching pattern wins (e.g. ``Allocation.per_layer``).
        allocation: ``None`` (the scope decides), ``"sensitivity"`` (measure each layer's
            damage on ``data``, batches of model inputs, with this method, then choose per-layer
            sparsities removing exactly ``round(sparsity * n)`` weights of the layers together;
            see :func:`prunekit.sensitivity`) or a :class:`prunekit.SensitivityResult` measured
            beforehand (its layers are allocated, the others follow ``scope``).
        normalize: per-layer score normalisation under global scope: ``"auto"``, ``"none"``,
            ``"mean"``, ``"l2"`` or ``"max"`` (see :mod:`prunekit.scope`).
        data: batches for data-driven methods (``taylor``).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` for data-driven methods.
        max_batches: use at most this many batches of ``data``.
        seed: seed of the ``random`` method (and of any stochastic criterion).
        inplace: prune ``model`` itself; by default a deep copy is pruned and ``model`` is left
            untouched.
        progress: show progress bars for data-driven scoring.

    Returns:
        A :class:`PruneReport`: per-layer and total params, zeros and sparsity (``print`` it, or
        ``.to_dict()``), with the pruned model in ``.model``.

    Pruning an already pruned model extends its masks: a zero stays zero.

    Example:
        >>> import torch, prunekit
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> report = prunekit.prune(net, sparsity=0.5, pattern="2:4")
        >>> report.sparsity
        0.5
    """
    refuse_accelerated(model, "prune")  # SparseLinear weights are buffers: deaccelerate first
    pattern = parse_pattern(pattern)
    sparsity = _resolve_sparsity(sparsity, pattern)
    criterion = get_criterion(method)
    _check_choice("scope", scope, SCOPES)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    overrides_in = dict(per_layer or {})
    for key, value in overrides_in.items():
        _check_sparsity(value, f"per_layer[{key!r}]")
    if overrides_in and isinstance(pattern, NM):
        raise ValueError(
            "per_layer sparsities do not apply to N:M patterns (their sparsity is fixed)"
        )
    if criterion.needs_data and data is None:
        raise ValueError(
            f"method {criterion.name!r} scores weights on data: pass data=<iterable of batches>"
            + (
                " and loss_fn=<callable(model, batch) -> scalar loss>"
                if criterion.needs_loss
                else ""
            )
        )
    if criterion.needs_loss and loss_fn is None:
        raise ValueError(
            f"method {criterion.name!r} needs loss_fn=<callable(model, batch) -> scalar loss>"
        )
    if scope == "row" and not isinstance(pattern, Unstructured):
        raise ValueError(f"scope 'row' works with the unstructured pattern, not {pattern}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")

    # Validate names on the user's model before copying anything.
    chosen = resolve_targets(model, targets, ignore, embeddings=True)
    for t in chosen:
        _refuse_nonfinite(t)
    tables = [t.module_name for t in chosen if isinstance(t.module, nn.Embedding)]
    if tables and criterion.needs_data:
        raise ValueError(
            f"method {criterion.name!r} scores weights from layer inputs, which embedding tables "
            f"({', '.join(tables)}) do not have: prune them with a data-free method "
            "('magnitude' or 'random') in a separate call"
        )
    overrides = per_layer_overrides(chosen, overrides_in)
    if allocation is not None:  # per-layer sparsities from sensitivity curves
        allocator = ALLOCATORS["sensitivity"]  # registered by prunekit.analysis
        overrides.update(
            allocator(
                model, chosen, overrides, allocation, sparsity, pattern, method, data, progress
            )
        )
    if not inplace:
        names = [t.module_name for t in chosen]
        model = copy_model(model, "prune")
        modules = dict(model.named_modules())
        chosen = [Target(n, modules[n]) for n in names]

    usable, skipped = split_by_pattern(chosen, pattern)
    stats = {}
    if criterion.needs_data:
        stats = criterion.collect(
            model, usable, data=data, loss_fn=loss_fn, max_batches=max_batches, progress=progress
        )
    generator = torch.Generator().manual_seed(seed)
    keeps = compute_masks(
        usable, criterion, stats, pattern, sparsity, overrides, scope, normalize, generator
    )

    for t in usable:
        apply_mask(t.module, t.param_name, keeps[t.name])

    rows = [layer_stats(t) for t in chosen]
    params, zeros = model_counts(model)
    settings = {"method": criterion.name, "pattern": str(pattern), "sparsity": sparsity}
    if pattern.selects_by_count:
        settings["scope"] = scope
    return PruneReport(rows, params, zeros, skipped, model=model, settings=settings)
