"""Goals for recipes: say what the result must be (a quality floor, a file size, a latency, a
MAC, parameter or non-zero budget), mark one stage's ratio ``search``, and the pipeline finds
the value that meets the goal.

    goal:
      quality: 0.99          # >= 99 % of the dense model's quality (a ceiling for perplexity)
      file: 0.05             # saved files <= 5 % of the dense fp32 safetensors file
    stages:
      - prune: {sparsity: search}           # or {search: [0.8, 0.99]} for a range
      - finetune: {teacher: dense, epochs: 2}
      - quantize: {bits: 8, mode: int}
      - save: {compressed: true, bits: 8}

How the value is chosen, every trial running the whole pipeline from the searched stage on
(recovery included) and measuring the result:

* with a size / speed target (``file``, ``macs``, ``params``, ``nonzeros``, ``latency``): the
  least compression that meets every target (the best quality at that size), found by bisection
  after checking that the most compressed end meets them; the quality floor, when given, is then
  checked on that model;
* with only a quality floor: the most compression whose quality stays above the floor
  (bisection between the two ends).

Both assume that quality falls and size shrinks as the ratio grows (the search never retries a
point it has passed). A goal without a ``search`` value is checked on the result and reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SEARCH = "search"

# (verb, key) -> (default low, default high, +1 when a larger value compresses more else -1)
KNOBS: dict[tuple[str, str], tuple[float, float, int]] = {
    ("prune", "sparsity"): (0.3, 0.99, +1),
    ("oneshot", "sparsity"): (0.3, 0.9, +1),
    ("prune_structured", "ratio"): (0.05, 0.9, +1),
    ("prune_structured", "target_macs"): (0.1, 0.95, -1),
    ("prune_structured", "target_params"): (0.1, 0.95, -1),
    ("prune_structured", "target_latency"): (0.2, 0.95, -1),
}
BUDGETS = ("file", "macs", "params", "nonzeros")  # fractions of the dense model's figure
GOAL_KEYS = ("quality", *BUDGETS, "latency", "tolerance", "max_trials")


def is_search(value: Any) -> bool:
    """True for a stage value that asks for a search: ``search`` or ``{search: [low, high]}``."""
    return value == SEARCH or (isinstance(value, dict) and set(value) == {SEARCH})


@dataclass(frozen=True)
class Knob:
    """The searched value: stage ``index`` (0-based), its verb and key, the range searched."""

    index: int
    verb: str
    key: str
    low: float
    high: float
    direction: int  # +1: larger compresses more

    def value(self, t: float) -> float:
        """The value at position ``t`` in [0, 1], 0 the least compressed end."""
        span = self.high - self.low
        v = self.low + t * span if self.direction > 0 else self.high - t * span
        return round(v, 4)

    def describe(self) -> str:
        return f"stage {self.index + 1} {self.verb}.{self.key} in [{self.low:g}, {self.high:g}]"


def find_knob(stages: list[tuple[str, dict[str, Any]]]) -> tuple[Knob | None, list[tuple]]:
    """The ``search`` value in the stages, and problems as (stage index, verb, key, message)."""
    found: list[Knob] = []
    problems: list[tuple] = []
    for index, (verb, kwargs) in enumerate(stages):
        for key, value in kwargs.items():
            if not is_search(value):
                continue
            spec = KNOBS.get((verb, key))
            if spec is None:
                accepted = ", ".join(f"{v}.{k}" for v, k in KNOBS)
                problems.append((index, verb, key, f"cannot be searched; searchable: {accepted}"))
                continue
            low, high, direction = spec
            if isinstance(value, dict):
                bounds = value[SEARCH]
                if (
                    not isinstance(bounds, list | tuple)
                    or len(bounds) != 2
                    or not all(
                        isinstance(b, int | float) and not isinstance(b, bool) for b in bounds
                    )
                ):
                    problems.append(
                        (index, verb, key, f"search range must be [low, high], got {bounds!r}")
                    )
                    continue
                low, high = float(bounds[0]), float(bounds[1])
                if not 0.0 < low < high < 1.0:
                    problems.append(
                        (
                            index,
                            verb,
                            key,
                            f"search range must satisfy 0 < low < high < 1, got {list(bounds)}",
                        )
                    )
                    continue
            found.append(Knob(index, verb, key, low, high, direction))
    if len(found) > 1:
        where = ", ".join(k.describe() for k in found)
        problems.append(
            (found[1].index, found[1].verb, found[1].key, f"one search at most: {where}")
        )
    return (found[0] if found else None), problems


@dataclass(frozen=True)
class Goal:
    """What the compressed model must be; fractions are of the dense model's own figure."""

    quality: float | None = None  # relative floor, fraction of dense
    quality_min: float | None = None  # absolute floors / ceilings
    quality_max: float | None = None
    file: float | None = None
    macs: float | None = None
    params: float | None = None
    nonzeros: float | None = None
    latency: float | None = None
    latency_batch: int = 1
    tolerance: float = 0.01
    max_trials: int = 10

    @property
    def has_targets(self) -> bool:
        return any(getattr(self, k) is not None for k in (*BUDGETS, "latency"))

    @property
    def has_quality(self) -> bool:
        return any(v is not None for v in (self.quality, self.quality_min, self.quality_max))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1


