"""First-order Taylor: |w * dL/dw| summed over the batches the user gives.

The score estimates how much the loss changes when a weight is set to zero. It is accumulated
per batch (sum of |w * g_b|), so gradients of opposite sign in different batches do not cancel.
The model runs in eval mode (no dropout, BatchNorm on running statistics) while scoring; the
user's ``.grad`` fields and ``requires_grad`` flags are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.masks import raw_parameter
from prunekit.scores.base import Criterion, LayerContext, register
from prunekit.targets import Target


def taylor_score(layer: LayerContext) -> torch.Tensor:
    """The accumulated |w * g|."""
    return layer.stats["taylor"]


def collect_taylor(
    model: nn.Module,
    targets: list[Target],
    *,
    data: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Accumulate |w * g| for every target over ``data`` (at most ``max_batches`` batches)."""
    params = [raw_parameter(t.module, t.param_name) for t in targets]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in tqdm(
            data,
            desc="taylor scores",
            unit="batch",
            disable=not progress,
            total=max_batches,
            leave=False,
        ):
            if max_batches is not None and batches >= max_batches:
                break
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError("loss_fn(model, batch) must return a scalar tensor")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, p, g in zip(sums, params, grads, strict=True):
                if g is not None:
                    total.add_((p.detach() * g).abs().float())
            batches += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if batches == 0:
        raise ValueError("method='taylor' got no batches from `data`")
    return {t.name: {"taylor": s} for t, s in zip(targets, sums, strict=True)}


register(Criterion("taylor", taylor_score, collect=collect_taylor, needs_loss=True))
