"""GradualPruner with structured units: soft masks on whole units during training, surgery at
the end, lossless, resumable."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import mlp
from prunekit.masks import is_masked, raw_parameter
from prunekit.train import GradualPruner, PolynomialSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


class ResCNN(nn.Module):
    """stem -> BN -> [conv -> BN -> ReLU -> conv -> BN] + residual -> pool -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.head(x.mean((2, 3)))


def cnn_params(c: int, h: int) -> int:
    """Parameters of ResCNN with c residual-stream channels and h hidden channels."""
    return 27 * c + 2 * c + (9 * c * h + h) + 2 * h + (9 * h * c + c) + 2 * c + (4 * c + 4)


def mlp_params(sizes: tuple[int, ...]) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


CNN_X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
MLP_X = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))


def cnn_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(n)
    ]


def mlp_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 16, generator=g), torch.randint(0, 8, (16,), generator=g))
        for _ in range(n)
    ]


def train_step(model, opt, batch, pruner) -> None:
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()
    pruner.step()


def masked_slices_are_zero(model: nn.Module, pruner: GradualPruner) -> bool:
    """Every raw parameter slice of every removed unit is exactly zero."""
    modules = dict(model.named_modules())
    masks = pruner.masks()
    assert bool(masks) == (pruner._structured.removed_count > 0)
    for key, keep in masks.items():
        module_name, _, name = key.rpartition(".")
        assert is_masked(modules[module_name], name)
        raw = raw_parameter(modules[module_name], name).detach()
        if not bool((raw[~keep] == 0).all()):
            return False
    return True


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return out


SCHEDULE = dict(final_sparsity=0.5, begin_step=1, end_step=7, frequency=2)


