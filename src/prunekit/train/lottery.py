"""Lottery tickets: iterative magnitude pruning with rewinding.

From "The Lottery Ticket Hypothesis" (Frankle and Carbin, 2019) and "Stabilizing the Lottery
Ticket Hypothesis" (Frankle et al., 2020). Train the dense network; then, round after round,
prune a share of the remaining weights by magnitude, *rewind* the surviving weights to their
values at initialisation (``rewind_to=0``) or at an early training step ``k`` (late rewinding,
``rewind_to=k``), and train again with the mask fixed.

You supply the training, as a function ``train_fn(model, ticket)`` that trains ``model`` in place
(building its own optimizer, so every round starts with fresh optimizer state) and returns
whatever metrics you want recorded. It should call ``ticket.step()`` after every optimizer step:
the runner counts steps to take the rewind snapshot at step ``k`` in the dense round, and keeps
pruned weights at zero.

Example:
    >>> import torch, prunekit
    >>> from prunekit.train import lottery_ticket
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> def train_fn(model, ticket):
    ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     for _ in range(5):
    ...         opt.zero_grad()
    ...         torch.nn.functional.cross_entropy(model(x), y).backward()
    ...         opt.step()
    ...         ticket.step()
    ...     return {"loss": torch.nn.functional.cross_entropy(model(x), y).item()}
    >>> result = lottery_ticket(net, train_fn, rounds=2, rate=0.5, rewind_to=1, targets=["0"],
    ...                         progress=False)
    >>> [round(r.sparsity, 2) for r in result.rounds]
    [0.0, 0.5, 0.75]
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.masks import MASK_SUFFIX, get_mask, masked_parameters, reapply_masks
from prunekit.patterns import NM, Pattern, parse_pattern
from prunekit.prune import prune
from prunekit.runtime.copies import copy_model
from prunekit.targets import Target, resolve_targets


@dataclass
class TicketRound:
    """One round: its index (0 = dense), the sparsity over the targeted weights, the keep-masks
    (bool, by parameter name; empty for an unmasked dense round) and ``train_fn``'s metrics."""

    round: int
    sparsity: float
    masks: dict[str, torch.Tensor]
    metrics: Any


@dataclass
class LotteryResult:
    """What :func:`lottery_ticket` returns.

    Attributes:
        model: the last ticket, trained (a copy of the model unless ``inplace=True``).
        rounds: one :class:`TicketRound` per round, the dense round first.
        rewind_step: the step the weights were rewound to.
        rewind_state: the saved parameters and buffers (masks excluded) rewound to.
        interrupted: Ctrl-C ended the run early (the rounds finished so far are kept).
    """

    model: nn.Module
    rounds: list[TicketRound] = field(default_factory=list)
    rewind_step: int = 0
    rewind_state: dict[str, torch.Tensor] = field(default_factory=dict)
    interrupted: bool = False

    def __str__(self) -> str:
        lines = [f"lottery ticket (rewind to step {self.rewind_step})", "round  sparsity  metrics"]
        for r in self.rounds:
            lines.append(f"{r.round:>5}  {100 * r.sparsity:7.2f}%  {r.metrics}")
        return "\n".join(lines)


class Ticket:
    """Handed to ``train_fn``: call :meth:`step` after every optimizer step.

    Attributes:
        round: the current round (0 = dense training).
        steps: optimizer steps counted in this round.
    """

    def __init__(self, runner: _Runner, round_index: int) -> None:
        self._runner = runner
        self.round = round_index
        self.steps = 0

    def step(self) -> None:
        """Count a step, keep pruned weights at zero, and take the rewind snapshot when due."""
        self.steps += 1
        reapply_masks(self._runner.model)
        if self.round == 0 and self.steps == self._runner.rewind_to:
            self._runner.snapshot()


def _mask_buffer_names(model: nn.Module) -> set[str]:
    return {
        f"{module_name}.{name}{MASK_SUFFIX}" if module_name else f"{name}{MASK_SUFFIX}"
        for module_name, _, name in masked_parameters(model)
    }


class _Runner:
    def __init__(self, model: nn.Module, rewind_to: int) -> None:
        self.model = model
        self.rewind_to = rewind_to
        self.state: dict[str, torch.Tensor] | None = None

    def snapshot(self) -> None:
        skip = _mask_buffer_names(self.model)
        state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        state.update(
            {n: b.detach().clone() for n, b in self.model.named_buffers() if n not in skip}
        )
        self.state = state

    def rewind(self) -> None:
        assert self.state is not None
        tensors = dict(self.model.named_parameters())
        tensors.update(dict(self.model.named_buffers()))
        with torch.no_grad():
            for name, saved in self.state.items():
                tensors[name].copy_(saved)
        reapply_masks(self.model)


