"""Sparsity schedules: how sparse the model should be after a given number of optimizer steps.

A schedule is anything with a ``sparsity_at(step) -> float`` method (or any plain callable
``step -> float``). ``step`` counts optimizer steps: 0 before training, 1 after the first step,
and so on. The train-time pruner updates its masks whenever the scheduled sparsity rises above
what it has applied so far; masks never shrink, so a schedule that goes down is held at its
highest value.

* :class:`ConstantSchedule`: one sparsity from ``begin_step`` on (0 before).
* :class:`PolynomialSchedule`: gradual magnitude pruning (Zhu and Gupta, 2017):
  ``final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power`` with the names used
  by TensorFlow Model Optimization (``initial_sparsity``, ``final_sparsity``, ``begin_step``,
  ``end_step``, ``frequency``, ``power=3`` for the cubic schedule).
* :class:`IterativeSchedule`: prune a share of the remaining weights, recover for ``every``
  steps, repeat (``rate`` and ``rounds``), or step through explicit ``sparsities``.
* :class:`FunctionSchedule`: wraps any callable.

Example:
    >>> from prunekit.train import PolynomialSchedule
    >>> s = PolynomialSchedule(final_sparsity=0.8, begin_step=0, end_step=100)
    >>> s.sparsity_at(0), round(s.sparsity_at(50), 6), s.sparsity_at(100)
    (0.0, 0.7, 0.8)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ConstantSchedule",
    "FunctionSchedule",
    "IterativeSchedule",
    "PolynomialSchedule",
    "Schedule",
    "SupportsSparsityAt",
    "as_schedule",
]


@runtime_checkable
class SupportsSparsityAt(Protocol):
    """Anything the pruner accepts as a schedule."""

    def sparsity_at(self, step: int) -> float: ...


def _check_fraction(name: str, value: Any, *, allow_one: bool = False) -> float:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (0 <= value and upper_ok)
    ):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_step(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Schedule:
    """Base class of the built-in schedules; ``schedule(step)`` is ``schedule.sparsity_at(step)``."""

    def sparsity_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.sparsity_at(step)


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``sparsity`` from ``begin_step`` on, 0 before.

    Example:
        >>> ConstantSchedule(0.9).sparsity_at(0)
        0.9
    """

    sparsity: float
    begin_step: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", _check_fraction("sparsity", self.sparsity))
        object.__setattr__(self, "begin_step", _check_step("begin_step", self.begin_step))

    @property
    def final_sparsity(self) -> float:
        return self.sparsity

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.begin_step else 0.0


