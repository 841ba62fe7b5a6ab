"""Per-group latency table and width allocation under a latency budget (measure faked: no timing).

The fake latency makes the first MLP layer's neurons (group "0") ten times as expensive per unit
as the second's (group "2"), and is linear, so the predicted latency is the real (fake) one.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import prunekit.graph.latency
from prunekit.analysis.latency_table import MIN_MS_PER_UNIT, LatencyTable, latency_table
from prunekit.analysis.structured_sensitivity import StructuredSensitivity, allocate_widths
from prunekit.graph.pruner import prune_structured

EXPENSIVE, CHEAP, BASE = 0.1, 0.01, 1.0


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()


def fake_ms(m: nn.Module) -> float:
    return BASE + EXPENSIVE * m[0].out_features + CHEAP * m[2].out_features


@pytest.fixture
def fake_measure(monkeypatch):
    calls = []

    def fake(models, example_inputs, *, threads=None, **_):
        calls.append(sorted(models))
        return {
            "ms": {n: fake_ms(m) for n, m in models.items()},
            "batch": 2,
            "threads": threads or 1,
            "repeats": 3,
            "device": "cpu",
        }

    monkeypatch.setattr(prunekit.graph.latency, "measure", fake)
    return calls


def test_table_ranks_the_expensive_group_first(fake_measure, tmp_path):
    net = mlp()
    table = latency_table(net, torch.randn(2, 8), ratios=(0.25, 0.5, 0.75), threads=1)
    assert table.ranked() == ["0", "2"]
    assert table.ms_per_unit["0"] == pytest.approx(EXPENSIVE)
    assert table.ms_per_unit["2"] == pytest.approx(CHEAP)
    assert table.points["0"] == [(4, pytest.approx(0.4)), (8, pytest.approx(0.8)),
                                 (12, pytest.approx(1.2))]  # fmt: skip
    assert table.dense_ms == pytest.approx(fake_ms(net))
    assert table.threads == 1 and table.cpu
    # dense and the group's pruned copies are timed in the same call
    assert fake_measure == [["dense", "k=12", "k=4", "k=8"]] * 2
    assert [m.out_features for m in (net[0], net[2])] == [16, 16]  # model left unchanged
    table.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["ms_per_unit"]["0"] == pytest.approx(0.1)
    assert LatencyTable.load(tmp_path / "t.json").ms_per_unit == table.ms_per_unit
    assert "ms/unit" in table.table()


def test_slope_is_floored_when_removal_saves_nothing(monkeypatch):
    def flat(models, example_inputs, **_):
        return {"ms": dict.fromkeys(models, 2.0), "batch": 2, "threads": 1, "repeats": 3,
                "device": "cpu"}  # fmt: skip

    monkeypatch.setattr(prunekit.graph.latency, "measure", flat)
    table = latency_table(mlp(), torch.randn(2, 8))
    assert set(table.ms_per_unit.values()) == {MIN_MS_PER_UNIT}


def sensitivity(curve_a, curve_b) -> StructuredSensitivity:
    return StructuredSensitivity(
        curves={"0": curve_a, "2": curve_b},
        sizes={"0": 16, "2": 16},
        unit_macs={"0": 1.0, "2": 1.0},
        steps={"0": 1, "2": 1},
        patterns={"0": "0", "2": "2"},
        dense_macs=40.0,
        metric="test",
    )


def test_latency_budget_removes_more_where_time_per_damage_is_highest(fake_measure):
    table = latency_table(mlp(), torch.randn(2, 8))
    same = [(0.25, 0.1), (0.5, 0.4), (0.75, 0.9)]
    result = sensitivity(same, same)
    by_macs = allocate_widths(result, 0.75)  # equal MACs and damage: an even split
    assert abs(by_macs["0"] - by_macs["2"]) <= 2 / 16 + 1e-9
    r = 0.8
    ratios = allocate_widths(result, r, cost=table)
    assert ratios["0"] >= ratios["2"] + 0.25  # group 0 saves 10x the ms per unit
    predicted = table.dense_ms - sum(ratios[n] * 16 * table.ms_per_unit[n] for n in ratios)
    assert predicted <= r * table.dense_ms + 1e-9
    # and not far below it: the allocation stops once the budget is met
    assert predicted > r * table.dense_ms - EXPENSIVE - 1e-9


def test_latency_budget_out_of_reach_or_wrong_form_says_so(fake_measure):
    table = latency_table(mlp(), torch.randn(2, 8))
    same = [(0.25, 0.1), (0.5, 0.4), (0.75, 0.9)]
    with pytest.raises(ValueError, match="below what the groups can reach"):
        allocate_widths(sensitivity(same, same), 0.3, cost=table)
    with pytest.raises(ValueError, match="fraction of the dense latency"):
        allocate_widths(sensitivity(same, same), 50.0, cost=table)


def test_prune_structured_allocates_under_target_latency(fake_measure):
    net = mlp()
    x = torch.randn(2, 8)
    calib = [torch.randn(32, 8)]
    report = prune_structured(
        net,
        x,
        unit="channel",
        allocation="sensitivity",
        target_latency=0.8,
        calib=calib,
        round_to=1,
        progress=False,
    )
    pruned = report.model
    assert report.settings["allocation"] == "sensitivity"
    assert report.settings["predicted_latency_ratio"] <= 0.8 + 1e-9
    # the measured latency is reported, and (the fake being linear) it meets the budget
    assert report.latency is not None
    assert report.latency.ratio <= 0.8 + 1e-9
    assert report.latency.ratio == pytest.approx(report.settings["predicted_latency_ratio"])
    assert fake_ms(pruned) / fake_ms(net) <= 0.8 + 1e-9
    with pytest.raises(ValueError, match="target_params"):
        prune_structured(
            mlp(), x, unit="channel", allocation="sensitivity", target_latency=0.8,
            target_params=0.5, calib=calib, progress=False,
        )  # fmt: skip


def test_cnn_table_and_allocation_meet_the_latency_budget(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip

    def conv_ms(m: nn.Module) -> float:
        return 1.0 + 0.2 * m[0].out_channels + 0.02 * m[2].out_channels

    def fake(models, example_inputs, *, threads=None, **_):
        return {"ms": {n: conv_ms(m) for n, m in models.items()}, "batch": 1, "threads": 1,
                "repeats": 3, "device": "cpu"}  # fmt: skip

    monkeypatch.setattr(prunekit.graph.latency, "measure", fake)
    x = torch.randn(1, 3, 8, 8)
    table = latency_table(net, x)
    assert table.ranked() == ["0", "2"]
    assert table.ms_per_unit["0"] == pytest.approx(0.2)
    report = prune_structured(
        net, x, unit="channel", allocation="sensitivity", target_latency=0.75,
        calib=[torch.randn(8, 3, 8, 8)], round_to=1, progress=False,
    )  # fmt: skip
    assert report.latency.ratio <= 0.75 + 1e-9
    assert report.model[0].out_channels < 8


def test_a_measured_overshoot_is_corrected_by_aiming_lower(monkeypatch):
    """Pruned models measure slower than the table's straight lines predict (a step the table
    never saw): the allocation is redone aiming lower until the measurement meets the budget."""
    dense_ms = fake_ms(mlp())

    def stepped(m: nn.Module) -> float:
        # widths off a multiple of 4 pay a fixed step, as odd channel counts do on a CPU; the
        # table measures 12 / 8 / 4 units and never sees it
        odd = m[0].out_features % 4 or m[2].out_features % 4
        return fake_ms(m) + (0.08 * dense_ms if odd else 0.0)

    def fake(models, example_inputs, *, threads=None, **_):
        ms = {n: (fake_ms(m) if n == "dense" else stepped(m)) for n, m in models.items()}
        return {"ms": ms, "batch": 2, "threads": 1, "repeats": 3, "device": "cpu"}

    monkeypatch.setattr(prunekit.graph.latency, "measure", fake)
    report = prune_structured(
        mlp(),
        torch.randn(2, 8),
        unit="channel",
        allocation="sensitivity",
        target_latency=0.8,
        calib=[torch.randn(32, 8)],
        round_to=1,
        progress=False,
    )
    assert report.settings["allocated_latency_budget"] < 0.8  # it aimed lower
    assert report.latency.ratio <= 0.8 * 1.025  # and the measurement meets the budget
    assert any("aiming lower" in n for n in report.notes)