def parse_goal(raw: Any) -> tuple[Goal | None, list[tuple[str, str]]]:
    """A :class:`Goal` from the recipe's ``goal:`` mapping, and problems as (key, message)."""
    if raw is None:
        return None, []
    if not isinstance(raw, dict) or not raw:
        return None, [("", "must be a mapping such as {quality: 0.99, file: 0.05}")]
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in GOAL_KEYS:
            problems.append((key, f"unknown key; accepted: {', '.join(GOAL_KEYS)}"))
        elif key == "quality":
            if _fraction(value):
                values["quality"] = float(value)
            elif (
                isinstance(value, dict)
                and len(value) == 1
                and set(value) <= {"min", "max"}
                and isinstance(next(iter(value.values())), int | float)
                and not isinstance(next(iter(value.values())), bool)
            ):
                ((bound, number),) = value.items()
                values[f"quality_{bound}"] = float(number)
            else:
                problems.append(
                    (
                        key,
                        "a fraction of the dense quality in (0, 1] (e.g. 0.99), or an absolute "
                        f"{{min: value}} / {{max: value}}; got {value!r}",
                    )
                )
        elif key in BUDGETS:
            if _fraction(value):
                values[key] = float(value)
            else:
                problems.append((key, f"a fraction of the dense model's in (0, 1], got {value!r}"))
        elif key == "latency":
            ratio, batch = value, 1
            if isinstance(value, dict):
                unknown = set(value) - {"ratio", "batch"}
                ratio, batch = value.get("ratio"), value.get("batch", 1)
                if unknown or ratio is None:
                    problems.append((key, f"{{ratio: r, batch: b}} or a number, got {value!r}"))
                    continue
            if not (isinstance(ratio, int | float) and not isinstance(ratio, bool) and ratio > 0):
                problems.append((key, f"a latency ratio to dense > 0 (e.g. 0.5), got {ratio!r}"))
            elif not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
                problems.append((key, f"batch must be a positive integer, got {batch!r}"))
            else:
                values["latency"], values["latency_batch"] = float(ratio), batch
        elif key == "tolerance":
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                values[key] = float(value)
            else:
                problems.append((key, f"must be > 0, got {value!r}"))
        elif key == "max_trials":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                values[key] = value
            else:
                problems.append((key, f"must be an integer >= 2, got {value!r}"))
    goal = Goal(**values)
    if not problems and not (goal.has_targets or goal.has_quality):
        problems.append(
            ("", "states nothing to meet: give quality, file, macs, params, nonzeros or latency")
        )
    return goal, problems


# ------------------------------------------------------------------------------ checking


@dataclass
class GoalCheck:
    """One line of the goal: what was asked, what was measured, whether it was met."""

    name: str
    target: float
    measured: float | None
    met: bool | None  # None: not measured
    text: str


