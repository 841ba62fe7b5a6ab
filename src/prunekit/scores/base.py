"""The criterion interface and its registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.masks import raw_parameter
from prunekit.targets import Target


@dataclass
class LayerContext:
    """What a score function sees for one layer."""

    target: Target
    weight: torch.Tensor
    """The effective (masked) weight, detached."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Statistics the criterion's collector gathered for this layer (empty if none)."""
    generator: torch.Generator | None = None
    """Seeded random generator shared by the whole call (for stochastic criteria)."""


ScoreFn = Callable[[LayerContext], torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
CollectFn = Callable[..., dict[str, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Criterion:
    """An importance criterion.

    Attributes:
        name: the ``method=`` name users pass.
        score: maps a :class:`LayerContext` to a score tensor shaped like the weight.
        comparable_across_layers: whether raw scores of different layers may compete in one
            global ranking; when False, global scope normalises each layer's scores by default.
        collect: for data-driven criteria, ``collect(model, targets, data=, loss_fn=,
            max_batches=, progress=)`` returning per-target statistics.
        needs_loss: whether ``collect`` needs the user's ``loss_fn`` (gradient-based criteria).
    """

    name: str
    score: ScoreFn
    comparable_across_layers: bool = True
    collect: CollectFn | None = None
    needs_loss: bool = False

    @property
    def needs_data(self) -> bool:
        return self.collect is not None


_REGISTRY: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    """Register a criterion under its name (replacing any previous one of that name)."""
    _REGISTRY[criterion.name] = criterion
    return criterion


def list_criteria() -> list[str]:
    """Names of the registered criteria."""
    return sorted(_REGISTRY)


def get_criterion(method: Any) -> Criterion:
    """Look a criterion up by name; a :class:`Criterion` passes through."""
    if isinstance(method, Criterion):
        return method
    if not isinstance(method, str) or method not in _REGISTRY:
        raise ValueError(
            f"unknown method {method!r}; accepted: {', '.join(list_criteria())}, "
            "or a prunekit.scores.Criterion"
        )
    return _REGISTRY[method]


def accumulate_gradients(
    model: nn.Module,
    targets: list[Target],
    data: Iterable[Any],
    loss_fn: LossFn | None,
    max_batches: int | None,
    progress: bool,
    desc: str,
    on_batch: Callable[[list[torch.Tensor], list[torch.Tensor | None]], None],
) -> int:
    """Run ``loss_fn`` on each batch and hand (raw weights, their gradients) to ``on_batch``.

    Returns the number of batches used. Gradients are taken with ``torch.autograd.grad``, so the
    parameters' ``.grad`` fields are not touched; ``requires_grad`` is restored afterwards.
    """
    if loss_fn is None:
        raise ValueError(f"{desc} needs loss_fn=<callable(model, batch) -> scalar loss>")
    params = [raw_parameter(t.module, t.param_name) for t in targets]
    flags = [p.requires_grad for p in params]
    batches = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in tqdm(
            data, desc=desc, unit="batch", disable=not progress, total=max_batches, leave=False
        ):
            if max_batches is not None and batches >= max_batches:
                break
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError("loss_fn(model, batch) must return a scalar tensor")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            on_batch([p.detach() for p in params], list(grads))
            batches += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if batches == 0:
        raise ValueError(f"{desc} got no batches from `data`")
    return batches