@dataclass(frozen=True, kw_only=True)
class PolynomialSchedule(Schedule):
    """Polynomial decay from ``initial_sparsity`` to ``final_sparsity`` (cubic by default).

    * before ``begin_step``: 0 (nothing pruned yet);
    * at ``begin_step``: ``initial_sparsity``;
    * between: ``final + (initial - final) * (1 - p) ** power`` with
      ``p = (t - begin_step) / (end_step - begin_step)``, where ``t`` is the latest update step
      ``begin_step + k * frequency`` at or before ``step`` (the value changes only on update
      steps, as in gradual magnitude pruning);
    * from ``end_step`` on: ``final_sparsity``, exactly (even when ``frequency`` does not
      divide ``end_step - begin_step``).

    Example:
        >>> s = PolynomialSchedule(initial_sparsity=0.0, final_sparsity=0.9, begin_step=100,
        ...                        end_step=1100, frequency=100)
        >>> s.sparsity_at(99), s.sparsity_at(100), round(s.sparsity_at(650), 4), s.sparsity_at(2000)
        (0.0, 0.0, 0.7875, 0.9)
    """

    final_sparsity: float
    begin_step: int = 0
    end_step: int = 1000
    initial_sparsity: float = 0.0
    frequency: int = 1
    power: float = 3.0

    def __post_init__(self) -> None:
        initial = _check_fraction("initial_sparsity", self.initial_sparsity)
        final = _check_fraction("final_sparsity", self.final_sparsity)
        if initial > final:
            raise ValueError(
                f"initial_sparsity ({initial}) must not exceed final_sparsity ({final}): masks "
                "only ever grow"
            )
        begin = _check_step("begin_step", self.begin_step)
        end = _check_step("end_step", self.end_step)
        if end <= begin:
            raise ValueError(f"end_step ({end}) must be greater than begin_step ({begin})")
        frequency = _check_step("frequency", self.frequency, minimum=1)
        power = self.power
        if isinstance(power, bool) or not isinstance(power, numbers.Real) or not power > 0:
            raise ValueError(f"power must be a positive number (3 for cubic), got {power!r}")
        for name, value in (
            ("initial_sparsity", initial),
            ("final_sparsity", final),
            ("begin_step", begin),
            ("end_step", end),
            ("frequency", frequency),
            ("power", float(power)),
        ):
            object.__setattr__(self, name, value)

    def sparsity_at(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        updated = self.begin_step + (step - self.begin_step) // self.frequency * self.frequency
        progress = (updated - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            (1.0 - progress) ** self.power
        )


@dataclass(frozen=True, kw_only=True)
class IterativeSchedule(Schedule):
    """Prune, recover for ``every`` steps, repeat.

    Either ``rate`` and ``rounds``: each round removes ``rate`` of the weights that remain, so
    after ``r`` rounds the sparsity is ``1 - (1 - rate) ** r`` (the convention of iterative
    magnitude pruning and lottery tickets); or explicit ``sparsities``, one per round (rising).
    Round ``r`` (counting from 0) happens at step ``begin_step + r * every``.

    Example:
        >>> s = IterativeSchedule(rate=0.5, rounds=3, every=10)
        >>> [s.sparsity_at(t) for t in (0, 9, 10, 20, 99)]
        [0.5, 0.5, 0.75, 0.875, 0.875]
        >>> IterativeSchedule(sparsities=(0.5, 0.9), every=100, begin_step=1).sparsity_at(101)
        0.9
    """

    rate: float | None = None
    rounds: int | None = None
    every: int = 1000
    begin_step: int = 0
    sparsities: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        every = _check_step("every", self.every, minimum=1)
        begin = _check_step("begin_step", self.begin_step)
        if self.sparsities:
            if self.rate is not None or self.rounds is not None:
                raise ValueError("give either rate and rounds, or sparsities, not both")
            values = tuple(
                _check_fraction(f"sparsities[{i}]", s) for i, s in enumerate(self.sparsities)
            )
            if any(b < a for a, b in zip(values, values[1:], strict=False)):
                raise ValueError(f"sparsities must not decrease, got {values}")
        else:
            if self.rate is None or self.rounds is None:
                raise ValueError(
                    "IterativeSchedule needs rate= (share of remaining weights removed each "
                    "round, in (0, 1)) and rounds=, or sparsities=(s1, s2, ...)"
                )
            rate = _check_fraction("rate", self.rate)
            if rate == 0:
                raise ValueError("rate must be in (0, 1), got 0")
            rounds = _check_step("rounds", self.rounds, minimum=1)
            values = tuple(1.0 - (1.0 - rate) ** r for r in range(1, rounds + 1))
        object.__setattr__(self, "sparsities", values)
        object.__setattr__(self, "every", every)
        object.__setattr__(self, "begin_step", begin)

    @property
    def final_sparsity(self) -> float:
        return self.sparsities[-1]

    def sparsity_at(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        done = min(len(self.sparsities), (step - self.begin_step) // self.every + 1)
        return self.sparsities[done - 1]


@dataclass(frozen=True)
class FunctionSchedule(Schedule):
    """Any callable ``step -> sparsity`` as a schedule; values are checked to lie in [0, 1).

    Example:
        >>> FunctionSchedule(lambda step: min(0.9, step / 1000)).sparsity_at(500)
        0.5
    """

    fn: Callable[[int], float]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"FunctionSchedule needs a callable step -> sparsity, got {self.fn!r}")

    def sparsity_at(self, step: int) -> float:
        value = self.fn(step)
        try:
            return _check_fraction(f"schedule value at step {step}", value)
        except ValueError:
            if isinstance(value, numbers.Real) and math.isnan(value):
                raise ValueError(f"the schedule returned NaN at step {step}") from None
            raise


def as_schedule(schedule: Any) -> SupportsSparsityAt:
    """A schedule from a schedule, a number (constant sparsity) or a callable ``step -> float``.

    Example:
        >>> as_schedule(0.5).sparsity_at(10)
        0.5
    """
    if isinstance(schedule, SupportsSparsityAt) and not isinstance(schedule, type):
        return schedule
    if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
        return ConstantSchedule(float(schedule))
    if callable(schedule):
        return FunctionSchedule(schedule)
    raise TypeError(
        f"schedule must be a number (constant sparsity), an object with sparsity_at(step), or a "
        f"callable step -> sparsity; got {schedule!r}"
    )