def check_goal(
    goal: Goal, metrics: dict[str, Any], dense: dict[str, Any], higher_is_better: bool = True
) -> list[GoalCheck]:
    """Check a measured row (the last stage's metrics) against the goal."""
    checks: list[GoalCheck] = []
    reference = {"file": "fp32_bytes", "macs": "macs", "params": "params", "nonzeros": "nonzeros"}
    for key in BUDGETS:
        fraction = getattr(goal, key)
        if fraction is None:
            continue
        base, value = dense.get(reference[key]), metrics.get("file_bytes" if key == "file" else key)
        if not base or value is None:
            checks.append(
                GoalCheck(key, fraction, None, None, f"{key} <= {fraction:.2%}: not measured")
            )
            continue
        ratio = value / base
        met = ratio <= fraction + 1e-12
        checks.append(
            GoalCheck(
                key, fraction, ratio, met, f"{key} {ratio:.2%} of dense (goal <= {fraction:.2%})"
            )
        )
    if goal.latency is not None:
        row = (metrics.get("latency") or {}).get(str(goal.latency_batch))
        name = f"latency b{goal.latency_batch}"
        if row is None or row.get("ratio") is None or math.isnan(row["ratio"]):
            checks.append(GoalCheck(name, goal.latency, None, None, f"{name}: not measured"))
        else:
            met = row["ratio"] <= goal.latency
            checks.append(
                GoalCheck(
                    name,
                    goal.latency,
                    row["ratio"],
                    met,
                    f"{name} {row['ratio']:.2f}x dense (goal <= {goal.latency:.2f}x"
                    f"{_retimed_text(row)})",
                )
            )
    if goal.has_quality:
        threshold, sign = quality_threshold(goal, dense.get("quality"), higher_is_better)
        value = metrics.get("quality")
        if threshold is None or value is None:
            checks.append(GoalCheck("quality", math.nan, None, None, "quality: not measured"))
        else:
            met = value >= threshold if sign == ">=" else value <= threshold
            asked = _relative_quality(goal, dense.get("quality"), higher_is_better)
            checks.append(
                GoalCheck(
                    "quality",
                    threshold,
                    value,
                    met,
                    f"quality {value:.6g} (goal {sign} {threshold:.6g}{asked})",
                )
            )
    return checks


def retimed_timings(retimed: dict[str, Any]) -> str:
    """The timings of a re-timed latency row's ``retimed`` record
    (:func:`prunekit.recipes.measure.retime`): ``median of 5 timings 0.71-0.84x, first 0.84x``,
    or empty when they were not kept.

    Example:
        >>> retimed_timings({"ratios": [0.84, 0.71, 0.78], "first": {"ratio": 0.84}})
        'median of 3 timings 0.71-0.84x, first 0.84x'
    """
    ratios = [r for r in retimed.get("ratios", []) if r is not None and not math.isnan(r)]
    first = (retimed.get("first") or {}).get("ratio")
    if not ratios or first is None:
        return ""
    return (
        f"median of {len(ratios)} timings {min(ratios):.2f}-{max(ratios):.2f}x, first {first:.2f}x"
    )


def _retimed_text(row: dict[str, Any]) -> str:
    """``; re-timed: median of 5 timings 0.71-0.84x, first 0.84x`` for a latency row that
    :func:`prunekit.recipes.measure.retime` re-measured, else empty."""
    retimed = row.get("retimed")
    if not isinstance(retimed, dict):
        return ""
    timings = retimed_timings(retimed)
    return f"; re-timed: {timings}" if timings else "; re-timed"


def _relative_quality(goal: Goal, dense_quality: float | None, higher_is_better: bool) -> str:
    """What a relative quality goal asked, to show beside the bound it gives: ``: 99% of dense
    0.992`` (``: dense 5.263 / 0.95`` when lower is better); empty for an absolute bound."""
    if goal.quality is None or goal.quality_min is not None or goal.quality_max is not None:
        return ""
    if higher_is_better:
        return f": {100 * goal.quality:.4g}% of dense {dense_quality:.6g}"
    return f": dense {dense_quality:.6g} / {goal.quality:g}"


def quality_threshold(
    goal: Goal, dense_quality: float | None, higher_is_better: bool
) -> tuple[float | None, str]:
    """The quality bound as (value, ">=" or "<=")."""
    if goal.quality_min is not None:
        return goal.quality_min, ">="
    if goal.quality_max is not None:
        return goal.quality_max, "<="
    if dense_quality is None or goal.quality is None:
        return None, ">=" if higher_is_better else "<="
    if higher_is_better:
        return dense_quality * goal.quality, ">="
    return dense_quality / goal.quality, "<="


RETIME_MARGIN = 0.05
"""A latency verdict within this fraction of the bound (or within the timing spread, when that
is larger) is re-timed before it counts."""


