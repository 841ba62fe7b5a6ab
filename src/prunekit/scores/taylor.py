"""First-order Taylor: |w * dL/dw| summed over the batches the user gives.

The score estimates how much the loss changes when a weight is set to zero. It is accumulated
per batch (sum of |w * g_b|), so gradients of opposite sign in different batches do not cancel.
The model runs in eval mode (no dropout, BatchNorm on running statistics) while scoring; the
user's ``.grad`` fields and ``requires_grad`` flags are left as they were.
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


def taylor_score(layer: LayerContext) -> torch.Tensor:
    """The accumulated |w * g|."""
    return layer.stats["taylor"].to(layer.weight.device)


def collect_taylor(
    model: nn.Module,
    targets: list[Target],
    *,
    data: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Accumulate |w * g| for every target over ``data`` (at most ``max_batches`` batches)."""
    sums = [torch.zeros(t.weight().shape, dtype=torch.float32) for t in targets]

    def add(weights: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        for total, w, g in zip(sums, weights, grads, strict=True):
            if g is not None:
                total.add_((w * g).abs().float().cpu())

    was_training = model.training
    model.eval()
    try:
        accumulate_gradients(
            model, targets, data, loss_fn, max_batches, progress, "taylor scores", add
        )
    finally:
        model.train(was_training)
    return {t.name: {"taylor": s} for t, s in zip(targets, sums, strict=True)}


register(Criterion("taylor", taylor_score, collect=collect_taylor, needs_loss=True))
