"""SNIP: connection sensitivity |g * w| on a batch, for pruning at initialisation.

From "SNIP: Single-shot Network Pruning based on Connection Sensitivity" (Lee et al., 2019):
the score of a weight is |dL/dw * w|, with the gradient of the loss on one mini-batch, taken
before training. Unlike ``taylor`` (which sums |w * g_b| per batch), the gradients of all the
batches given are summed first and the absolute value taken once, as SNIP does with its single
batch; pass one batch (``data=[batch]`` or ``max_batches=1``) for the original method.

The model runs in whatever mode it is in (a freshly built model is in training mode, as in the
paper). The user's ``.grad`` fields and ``requires_grad`` flags are left as they were.

Example:
    >>> import torch, prunekit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    >>> loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    >>> report = prunekit.prune(net, 0.9, method="snip", data=[batch], loss_fn=loss)
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


def snip_score(layer: LayerContext) -> torch.Tensor:
    """|w * g| with the gradient summed over the batches given."""
    return (layer.weight.float() * layer.stats["snip_grad"].to(layer.weight.device)).abs()


def collect_snip(
    model: nn.Module,
    targets: list[Target],
    *,
    data: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Sum the loss gradient of every target over ``data`` (at most ``max_batches`` batches)."""
    sums = [torch.zeros(t.weight().shape, dtype=torch.float32) for t in targets]

    def add(_: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        for total, g in zip(sums, grads, strict=True):
            if g is not None:
                total.add_(g.detach().float().cpu())

    accumulate_gradients(model, targets, data, loss_fn, max_batches, progress, "snip scores", add)
    return {t.name: {"snip_grad": s} for t, s in zip(targets, sums, strict=True)}


register(Criterion("snip", snip_score, collect=collect_snip, needs_loss=True))