def latency_check(checks: list[GoalCheck]) -> GoalCheck | None:
    """The goal's latency check among ``checks`` (None without a latency goal)."""
    return next((c for c in checks if c.name.startswith("latency")), None)


def retime_reason(
    goal: Goal,
    knob: Knob | None,
    value: float,
    checks: list[GoalCheck],
    row: dict[str, Any] | None,
    others: list[tuple[float, list[GoalCheck]]],
) -> str | None:
    """Why the latency of the trial at ``value`` must be timed again before its verdict counts,
    or None. ``checks`` are its goal checks, ``row`` its measured latency row at the goal's
    batch, ``others`` the (value, checks) of the other trials.

    Only a verdict that latency decides is re-timed (every other size / speed target met), and
    only once (a row already re-timed is final), when

    * its ratio to dense is within the timing noise of the bound: ``|ratio / bound - 1|`` at most
      the larger spread (interquartile range / median) of the two models' calls, and at least
      :data:`RETIME_MARGIN`; or
    * it contradicts another trial under the search's own assumption that more compression is
      never slower: it missed the bound while a less compressed trial met it, or met it while
      a more compressed one missed it.

    Example:
        >>> k, g = Knob(0, "prune_structured", "target_params", 0.1, 0.95, -1), Goal(latency=0.8)
        >>> near = [GoalCheck("latency b32", 0.8, 0.81, False, "")]
        >>> retime_reason(g, k, 0.3125, near, {"ratio": 0.81, "spread": 0.02}, [])
        '0.81x is within the timing spread (5%) of the bound 0.80x'
        >>> far = [GoalCheck("latency b32", 0.8, 1.2, False, "")]
        >>> met = [GoalCheck("latency b32", 0.8, 0.7, True, "")]
        >>> retime_reason(g, k, 0.3125, far, {"ratio": 1.2, "spread": 0.02}, [(0.525, met)])
        'missed, but the less compressed target_params=0.525 met it (0.70x)'
    """
    check = latency_check(checks)
    if goal.latency is None or check is None or check.met is None or row is None:
        return None
    if row.get("retimed"):
        return None
    if not all(c.met for c in checks if _is_target(c.name) and c is not check):
        return None  # another target missed: latency does not decide this trial
    spreads = [row.get("spread"), row.get("dense_spread")]
    if any(s is not None and not math.isfinite(s) for s in spreads):
        margin = math.inf
    else:
        margin = max([RETIME_MARGIN, *(s for s in spreads if s is not None)])
    assert check.measured is not None
    if abs(check.measured / goal.latency - 1) <= margin:
        if math.isinf(margin):
            return "the timing spread is not finite"
        return (
            f"{check.measured:.2f}x is within the timing spread ({margin:.0%}) of the bound "
            f"{goal.latency:.2f}x"
        )
    for other_value, other_checks in others:
        other = latency_check(other_checks)
        if other is None or other.met is None or other_value == value:
            continue
        if knob is None:  # a single run: no other trial to contradict
            break
        more = (other_value - value) * knob.direction > 0  # the other compresses more
        if check.met is False and other.met and not more:
            return (
                f"missed, but the less compressed {knob.key}={other_value:g} met it "
                f"({other.measured:.2f}x)"
            )
        if check.met and other.met is False and more:
            return (
                f"met, but the more compressed {knob.key}={other_value:g} missed it "
                f"({other.measured:.2f}x)"
            )
    return None


def goal_met(checks: list[GoalCheck]) -> bool:
    return bool(checks) and all(c.met for c in checks)


def checks_text(checks: list[GoalCheck]) -> str:
    """The checks on one line, each one that failed marked ``MISSED``.

    Example:
        >>> checks_text([GoalCheck("file", 0.03, 0.04, False, "file 4.00% of dense (goal <= 3.00%)")])
        'MISSED file 4.00% of dense (goal <= 3.00%)'
    """
    return "; ".join(("MISSED " if c.met is False else "") + c.text for c in checks)


def verdict(checks: list[GoalCheck]) -> str:
    """``goal met: ...`` or ``goal NOT met: ...`` with every check, the failed ones marked."""
    return f"goal {'met' if goal_met(checks) else 'NOT met'}: {checks_text(checks)}"


# ------------------------------------------------------------------------------ searching


