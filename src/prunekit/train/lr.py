"""Learning rates for recovery: warm-up + decay schedules, and a short learning-rate range test.

* :class:`WarmupSchedule`: linear warm-up over the first ``warmup`` fraction of the steps, then
  ``"cosine"`` or ``"linear"`` decay to zero (or ``"constant"``), optionally held at the peak
  until step ``hold`` (a gradual pruning ramp) before the decay starts. It sets ``lr`` on the
  optimizer's parameter groups from the step count alone, so resuming needs only that count.
* :func:`find_lr`: a learning-rate range test (Smith, 2017; the fastai ``lr_find``): train a few
  steps with the learning rate growing geometrically, record the smoothed loss, restore the
  model, and suggest a rate a factor below the one where the loss was lowest.

Example:
    >>> import torch
    >>> from prunekit.train.lr import WarmupSchedule
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    >>> sched = WarmupSchedule(opt, "cosine", total_steps=10, warmup=0.2)
    >>> [round(sched.factor(i), 3) for i in (0, 1, 2, 6, 9)]
    [0.333, 0.667, 1.0, 0.5, 0.038]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")


class WarmupSchedule:
    """Linear warm-up then cosine / linear decay (or a constant rate), set from the step count.

    Args:
        optimizer: whose groups' ``lr`` is set; each group's rate at creation is its peak.
        kind: ``"cosine"``, ``"linear"`` or ``"constant"``.
        total_steps: the optimizer steps of the whole run (decay reaches zero there); None when
            unknown (then the rate stays at its peak after warm-up).
        warmup: fraction of ``total_steps`` spent warming up linearly from ``peak / (w + 1)``.
        hold: the decay starts at this step instead of right after the warm-up (the rate stays
            at its peak until then); ignored unless it lies after the warm-up and before
            ``total_steps``. ``finetune`` sets it to the step a pruner's schedule ends, so the
            model at its final sparsity recovers over a whole decay.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        >>> sched = WarmupSchedule(opt, "cosine", total_steps=10, hold=6)
        >>> [round(sched.factor(i), 3) for i in (0, 5, 6, 8)]
        [1.0, 1.0, 1.0, 0.5]

    Call :meth:`set_step` (``step`` = optimizer steps taken) before every optimizer step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str = "cosine",
        total_steps: int | None = None,
        warmup: float = 0.0,
        hold: int = 0,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; accepted: {', '.join(SCHEDULES)}")
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = total_steps
        self.warmup_steps = int(round(warmup * total_steps)) if total_steps else 0
        self.peaks = [float(g["lr"]) for g in optimizer.param_groups]
        if isinstance(hold, bool) or not isinstance(hold, int) or hold < 0:
            raise ValueError(f"hold must be an integer step >= 0, got {hold!r}")
        within = total_steps is not None and self.warmup_steps < hold < total_steps
        self.decay_start = hold if within else self.warmup_steps

    def factor(self, step: int) -> float:
        """Multiplier of the peak rate for the optimizer step with index ``step`` (from 0)."""
        w = self.warmup_steps
        if step < w:
            return (step + 1) / (w + 1)
        if self.kind == "constant" or not self.total_steps or step < self.decay_start:
            return 1.0
        start = self.decay_start
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def set_step(self, step: int) -> None:
        scale = self.factor(step)
        for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
            group["lr"] = peak * scale

    def __repr__(self) -> str:
        return (
            f"WarmupSchedule(kind={self.kind!r}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, decay_start={self.decay_start}, peaks={self.peaks})"
        )


@dataclass
class RangeTest:
    """What :func:`find_lr` measured: the suggestion and the (lr, smoothed loss) curve."""

    lr: float
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_lr: float | None = None


def find_lr(
    model: nn.Module,
    batches: Iterable[Any],
    step_loss: Callable[[Any], torch.Tensor],
    make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer],
    *,
    steps: int = 100,
    start: float = 1e-7,
    end: float = 1.0,
    divisor: float = 10.0,
    after_step: Callable[[], None] | None = None,
    fallback: float = 1e-4,
) -> RangeTest:
    """Learning-rate range test: the rate ``divisor`` times below the one of lowest loss.

    ``steps`` optimizer steps are taken with the rate growing geometrically from ``start`` to
    ``end`` (the data is cycled when shorter); the loss is smoothed (exponential average,
    debiased) and the test stops once it exceeds four times its minimum. The model (parameters
    and buffers) is restored afterwards, the optimizer used is thrown away.

    Args:
        model: trained in place during the test, then restored.
        batches: an iterable of batches (re-iterated when exhausted).
        step_loss: ``batch -> scalar loss`` (forward pass included).
        make_optimizer: ``(params, lr) -> Optimizer``, the optimizer the run will use.
        after_step: called after every optimizer step (e.g. to re-zero masked weights).
        fallback: returned when no finite loss was seen.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 1)
        >>> data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4)]
        >>> mse = lambda b: torch.nn.functional.mse_loss(net(b[0]), b[1])
        >>> test = find_lr(net, data, mse, lambda p, lr: torch.optim.SGD(p, lr=lr), steps=30)
        >>> 1e-8 <= test.lr <= 0.1  # a tenth of a rate in [start, end]
        True
    """
    if steps < 2:
        raise ValueError(f"the range test needs steps >= 2, got {steps!r}")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, start)
    ratio = (end / start) ** (1.0 / (steps - 1))
    was_training = model.training
    model.train()
    result = RangeTest(lr=fallback)
    avg, best, best_lr = 0.0, math.inf, None
    iterator = iter(batches)
    try:
        for i in range(steps):
            lr = start * ratio**i
            for group in opt.param_groups:
                group["lr"] = lr
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(batches)
                batch = next(iterator)
            loss = step_loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            avg = 0.9 * avg + 0.1 * value
            smooth = avg / (1 - 0.9 ** (i + 1))
            result.lrs.append(lr)
            result.losses.append(smooth)
            if smooth < best:
                best, best_lr = smooth, lr
            if i >= 5 and smooth > 4 * best:
                break
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if best_lr is not None:
        result.best_lr = best_lr
        result.lr = best_lr / divisor
    return result
