"""Verbs on a model sped up by ``prunekit.accelerate``: ``deaccelerate`` and ``finalize`` give the
dense model back, read-only verbs (``stats``, ``count``) see through the sparse-kernel layers,
and every verb that needs dense weights stops with :class:`prunekit.AcceleratedModelError`
(never "nothing to prune", never a silent partial result), leaving the model unchanged.

The accelerated layers are built directly (``SparseLinear.from_linear``,
``SparseConv2d.from_conv``), so no compiled kernel is needed: without one they compute densely.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.compress.quantize import QUANT_ATTR
from prunekit.runtime.accelerate import SparseConv2d, SparseLinear
from prunekit.runtime.accelerated import accelerated_layers, is_accelerated


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip


def pruned_and_accelerated() -> tuple[nn.Sequential, nn.Sequential]:
    """(the finalized 80 % sparse model, the same with its conv and middle Linear accelerated)."""
    pruned = prunekit.finalize(prunekit.prune(make_net(), 0.8, targets=["0", "3"]).model)
    fast = copy.deepcopy(pruned)
    fast[0] = SparseConv2d.from_conv(pruned[0], format="csr")
    fast[3] = SparseLinear.from_linear(pruned[3], format="tiles")
    return pruned, fast


X = torch.randn(3, 2, 4, 4)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_deaccelerate_gives_the_dense_model_back() -> None:
    pruned, fast = pruned_and_accelerated()
    assert accelerated_layers(fast) == ["0", "3"]  # the conv's inner SparseLinear not listed
    before = buffers(fast)
    dense = prunekit.deaccelerate(fast)
    assert type(dense[0]) is nn.Conv2d and type(dense[3]) is nn.Linear
    assert not any(is_accelerated(m) for m in dense.modules())
    assert_same_state(before, buffers(fast))  # not in place: the accelerated model is kept
    assert_same_state(dense.state_dict(), pruned.state_dict())  # same weights, zeros included
    fresh = make_net()
    fresh.load_state_dict(dense.state_dict())  # loads into the plain architecture
    with torch.no_grad():
        torch.testing.assert_close(dense(X), pruned(X))
    assert prunekit.deaccelerate(fast, inplace=True) is fast and type(fast[3]) is nn.Linear
    assert type(prunekit.deaccelerate(SparseLinear.from_linear(pruned[3]))) is nn.Linear
    with pytest.raises(TypeError, match="nn.Module"):
        prunekit.deaccelerate("model")  # type: ignore[arg-type]


def test_finalize_decodes_accelerated_layers() -> None:
    pruned, fast = pruned_and_accelerated()
    plain = prunekit.finalize(fast)
    assert type(plain[0]) is nn.Conv2d and type(plain[3]) is nn.Linear
    assert_same_state(plain.state_dict(), pruned.state_dict())
    assert is_accelerated(fast[3])  # not in place
    # masked and accelerated layers in one model: both baked in
    mixed = copy.deepcopy(fast)
    prunekit.masks.apply_mask(mixed[5], "weight", torch.rand(4, 32) > 0.5)
    plain = prunekit.finalize(mixed, inplace=True)
    assert type(plain[5]) is nn.Linear and type(plain[3]) is nn.Linear


def test_read_only_verbs_see_the_dense_weights() -> None:
    pruned, fast = pruned_and_accelerated()
    a, b = prunekit.stats(fast), prunekit.stats(pruned)
    assert [(r.name, r.params, r.nonzeros) for r in a.layers] == [
        (r.name, r.params, r.nonzeros) for r in b.layers
    ]
    assert (a.params, a.zeros) == (b.params, b.zeros)
    ca, cb = prunekit.count(fast, X), prunekit.count(pruned, X)
    assert (ca.params, ca.macs) == (cb.params, cb.macs) and ca.params > 0
    assert is_accelerated(fast[0]) and is_accelerated(fast[3])  # put back afterwards


def _calib() -> list[torch.Tensor]:
    return [torch.randn(2, 2, 4, 4) for _ in range(2)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


DATA = [(torch.randn(2, 2, 4, 4), torch.tensor([0, 1]))]

REFUSING_VERBS = {
    "prune": lambda m: prunekit.prune(m, 0.9),
    "prune 2:4 targets": lambda m: prunekit.prune(m, pattern="2:4", targets=["3"]),
    "oneshot wanda": lambda m: prunekit.oneshot(m, _calib(), "wanda", 0.5, progress=False),
    "oneshot sparsegpt": lambda m: prunekit.oneshot(m, _calib(), "sparsegpt", 0.5, progress=False),
    "oneshot magnitude": lambda m: prunekit.oneshot(m, _calib(), "magnitude", 0.5, progress=False),
    "quantize": lambda m: prunekit.quantize(m, bits=8),
    "quantize int inplace": lambda m: prunekit.quantize(m, bits=8, mode="int", inplace=True),
    "prune_structured": lambda m: prunekit.prune_structured(m, X, 0.5, progress=False),
    "finetune": lambda m: prunekit.finetune(m, DATA, _loss, max_steps=1, lr=1e-3, progress=False),
    "sensitivity": lambda m: prunekit.sensitivity(m, _calib(), progress=False),
    "GradualPruner": lambda m: prunekit.GradualPruner(m, 0.9),
    "GradualPruner channel": lambda m: prunekit.GradualPruner(
        m, 0.5, pattern="channel", example_inputs=X
    ),
    "prune_at_init": lambda m: prunekit.prune_at_init(m, 0.5, "snip", data=DATA, loss_fn=_loss),
    "lottery_ticket": lambda m: prunekit.lottery_ticket(m, lambda net, ticket: None, rounds=1),
    "export_onnx": lambda m: prunekit.export_onnx(m, X, "unused.onnx"),
    "load": lambda m: prunekit.load(prunekit.save(make_net(), tempfile.mkdtemp() + "/n"), m),
}


@pytest.mark.parametrize("verb", list(REFUSING_VERBS))
def test_weight_changing_verbs_refuse_accelerated_models(verb: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, fast = pruned_and_accelerated()
    before = buffers(fast)
    with pytest.raises(prunekit.AcceleratedModelError, match=r"deaccelerate\(model\)") as info:
        REFUSING_VERBS[verb](fast)
    assert "'0', '3'" in str(info.value) and "accelerated" in str(info.value)
    assert_same_state(before, buffers(fast))  # nothing was changed
    assert is_accelerated(fast[0]) and is_accelerated(fast[3])
    assert not getattr(fast, QUANT_ATTR, None)
    assert not list(tmp_path.iterdir())  # nothing written


def test_verbs_work_after_deaccelerate() -> None:
    pruned, fast = pruned_and_accelerated()
    dense = prunekit.deaccelerate(fast)
    zeros = dense[3].weight == 0
    report = prunekit.prune(dense, 0.9, targets=["0", "3"])
    assert (report.model[3].weight[zeros] == 0).all()  # the accelerated zeros stay zero
    assert report.sparsity == pytest.approx(0.9, abs=1e-3)
    quantized = prunekit.quantize(dense, bits=8, targets=["0", "3"]).model
    assert (quantized[3].weight[zeros] == 0).all()
    assert torch.equal(
        quantized[3].weight, prunekit.quantize(pruned, bits=8, targets=["0", "3"]).model[3].weight
    )


def test_int8_accelerated_layers_keep_their_quantized_values(tmp_path) -> None:
    """quantize(mode="int") -> accelerate on the int8 codes -> deaccelerate / finalize / save:
    the dequantized values come back exactly, zeros included, and the codes stay on file."""
    pruned, _ = pruned_and_accelerated()
    quantized = prunekit.quantize(pruned, bits=8, mode="int", targets=["3"]).model
    q = getattr(quantized, QUANT_ATTR)["layers"]["3.weight"]
    fast = copy.deepcopy(quantized)
    fast[3] = SparseLinear.from_dense(q.codes, quantized[3].bias, format="csr", scale=q.scale[:, 0])
    assert fast[3].values.dtype == torch.int8
    for back in (prunekit.deaccelerate(fast), prunekit.finalize(fast)):
        assert torch.equal(back[3].weight, quantized[3].weight)
        assert getattr(back, QUANT_ATTR)["layers"].keys() == {"3.weight"}
    folder = prunekit.save(fast, tmp_path / "q", compressed=True)
    loaded = prunekit.load(folder, make_net())
    assert torch.equal(loaded[3].weight, quantized[3].weight)
    with pytest.raises(prunekit.AcceleratedModelError):
        prunekit.quantize(fast, bits=4)  # would re-quantize the int8 layer: refused
    assert torch.equal(fast[3].dense_weight(), quantized[3].weight)
