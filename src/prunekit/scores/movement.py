"""Movement: -w * dL/dw accumulated, so weights moving away from zero score high.

From "Movement Pruning: Adaptive Sparsity by Fine-Tuning" (Sanh et al., 2020): the score of a
weight is ``S = -sum_t w_t * g_t`` over training steps ``t``. It is positive when gradient descent
pushes the weight away from zero and negative when it pulls it towards zero; unlike magnitude it
reflects what fine-tuning is doing, not what pre-training left.

Movement is a train-time criterion: ``prunekit.train.GradualPruner(model, schedule,
method="movement")`` accumulates it from the real training gradients at every ``step()``. Used
by ``prunekit.prune`` (one shot), the score is accumulated over the batches of ``data`` at fixed
weights: the first step of movement, a signed first-order estimate of the loss change
(``-w * g`` is how much the loss would go up if the weight were zeroed, to first order).
Scores of different layers are not on one scale, so global scope normalises them per layer.

Example:
    >>> import torch, prunekit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    >>> loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    >>> report = prunekit.prune(net, 0.5, method="movement", data=[batch], loss_fn=loss)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunekit.scores.base import (
    Criterion,
    LayerContext,
    LossFn,
    accumulate_gradients,
    register,
)
from prunekit.targets import Target

STAT = "movement"


def movement_score(layer: LayerContext) -> torch.Tensor:
    """The accumulated -w * g."""
    return layer.stats[STAT].to(layer.weight.device)


def collect_movement(
    model: nn.Module,
    targets: list[Target],
    *,
    data: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Sum -w * g over ``data`` for every target, in eval mode (no dropout), weights fixed."""
    sums = [torch.zeros(t.weight().shape, dtype=torch.float32) for t in targets]

    def add(weights: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        for total, w, g in zip(sums, weights, grads, strict=True):
            if g is not None:
                total.sub_((w * g).float().cpu())

    was_training = model.training
    model.eval()
    try:
        accumulate_gradients(
            model, targets, data, loss_fn, max_batches, progress, "movement scores", add
        )
    finally:
        model.train(was_training)
    return {t.name: {STAT: s} for t, s in zip(targets, sums, strict=True)}


register(
    Criterion(
        "movement",
        movement_score,
        comparable_across_layers=False,
        collect=collect_movement,
        needs_loss=True,
    )
)