@dataclass
class Trial:
    """One value tried: the measured figures that the goal looks at, and the verdict."""

    value: float
    phase: str  # "edge" or "bisect"
    seconds: float
    checks: list[GoalCheck]
    reused: bool = False

    def ok(self, names: Callable[[str], bool]) -> bool:
        relevant = [c for c in self.checks if names(c.name)]
        return all(c.met for c in relevant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "phase": self.phase,
            "seconds": self.seconds,
            "reused": self.reused,
            "checks": [asdict(c) for c in self.checks],
        }


@dataclass
class SearchResult:
    """The trials run and the value chosen (``None`` when no trial ran)."""

    knob: Knob
    goal: Goal
    trials: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    met: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "knob": asdict(self.knob),
            "goal": self.goal.to_dict(),
            "chosen": self.chosen.value if self.chosen else None,
            "met": self.met,
            "trials": [t.to_dict() for t in self.trials],
        }

    def lines(self) -> list[str]:
        out = [f"search: {self.knob.describe()}"]
        for i, t in enumerate(self.trials, 1):
            checks = checks_text(t.checks)
            mark = " <- chosen" if t is self.chosen else ""
            again = " (from checkpoint)" if t.reused else ""
            out.append(f"  {i:>2}. {self.knob.key}={t.value:g} [{t.phase}]: {checks}{mark}{again}")
        return out


def _is_target(name: str) -> bool:
    return name != "quality"


def _is_quality(name: str) -> bool:
    return name == "quality"


def search(
    knob: Knob,
    goal: Goal,
    run_trial: Callable[[float], tuple[list[GoalCheck], bool]],
    progress: bool = True,
    on_best: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Choose the knob's value for the goal. ``run_trial(value)`` runs the pipeline at that value
    and returns its goal checks and whether they came from a checkpoint; ``on_best(trial)`` is
    called right after a trial becomes the one to keep (before the next trial runs).

    Example (a pure function of the trials):
        >>> k = Knob(0, "prune", "sparsity", 0.5, 0.9, +1)
        >>> g = Goal(quality=0.9, tolerance=0.05)
        >>> def trial(v):
        ...     q = 1.0 - max(0.0, v - 0.7)  # quality falls past 0.7
        ...     return [GoalCheck("quality", 0.9, q, q >= 0.9, "")], False
        >>> round(search(k, g, trial, progress=False).chosen.value, 2)  # 0.8 to within 0.05
        0.75
    """
    result = SearchResult(knob, goal)
    tol = goal.tolerance / (knob.high - knob.low)

    def run(t: float, phase: str) -> Trial:
        value = knob.value(t)
        for done in result.trials:
            if done.value == value:
                return done
        started = time.perf_counter()
        checks, reused = run_trial(value)
        trial = Trial(value, phase, time.perf_counter() - started, checks, reused)
        result.trials.append(trial)
        if progress:
            print(
                f"[prunekit compress] search {knob.key}={value:g}: {checks_text(checks)}",
                flush=True,
            )
        return trial

    def room() -> bool:
        return len(result.trials) < goal.max_trials

    def keep(trial: Trial) -> Trial:
        if on_best is not None:
            on_best(trial)
        return trial

    def bisect(best: Trial, names: Callable[[str], bool], passing_lowers_high: bool) -> Trial:
        """Halve [0, 1] until narrower than the tolerance; a passing trial is kept and moves
        the upper bound down (targets: least compression) or the lower bound up (floor: most
        compression)."""
        low, high = 0.0, 1.0
        while high - low > tol and room():
            mid = (low + high) / 2
            trial = run(mid, "bisect")
            passed = trial.ok(names)
            if passed:
                best = keep(trial)
            if passed == passing_lowers_high:
                high = mid
            else:
                low = mid
        return best

    if goal.has_targets:
        best = keep(run(1.0, "edge"))  # the most compressed end must meet the targets
        if best.ok(_is_target):
            best = bisect(best, _is_target, passing_lowers_high=True)
    else:
        best = keep(run(0.0, "edge"))  # the least compressed end must stay above the floor
        if best.ok(_is_quality):
            top = run(1.0, "edge")
            if top.ok(_is_quality):
                best = keep(top)
            else:
                best = bisect(best, _is_quality, passing_lowers_high=False)
    result.chosen = best
    result.met = goal_met(best.checks)
    return result
