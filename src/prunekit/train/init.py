"""Pruning at initialisation: choose the sparse network before training it.

``prunekit.prune`` does this with ``method="snip"`` (gradients on a batch) or
``method="synflow"`` (data-free, iterative); :func:`prune_at_init` is a small front for both
that says what each needs: SNIP a batch and a loss, SynFlow only an example input (for its shape).

Example:
    >>> import torch
    >>> from prunekit.train import prune_at_init
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    >>> report = prune_at_init(net, 0.9, "synflow", example_input=torch.zeros(1, 8),
    ...                        targets=["0", "2"], progress=False)
    >>> round(report.sparsity, 2)
    0.9
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.patterns import Pattern
from prunekit.prune import prune
from prunekit.report import PruneReport
from prunekit.scores.synflow import DEFAULT_ITERATIONS, make_synflow

METHODS = ("synflow", "snip", "magnitude", "random")


def _not_used(model: nn.Module, batch: Any) -> torch.Tensor:  # pragma: no cover - never called
    raise RuntimeError("SynFlow does not use a loss")


def prune_at_init(
    model: nn.Module,
    sparsity: float,
    method: str = "synflow",
    *,
    example_input: torch.Tensor | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    max_batches: int | None = 1,
    pattern: str | Pattern = "unstructured",
    scope: str = "global",
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    seed: int = 0,
    inplace: bool = False,
    progress: bool = True,
) -> PruneReport:
    """Prune an untrained model with SNIP, SynFlow, magnitude or random scores.

    Args:
        model: the freshly initialised model.
        sparsity: fraction of zeros in the targeted weights, in [0, 1).
        method: ``"synflow"`` (needs ``example_input``, a batch-first tensor whose values are
            ignored), ``"snip"`` (needs ``data`` and ``loss_fn``; ``max_batches=1`` by default,
            as in the paper), ``"magnitude"`` or ``"random"``.
        iterations: SynFlow's pruning steps (see :mod:`prunekit.scores.synflow`).
        pattern, scope, targets, ignore, seed, inplace, progress: as in ``prunekit.prune``.
            SynFlow is meant for ``scope="global"``, where it never empties a layer.

    Returns:
        The :class:`~prunekit.PruneReport` (pruned model in ``.model``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(map(repr, METHODS))}")
    common: dict[str, Any] = dict(
        pattern=pattern,
        scope=scope,
        targets=targets,
        ignore=ignore,
        seed=seed,
        inplace=inplace,
        progress=progress,
    )
    if method == "synflow":
        if example_input is None:
            if data is None:
                raise ValueError(
                    "synflow needs example_input=<a batch-first input tensor> (only its shape "
                    "is used)"
                )
            example_input = next(iter(data))
        criterion = make_synflow(iterations=iterations)
        return prune(
            model,
            sparsity,
            method=criterion,
            data=[example_input],
            loss_fn=loss_fn or _not_used,
            **common,
        ).named("prune_at_init")
    if method == "snip":
        if data is None or loss_fn is None:
            raise ValueError(
                "snip scores weights by |w * grad| on a batch: pass data=<iterable of batches> "
                "and loss_fn=<callable(model, batch) -> scalar loss>"
            )
        return prune(
            model,
            sparsity,
            method="snip",
            data=data,
            loss_fn=loss_fn,
            max_batches=max_batches,
            **common,
        ).named("prune_at_init")
    return prune(model, sparsity, method=method, **common).named("prune_at_init")
