"""Hardware-aware structured pruning: default width rounding, targets met with the rounding,
``round_to=1``, ``target_latency`` (with a fake latency measurement: no timing here), and the
latency in the report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import prunekit.graph as pg
from prunekit.graph import latency as latency_module
from prunekit.graph.plan import group_multiple

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 24, generator=torch.Generator().manual_seed(0))
IMG = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
WIDTHS = [64, 40, 20, 10]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers, cin = [], 24
    for w in WIDTHS:
        layers += [nn.Linear(cin, w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers, nn.Linear(cin, 5)).eval()


def convnet(widths=(32, 64, 48, 32)) -> nn.Sequential:
    """A plain 3x3 conv chain (padding 1, 8x8 maps): MACs = 64 * 9 * sum(c_in * c_out)."""
    torch.manual_seed(0)
    layers, cin = [], 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers, nn.Conv2d(cin, 4, 1, bias=False)).eval()


def chain_macs(widths: list[int]) -> int:
    """The obvious reference for convnet(): every conv's MACs from its channel counts."""
    chans = [3, *widths]
    return sum(64 * 9 * a * b for a, b in zip(chans, chans[1:], strict=False)) + 64 * widths[-1] * 4


def fake_measure(dense_macs: int, overhead: float = 0.2, calls: list | None = None):
    """A stand-in for prunekit.graph.latency.measure: a model's latency is
    ``10 ms * (overhead + (1 - overhead) * its MACs / dense_macs)`` (MACs from pg.count)."""

    def measure(models, example_inputs, *, threads=None, **_):
        if calls is not None:
            calls.append(sorted(models))
        ms = {
            name: 10.0 * (overhead + (1 - overhead) * pg.count(m, example_inputs).macs / dense_macs)
            for name, m in models.items()
        }
        return {"ms": ms, "batch": 1, "threads": threads or 1, "repeats": 1, "device": "cpu"}

    return measure


@pytest.fixture
def lanes_8(monkeypatch):
    """The default multiple as on an AVX2 CPU (8), whatever this machine has."""
    monkeypatch.setattr(latency_module, "cpu_round_to", lambda: 8)


@pytest.fixture
def no_timing(monkeypatch):
    def measure(models, example_inputs, *, threads=None, **_):
        return {"ms": dict.fromkeys(models, 1.0), "batch": 4, "threads": 1, "repeats": 1,
                "device": "cpu"}  # fmt: skip

    monkeypatch.setattr(latency_module, "measure", measure)


# --------------------------------------------------------------------------- rounding


def test_group_multiple_halves_for_narrow_groups() -> None:
    assert [group_multiple(n, 16) for n in (64, 32, 31, 16, 10, 3)] == [16, 16, 8, 8, 4, 1]
    assert [group_multiple(n, 8) for n in (64, 16, 15, 8)] == [8, 8, 4, 4]
    assert group_multiple(64, None) == group_multiple(64, 1) == 1


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_default_round_to_keeps_fast_widths(lanes_8, no_timing, ratio: float) -> None:
    model = mlp()
    report = pg.prune_structured(model, X, ratio=ratio, progress=False)
    assert report.settings["round_to"] == 8
    want = []
    for n in WIDTHS:  # reference: keep n - round(ratio * n), rounded up to the group's multiple
        m = group_multiple(n, 8)
        want.append(min(n, math.ceil((n - round(ratio * n)) / m) * m))
    got = [layer.out_features for layer in report.model if isinstance(layer, nn.Linear)][:-1]
    assert got == want
    assert all(w % 8 == 0 or w == n for w, n in zip(got[:2], WIDTHS[:2], strict=True))
    assert all(w <= n for w, n in zip(got, WIDTHS, strict=True))


def test_round_to_one_opts_out(lanes_8, no_timing) -> None:
    report = pg.prune_structured(mlp(), X, ratio=0.3, round_to=1, progress=False)
    got = [layer.out_features for layer in report.model if isinstance(layer, nn.Linear)][:-1]
    assert got == [n - round(0.3 * n) for n in WIDTHS] == [45, 28, 14, 7]
    assert report.settings["round_to"] == 1