def test_cnn_units_follow_schedule_stay_zero_and_surgery_is_lossless() -> None:
    torch.manual_seed(0)
    model = ResCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    schedule = PolynomialSchedule(**SCHEDULE)
    pruner = GradualPruner(
        model, schedule, method="l2", pattern="channel", example_inputs=CNN_X, optimizer=opt
    )
    assert pruner.structured and pruner._structured.total_units == 24  # 8 stream + 16 hidden
    for step, batch in enumerate(cnn_batches(10), start=1):
        train_step(model, opt, batch, pruner)
        expected = schedule.sparsity_at(step)
        assert pruner.sparsity == expected
        assert pruner._structured.removed_count == round(expected * 24)
        assert masked_slices_are_zero(model, pruner)
    assert pruner.unit_sparsity == 0.5
    assert is_masked(model.bn1, "weight") and is_masked(model.bn1, "bias")
    removed = pruner.removed_units()
    stream = next(v for k, v in removed.items() if "stem" in k)
    hidden = next(v for k, v in removed.items() if "conv1" in k)
    assert len(stream) + len(hidden) == 12
    # the removed channels are exactly zero on the residual stream, in train mode too
    assert torch.equal(model.bn1.running_mean[hidden], torch.zeros(len(hidden)))

    reference = eval_out(model, CNN_X)
    x_other = torch.randn(5, 3, 6, 6)
    reference_other = eval_out(model, x_other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smaller = pruner.finalize()
    assert smaller is model
    c, h = 8 - len(stream), 16 - len(hidden)
    assert model.conv1.weight.shape == (h, c, 3, 3) and model.bn0.num_features == c
    assert sum(p.numel() for p in model.parameters()) == cnn_params(c, h)
    assert cnn_params(c, h) < cnn_params(8, 16)
    torch.testing.assert_close(eval_out(model, CNN_X), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_out(model, x_other), reference_other, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        pruner.step()


def test_mlp_local_scope_counts_and_finalize() -> None:
    torch.manual_seed(0)
    model = mlp()  # 16 -> 32 -> 24 -> 8
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = PolynomialSchedule(**SCHEDULE)
    pruner = GradualPruner(
        model, schedule, pattern="neuron", scope="local", example_inputs=MLP_X, optimizer=opt
    )
    previous: dict[str, set[int]] = {}
    for step, batch in enumerate(mlp_batches(9), start=1):
        train_step(model, opt, batch, pruner)
        s = schedule.sparsity_at(step)
        counts = {k: len(v) for k, v in pruner.removed_units().items()}
        assert sorted(counts.values()) == sorted([round(s * 32), round(s * 24)])
        for k, v in pruner.removed_units().items():  # monotone: removed units stay removed
            assert previous.get(k, set()) <= set(v)
            previous[k] = set(v)
        assert masked_slices_are_zero(model, pruner)
        gone = sorted(previous["0"])  # the first hidden layer's neurons: next layer's columns
        assert bool((raw_parameter(model[2], "weight")[:, gone] == 0).all())
    reference = eval_out(model, MLP_X)
    pruner.finalize()
    assert [model[0].out_features, model[2].out_features] == [16, 12]
    assert sum(p.numel() for p in model.parameters()) == mlp_params((16, 16, 12, 8))
    torch.testing.assert_close(eval_out(model, MLP_X), reference, rtol=1e-5, atol=1e-6)


def test_resume_gives_identical_masks_and_weights() -> None:
    schedule = PolynomialSchedule(**SCHEDULE)
    data = cnn_batches(8, seed=3)

    def build():
        torch.manual_seed(1)
        model = ResCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = GradualPruner(
            model, schedule, pattern="channel", example_inputs=CNN_X, optimizer=opt
        )
        return model, opt, pruner

    model, opt, pruner = build()
    for batch in data[:4]:
        train_step(model, opt, batch, pruner)
    saved = copy.deepcopy(
        {"pruner": pruner.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}
    )
    for batch in data[4:]:
        train_step(model, opt, batch, pruner)

    model2, opt2, pruner2 = build()
    pruner2.load_state_dict(saved["pruner"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert list(pruner2.removed_units().values()) == saved["pruner"]["removed"]
    assert sum(map(len, saved["pruner"]["removed"])) == round(schedule.sparsity_at(4) * 24)
    for batch in data[4:]:
        train_step(model2, opt2, batch, pruner2)
    assert pruner2.step_count == pruner.step_count and pruner2.history == pruner.history
    assert pruner2.removed_units() == pruner.removed_units()
    masks, masks2 = pruner.masks(), pruner2.masks()
    assert masks.keys() == masks2.keys()
    assert all(torch.equal(masks[k], masks2[k]) for k in masks)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_online_taylor_and_heads() -> None:
    torch.manual_seed(0)
    model = TinyAttention()
    x = torch.randn(2, 5, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruner(
        model,
        PolynomialSchedule(final_sparsity=0.5, begin_step=1, end_step=3, frequency=1),
        method="taylor",
        pattern="head",
        example_inputs=x,
        optimizer=opt,
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        batch = (torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
        train_step(model, opt, batch, pruner)
    assert pruner.unit_sparsity == 0.5
    assert masked_slices_are_zero(model, pruner)
    reference = eval_out(model, x)
    pruner.finalize()
    assert model.attn.num_heads == 2
    torch.testing.assert_close(eval_out(model, x), reference, rtol=1e-5, atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        GradualPruner(mlp(), 0.5, pattern="channel")
    with pytest.raises(ValueError, match="depth"):
        GradualPruner(mlp(), 0.5, pattern="layer", example_inputs=MLP_X)
    with pytest.raises(ValueError, match="structured"):
        GradualPruner(mlp(), 0.5).finalize(surgery=True)


def test_layernorm_over_pruned_channels_is_not_lossless_and_warns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    pruner = GradualPruner(model, 0.25, pattern="channel", example_inputs=MLP_X)
    assert pruner.unit_sparsity == 0.25  # a constant schedule prunes at construction
    with pytest.warns(UserWarning, match="does not compute exactly"):
        pruner.finalize()
    assert model[0].out_features == 24 and model[1].normalized_shape == (24,)
