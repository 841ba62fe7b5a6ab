"""Sparsity schedules: formulas at their end points and midpoints, and bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.train import (
    ConstantSchedule,
    FunctionSchedule,
    IterativeSchedule,
    PolynomialSchedule,
    as_schedule,
)


def test_cubic_schedule_end_points_and_midpoint() -> None:
    s = PolynomialSchedule(initial_sparsity=0.1, final_sparsity=0.9, begin_step=10, end_step=110)
    assert s.sparsity_at(0) == 0.0
    assert s.sparsity_at(9) == 0.0  # nothing before begin_step
    assert s.sparsity_at(10) == pytest.approx(0.1, abs=1e-15)
    # midpoint: 0.9 + (0.1 - 0.9) * (1 - 0.5) ** 3 = 0.8
    assert s.sparsity_at(60) == pytest.approx(0.8, abs=1e-15)
    assert s.sparsity_at(35) == pytest.approx(0.9 - 0.8 * 0.75**3, abs=1e-15)
    assert s.sparsity_at(110) == 0.9
    assert s.sparsity_at(10**9) == 0.9


def test_polynomial_power_one_is_linear() -> None:
    s = PolynomialSchedule(final_sparsity=0.8, end_step=100, power=1)
    assert [s.sparsity_at(t) for t in (0, 25, 50, 100)] == pytest.approx([0.0, 0.2, 0.4, 0.8])


def test_polynomial_frequency_holds_value_between_updates() -> None:
    s = PolynomialSchedule(final_sparsity=0.9, begin_step=0, end_step=100, frequency=30)
    assert s.sparsity_at(29) == s.sparsity_at(0) == 0.0
    assert s.sparsity_at(30) == s.sparsity_at(59) == pytest.approx(0.9 - 0.9 * 0.7**3)
    assert s.sparsity_at(99) == pytest.approx(0.9 - 0.9 * 0.1**3)  # last update at 90
    assert s.sparsity_at(100) == 0.9  # end_step reaches final even off the frequency grid


@settings(max_examples=50, deadline=None)
@given(
    initial=st.floats(0, 0.5),
    final=st.floats(0.5, 0.99),
    begin=st.integers(0, 50),
    length=st.integers(1, 200),
    frequency=st.integers(1, 20),
    power=st.floats(0.5, 5),
)
def test_polynomial_is_monotone_and_bounded(initial, final, begin, length, frequency, power):
    s = PolynomialSchedule(
        initial_sparsity=initial,
        final_sparsity=final,
        begin_step=begin,
        end_step=begin + length,
        frequency=frequency,
        power=power,
    )
    values = [s.sparsity_at(t) for t in range(begin, begin + length + 2)]
    assert values[0] == pytest.approx(initial)
    assert values[-1] == final
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False))
    assert all(initial - 1e-12 <= v <= final + 1e-12 for v in values)


def test_constant_schedule() -> None:
    assert ConstantSchedule(0.7).sparsity_at(0) == 0.7
    s = ConstantSchedule(0.7, begin_step=5)
    assert (s.sparsity_at(4), s.sparsity_at(5), s.sparsity_at(500)) == (0.0, 0.7, 0.7)


def test_iterative_schedule_rate_and_explicit_steps() -> None:
    s = IterativeSchedule(rate=0.2, rounds=3, every=100, begin_step=10)
    assert s.sparsity_at(9) == 0.0
    assert s.sparsity_at(10) == pytest.approx(0.2)
    assert s.sparsity_at(109) == pytest.approx(0.2)
    assert s.sparsity_at(110) == pytest.approx(0.36)
    assert s.sparsity_at(210) == pytest.approx(0.488)
    assert s.sparsity_at(10**6) == pytest.approx(0.488)  # three rounds only
    e = IterativeSchedule(sparsities=(0.5, 0.9, 0.95), every=10)
    assert [e.sparsity_at(t) for t in (0, 10, 19, 20, 30)] == [0.5, 0.9, 0.9, 0.95, 0.95]


def test_callables_and_numbers_become_schedules() -> None:
    assert as_schedule(0.3).sparsity_at(0) == 0.3
    f = as_schedule(lambda step: min(0.5, step / 100))
    assert isinstance(f, FunctionSchedule) and f.sparsity_at(20) == 0.2 and f(1000) == 0.5
    s = PolynomialSchedule(final_sparsity=0.5, end_step=10)
    assert as_schedule(s) is s

    class Custom:
        def sparsity_at(self, step: int) -> float:
            return 0.25

    custom = Custom()
    assert as_schedule(custom) is custom


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PolynomialSchedule(initial_sparsity=0.6, final_sparsity=0.5), "must not exceed"),
        (lambda: PolynomialSchedule(final_sparsity=0.5, begin_step=10, end_step=10), "greater"),
        (lambda: PolynomialSchedule(final_sparsity=1.0), r"\[0, 1\)"),
        (lambda: PolynomialSchedule(final_sparsity=0.5, frequency=0), "frequency"),
        (lambda: PolynomialSchedule(final_sparsity=0.5, power=0), "power"),
        (lambda: ConstantSchedule(-0.1), "sparsity"),
        (lambda: IterativeSchedule(rate=0.2, every=10), "rounds"),
        (lambda: IterativeSchedule(rate=0.0, rounds=2), "rate"),
        (lambda: IterativeSchedule(sparsities=(0.5, 0.4)), "decrease"),
        (lambda: IterativeSchedule(rate=0.5, rounds=2, sparsities=(0.5,)), "not both"),
    ],
)
def test_bad_schedules_say_what_is_accepted(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_function_schedule_checks_its_values() -> None:
    with pytest.raises(ValueError, match="step 3"):
        FunctionSchedule(lambda step: 1.5).sparsity_at(3)
    with pytest.raises(TypeError, match="schedule must be"):
        as_schedule("cubic")
