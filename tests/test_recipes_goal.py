"""Recipe goals: the bisection against a brute-force answer, the schema's checks, and end-to-end
searches with and without an out folder (resumed without re-running a trial)."""

from __future__ import annotations

import html
import importlib.util
import json
import random

import pytest
import torch
from torch import nn

from prunekit.compress.io import load
from prunekit.prune import prune
from prunekit.recipes import compress
from prunekit.recipes.goal import Goal, GoalCheck, Knob, search
from prunekit.recipes.schema import RecipeError, load_recipe

# ------------------------------------------------------------------------------ pure search


def _grid(knob: Knob, step: float = 1e-4) -> list[float]:
    n = round((knob.high - knob.low) / step)
    return [round(knob.low + i * step, 4) for i in range(n + 1)]


@pytest.mark.parametrize("seed", range(25))
def test_quality_floor_search_finds_the_most_compressed_passing_value(seed: int) -> None:
    rng = random.Random(seed)
    direction = rng.choice([1, -1])
    knob = Knob(0, "prune", "sparsity", 0.2, 0.95, direction)
    cut = rng.uniform(0.1, 1.1)  # quality passes while the compression coordinate is <= cut
    span = knob.high - knob.low

    def coordinate(v: float) -> float:
        return (v - knob.low) / span if direction > 0 else (knob.high - v) / span

    def trial(v: float) -> tuple[list[GoalCheck], bool]:
        ok = coordinate(v) <= cut
        return [GoalCheck("quality", 0.0, 1.0 if ok else 0.0, ok, "")], False

    goal = Goal(quality=0.9, tolerance=0.01, max_trials=30)
    result = search(knob, goal, trial, progress=False)
    passing = [v for v in _grid(knob) if coordinate(v) <= cut]
    if not passing:
        assert not result.met and len(result.trials) == 1
        return
    best = max(passing, key=coordinate)  # brute force: the most compressed passing value
    assert result.met
    assert coordinate(result.chosen.value) <= cut
    assert abs(coordinate(result.chosen.value) - coordinate(best)) * span <= goal.tolerance
    assert len(result.trials) <= 2 + 7  # two ends, then bisection to 0.01 over 0.75


@pytest.mark.parametrize("seed", range(25))
def test_target_search_finds_the_least_compressed_value_meeting_the_targets(seed: int) -> None:
    rng = random.Random(100 + seed)
    knob = Knob(0, "prune_structured", "target_macs", 0.1, 0.9, -1)
    need = rng.uniform(0.05, 0.95)  # targets met once target_macs <= need
    floor_ok = rng.random() < 0.5

    def trial(v: float) -> tuple[list[GoalCheck], bool]:
        ok = v <= need
        return [
            GoalCheck("macs", need, v, ok, ""),
            GoalCheck("quality", 0.0, 1.0, floor_ok, ""),
        ], False

    goal = Goal(macs=0.5, quality=0.9, tolerance=0.01, max_trials=30)
    result = search(knob, goal, trial, progress=False)
    meeting = [v for v in _grid(knob) if v <= need]
    if not meeting:
        assert not result.met and len(result.trials) == 1
        return
    best = max(meeting)  # least compression = largest target_macs that meets the target
    assert result.chosen.value <= need
    assert best - result.chosen.value <= goal.tolerance
    assert result.met == floor_ok  # the floor is checked on the chosen point, not searched


def test_search_stops_at_max_trials() -> None:
    knob = Knob(0, "prune", "sparsity", 0.0001, 0.9999, 1)
    calls = []

    def trial(v: float) -> tuple[list[GoalCheck], bool]:
        calls.append(v)
        ok = v < 0.61803
        return [GoalCheck("quality", 0, 0, ok, "")], False

    result = search(knob, Goal(quality=0.9, tolerance=1e-6, max_trials=5), trial, progress=False)
    assert len(calls) == 5 and result.chosen.value < 0.61803


