"""save / save_pretrained: accelerated models, quantized models, empty folders, permissions,
crash-safe overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import prunekit
from conftest import SmallCNN, tiny_llama
from prunekit.runtime.accelerate import SparseConv2d, SparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return prunekit.finalize(prunekit.prune(SmallCNN(), 0.8).model)


def _accelerated(model: SmallCNN) -> SmallCNN:
    """The swaps prunekit.accelerate makes, done by hand (no timing involved)."""
    fast = SmallCNN()
    fast.load_state_dict(model.state_dict())
    fast.conv2 = SparseConv2d.from_conv(model.conv2, format="csr")
    fast.fc1 = SparseLinear.from_linear(model.fc1, format="tiles")
    return fast


def test_accelerated_model_saves_ordinary_weights(tmp_path, cnn_input) -> None:
    model = _sparse_cnn()
    fast = _accelerated(model)
    for compressed in (False, True):
        folder = prunekit.save(fast, tmp_path / f"fast{compressed}", compressed=compressed)
        with safe_open(folder / "model.safetensors", "pt") as f:
            keys = {k for k in f.keys() if not k.startswith("__prunekit_")}
        expected = {k for k in model.state_dict() if not (compressed and k.endswith("weight"))}
        assert keys == expected
        restored = prunekit.load(folder, SmallCNN())
        for key, value in model.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), key
        assert torch.equal(restored(cnn_input), model(cnn_input))
    assert isinstance(fast.fc1, SparseLinear) and isinstance(fast.conv2, SparseConv2d)  # put back


def test_accelerated_int8_layer_saves_its_codes(tmp_path) -> None:
    model = prunekit.quantize(_sparse_cnn(), bits=8, mode="int").model
    q = model._prunekit_quant["layers"]["fc1.weight"]
    fast = _accelerated(model)
    fast.fc1 = SparseLinear.from_dense(q.codes, model.fc1.bias, format="csr", scale=q.scale[:, 0])
    object.__setattr__(fast, "_prunekit_quant", model._prunekit_quant)
    folder = prunekit.save(fast, tmp_path / "q", compressed=True)
    entry = json.loads((folder / "prunekit.json").read_text())["compressed"]["fc1.weight"]
    assert entry["quant"]["bits"] == 8
    assert torch.equal(prunekit.load(folder, SmallCNN()).fc1.weight, model.fc1.weight)


def test_accelerated_hugging_face_model_stays_plain_loadable(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    model = prunekit.finalize(prunekit.prune(tiny_llama(), 0.7).model).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    attn = model.model.layers[0].self_attn
    attn.q_proj = SparseLinear.from_linear(attn.q_proj, format="csr")
    mlp = model.model.layers[1].mlp
    mlp.down_proj = SparseLinear.from_linear(mlp.down_proj, format="tiles")
    folder = prunekit.save_pretrained(model, tmp_path / "hf")
    assert json.loads((folder / "prunekit.json").read_text())["plain_loadable"] is True
    plain = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, want)
        assert torch.equal(prunekit.from_pretrained(folder)(ids).logits, want)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseLinear)


def test_accelerated_layer_alone_is_refused(tmp_path) -> None:
    layer = SparseLinear.from_dense(torch.eye(4))
    with pytest.raises(TypeError, match="accelerated layer"):
        prunekit.save(layer, tmp_path / "x")
    assert not (tmp_path / "x").exists()
