"""Pruning at initialisation: SNIP and SynFlow as prunekit.prune criteria."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from conftest import SmallCNN
from prunekit.masks import get_mask
from prunekit.scores.synflow import make_synflow
from prunekit.train import prune_at_init

SIZES = (32, 128, 128, 16, 10)
LAYERS = ["0", "2", "4", "6"]


pytestmark = pytest.mark.usefixtures("one_thread")


def deep_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(SIZES[:-1], SIZES[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def flow(model: nn.Module) -> float:
    """Synaptic flow of the pruned network: 0 when some layer cuts every path."""
    net = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
        return float(net(torch.ones(1, SIZES[0], dtype=torch.float64)).sum())


def test_synflow_prunes_no_layer_entirely_at_99_percent() -> None:
    for seed in range(3):
        net = deep_mlp(seed)
        report = prunekit.prune(
            net, 0.99, method="synflow", data=[torch.zeros(1, SIZES[0])], targets=LAYERS
        )
        assert report.zeros == round(0.99 * report.params)
        assert all(row.nonzeros > 0 for row in report.layers), [r.nonzeros for r in report.layers]
        assert flow(report.model) > 0
        # The contrast that makes the test meaningful: global magnitude empties layers here.
        magnitude = prunekit.prune(net, 0.99, targets=LAYERS)
        assert any(row.nonzeros == 0 for row in magnitude.layers)
        single_shot = prunekit.prune(
            net, 0.99, method=make_synflow(iterations=1), data=[torch.zeros(1, 32)], targets=LAYERS
        )
        assert any(row.nonzeros == 0 for row in single_shot.layers)


def test_synflow_uses_no_data_values_and_leaves_the_model_alone() -> None:
    net = deep_mlp()
    before = copy.deepcopy(net.state_dict())
    a = prunekit.prune(net, 0.9, method="synflow", data=[torch.zeros(1, 32)], targets=LAYERS)
    b = prunekit.prune(net, 0.9, method="synflow", data=[torch.randn(7, 32)], targets=LAYERS)
    for name in LAYERS:
        assert torch.equal(get_mask(getattr(a.model, name)), get_mask(getattr(b.model, name)))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net[0].weight.dtype == torch.float32


def test_synflow_on_a_cnn_through_prune_at_init() -> None:
    torch.manual_seed(0)
    report = prune_at_init(
        SmallCNN(), 0.98, "synflow", example_input=torch.zeros(1, 1, 8, 8), progress=False
    )
    assert report.zeros == round(0.98 * report.params)
    assert all(row.nonzeros > 0 for row in report.layers)


def test_snip_scores_are_abs_weight_times_batch_gradient() -> None:
    net = deep_mlp()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    report = prune_at_init(net, 0.9, "snip", data=[batch], loss_fn=loss, targets=LAYERS)
    params = [getattr(net, n).weight for n in LAYERS]
    grads = torch.autograd.grad(loss(net, batch), params)
    scores = torch.cat([(w * gr).abs().reshape(-1) for w, gr in zip(params, grads, strict=True)])
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.topk(scores, round(0.9 * scores.numel()), largest=False).indices] = False
    got = torch.cat([get_mask(getattr(report.model, n)).reshape(-1) for n in LAYERS])
    assert int((got != keep).sum()) == 0
    assert all(p.grad is None for p in net.parameters())  # user's .grad untouched


def test_snip_sums_gradients_before_the_absolute_value() -> None:
    # Two batches whose gradients cancel on the only weight scored: SNIP sees zero.
    net = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    data = [torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, 1.0]])]
    stats = prunekit.scores.get_criterion("snip").collect(
        net,
        prunekit.targets.resolve_targets(net, "0"),
        data=data,
        loss_fn=lambda m, x: m(x).sum(),
        progress=False,
    )
    assert stats["0.weight"]["snip_grad"].tolist() == [[0.0, 2.0]]


def test_prune_at_init_says_what_each_method_needs() -> None:
    with pytest.raises(ValueError, match="example_input"):
        prune_at_init(deep_mlp(), 0.9, "synflow")
    with pytest.raises(ValueError, match="loss_fn"):
        prune_at_init(deep_mlp(), 0.9, "snip", data=[torch.zeros(1, 32)])
    with pytest.raises(ValueError, match="accepted"):
        prune_at_init(deep_mlp(), 0.9, "grasp")
    with pytest.raises(TypeError, match="token ids"):
        prune_at_init(
            deep_mlp(), 0.9, "synflow", example_input=torch.zeros(1, 32, dtype=torch.long)
        )