def test_rounding_respects_min_keep_and_full_width(lanes_8, no_timing) -> None:
    report = pg.prune_structured(mlp(), X, ratio=0.99, min_keep=3, progress=False)
    got = [g.kept for g in report.groups]
    # 3 rounded up to each group's multiple (8, 8, 8, 4), never above the width
    assert [group_multiple(n, 8) for n in WIDTHS] == [8, 8, 8, 4]
    assert got == [8, 8, 8, 4]
    report = pg.prune_structured(mlp(), X, ratio=0.99, min_keep=9, progress=False)
    assert [g.kept for g in report.groups] == [16, 16, 16, 10]  # 12 > 10: its full width


def test_target_macs_met_with_rounding_and_lands_just_below(lanes_8, no_timing) -> None:
    widths = [32, 64, 48, 32]
    model = convnet(widths)
    dense = chain_macs(widths)
    assert pg.count(model, IMG).macs == dense  # the reference counts what prunekit counts
    report = pg.prune_structured(model, IMG, target_macs=0.5, progress=False)
    kept = [g.kept for g in report.groups]
    assert all(k % 8 == 0 for k in kept)
    assert report.macs_after == chain_macs(kept) <= 0.5 * dense
    assert report.macs_ratio == pytest.approx(report.macs_after / dense)
    # at or just below: no group can take its next step of 8 without breaking the target
    for i, k in enumerate(kept):
        if k < widths[i]:
            grown = [*kept[:i], k + 8, *kept[i + 1 :]]
            assert chain_macs(grown) > 0.5 * dense, (kept, i)
    assert report.macs_ratio > 0.45


def test_target_params_with_default_rounding(lanes_8, no_timing) -> None:
    model = mlp()
    report = pg.prune_structured(model, X, target_params=0.5, progress=False)
    assert report.params_after <= 0.5 * report.params_before
    assert all(g.kept % group_multiple(g.units, 8) == 0 or g.kept == g.units for g in report.groups)


def test_unreachable_with_rounding_says_so(lanes_8, no_timing) -> None:
    with pytest.raises(ValueError, match="round_to=8"):
        pg.prune_structured(convnet(), IMG, target_macs=0.01, progress=False)


# --------------------------------------------------------------------------- latency


def test_report_holds_measured_latency(monkeypatch) -> None:
    calls: list = []
    dense = pg.count(mlp(), X).macs
    monkeypatch.setattr(latency_module, "measure", fake_measure(dense, 0.2, calls))
    report = pg.prune_structured(mlp(), X, ratio=0.5, round_to=1, progress=False)
    lat = report.latency
    assert calls == [["dense", "pruned"]]  # side by side, once
    assert lat.dense_ms == pytest.approx(10.0)
    assert lat.ratio == pytest.approx(0.2 + 0.8 * report.macs_ratio)
    assert "latency 10 ms ->" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["latency"]["ratio"] == pytest.approx(lat.ratio)
    off = pg.prune_structured(mlp(), X, ratio=0.5, measure_latency=False, progress=False)
    assert off.latency is None and len(calls) == 1


def test_inplace_measures_dense_before_surgery(monkeypatch) -> None:
    calls: list = []
    model = mlp()
    dense = pg.count(model, X).macs
    monkeypatch.setattr(latency_module, "measure", fake_measure(dense, 0.0, calls))
    report = pg.prune_structured(model, X, ratio=0.5, round_to=1, inplace=True, progress=False)
    assert calls == [["dense"], ["pruned"]]
    assert report.latency.ratio == pytest.approx(report.macs_ratio)


@pytest.mark.parametrize("overhead", [0.0, 0.2, 0.4])
def test_target_latency_converges(monkeypatch, overhead: float) -> None:
    model = convnet()
    dense = pg.count(model, IMG).macs
    calls: list = []
    monkeypatch.setattr(latency_module, "measure", fake_measure(dense, overhead, calls))
    report = pg.prune_structured(model, IMG, target_latency=0.5, round_to=1, progress=False)
    assert abs(report.latency.ratio / 0.5 - 1) <= 0.05
    # the reported latency is the one of the returned model
    assert report.latency.ratio == pytest.approx(overhead + (1 - overhead) * report.macs_ratio)
    assert len(calls) <= 8 and all(c == ["dense", "pruned"] for c in calls)
    assert "target_latency 0.5" in report.notes[-1]
    assert report.settings["target_latency"] == 0.5


