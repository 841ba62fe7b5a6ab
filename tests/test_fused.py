"""Sibling sparse layers that read the same input run as one stacked product
(prunekit.runtime.fused, through accelerate): same outputs as the separate layers, whatever the
call order or input, put back where the model cannot take them, and decoded exactly."""

from __future__ import annotations

import copy
import importlib
import pickle

import pytest
import torch
from torch import nn

import prunekit
from prunekit.runtime import kernels
from prunekit.runtime.accelerate import SparseLinear, accelerate, deaccelerate
from prunekit.runtime.fused import SharedInputProduct, SparseLinearSlice, shared_input_groups

acc_mod = importlib.import_module("prunekit.runtime.accelerate")
needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="no C compiler for the kernels")


class Attention(nn.Module):
    """q, k, v read the same hidden state; o reads another tensor. ``flatten``: a model that
    needs q contiguous (``.view(-1)``)."""

    def __init__(self, width: int = 96, flatten: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(width, width, bias=bias), nn.Linear(width, width, bias=False)
        self.v, self.o = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.flatten:
            q = q.view(-1).view(q.shape)
        mixed = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.o(mixed)


def _sparse(model: nn.Module, sparsity: float = 0.8) -> nn.Module:
    torch.manual_seed(0)
    return prunekit.finalize(prunekit.prune(model, sparsity=sparsity, scope="local",
                                            progress=False).model)  # fmt: skip


def _layer(out: int, inp: int, bias: bool = True) -> SparseLinear:
    w = torch.randn(out, inp) * (torch.rand(out, inp) > 0.7)
    return SparseLinear.from_dense(w, torch.randn(out) if bias else None, format="csr")


def test_groups_are_layers_called_once_with_one_tensor_object() -> None:
    x, y = torch.ones(2), torch.ones(2)
    first = {"q": x, "k": x, "v": x, "o": y, "twice": x, "alone": y + 1}
    calls = {"q": 1, "k": 1, "v": 1, "o": 1, "twice": 2, "alone": 1}
    # "o" and "alone" read equal values but other objects; "twice" runs twice
    assert shared_input_groups(first, calls) == [["q", "k", "v"]]


@needs_kernels
def test_the_product_is_computed_once_per_input_and_again_for_a_changed_one() -> None:
    torch.manual_seed(0)
    parts = [_layer(8, 16), _layer(4, 16, bias=False)]
    stacked = SparseLinear.from_dense(
        torch.cat([p.dense_weight() for p in parts]),
        torch.cat([parts[0].bias, torch.zeros(4)]),
        format="csr",
    )
    product = SharedInputProduct(stacked, [8, 4], [True, False])
    slices = [SparseLinearSlice(product, i) for i in range(2)]
    computed = []
    real = stacked.forward
    stacked.forward = lambda x: computed.append(1) or real(x)

    x = torch.randn(3, 16)
    for s, p in zip(slices, parts, strict=True):
        torch.testing.assert_close(s(x), p(x))
    assert len(computed) == 1  # the second slice read the first one's product
    # in reverse order, with another input, and after an in-place change of the same input
    x2 = torch.randn(3, 16)
    torch.testing.assert_close(slices[1](x2), parts[1](x2))
    x2.mul_(2)  # bumps its version: the cached product is stale
    torch.testing.assert_close(slices[0](x2), parts[0](x2))
    torch.testing.assert_close(slices[1](x2), parts[1](x2))
    assert len(computed) == 3
    # a slice read twice in a row recomputes (the product was dropped once all parts were read)
    torch.testing.assert_close(slices[0](x), parts[0](x))
    torch.testing.assert_close(slices[0](x), parts[0](x))
    # copies keep the sharing and drop the cached activation
    del stacked.forward  # the counting wrapper
    product._latest = ("stale",)
    for clone in (copy.deepcopy(slices), pickle.loads(pickle.dumps(slices))):
        assert clone[0].product is clone[1].product and clone[0].product._latest is None
        torch.testing.assert_close(clone[1](x), parts[1](x))
    # decoded: each sibling's own weight, and a bias only where it had one
    for s, p in zip(slices, parts, strict=True):
        dense = s.to_dense()
        assert torch.equal(dense.weight, p.dense_weight())
        assert (dense.bias is None) == (p.bias is None)


@needs_kernels
def test_accelerate_stacks_siblings_with_the_same_outputs(monkeypatch) -> None:
    monkeypatch.setattr(acc_mod, "FUSE_MIN_GAIN", 0.0)  # stack whatever the timing says
    model = _sparse(Attention())
    x = torch.randn(2, 12, 96)
    separate, _ = accelerate(model, x, min_speedup=0.0, fuse=False, progress=False)
    fused, report = accelerate(model, x, min_speedup=0.0, progress=False)
    assert [g.layers for g in report.fused] == [["q", "k", "v"]]
    assert report.fused[0].kept and isinstance(fused.q, SparseLinearSlice)
    assert not isinstance(fused.o, SparseLinearSlice)  # reads another tensor
    assert "one product with k + v" in report.row("q").reason
    assert "same input: q + k + v" in str(report) and "stacked" in str(report)
    with torch.no_grad():
        for inputs in (x, torch.randn(5, 96)):  # another batch and shape than the example
            torch.testing.assert_close(fused(inputs), separate(inputs), atol=1e-5, rtol=1e-5)
    dense = deaccelerate(fused)
    for name in ("q", "k", "v", "o"):
        original = getattr(model, name)
        back = getattr(dense, name)
        assert type(back) is nn.Linear and torch.equal(back.weight, original.weight)
        assert (back.bias is None) == (original.bias is None)
    assert report.to_dict()["fused"][0]["layers"] == ["q", "k", "v"]


@needs_kernels
def test_a_model_that_needs_contiguous_outputs_gets_its_layers_back(monkeypatch) -> None:
    monkeypatch.setattr(acc_mod, "FUSE_MIN_GAIN", 0.0)
    model = _sparse(Attention(flatten=True))
    x = torch.randn(1, 12, 96)
    fast, report = accelerate(model, x, min_speedup=0.0, progress=False)
    (group,) = report.fused
    assert not group.kept and "the model failed with them" in group.reason
    assert isinstance(fast.q, SparseLinear) and report.row("q").reason == "faster"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)