def _round_sparsities(rounds: int, rate: float, sparsities: Sequence[float] | None) -> list[float]:
    if sparsities is not None:
        values = list(sparsities)
        if not values:
            raise ValueError("sparsities must not be empty")
        for i, s in enumerate(values):
            if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 < s < 1:
                raise ValueError(f"sparsities[{i}] must be in (0, 1), got {s!r}")
        if any(b <= a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"sparsities must rise from round to round, got {values}")
        return [float(s) for s in values]
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < 1:
        raise ValueError(
            f"rate (share of the remaining weights pruned each round) must be in (0, 1), "
            f"got {rate!r}"
        )
    return [1.0 - (1.0 - float(rate)) ** r for r in range(1, int(rounds) + 1)]


def _measured_sparsity(targets: list[Target]) -> float:
    params = sum(t.weight().numel() for t in targets)
    zeros = sum(int((t.weight() == 0).sum()) for t in targets)
    return zeros / params if params else 0.0


def lottery_ticket(
    model: nn.Module,
    train_fn: Callable[[nn.Module, Ticket], Any],
    rounds: int = 5,
    rate: float = 0.2,
    rewind_to: int = 0,
    *,
    sparsities: Sequence[float] | None = None,
    method: str = "magnitude",
    pattern: str | Pattern = "unstructured",
    scope: str = "global",
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> LotteryResult:
    """Find a lottery ticket by iterative magnitude pruning with rewinding.

    Args:
        model: the network, at initialisation (or wherever "step 0" should be).
        train_fn: ``train_fn(model, ticket) -> metrics``: trains ``model`` in place for one
            round, calling ``ticket.step()`` after every optimizer step.
        rounds: pruning rounds after the dense round.
        rate: share of the *remaining* weights pruned each round (sparsity after round ``r`` is
            ``1 - (1 - rate) ** r``).
        rewind_to: optimizer step whose weights the survivors are rewound to (0: the weights
            the model came with).
        sparsities: explicit sparsity after each round, instead of ``rounds`` and ``rate``.
        method, pattern, scope, targets, ignore: how each round prunes (``prunekit.prune``;
            N:M patterns have a fixed sparsity and do not apply).
        inplace: work on ``model`` itself; by default on a deep copy.
        progress: show a progress bar over rounds.

    Returns:
        A :class:`LotteryResult`: per-round sparsity, masks and metrics, and the last ticket.
    """
    plan = _round_sparsities(rounds, rate, sparsities)
    if isinstance(rewind_to, bool) or not isinstance(rewind_to, numbers.Integral) or rewind_to < 0:
        raise ValueError(f"rewind_to must be a step number >= 0, got {rewind_to!r}")
    parsed = parse_pattern(pattern)
    if isinstance(parsed, NM):
        raise ValueError(
            f"pattern {parsed} has a fixed sparsity; lottery tickets prune in rising rounds "
            "(use 'unstructured' or 'block:RxC')"
        )
    if not callable(train_fn):
        raise TypeError(f"train_fn must be a callable (model, ticket) -> metrics, got {train_fn!r}")
    resolve_targets(model, targets, ignore)  # validate names before copying
    if not inplace:
        model = copy_model(model, "lottery_ticket")
    chosen = resolve_targets(model, targets, ignore)
    runner = _Runner(model, int(rewind_to))
    if runner.rewind_to == 0:
        runner.snapshot()
    result = LotteryResult(model=model, rewind_step=runner.rewind_to)
    bar = tqdm(total=len(plan) + 1, desc="lottery ticket", unit="round", disable=not progress)
    try:
        for index in range(len(plan) + 1):
            if index > 0:
                prune(
                    model,
                    plan[index - 1],
                    method=method,
                    pattern=parsed,
                    scope=scope,
                    targets=targets,
                    ignore=ignore,
                    inplace=True,
                    progress=False,
                )
                runner.rewind()
            ticket = Ticket(runner, index)
            metrics = train_fn(model, ticket)
            if index == 0 and runner.state is None:
                raise RuntimeError(
                    f"rewind_to={runner.rewind_to} needs train_fn to call ticket.step() after "
                    f"every optimizer step; it called it {ticket.steps} times in the dense round"
                )
            masks = {}
            for t in chosen:
                keep = get_mask(t.module, t.param_name)
                if keep is not None:
                    masks[t.name] = keep
            sparsity = _measured_sparsity(chosen)
            result.rounds.append(TicketRound(index, sparsity, masks, metrics))
            bar.set_postfix(sparsity=f"{sparsity:.3f}")
            bar.update(1)
    except KeyboardInterrupt:
        result.interrupted = True
        warnings.warn(
            f"prunekit: lottery_ticket interrupted after {len(result.rounds)} rounds", stacklevel=2
        )
    finally:
        bar.close()
    assert runner.state is not None or result.interrupted
    result.rewind_state = runner.state or {}
    return result