def test_target_latency_with_default_rounding(monkeypatch, lanes_8) -> None:
    model = convnet()
    dense = pg.count(model, IMG).macs
    monkeypatch.setattr(latency_module, "measure", fake_measure(dense, 0.1))
    report = pg.prune_structured(model, IMG, target_latency=0.5, progress=False)
    assert abs(report.latency.ratio / 0.5 - 1) <= 0.10
    assert all(g.kept % 8 == 0 for g in report.groups)


def test_unreachable_latency_says_so_and_changes_nothing(monkeypatch) -> None:
    model = convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = pg.count(model, IMG).macs
    monkeypatch.setattr(latency_module, "measure", fake_measure(dense, 0.9))
    with pytest.raises(ValueError, match="target_latency=0.5 cannot be reached"):
        pg.prune_structured(model, IMG, target_latency=0.5, inplace=True, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_unreachable_latency_when_fewer_macs_run_slower(monkeypatch) -> None:
    # narrow layers that run slower (oneDNN below its vector width): the latency ratio stops
    # falling at half the MACs and rises below it, so the target is out of reach although the
    # closest try is not the smallest model; it must say so, not return a 0.72 model silently
    model = convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = pg.count(model, IMG).macs

    def measure(models, example_inputs, *, threads=None, **_):
        def ms(m) -> float:
            share = pg.count(m, example_inputs).macs / dense
            return 10.0 if share == 1 else (7.2 if share >= 0.4 else 7.4)

        ms_ = {n: ms(m) for n, m in models.items()}
        return {"ms": ms_, "batch": 1, "threads": 1, "repeats": 1, "device": "cpu"}

    monkeypatch.setattr(latency_module, "measure", measure)
    with pytest.raises(ValueError, match=r"cannot be reached.*ratio 0\.72"):
        pg.prune_structured(model, IMG, target_latency=0.5, inplace=True, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_latency_target_missed_within_reach_warns(monkeypatch) -> None:
    model = convnet()
    dense = pg.count(model, IMG).macs

    def measure(
        models, example_inputs, *, threads=None, **_
    ):  # a jump: 0.8 or 0.3, nothing between
        ratio = {n: 1.0 if n == "dense" else (0.8 if pg.count(m, example_inputs).macs > 0.3 * dense else 0.3)
                 for n, m in models.items()}  # fmt: skip
        return {"ms": {n: 10 * r for n, r in ratio.items()}, "batch": 1, "threads": 1,
                "repeats": 1, "device": "cpu"}  # fmt: skip

    monkeypatch.setattr(latency_module, "measure", measure)
    with pytest.warns(UserWarning, match="target_latency=0.5 not reached"):
        report = pg.prune_structured(model, IMG, target_latency=0.5, round_to=1, progress=False)
    assert report.latency.ratio in (0.8, 0.3)


# --------------------------------------------------------------------------- depth


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Tower(nn.Module):
    def __init__(self, n: int = 10, outputs: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Residual() for _ in range(n))
        self.head = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def per_block_measure(fixed_ms: float, calls: list):
    """A model's latency: ``fixed_ms`` plus 1 ms per block it still has."""

    def measure(models, example_inputs, *, threads=None, **_):
        calls.append(sorted(models))
        ms = {name: fixed_ms + len(m.blocks) for name, m in models.items()}
        return {"ms": ms, "batch": 4, "threads": 1, "repeats": 1, "device": "cpu"}

    return measure


def test_depth_target_latency_removes_the_lowest_scored_blocks(monkeypatch) -> None:
    model = Tower().eval()
    idle = [1, 2, 4, 6, 7, 9]
    with torch.no_grad():
        for i in idle:  # these blocks return their input: influence 0, they go first
            model.blocks[i].down.weight.zero_()
            model.blocks[i].down.bias.zero_()
    calls: list = []
    monkeypatch.setattr(latency_module, "measure", per_block_measure(2.0, calls))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    report = pg.prune_structured(model, x, unit="layer", target_latency=0.5, progress=False)
    # dense: 2 + 10 = 12 ms; 0.5 is 6 ms: exactly 6 blocks removed, the idle ones
    assert sorted(report.removed_layers) == sorted(f"blocks.{i}" for i in idle)
    assert len(report.model.blocks) == 4
    assert report.latency.ratio == pytest.approx(0.5)
    torch.testing.assert_close(report.model(x), model(x))
    assert 1 <= len(calls) <= 8 and all(c == ["dense", "pruned"] for c in calls)
    assert "target_latency 0.5" in report.notes[-1] and "6 of 10 blocks" in report.notes[-1]
    assert report.settings["target_latency"] == 0.5


@pytest.mark.parametrize("asked", [0.3, 0.62, 0.9])
def test_depth_target_latency_lands_on_the_closest_count(monkeypatch, asked: float) -> None:
    calls: list = []
    monkeypatch.setattr(latency_module, "measure", per_block_measure(0.0, calls))
    report = pg.prune_structured(Tower().eval(), torch.randn(4, 16), unit="layer",
                                 target_latency=asked, progress=False)  # fmt: skip
    assert len(report.model.blocks) == round(10 * asked)  # 1 ms per block, nothing fixed
    assert report.latency.ratio == pytest.approx(round(10 * asked) / 10)


def test_depth_target_latency_out_of_reach_says_so_and_changes_nothing(monkeypatch) -> None:
    model = Tower().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(latency_module, "measure", per_block_measure(10.0, []))
    # dense 20 ms; with every block but one gone (min_keep=1) still 11 ms: 0.55
    with pytest.raises(
        ValueError, match=r"target_latency=0.5 cannot be reached by removing layers"
    ):
        pg.prune_structured(model, torch.randn(4, 16), unit="layer", target_latency=0.5,
                            inplace=True, progress=False)  # fmt: skip
    assert len(model.blocks) == 10
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("overhead", [0.0, 0.6])
def test_a_speedup_short_of_the_mac_ratio_points_at_depth(monkeypatch, overhead: float) -> None:
    model, x = Tower().eval(), torch.randn(4, 16)
    dense = pg.count(model, x).macs
    monkeypatch.setattr(latency_module, "measure", fake_measure(dense, overhead))
    report = pg.prune_structured(model, x, target_macs=0.5, round_to=1, progress=False)
    hints = [n for n in report.notes if "unit='layer' removes whole blocks" in n]
    if overhead == 0.0:  # the time follows the MACs: nothing to say
        assert not hints
    else:  # 0.6 + 0.4 * ~0.5 of the time is left: about 1.25x at about 2x fewer MACs
        assert len(hints) == 1 and "10 removable" in hints[0]


def test_depth_target_met_within_a_hair_does_not_cost_another_block(no_timing) -> None:
    # 20 blocks of 1,024 MACs and a head of 16: half the blocks leave 10,256 / 20,496 = 50.04 %
    report = pg.prune_structured(Tower(20, outputs=1).eval(), torch.randn(1, 16), unit="layer",
                                 target_macs=0.5, progress=False)  # fmt: skip
    assert len(report.removed_layers) == 10
    assert report.macs_ratio == pytest.approx(10256 / 20496)
    # a head big enough to matter (64 MACs: 50.16 %) still costs another block
    report = pg.prune_structured(Tower(20, outputs=4).eval(), torch.randn(1, 16), unit="layer",
                                 target_macs=0.5, progress=False)  # fmt: skip
    assert len(report.removed_layers) == 11 and report.macs_ratio <= 0.5


def test_width_out_of_reach_points_at_depth(monkeypatch) -> None:
    dense = pg.count(convnet(), IMG).macs
    monkeypatch.setattr(latency_module, "measure", fake_measure(dense, 0.9))
    with pytest.raises(ValueError, match="unit='layer' removes whole blocks"):
        pg.prune_structured(convnet(), IMG, target_latency=0.5, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_latency": 1.5}, "target_latency must be a number in"),
        ({"target_latency": 0.0}, "target_latency must be a latency fraction"),
        ({"target_latency": 0.5, "target_macs": 0.5}, "not both"),
        ({"threads": 0}, "threads must be a positive integer"),
    ],
)
def test_bad_latency_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        pg.prune_structured(mlp(), X, progress=False, **kwargs)


class PadNet(nn.Module):
    """16 channels padded with 8 zero channels on each side before a 32-input conv (the
    option-A shortcut of CIFAR ResNets): the 16-unit group lives in a 32-wide layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.pad(torch.relu(self.conv1(x)), (0, 0, 0, 0, 8, 8))
        return self.conv3(torch.relu(self.conv2(y)))


def test_a_group_inside_a_wider_layer_keeps_the_full_multiple(no_timing) -> None:
    torch.manual_seed(0)
    model = PadNet().eval()
    kept = {
        g.name: g.kept
        for g in pg.prune_structured(model, IMG, ratio=0.5, round_to=16, progress=False).groups
    }
    # conv1's 16 channels sit in conv2's 32-wide input: 8 of them would make it 24 wide
    assert kept == {"conv1": 16, "conv2": 8}  # conv2's group is 16 wide everywhere: multiple 8
    pruned = pg.prune_structured(model, IMG, ratio=0.5, round_to=8, progress=False).model
    assert pruned.conv2.in_channels == 24 and pruned.conv1.out_channels == 8


# --------------------------------------------------------------------------- hardware-aware


def test_group_multiple_without_halving_keeps_the_full_multiple() -> None:
    assert [group_multiple(n, 16, halve=False) for n in (64, 31, 16, 10)] == [16, 16, 16, 16]
    assert [group_multiple(n, 16) for n in (31, 16)] == [8, 8]


def test_time_per_mac_is_each_units_share_of_its_modules_time() -> None:
    from prunekit.graph.groups import build_groups
    from prunekit.graph.hardware import time_per_mac
    from prunekit.graph.plan import CostModel
    from prunekit.graph.trace import trace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    graph = trace(net, x)
    groups = build_groups(graph)
    times = {"0": 2.0, "1": 9.0, "2": 1.5, "4": 0.5}
    per_mac = time_per_mac(graph, groups, CostModel(graph), times)
    got = {g.name: per_mac[g.index] for g in groups}
    # reference by hand: a hidden unit of layer 0 is 1/8 of layer 0's rows and 1/8 of layer 2's
    # columns (ReLU holds no parameter); it carries 5 rows * (4 + 6) MACs
    assert got["0"] == pytest.approx((2.0 / 8 + 1.5 / 8) / (5 * (4 + 6)))
    assert got["2"] == pytest.approx((1.5 / 6 + 0.5 / 6) / (5 * (8 + 3)))


class FakeCost:
    def __init__(self, per_unit: dict[int, float], n: dict[int, int]) -> None:
        self.per_unit, self.n = per_unit, n

    def evaluate(self, roots):
        removed = {i for i in self.n if i in set(int(r) for r in roots)}
        return sum(self.per_unit[i] * self.n[i] for i in self.n if i not in removed), 0.0


def test_weights_are_time_per_mac_over_the_mac_weighted_mean_clipped() -> None:
    from types import SimpleNamespace

    import numpy as np

    from prunekit.graph import hardware

    # three groups of one unit each (its root is its index), MACs 1, 3 and 4
    groups = [SimpleNamespace(index=i, roots=np.array([i])) for i in range(3)]
    cost = FakeCost({0: 1.0, 1: 3.0, 2: 4.0}, {0: 1, 1: 1, 2: 1})
    w = hardware.weights(groups, cost, {0: 4.0, 1: 1.0, 2: 0.5})
    mean = (4.0 * 1 + 1.0 * 3 + 0.5 * 4) / 8
    # 4 / mean = 3.6 and 0.5 / mean = 0.44 are clipped to [0.5, 2]
    assert w == pytest.approx({0: 2.0, 1: 1.0 / mean, 2: 0.5})
    assert hardware.weights(groups, cost, {0: 1.0}) == {0: 1.0, 1: 1.0, 2: 1.0}
    over = hardware.weighted_overrides(groups, {0: 2.0, 1: 1.0, 2: 0.5}, 0.5, {2: 0.1})
    assert over == pytest.approx({0: 0.75, 1: 0.5, 2: 0.1})


def candidate_measure(favour: str | None, calls: list):
    """Times every model 10 ms, but the candidate named ``favour`` 5 ms."""

    def measure(models, example_inputs, *, threads=None, **_):
        calls.append(sorted(models))
        ms = {n: (5.0 if n == favour else 10.0) for n in models}
        return {"ms": ms, "batch": 1, "threads": 1, "repeats": 5, "device": "cpu"}

    return measure


@pytest.mark.parametrize("favour", [None, "time"])
def test_default_target_keeps_the_fastest_measured_candidate(monkeypatch, lanes_8, favour) -> None:
    widths = [32, 64, 48, 32]
    model = convnet(widths)
    dense = chain_macs(widths)
    calls: list = []
    monkeypatch.setattr(latency_module, "measure", candidate_measure(favour, calls))
    # module times: the first conv costs 50x more per unit than the others
    times = {"0": 50.0, "2": 1.0, "4": 1.0, "6": 1.0, "8": 0.1}
    monkeypatch.setattr(latency_module, "module_times", lambda *a, **k: times)
    report = pg.prune_structured(model, IMG, target_macs=0.5, progress=False)
    hw = report.settings["hardware"]
    assert len(calls) == 1 and calls[0][0] == "dense"  # every candidate in one measurement
    assert set(hw["candidates"]) <= {"uniform", "whole", "time", "time-whole"}
    assert {"uniform", "time"} <= set(hw["candidates"])
    assert hw["chosen"] == (favour or "uniform")
    kept = [g.kept for g in report.groups]
    assert report.macs_after == chain_macs(kept) <= 0.5 * dense  # the target still holds
    assert report.latency.pruned_ms == (5.0 if favour else 10.0)
    uniform = pg.prune_structured(
        model, IMG, target_macs=0.5, measure_latency=False, progress=False
    )
    if favour == "time":  # the first conv's group lost more than under one uniform ratio
        assert kept[0] < uniform.groups[0].kept
    else:
        assert kept == [g.kept for g in uniform.groups]


def test_an_explicit_round_to_measures_no_candidates(monkeypatch) -> None:
    calls: list = []
    model = convnet()
    monkeypatch.setattr(latency_module, "measure", candidate_measure(None, calls))
    report = pg.prune_structured(model, IMG, target_macs=0.5, round_to=8, progress=False)
    assert "hardware" not in report.settings and calls == [["dense", "pruned"]]


def test_choose_needs_speed_and_no_worse_outputs() -> None:
    from prunekit.graph.hardware import choose

    ms = {"uniform": 10.0, "whole": 9.0, "time": 8.0, "time-whole": 9.9}
    # the fastest wins when its outputs are as close to dense as uniform's
    assert (
        choose(ms, {"uniform": 0.2, "whole": 0.2, "time": 0.21, "time-whole": 0.1}, "uniform")
        == "time"
    )
    # a faster candidate with clearly worse outputs does not replace uniform ...
    err = {"uniform": 0.2, "whole": 0.2, "time": 0.3, "time-whole": 0.1}
    assert choose(ms, err, "uniform") == "whole"
    # ... nor one less than 3 % faster, however good
    assert choose({"uniform": 10.0, "a": 9.8}, {"uniform": 0.2, "a": 0.0}, "uniform") == "uniform"
    assert choose({"uniform": 10.0, "a": 5.0}, {"uniform": 0.2, "a": 0.5}, "uniform") == "uniform"


def test_output_error_is_relative_over_every_output_and_keeps_modes() -> None:
    from prunekit.graph.hardware import output_error

    class Two(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.bn, self.scale = nn.BatchNorm1d(4), scale

        def forward(self, x):
            return {"a": x.sum(1), "b": (self.bn(x) * self.scale, torch.arange(3))}

    x = torch.randn(8, 4)
    dense, other = Two(1.0), Two(1.5)
    with torch.no_grad():
        ref = torch.cat([x.sum(1), dense.bn.eval()(x).flatten()]).double()
        diff = torch.cat([torch.zeros(8), 0.5 * dense.bn(x).flatten()]).double()
    dense.train()
    got = output_error(dense, other, x)
    assert got == pytest.approx(float(diff.norm() / ref.norm()), rel=1e-6)
    assert dense.training and other.training  # modes restored
    assert torch.equal(dense.bn.running_mean, torch.zeros(4))  # ran in eval: no stat updates


def test_a_faster_candidate_with_worse_outputs_is_not_kept(monkeypatch, lanes_8) -> None:
    from prunekit.graph import hardware

    model = convnet([32, 64, 48, 32])
    monkeypatch.setattr(latency_module, "measure", candidate_measure("time", []))
    times = {"0": 50.0, "2": 1.0, "4": 1.0, "6": 1.0, "8": 0.1}
    monkeypatch.setattr(latency_module, "module_times", lambda *a, **k: times)
    real = hardware.output_error
    errors: list = []

    def worse_unless_uniform(dense, net, inputs):  # the 1st distinct candidate is uniform
        errors.append(real(dense, net, inputs))
        return errors[-1] * (1.0 if len(errors) == 1 else 2.0)

    monkeypatch.setattr(hardware, "output_error", worse_unless_uniform)
    report = pg.prune_structured(model, IMG, target_macs=0.5, progress=False)
    hw = report.settings["hardware"]
    assert hw["chosen"] == "uniform" and hw["candidates"]["time"]["ms"] == 5.0
    assert hw["candidates"]["time"]["output_error"] > hw["candidates"]["uniform"]["output_error"]


def block_cost_measure(calls: list | None = None):
    """A model's latency: 1 ms fixed per block it still has plus 2 ms scaled by its MACs: widths
    alone get no lower than about 10 / 12 of dense; removing blocks gets anywhere."""

    def measure(models, example_inputs, *, threads=None, **_):
        if calls is not None:
            calls.append(sorted(models))
        dense = pg.count(Tower().eval(), example_inputs).macs
        ms = {
            name: len(m.blocks) + 2.0 * pg.count(m, example_inputs).macs / dense
            for name, m in models.items()
        }
        return {"ms": ms, "batch": 4, "threads": 1, "repeats": 1, "device": "cpu"}

    return measure


def test_default_unit_removes_blocks_when_widths_cannot_reach_the_latency(monkeypatch) -> None:
    model, x = Tower().eval(), torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(latency_module, "measure", block_cost_measure())
    with pytest.warns(UserWarning, match="channel widths reach at best a latency ratio of 0.92"):
        report = pg.prune_structured(model, x, target_latency=0.5, progress=False)
    assert report.settings["unit"] == "layer"
    assert report.settings["unit_switched_from"] == "channel"
    assert "Removing whole blocks instead" in report.notes[0]
    # dense 12 ms; 6 ms is 5 blocks gone (5 + 2 * 5/10 = 6, the head's MACs aside)
    assert len(report.model.blocks) == 5 and len(report.removed_layers) == 5
    assert report.latency.ratio == pytest.approx(0.5, abs=1e-3)
    assert len(model.blocks) == 10  # a copy, as asked (inplace=False)


def test_explicit_channel_unit_never_switches_to_blocks(monkeypatch) -> None:
    model, x = Tower().eval(), torch.randn(4, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(latency_module, "measure", block_cost_measure())
    for kwargs in ({"unit": "channel"}, {"round_to": 1}, {"importance": "l1"}, {"min_keep": 2}):
        with pytest.raises(pg.LatencyOutOfReach, match="cannot be reached by removing"):
            pg.prune_structured(model, x, target_latency=0.5, inplace=True, progress=False,
                                **kwargs)  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_switch_to_blocks_that_cannot_reach_either_says_both(monkeypatch) -> None:
    model, x = Tower().eval(), torch.randn(4, 16)
    monkeypatch.setattr(latency_module, "measure", block_cost_measure())
    with pytest.raises(ValueError, match=r"(?s)by removing \['channel'\].*blocks instead failed"):
        pg.prune_structured(model, x, target_latency=0.05, inplace=True, progress=False)
    assert len(model.blocks) == 10


def test_switch_to_blocks_keeps_every_bound_asked(monkeypatch) -> None:
    """The depth latency search cannot also meet target_params: with it, no switch (the widths'
    error stands, nothing changed); layers= narrows the blocks the note counts."""
    model, x = Tower().eval(), torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(latency_module, "measure", block_cost_measure())
    with pytest.raises(pg.LatencyOutOfReach, match="cannot be reached by removing"):
        pg.prune_structured(model, x, target_latency=0.6, target_params=0.9, inplace=True,
                            progress=False)  # fmt: skip
    assert len(model.blocks) == 10
    with pytest.warns(UserWarning, match=r"unit='layer', 5 removable"):
        report = pg.prune_structured(model, x, target_latency=0.8, layers=r"re:blocks\.[0-4]",
                                     progress=False)  # fmt: skip
    assert report.settings["unit_switched_from"] == "channel"
    assert set(report.removed_layers) <= {f"blocks.{i}" for i in range(5)}


def test_depth_latency_search_refuses_a_parameter_target_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="takes no target_params"):
        pg.prune_structured(Tower().eval(), torch.randn(4, 16), unit="layer",
                            target_latency=0.5, target_params=0.8, progress=False)  # fmt: skip


def jump_or_blocks_measure(depth_ratio=None):
    """Widths (all 10 blocks kept): 0.6 of dense down to 40 % of the MACs, then 0.2, so a
    width search ends at 0.6 without trying the smallest model. Fewer blocks: 1 ms per block
    plus 2 ms scaled by the MACs (dense 12 ms), or ``depth_ratio`` of dense when given."""

    def measure(models, example_inputs, *, threads=None, **_):
        dense = pg.count(Tower().eval(), example_inputs).macs
        ms = {}
        for name, m in models.items():
            share = pg.count(m, example_inputs).macs / dense
            if len(m.blocks) == 10:
                ms[name] = 12.0 * (1.0 if share > 0.999 else 0.6 if share > 0.4 else 0.2)
            elif depth_ratio is not None:
                ms[name] = 12.0 * depth_ratio
            else:
                ms[name] = len(m.blocks) + 2.0 * share
        return {"ms": ms, "batch": 4, "threads": 1, "repeats": 1, "device": "cpu"}

    return measure


def test_default_unit_removes_blocks_when_the_width_search_misses(monkeypatch, lanes_8) -> None:
    model, x = Tower().eval(), torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(latency_module, "measure", jump_or_blocks_measure())
    with pytest.warns(
        UserWarning, match="channel widths came no closer than a latency ratio of 0.60"
    ):
        report = pg.prune_structured(model, x, target_latency=0.5, progress=False)
    assert report.settings["unit_switched_from"] == "channel"
    assert len(report.model.blocks) == 5
    assert report.latency.ratio == pytest.approx(0.5, abs=1e-3)
    # an explicit channel unit keeps the widths' closest model, with the miss warned about
    with pytest.warns(UserWarning, match="not reached within"):
        widths = pg.prune_structured(model, x, target_latency=0.5, unit="channel", progress=False)
    assert widths.latency.ratio == pytest.approx(0.6) and len(widths.model.blocks) == 10


def test_a_width_miss_that_blocks_cannot_mend_returns_the_widths_closest(
    monkeypatch, lanes_8
) -> None:
    model, x = Tower().eval(), torch.randn(4, 16)
    fake, width_tries = jump_or_blocks_measure(depth_ratio=0.9), []

    def counting(models, example_inputs, **kwargs):
        pruned = models.get("pruned")
        if pruned is not None and len(pruned.blocks) == 10:
            width_tries.append(1)  # a candidate of the width search, timed
        return fake(models, example_inputs, **kwargs)

    monkeypatch.setattr(latency_module, "measure", counting)
    with pytest.warns(UserWarning, match="not reached within"):
        report = pg.prune_structured(model, x, target_latency=0.5, progress=False)
    assert report.settings["unit"] == "channel" and "unit_switched_from" not in report.settings
    assert report.latency.ratio == pytest.approx(0.6)
    assert report.notes[0].startswith("removing whole blocks instead could not reach it either")
    # the widths' closest model is the search's own try, not the result of a second search
    fallback_tries, width_tries[:] = len(width_tries), []
    with pytest.warns(UserWarning, match="not reached within"):
        alone = pg.prune_structured(model, x, target_latency=0.5, unit="channel", progress=False)
    assert fallback_tries == len(width_tries) > 1
    assert [tuple(p.shape) for p in report.model.parameters()] == [
        tuple(p.shape) for p in alone.model.parameters()
    ]
