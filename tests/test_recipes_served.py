"""Recipes time a model with sparse layers as prunekit serves it: after ``prunekit.accelerate``
at each measured batch size (``measure.accelerate``: auto, true, false)."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from torch import nn

import prunekit.recipes.measure as measure_module
from prunekit.recipes import compress
from prunekit.recipes.measure import MeasureSettings, retime
from prunekit.recipes.schema import RecipeError, load_recipe
from prunekit.recipes.served import has_sparse_layers

# the module: prunekit.runtime exports a function of the same name
accelerate_module = importlib.import_module("prunekit.runtime.accelerate")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))


def _spies(monkeypatch) -> tuple[list[tuple[int, float]], list[int], list[int]]:
    """Record accelerate's calls (input batch, density of the first layer), the ids of the
    models it returned, and the ids of the models ``_timed`` timed."""
    calls: list[tuple[int, float]] = []
    returned: list[int] = []
    timed: list[int] = []
    real_accelerate, real_timed = accelerate_module.accelerate, measure_module._timed

    def accelerate(model, inputs, **kwargs):
        weight = model[0].weight
        calls.append((inputs.shape[0], float((weight != 0).float().mean())))
        fast, report = real_accelerate(model, inputs, **kwargs)
        returned.append(id(fast))
        return fast, report

    def spy_timed(model, dense, example_inputs, settings):
        timed.append(id(model))
        return real_timed(model, dense, example_inputs, settings)

    monkeypatch.setattr(accelerate_module, "accelerate", accelerate)
    monkeypatch.setattr(measure_module, "_timed", spy_timed)
    return calls, returned, timed


def test_sparse_stages_are_timed_after_accelerate_at_each_batch(monkeypatch) -> None:
    calls, returned, timed = _spies(monkeypatch)
    recipe = {
        "stages": [{"prune": {"sparsity": 0.7}}, {"quantize": {"bits": 8, "mode": "int"}}],
        "measure": {"batch_sizes": [1, 4], "repeats": 3},
    }
    report = compress(_mlp(), recipe, example_inputs=torch.randn(2, 64), progress=False)
    # each stage (not the dense reference, timed beside them) after accelerate, once per batch
    # size, on inputs of that batch
    assert [b for b, _ in calls] == [1, 4, 1, 4]
    assert all(d == pytest.approx(0.3, abs=0.01) for _, d in calls)
    assert timed == returned  # what was timed is what accelerate returned
    for stage in report.stages:
        for batch in ("1", "4"):
            swapped = stage.metrics["latency"][batch]["accelerated"]
            assert swapped["layers"] == 2 and 0 <= swapped["swapped"] <= 2
    text = str(report)
    assert "latency timed as served, after prunekit.accelerate" in text
    any_swapped = any(
        s.metrics["latency"][b]["accelerated"]["swapped"] for s in report.stages for b in ("1", "4")
    )
    assert ("x*)" in text) == any_swapped  # * marks timings with sparse kernels in them
    assert re.search(r"01-prune b1 [0-2]/2, 01-prune b4 [0-2]/2, 02-quantize b1 [0-2]/2", text)


@pytest.mark.parametrize(
    ("setting", "sparsity", "accelerated"),
    [(False, 0.7, False), (None, 0.1, False), (True, 0.1, True)],
)
def test_measure_accelerate_setting(monkeypatch, setting, sparsity, accelerated) -> None:
    calls, _, _ = _spies(monkeypatch)
    measure = {"batch_sizes": [1], "repeats": 3}
    if setting is not None:
        measure["accelerate"] = setting
    recipe = {"stages": [{"prune": {"sparsity": sparsity}}], "measure": measure}
    report = compress(_mlp(), recipe, example_inputs=torch.randn(1, 64), progress=False)
    assert bool(calls) == accelerated
    assert ("accelerated" in report.stages[0].metrics["latency"]["1"]) == accelerated


def test_a_retime_of_a_served_latency_accelerates_once_and_keeps_the_mark(monkeypatch) -> None:
    calls, returned, timed = _spies(monkeypatch)
    model = _mlp()
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.8] = 0
    settings = MeasureSettings(batch_sizes=[1], repeats=3)
    first = measure_module.latency(model, _mlp(), torch.randn(1, 64), settings)["1"]
    assert "accelerated" in first and len(calls) == 1
    row = retime(model, _mlp(), torch.randn(1, 64), settings, 1, first, "near the bound")
    assert len(calls) == 2 and timed[-4:] == [returned[-1]] * 4  # one accelerate, four timings
    assert row["accelerated"] == first["accelerated"]
    assert len(row["retimed"]["ratios"]) == 5


def test_has_sparse_layers_counts_masked_zeros() -> None:
    import prunekit

    model = _mlp()
    assert not has_sparse_layers(model)
    pruned = prunekit.prune(model, sparsity=0.5, progress=False).model  # masked, not finalized
    assert has_sparse_layers(pruned)
    assert not has_sparse_layers(pruned, zeros=0.6)


def test_measure_accelerate_must_be_a_bool() -> None:
    with pytest.raises(RecipeError, match="measure.*accelerate.*must be bool"):
        load_recipe({"stages": [{"prune": {"sparsity": 0.5}}], "measure": {"accelerate": "yes"}})


def test_without_room_for_the_accelerated_copy_the_model_is_timed_as_it_is(monkeypatch) -> None:
    import prunekit.recipes.served as served_module

    def no_room(*args, **kwargs):
        raise MemoryError("the copy needs 9 GB, 1 GB available")

    monkeypatch.setattr(served_module, "served_at", no_room)
    recipe = {"stages": [{"prune": {"sparsity": 0.7}}], "measure": {"batch_sizes": [1]}}
    with pytest.warns(UserWarning, match="timed without accelerate"):
        report = compress(_mlp(), recipe, example_inputs=torch.randn(1, 64), progress=False)
    row = report.stages[0].metrics["latency"]["1"]
    assert "accelerated" not in row and "9 GB" in row["served_as_is"]
    assert "latency timed without accelerate, as it is: 01-prune b1 (" in str(report)


def test_auto_leaves_models_off_the_cpu_as_they_are() -> None:
    from prunekit.recipes.served import serves_accelerated

    model = _mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    assert serves_accelerated(model, None)
    meta = _mlp().to("meta")  # stands in for a GPU model: not where the kernels run
    assert not serves_accelerated(meta, None)
    assert serves_accelerated(meta, True) and not serves_accelerated(model, False)


def test_the_progress_says_when_a_stage_is_timed_as_served(capsys) -> None:
    recipe = {
        "stages": [{"prune": {"sparsity": 0.1}}, {"prune": {"sparsity": 0.7}}],
        "measure": {"batch_sizes": [1, 4], "repeats": 3},
    }
    compress(_mlp(), recipe, example_inputs=torch.randn(1, 64), progress=True)
    out = capsys.readouterr().out
    assert "timing 01-prune as served" not in out  # 10 %: timed as it is
    assert "timing 02-prune as served: prunekit.accelerate at batch 1, 4" in out