# ------------------------------------------------------------------------------ schema


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ({"stages": [{"prune": {"sparsity": "search"}}]}, "needs a goal"),
        (
            {"goal": {"nonzeros": 0.5}, "stages": [{"prune": {"sparsity": "search"}}, "oneshot"]},
            None,
        ),
        (
            {
                "goal": {"nonzeros": 0.5},
                "stages": [{"prune": {"sparsity": "search"}}, {"oneshot": {"sparsity": "search"}}],
            },
            "one search at most",
        ),
        ({"goal": {"quality": 0.9}, "stages": [{"quantize": {"bits": "search"}}]}, "cannot be"),
        (
            {"goal": {"quality": 0.9}, "stages": [{"prune": {"sparsity": {"search": [0.9, 0.5]}}}]},
            "0 < low < high < 1",
        ),
        ({"goal": {"quality": 1.5}, "stages": ["save"]}, "fraction of the dense quality"),
        ({"goal": {"size": 0.5}, "stages": ["save"]}, "key 'goal.size': unknown key"),
        ({"goal": {}, "stages": ["save"]}, "must be a mapping"),
        ({"goal": {"tolerance": 0.1}, "stages": ["save"]}, "states nothing to meet"),
        (
            {"goal": {"latency": {"ratio": 0.5, "batch": 8}}, "stages": ["save"]},
            "batch 8 is not among",
        ),
    ],
)
def test_schema_checks_goals_and_search_values(recipe: dict, expected: str | None) -> None:
    if expected is None:
        stages = recipe["stages"]
        recipe = {**recipe, "stages": [stages[0]]}
        loaded = load_recipe(recipe)
        assert loaded.knob is not None and loaded.knob.key == "sparsity"
        assert loaded.with_value(0.7).stages[0].kwargs["sparsity"] == 0.7
        return
    with pytest.raises(RecipeError, match=expected):
        load_recipe(recipe)


def test_searched_range_and_goal_survive_the_round_trip() -> None:
    text = (
        "goal: {quality: {min: 0.5}, file: 0.2}\n"
        "stages:\n  - prune: {sparsity: {search: [0.5, 0.9]}}\n  - save: {}\n"
    )
    recipe = load_recipe(text)
    assert (recipe.knob.low, recipe.knob.high) == (0.5, 0.9)
    assert recipe.goal.quality_min == 0.5 and recipe.goal.file == 0.2
    again = load_recipe(recipe)  # through to_dict
    assert again.knob == recipe.knob and again.goal == recipe.goal


