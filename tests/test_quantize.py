"""quantize: zeros and masks kept, bounded error, straight-through gradient, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from conftest import SmallCNN, mlp
from prunekit.compress.quantize import (
    fake_quant_forward,
    fake_quantize,
    quantize,
    quantize_tensor,
)
from prunekit.masks import get_mask


def _weight(rows: int = 64, cols: int = 256, sparsity: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen)
    if sparsity:
        w[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    return w


@pytest.mark.parametrize("granularity", ["per_channel", "group:128", "group:100"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_zeros_stay_zero_and_error_is_bounded(bits, granularity, symmetric) -> None:
    w = _weight(sparsity=0.5)
    q = quantize_tensor(w, bits, granularity, symmetric)
    deq = q.dequantize()
    assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))
    rel = float((deq - w).norm() / w.norm())
    assert rel < (0.01 if bits == 8 else 0.15)
    assert q.codes.dtype == torch.int8
    lo, hi = (-127, 127) if symmetric and bits == 8 else (-128, 127) if bits == 8 else (-8, 7)
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi


def test_group_error_is_not_worse_than_per_channel() -> None:
    w = _weight()
    w[:, :8] *= 50  # outliers in a few columns hurt a per-channel scale
    err = {
        g: float((quantize_tensor(w, 4, g).dequantize() - w).norm() / w.norm())
        for g in ("per_channel", "group:32")
    }
    assert err["group:32"] < err["per_channel"]


def test_quantize_model_keeps_every_mask_and_zero(cnn: SmallCNN, cnn_input) -> None:
    pruned = prunekit.prune(cnn, 0.8).model
    before = {
        n: get_mask(m, "weight")
        for n, m in pruned.named_modules()
        if get_mask(m, "weight") is not None
    }
    report = quantize(pruned, bits=4, granularity="group:16")
    model = report.model
    assert model is not pruned
    for name, mask in before.items():
        module = model.get_submodule(name)
        assert torch.equal(get_mask(module, "weight"), mask)
        assert torch.all(module.weight[~mask] == 0)
    assert all(row.zeros_kept for row in report.layers)
    assert "head" not in {r.name.split(".")[0] for r in report.layers}  # same targets as prune
    text = str(report)
    assert "rel. error" in text and "conv1.weight" in text
    assert prunekit.stats(model).sparsity == pytest.approx(prunekit.stats(pruned).sparsity)
    assert model(cnn_input).shape == (4, 10)


def test_int8_model_error_and_inplace(cnn: SmallCNN) -> None:
    original = cnn.fc1.weight.detach().clone()
    model, report = quantize(cnn, bits=8, mode="int", inplace=True)
    assert model is cnn
    assert report.max_rel_error < 0.01
    assert not torch.equal(cnn.fc1.weight, original)
    assert report.layer("fc1").max_abs_error <= float(original.abs().max()) / 127


def test_ste_gradient_flows_and_masks_hold(cnn: SmallCNN, cnn_input) -> None:
    w = torch.randn(8, 16, requires_grad=True)
    fake_quantize(w, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    pruned = prunekit.prune(cnn, 0.5).model
    out = fake_quant_forward(pruned, cnn_input, bits=4)
    out.square().mean().backward()
    raw = pruned.fc1._parameters["weight"]
    mask = get_mask(pruned.fc1)
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    assert torch.all(raw.grad[~mask] == 0)
    assert not torch.equal(out, pruned(cnn_input))  # the weights really were quantized


def test_bad_inputs(cnn: SmallCNN) -> None:
    with pytest.raises(ValueError, match="use 8 .int8. or 4"):
        quantize(cnn, bits=3)
    with pytest.raises(ValueError, match="per_channel"):
        quantize(cnn, granularity="group:0")
    with pytest.raises(ValueError, match="per_channel"):
        quantize(cnn, granularity="per_tensor")
    with pytest.raises(ValueError, match="'fake' or 'int'"):
        quantize(cnn, mode="float")
    with pytest.raises(ValueError, match="matches no prunable layer"):
        quantize(cnn, targets="nope")
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(torch.ones(2, 2), bits=16)


def test_all_zero_rows_and_transposed_shapes() -> None:
    net = mlp()
    with torch.no_grad():
        net[0].weight[:5] = 0
    report = quantize(net, bits=8, targets=["0", "2"])
    assert torch.all(report.model[0].weight[:5] == 0)
    assert isinstance(report.model[0], nn.Linear)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_refused_with_the_layer_named(bad) -> None:
    torch.manual_seed(0)
    net = mlp((8, 16, 8, 4))
    with torch.no_grad():
        net[2].weight[3, 5] = bad
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kind = "1 NaN and 0 inf" if bad != bad else "0 NaN and 1 inf"
    for inplace in (False, True):
        with pytest.raises(ValueError, match=rf"2\.weight holds {kind} of its 128 values") as info:
            quantize(net, bits=8, inplace=inplace)
        assert "ignore=['2']" in str(info.value)
    for k, v in net.state_dict().items():  # nothing changed, not even the healthy layer 0
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num())
    assert not hasattr(net, "_prunekit_quant")
    # the layer left out: the others are quantized and the bad one is untouched
    model, report = quantize(net, bits=8, ignore=["2"])
    assert [r.name for r in report.layers] == ["0.weight"]
    assert torch.equal(model[2].weight.nan_to_num(), net[2].weight.nan_to_num())
    assert not torch.equal(model[0].weight, net[0].weight)
    with pytest.raises(ValueError, match=r"cannot quantize w: it holds"):
        quantize_tensor(net[2].weight, 8, name="w")
    with pytest.raises(ValueError, match=r"2\.weight"):
        fake_quant_forward(net, torch.randn(2, 8))


def test_nonfinite_weight_refused_by_prune() -> None:
    torch.manual_seed(0)
    net = mlp((8, 16, 8, 4))
    with torch.no_grad():
        net[0].weight[1, 1] = float("nan")
    before = net[0].weight.clone()
    for method in ("magnitude", "random"):
        with pytest.raises(ValueError, match=r"0\.weight holds 1 NaN and 0 inf of its 128"):
            prunekit.prune(net, sparsity=0.5, method=method, inplace=True)
    assert torch.equal(net[0].weight.isnan(), before.isnan())
    assert not any("_prunekit_mask" in k for k in net.state_dict())  # no mask was applied
    # left out by name, the rest prunes to the exact count
    report = prunekit.prune(net, sparsity=0.5, method="random", ignore=["0"])
    assert [(r.name, r.params, r.zeros) for r in report.layers] == [("2.weight", 128, 64)]


def test_the_report_counts_the_zeros_of_the_quantized_weights() -> None:
    # Row 0's scale is 100 / 127: its small weights round to 0 on the int8 grid. The report
    # counts the zeros the model has after quantization (what the stage table measures), and
    # says how many of them the rounding made.
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight.copy_(torch.full((8, 16), 0.25))
        net[0].weight[0, 0] = 100.0
        net[0].weight[0, 1:4] = 0.0  # pruned before: stay zero
        net[0].weight[0, 4:10] = 0.3  # rounds to 0 (0.3 < half a step of 0.787)
    report = quantize(net, bits=8)
    row = report.layer("0")
    after = int((report.model[0].weight == 0).sum())
    assert after == 3 + 6 + 6  # the 3 zeros, the six 0.3 and the six 0.25 left in row 0
    assert row.zeros == after
    assert row.rounded_to_zero == 12 and row.zeros_kept
    assert report.to_dict()["layers"][0]["zeros"] == after
    text = str(report)
    assert "rounded to 0" in text and f"{after:,}" in text.splitlines()[3]
