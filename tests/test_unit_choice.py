"""The default unit with a MAC target: widths, or whole blocks when widths run too slow for their
MACs and the blocks keep the outputs as close (fake latency: no timing here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit.graph as pg
from prunekit.graph import latency as latency_module
from prunekit.graph import unit_choice
from test_structured_speed import Tower

pytestmark = pytest.mark.usefixtures("one_thread", "lanes_8")

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
IDLE = [1, 2, 4, 6, 7, 9]


def idle_tower() -> nn.Module:
    """The 10-block residual MLP of test_structured_speed, blocks ``IDLE`` returning their input
    (removing them changes nothing)."""
    model = Tower().eval()
    with torch.no_grad():
        for i in IDLE:
            model.blocks[i].down.weight.zero_()
            model.blocks[i].down.bias.zero_()
    return model


@pytest.fixture
def lanes_8(monkeypatch):
    """The default multiple as on an AVX2 CPU (8), whatever this machine has."""
    monkeypatch.setattr(latency_module, "cpu_round_to", lambda: 8)


def block_cost_measure(per_block: float, calls: list):
    """A model's latency: ``per_block`` ms per block it has plus 2 ms scaled by its MACs (dense
    10 blocks): with a large ``per_block`` widths barely speed it up, blocks do."""
    dense_macs = pg.count(Tower().eval(), X).macs

    def measure(models, example_inputs, *, threads=None, **_):
        calls.append(sorted(models))
        ms = {
            name: per_block * len(m.blocks) + 2.0 * pg.count(m, example_inputs).macs / dense_macs
            for name, m in models.items()
        }
        return {"ms": ms, "batch": 4, "threads": 1, "repeats": 1, "device": "cpu"}

    return measure


def test_blocks_replace_widths_that_run_too_slow_for_their_macs(monkeypatch) -> None:
    model = idle_tower()
    calls: list = []
    monkeypatch.setattr(latency_module, "measure", block_cost_measure(1.0, calls))
    with pytest.warns(UserWarning, match=r"channel widths ran only 1\.\d\dx faster at 2\.0\dx"):
        report = pg.prune_structured(model, X, target_macs=0.5, progress=False)
    assert report.settings["unit"] == "layer"
    assert report.settings["unit_switched_from"] == "channel"
    # the head's MACs take 6 of 10 blocks; the idle ones go (influence 0): outputs unchanged
    assert sorted(report.removed_layers) == sorted(f"blocks.{i}" for i in IDLE)
    assert report.macs_ratio <= 0.5
    torch.testing.assert_close(report.model(X), model(X))
    assert ["blocks", "dense", "widths"] in calls  # all three timed side by side
    chosen = report.settings["unit_choice"]
    assert chosen["chosen"] == "blocks"
    assert chosen["candidates"]["blocks"]["output_error"] == pytest.approx(0.0, abs=1e-6)
    assert chosen["candidates"]["widths"]["output_error"] > 0.0
    # the report's latency is that measurement's (dense: 10 blocks + 2 ms of MACs)
    assert report.latency.dense_ms == pytest.approx(12.0)
    assert report.latency.pruned_ms == pytest.approx(chosen["candidates"]["blocks"]["ms"])
    assert "so whole blocks were removed instead" in report.notes[0]
    header = str(report).splitlines()[0]  # the measurement is told in the note, not dumped here
    assert "unit_switched_from=channel" in header and "candidates" not in header
    assert len(model.blocks) == 10  # a copy, as asked


def test_widths_stay_when_blocks_change_the_outputs_more(monkeypatch) -> None:
    model = idle_tower()
    monkeypatch.setattr(latency_module, "measure", block_cost_measure(1.0, []))
    errors = iter([0.1, 0.5])  # widths, then blocks

    monkeypatch.setattr(unit_choice, "output_error", lambda dense, net, x: next(errors))
    report = pg.prune_structured(model, X, target_macs=0.5, progress=False)
    assert report.settings["unit"] == "channel" and "unit_switched_from" not in report.settings
    assert len(report.model.blocks) == 10 and report.macs_ratio <= 0.5
    assert report.settings["unit_choice"]["chosen"] == "widths"
    measured = [n for n in report.notes if "whole blocks were measured too" in n]
    assert len(measured) == 1 and "their outputs are further from the dense model's" in measured[0]
    assert not [n for n in report.notes if "unit='layer' removes whole blocks" in n]  # no hint
    # the widths' latency is from the same three-way measurement
    assert report.latency.pruned_ms == pytest.approx(
        report.settings["unit_choice"]["candidates"]["widths"]["ms"]
    )


def test_no_blocks_are_built_when_widths_run_as_fast_as_their_macs(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(latency_module, "measure", block_cost_measure(0.0, calls))
    report = pg.prune_structured(idle_tower(), X, target_macs=0.5, progress=False)
    assert report.settings["unit"] == "channel" and "unit_choice" not in report.settings
    assert not any("blocks" in c for c in calls)


def test_inplace_switch_changes_the_model_itself(monkeypatch) -> None:
    monkeypatch.setattr(latency_module, "measure", block_cost_measure(1.0, []))
    with pytest.warns(UserWarning, match="whole blocks were removed instead"):
        reference = pg.prune_structured(idle_tower(), X, target_macs=0.5, progress=False)
    model = idle_tower()
    with pytest.warns(UserWarning, match="whole blocks were removed instead"):
        report = pg.prune_structured(model, X, target_macs=0.5, inplace=True, progress=False)
    assert report.model is model and len(model.blocks) == 4
    assert report.removed_layers == reference.removed_layers
    assert model._prunekit_structure == reference.model._prunekit_structure
    torch.testing.assert_close(model(X), reference.model(X))


def test_inplace_widths_change_the_model_itself(monkeypatch) -> None:
    monkeypatch.setattr(latency_module, "measure", block_cost_measure(1.0, []))
    errors = iter([0.1, 0.5])
    monkeypatch.setattr(unit_choice, "output_error", lambda dense, net, x: next(errors))
    model = idle_tower()
    report = pg.prune_structured(model, X, target_macs=0.5, inplace=True, progress=False)
    assert report.model is model and len(model.blocks) == 10
    assert pg.count(model, X).macs == report.macs_after < report.macs_before


@pytest.mark.parametrize(
    "kwargs",
    [{"unit": "channel"}, {"round_to": 1}, {"importance": "l1"}, {"target_params": 0.9},
     {"measure_latency": False}],
)  # fmt: skip
def test_explicit_choices_never_switch_to_blocks(monkeypatch, kwargs) -> None:
    calls: list = []
    monkeypatch.setattr(latency_module, "measure", block_cost_measure(1.0, calls))
    report = pg.prune_structured(idle_tower(), X, target_macs=0.5, progress=False, **kwargs)
    assert report.settings["unit"] == "channel" and len(report.model.blocks) == 10
    assert not any("blocks" in c for c in calls)


def test_widths_stay_when_blocks_are_barely_faster(monkeypatch) -> None:
    def measure(models, example_inputs, *, threads=None, **_):
        ms = {
            name: 10.0 if name == "dense" else 7.95 if len(m.blocks) < 10 else 8.0
            for name, m in models.items()
        }  # widths 1.25x at about 2x fewer MACs: short; blocks under 1 % faster than them
        return {"ms": ms, "batch": 4, "threads": 1, "repeats": 1, "device": "cpu"}

    monkeypatch.setattr(latency_module, "measure", measure)
    monkeypatch.setattr(unit_choice, "output_error", lambda dense, net, x: 0.2)  # level
    report = pg.prune_structured(idle_tower(), X, target_macs=0.5, progress=False)
    assert report.settings["unit_choice"]["chosen"] == "widths"
    assert len(report.model.blocks) == 10
    assert report.notes[-1].endswith("Kept the widths: they are not 3 % faster")


def test_no_room_for_the_blocks_copy_keeps_the_widths(monkeypatch) -> None:
    monkeypatch.setattr(latency_module, "measure", block_cost_measure(1.0, []))
    widths = pg.prune_structured(idle_tower(), X, target_macs=0.5, unit="channel", progress=False)

    def no_room(**_):
        raise MemoryError("a copy of the model would not fit")

    call = {"model": idle_tower(), "example_inputs": X, "inplace": False, "threads": None}
    report = unit_choice.blocks_if_faster(call, widths, no_room, {})
    assert report is widths and len(report.model.blocks) == 10
    assert "not an option: a copy of the model would not fit" in report.notes[-1]