# ------------------------------------------------------------------------------ end to end


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _density(model: nn.Module) -> float:
    """A quality stand-in that falls as pruning grows: the fraction of non-zero weights."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


RECIPE = {
    "measure": {"latency": False},
    "goal": {"quality": {"min": 0.42}, "tolerance": 0.01},
    "stages": [{"prune": {"sparsity": "search", "scope": "global"}}, {"save": {}}],
}


def test_quality_floor_search_end_to_end_and_resume(tmp_path) -> None:
    model, x = _mlp(), torch.randn(2, 16)
    out = tmp_path / "run"
    report = compress(model, RECIPE, evaluate=_density, example_inputs=x, out=out, progress=False)
    chosen = report.search.chosen.value
    # the most pruning whose density stays >= 0.42, to the tolerance: a little more misses
    assert report.goal_met and _density(report.model) >= 0.42
    more = prune(_mlp(), sparsity=chosen + 0.01, scope="global", progress=False).model
    assert _density(more) < 0.42
    assert report.stages[0].kwargs["sparsity"] == chosen
    assert not any(s.resumed for s in report.stages)  # all ran in this call, in a trial
    # the saved model is the chosen one, not the last trial's
    saved = load(out / "model", _mlp())
    assert _density(saved) == pytest.approx(_density(report.model))
    data = json.loads((out / "report.json").read_text())
    assert data["goal"]["met"] is True and len(data["search"]["trials"]) == len(
        report.search.trials
    )
    assert "goal met" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "goal met" in page
    if importlib.util.find_spec("matplotlib") is not None:
        assert "<h2>Search for the goal</h2>\n<img alt='Search for the goal'" in page

    again = compress(_mlp(), RECIPE, evaluate=_density, example_inputs=x, out=out, progress=False)
    assert all(t.reused for t in again.search.trials)  # nothing ran twice
    assert all(s.resumed for s in again.stages)
    pairs = zip(report.model.state_dict().values(), again.model.state_dict().values(), strict=True)
    for a, b in pairs:
        assert torch.equal(a, b)


def test_a_resumed_search_judges_saved_trials_by_the_current_goal(tmp_path) -> None:
    model, x, out = _mlp(), torch.randn(2, 16), tmp_path / "run"
    first = compress(model, RECIPE, evaluate=_density, example_inputs=x, out=out, progress=False)
    stricter = {**RECIPE, "goal": {"quality": {"min": 0.6}, "tolerance": 0.01}}
    again = compress(_mlp(), stricter, evaluate=_density, example_inputs=x, out=out,
                     progress=False)  # fmt: skip
    assert any(t.reused for t in again.search.trials)  # the first run's trials were reused ...
    chosen = again.search.chosen.value
    assert chosen < first.search.chosen.value
    # ... but judged against the new floor: the most pruning that keeps density >= 0.6
    assert again.goal_met and _density(again.model) >= 0.6
    more = prune(_mlp(), sparsity=chosen + 0.01, scope="global", progress=False).model
    assert _density(more) < 0.6
    # the saved records (which the latency re-time rule compares with) hold the new verdicts
    records = json.loads((out / "search" / "trials.json").read_text())
    for record in records.values():
        (check,) = record["checks"]
        assert check["target"] == 0.6 and check["met"] == (check["measured"] >= 0.6)


def test_target_search_in_memory_matches_the_folder_run(tmp_path) -> None:
    recipe = {
        "measure": {"latency": False},
        "goal": {"nonzeros": 0.4, "tolerance": 0.005},
        "stages": [{"prune": {"sparsity": {"search": [0.5, 0.95]}}}],
    }
    x = torch.randn(2, 16)
    in_memory = compress(_mlp(), recipe, example_inputs=x, progress=False)
    on_disk = compress(_mlp(), recipe, example_inputs=x, out=tmp_path / "r", progress=False)
    assert in_memory.search.chosen.value == on_disk.search.chosen.value
    check = next(c for c in in_memory.goal if c.name == "nonzeros")
    assert check.met and check.measured <= 0.4
    # one tolerance step less pruning would miss the budget
    looser = compress(
        _mlp(),
        {**recipe, "stages": [{"prune": {"sparsity": in_memory.search.chosen.value - 0.006}}]},
        example_inputs=x,
        progress=False,
    )
    assert looser.goal_met is False


def test_goal_without_search_is_checked_and_reported() -> None:
    recipe = {
        "measure": {"latency": False},
        "goal": {"nonzeros": 0.1},
        "stages": [{"prune": {"sparsity": 0.5}}],
    }
    report = compress(_mlp(), recipe, example_inputs=torch.randn(2, 16), progress=False)
    assert report.search is None and report.goal_met is False
    assert "goal NOT met" in str(report)


def test_a_missed_goal_says_which_check_missed(tmp_path, capsys) -> None:
    """Every line with a goal's checks (progress, trials, verdict; text and Markdown) marks
    the checks that failed, so a user need not compare each figure with its bound."""
    recipe = {
        "measure": {"latency": False},
        "goal": {"nonzeros": 0.9, "quality": {"min": 2.0}},  # the floor cannot be reached
        "stages": [{"prune": {"sparsity": "search"}}],
    }
    report = compress(
        _mlp(), recipe, evaluate=_density, example_inputs=torch.randn(2, 16), out=tmp_path / "r"
    )
    assert report.goal_met is False
    verdict = str(report).splitlines()[-1]
    assert verdict.startswith("goal NOT met: "), verdict
    assert "MISSED quality" in verdict and "MISSED nonzeros" not in verdict, verdict
    trials = [line for line in str(report).splitlines() if "[edge]" in line or "[bisect]" in line]
    assert trials and all("MISSED quality" in line for line in trials), trials
    assert "goal NOT met: " in capsys.readouterr().out  # the progress line too
    assert verdict in (tmp_path / "r" / "report.md").read_text()


def test_goal_inputs_and_inplace_are_checked_before_work(tmp_path) -> None:
    x, out = torch.randn(2, 16), tmp_path / "r"
    with pytest.raises(RecipeError, match="quality needs evaluate"):
        compress(_mlp(), RECIPE, example_inputs=x, out=out, progress=False)
    with pytest.raises(ValueError, match="inplace=True cannot"):
        compress(_mlp(), RECIPE, evaluate=_density, inplace=True, out=out, progress=False)
    assert not (out / "stages").exists()


def test_a_relative_quality_goal_shows_what_was_asked_beside_its_bound(tmp_path, capsys) -> None:
    """goal: {quality: 0.99} is checked against 0.99 x the dense figure; every line that shows
    the bound (progress, trials, verdict, reports) also says it is 99 % of dense, and of what."""
    from prunekit.recipes.goal import check_goal

    goal = Goal(quality=0.99)
    (check,) = check_goal(goal, {"quality": 0.981}, {"quality": 0.992})
    assert check.text == "quality 0.981 (goal >= 0.98208: 99% of dense 0.992)"
    assert check.met is False and check.target == pytest.approx(0.98208)
    # lower is better (perplexity): the bound is dense / 0.95
    (check,) = check_goal(Goal(quality=0.95), {"quality": 5.5}, {"quality": 5.263}, False)
    assert check.text == "quality 5.5 (goal <= 5.54: dense 5.263 / 0.95)"
    assert check.met is True
    # an absolute bound is shown as it was given
    (check,) = check_goal(Goal(quality_min=0.5), {"quality": 0.6}, {"quality": 0.9})
    assert check.text == "quality 0.6 (goal >= 0.5)"

    recipe = {
        "measure": {"latency": False},
        "goal": {"quality": 0.9},
        "stages": [{"prune": {"sparsity": "search"}}],
    }
    report = compress(
        _mlp(), recipe, evaluate=_density, example_inputs=torch.randn(2, 16), out=tmp_path / "r"
    )
    asked = "(goal >= 0.9: 90% of dense 1)"  # the dense density is 1
    lines = str(report).splitlines()
    assert asked in lines[-1] and lines[-1].startswith("goal ")
    trials = [line for line in lines if "[edge]" in line or "[bisect]" in line]
    assert trials and all(asked in line for line in trials), trials
    progress = [line for line in capsys.readouterr().out.splitlines() if "goal >=" in line]
    assert any(line.startswith("[prunekit compress] search") for line in progress), progress
    assert any(line.startswith("[prunekit compress] goal NOT met") for line in progress)
    assert all(asked in line for line in progress), progress
    assert lines[-1] in (tmp_path / "r" / "report.md").read_text()


# ------------------------------------------------------------------------------ timing noise


def _timed_by_density(outliers: dict[float, float], spread: float, calls: list[float]):
    """A stand-in for measure.latency: the ratio to dense is the first layer's weight density
    (1 - the sparsity searched), times ``outliers[density]`` on the first timing of a model of
    that density (one noisy burst)."""

    def latency(model, dense, example_inputs, settings):
        weight = model[0].weight
        density = round(int(torch.count_nonzero(weight)) / weight.numel(), 2)
        calls.append(density)
        ratio = density * outliers.pop(density, 1.0)
        return {
            str(b): {
                "ms": ratio,
                "dense_ms": 1.0,
                "ratio": ratio,
                "spread": spread,
                "dense_spread": spread,
            }  # fmt: skip
            for b in settings.batch_sizes
        }

    return latency


LATENCY_RECIPE = {
    "measure": {"batch_sizes": [1], "repeats": 3},
    "goal": {"latency": {"ratio": 0.6, "batch": 1}, "tolerance": 0.02},
    "stages": [{"prune": {"sparsity": {"search": [0.1, 0.9]}}}],
}


def test_a_noisy_latency_near_the_bound_is_re_timed_before_it_steers_the_search(
    monkeypatch, tmp_path, capsys
) -> None:
    """The trial at sparsity 0.5 is 0.5x dense, but its first timing caught a burst (0.65x,
    over the 0.6x bound): without a re-time the search moves to more pruning than the goal
    needs. Re-timed beside dense, its verdict comes from the median of five timings."""
    import prunekit.recipes.measure as measure_module

    calls: list[float] = []
    fake = _timed_by_density({0.5: 1.3}, spread=0.1, calls=calls)
    monkeypatch.setattr(measure_module, "latency", fake)
    report = compress(_mlp(), LATENCY_RECIPE, example_inputs=torch.randn(2, 16), out=tmp_path / "r")
    # the least pruning that is <= 0.6x dense (density <= 0.6): sparsity 0.4, to the tolerance
    assert report.goal_met
    assert 0.4 <= report.search.chosen.value <= 0.42, report.search.lines()
    at_half = next(t for t in report.search.trials if t.value == 0.5)
    (check,) = at_half.checks
    assert check.met and check.measured == pytest.approx(0.5)
    assert "re-timed: median of 5 timings 0.50-0.65x, first 0.65x" in check.text
    line = next(line for line in report.search.lines() if "sparsity=0.5 " in line)
    assert "re-timed" in line and "MISSED" not in line
    assert (
        "re-timing sparsity=0.5 beside dense: 0.65x is within the timing spread (10%)"
        in capsys.readouterr().out
    )
    # bounded: every trial timed once, plus at most four more once
    assert len(calls) <= 5 * len(report.search.trials)
    retimed = [t for t in report.search.trials if "re-timed" in t.checks[0].text]
    assert all(abs(t.checks[0].measured / 0.6 - 1) <= 0.1 + 1e-9 or t is at_half for t in retimed)
    far = [
        t
        for t in report.search.trials
        if t is not at_half and abs(t.checks[0].measured / 0.6 - 1) > 0.1
    ]
    assert far and not any("re-timed" in t.checks[0].text for t in far)  # clear verdicts kept
    # the chosen trial's rows carry the re-timed row, so the final verdict agrees with its trial
    final = report.stages[-1].metrics["latency"]["1"]
    assert report.goal[0].measured == pytest.approx(final["ratio"])
    assert report.goal[0].met == report.search.chosen.checks[0].met
    text = (tmp_path / "r" / "report.md").read_text()
    assert check.text in text  # the trial line in the report
    # the chosen trial (0.6x, at the bound) was re-timed too: a note under the stage table
    assert "re-timed" in report.search.chosen.checks[0].text
    note = "latency re-timed beside dense before the goal's verdict: 01-prune b1 0.60x"
    assert note in str(report) and note in text
    assert html.escape(note) in (tmp_path / "r" / "report.html").read_text()


def test_a_goal_without_a_search_is_re_timed_too(monkeypatch, capsys) -> None:
    """A recipe with a goal and no search: its one run at sparsity 0.5 (0.5x dense) first
    timed 0.65x over the 0.6x bound; re-timed beside dense, the goal is met."""
    import prunekit.recipes.measure as measure_module

    calls: list[float] = []
    monkeypatch.setattr(measure_module, "latency", _timed_by_density({0.5: 1.3}, 0.1, calls))
    recipe = {**LATENCY_RECIPE, "stages": [{"prune": {"sparsity": 0.5}}]}
    report = compress(_mlp(), recipe, example_inputs=torch.randn(2, 16), progress=True)
    (check,) = report.goal
    assert report.goal_met and check.measured == pytest.approx(0.5)
    assert "re-timed: median of 5 timings 0.50-0.65x, first 0.65x" in check.text
    assert "re-timing the compressed model beside dense" in capsys.readouterr().out
    assert calls.count(0.5) == 5  # timed once, then four more


def test_retime_rules() -> None:
    from prunekit.recipes.goal import retime_reason

    knob = Knob(0, "prune_structured", "target_params", 0.1, 0.95, -1)  # smaller compresses more
    goal = Goal(params=0.5, latency=0.8, latency_batch=32)

    def checks(ratio: float, params_met: bool = True) -> list[GoalCheck]:
        return [
            GoalCheck("params", 0.5, 0.3, params_met, ""),
            GoalCheck("latency b32", 0.8, ratio, ratio <= 0.8, ""),
        ]

    quiet = {"spread": 0.02, "dense_spread": 0.03}
    # near the bound: within the larger spread, at least 5 %
    assert "within the timing spread (5%)" in retime_reason(
        goal, knob, 0.3, checks(0.83), {"ratio": 0.83, **quiet}, []
    )
    assert retime_reason(goal, knob, 0.3, checks(0.85), {"ratio": 0.85, **quiet}, []) is None
    noisy = {"spread": 0.2, "dense_spread": 0.05}
    assert "within the timing spread (20%)" in retime_reason(
        goal, knob, 0.3, checks(0.95), {"ratio": 0.95, **noisy}, []
    )
    assert "within the timing spread (20%)" in retime_reason(
        goal, knob, 0.3, checks(0.66), {"ratio": 0.66, **noisy}, []
    )
    # latency does not decide the trial: another target missed
    assert retime_reason(goal, knob, 0.3, checks(0.83, False), {"ratio": 0.83, **quiet}, []) is None
    # once only
    done = {"ratio": 0.83, **quiet, "retimed": {"ratios": [0.83]}}
    assert retime_reason(goal, knob, 0.3, checks(0.83), done, []) is None
    # contradicting another trial: far from the bound, but a less compressed model (larger
    # target_params) met it, or a more compressed one missed it
    far = {"ratio": 1.2, **quiet}
    reason = retime_reason(goal, knob, 0.3, checks(1.2), far, [(0.5, checks(0.7))])
    assert reason == "missed, but the less compressed target_params=0.5 met it (0.70x)"
    assert retime_reason(goal, knob, 0.3, checks(1.2), far, [(0.2, checks(0.7))]) is None
    fast = {"ratio": 0.4, **quiet}
    reason = retime_reason(goal, knob, 0.3, checks(0.4), fast, [(0.2, checks(0.9))])
    assert reason == "met, but the more compressed target_params=0.2 missed it (0.90x)"
    assert retime_reason(goal, knob, 0.3, checks(0.4), fast, [(0.5, checks(0.9))]) is None
    # no latency goal, or not measured
    assert retime_reason(Goal(params=0.5), knob, 0.3, checks(0.83)[:1], None, []) is None
