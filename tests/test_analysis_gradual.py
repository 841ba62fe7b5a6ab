"""GradualPruner with per-layer final sparsities: given (per_layer=) or measured (allocation=)."""

from __future__ import annotations

import pytest
import torch

from conftest import mlp
from prunekit.train import GradualPruner, PolynomialSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["0", "2", "4"]


def _sparsity(net, name: str) -> float:
    weight = net.get_submodule(name).weight
    return float((weight == 0).sum()) / weight.numel()


def _train(net, pruner, steps: int) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    pruner.optimizer = opt
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        opt.step()
        pruner.step()


def test_per_layer_ratios_hold_along_the_schedule_and_are_reached_at_the_end() -> None:
    torch.manual_seed(0)
    net = mlp((16, 64, 48, 8))
    schedule = PolynomialSchedule(final_sparsity=0.6, begin_step=0, end_step=10, power=1)
    per_layer = {"0": 0.9, "2": 0.45, "4": 0.3}
    pruner = GradualPruner(net, schedule, targets=LAYERS, per_layer=per_layer)
    _train(net, pruner, 5)
    half = {n: _sparsity(net, n) for n in LAYERS}
    assert 0 < pruner.sparsity < 0.6
    scale = pruner.sparsity / 0.6  # every layer at its final share of the scheduled sparsity
    for n in LAYERS:
        assert half[n] == pytest.approx(per_layer[n] * scale, abs=0.02)
    _train(net, pruner, 6)
    for n in LAYERS:
        assert _sparsity(net, n) == pytest.approx(per_layer[n], abs=1e-3)
    # resuming: the allocation travels in the state dict
    state = pruner.state_dict()
    fresh = GradualPruner(mlp((16, 64, 48, 8)), schedule, targets=LAYERS)
    fresh.load_state_dict(state)
    assert fresh.per_layer == pruner.per_layer


def test_sensitivity_allocation_meets_the_final_budget_exactly() -> None:
    torch.manual_seed(0)
    net = mlp((16, 64, 48, 8))
    data = [torch.randn(32, 16) for _ in range(2)]
    schedule = PolynomialSchedule(final_sparsity=0.8, begin_step=0, end_step=4)
    pruner = GradualPruner(net, schedule, targets=LAYERS, allocation="sensitivity", data=data)
    chosen = pruner.per_layer
    assert set(chosen) == {f"{n}.weight" for n in LAYERS}
    assert len({round(v, 3) for v in chosen.values()}) > 1  # not uniform
    _train(net, pruner, 5)
    sizes = {n: net.get_submodule(n).weight.numel() for n in LAYERS}
    zeros = sum(int((net.get_submodule(n).weight == 0).sum()) for n in LAYERS)
    assert zeros == round(0.8 * sum(sizes.values()))


def test_allocation_errors_say_what_is_accepted() -> None:
    net = mlp((16, 64, 48, 8))
    schedule = PolynomialSchedule(final_sparsity=0.5, begin_step=0, end_step=4)
    with pytest.raises(ValueError, match="N:M"):
        GradualPruner(net, schedule, pattern="2:4", targets=LAYERS, per_layer={"0": 0.5})
    with pytest.raises(ValueError, match="final_sparsity"):
        GradualPruner(net, lambda step: 0.1, targets=LAYERS, per_layer={"0": 0.5})
    with pytest.raises(ValueError, match=r"per_layer\['0'\]"):
        GradualPruner(net, schedule, targets=LAYERS, per_layer={"0": 1.5})
    with pytest.raises(ValueError, match="data="):
        GradualPruner(net, schedule, targets=LAYERS, allocation="sensitivity")