@needs_kernels
def test_fuse_false_and_a_slower_product_keep_separate_layers(monkeypatch) -> None:
    model = _sparse(Attention())
    x = torch.randn(1, 12, 96)
    _, report = accelerate(model, x, min_speedup=0.0, fuse=False, progress=False)
    assert report.fused == []
    monkeypatch.setattr(acc_mod, "FUSE_MIN_GAIN", 1e9)  # never fast enough
    fast, report = accelerate(model, x, min_speedup=0.0, progress=False)
    assert len(report.fused) == 1 and not report.fused[0].kept and report.fused[0].reason == ""
    assert "kept separate" in str(report) and isinstance(fast.k, SparseLinear)


@needs_kernels
def test_a_saved_fused_model_loads_as_the_original(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(acc_mod, "FUSE_MIN_GAIN", 0.0)
    model = _sparse(Attention(bias=False))
    x = torch.randn(1, 12, 96)
    fast, report = accelerate(model, x, min_speedup=0.0, progress=False)
    assert report.fused[0].kept
    prunekit.save(fast, tmp_path / "m", compressed=True)
    loaded = prunekit.load(tmp_path / "m", Attention(bias=False))
    for name in ("q", "k", "v", "o"):
        assert torch.equal(getattr(loaded, name).weight, getattr(model, name).weight)
    assert loaded.q.bias is None and loaded.v.bias is not None


@needs_kernels
def test_a_llama_block_stacks_qkv_and_gate_up_with_the_same_logits(monkeypatch) -> None:
    pytest.importorskip("transformers")
    from conftest import tiny_llama

    monkeypatch.setattr(acc_mod, "FUSE_MIN_GAIN", 0.0)
    model = _sparse(tiny_llama(vocab_size=64), sparsity=0.7)
    x = torch.randint(0, 64, (1, 16))
    separate, _ = accelerate(model, x, min_speedup=0.0, fuse=False, progress=False)
    fused, report = accelerate(model, x, min_speedup=0.0, progress=False)
    kinds = sorted({tuple(n.rsplit(".", 1)[-1] for n in g.layers) for g in report.fused})
    assert kinds == [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")]
    assert all(g.kept for g in report.fused)
    with torch.no_grad():
        for ids in (x, torch.randint(0, 64, (2, 9))):
            torch.testing.assert_close(fused(ids).logits, separate(ids).logits, atol=1e-4,
                                       rtol=1e-4)  # fmt: skip
