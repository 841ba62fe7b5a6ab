"""prunekit.compress.onnx_export: pruned models to ONNX, checked in onnxruntime."""

from __future__ import annotations

import builtins
import importlib.util
import itertools

import pytest
import torch
from torch import nn

import prunekit
from conftest import mlp, tiny_llama
from prunekit.compress.onnx_export import OnnxCheckError, export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})


def test_finalized_pruned_cnn(cnn, cnn_input, tmp_path):
    pruned = prunekit.finalize(prunekit.prune(cnn, sparsity=0.5, scope="global").model)
    result = export_onnx(pruned, cnn_input, tmp_path / "cnn.onnx")
    assert result.path.is_file() and result.exporter in ("torchscript", "dynamo")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.input_names == ["input"] and "max abs diff" in str(result)
    assert result.dynamic_batch
    # the batch dimension is dynamic: another batch size runs and matches
    x = torch.randn(7, 1, 8, 8)
    (got,) = _run(result.path, {"input": x})
    with torch.inference_mode():
        want = pruned(x)
    assert got.shape == (7, 10)
    assert abs(got - want.numpy()).max() <= 1e-4


def test_structurally_pruned_mlp(tmp_path):
    torch.manual_seed(0)
    dense = mlp((16, 64, 48, 8))
    x = torch.randn(5, 16)
    report = prunekit.prune_structured(dense, x[:2], ratio=0.5, progress=False)
    small = report.model
    assert small[0].out_features < 64
    result = export_onnx(small, x, tmp_path / "sub" / "mlp.onnx", opset=17)
    assert result.opset == 17 and result.max_abs_diff <= 1e-4
    fresh = torch.randn(9, 16)
    (got,) = _run(result.path, {"input": fresh})
    with torch.inference_mode():
        assert abs(got - small(fresh).numpy()).max() <= 1e-5
    weights = {i.name: i for i in onnx.load(str(result.path)).graph.initializer}
    shapes = sorted(tuple(w.dims) for w in weights.values() if len(w.dims) == 2)
    assert (small[0].out_features, 16) in shapes  # the smaller layer is what was exported


def test_masked_model_refused(cnn, cnn_input, tmp_path):
    masked = prunekit.prune(cnn, sparsity=0.5).model
    with pytest.raises(ValueError, match=r"prunekit\.finalize"):
        export_onnx(masked, cnn_input, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class Keywords(nn.Module):
    """Three same-shaped inputs that play different roles: a wrong binding changes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.a(x) - 2 * self.b(y)
        return (out + 3 * z if z is not None else out), self.b(y)


@pytest.mark.parametrize("order", list(itertools.permutations("xyz")))
def test_dict_inputs_in_any_key_order(tmp_path, order):
    torch.manual_seed(0)
    net = Keywords().eval()
    example = {k: torch.randn(2, 4) for k in order}
    result = export_onnx(net, example, tmp_path / "k.onnx")
    assert result.input_names == ["x", "y", "z"] and len(result.output_names) == 2
    fresh = {k: torch.randn(5, 4) for k in "zyx"}
    got = _run(result.path, fresh)
    with torch.inference_mode():
        want = net(**fresh)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert abs(g - w.numpy()).max() <= 1e-5


def test_tuple_inputs_and_mode_restored(tmp_path):
    torch.manual_seed(0)
    net = Keywords().train()
    x, y, z = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    result = export_onnx(net, (x, y, z), tmp_path / "p.onnx")
    assert result.input_names == ["input_0", "input_1", "input_2"]
    assert net.training and all(m.training for m in net.modules())
    x, y, z = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    got = _run(result.path, {"input_0": x, "input_1": y, "input_2": z})
    with torch.inference_mode():
        want = net.eval()(x, y, z)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w.numpy()).max() <= 1e-5
    unchecked = export_onnx(net, (x, y), tmp_path / "u.onnx", check=False, dynamic_batch=False)
    assert not unchecked.dynamic_batch
    assert unchecked.max_abs_diff is None and unchecked.path.is_file()


def test_dict_with_fixed_non_tensor_value(tmp_path):
    torch.manual_seed(0)
    net = Keywords().eval()
    example = {"y": torch.randn(2, 4), "z": None, "x": torch.randn(2, 4)}
    result = export_onnx(net, example, tmp_path / "k.onnx")
    assert result.input_names == ["x", "y"]
    fresh = {"y": torch.randn(4, 4), "x": torch.randn(4, 4)}
    got = _run(result.path, fresh)
    with torch.inference_mode():
        want = net(**fresh)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w.numpy()).max() <= 1e-5


def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        type_vocab_size=2,
    )
    return transformers.BertModel(config).eval()


def _tokens(batch: int, length: int = 7) -> dict[str, torch.Tensor]:
    """What a BERT tokenizer returns, in its key order, with padding in the last row."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2 :] = 0
    return {
        "input_ids": torch.randint(0, 40, (batch, length)),
        "token_type_ids": torch.randint(0, 2, (batch, length)),
        "attention_mask": mask,
    }


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "keys",
    [
        ("input_ids", "token_type_ids", "attention_mask"),  # a tokenizer's order
        ("attention_mask", "input_ids", "token_type_ids"),
    ],
)
def test_tiny_bert_dict_inputs_checked_in_onnxruntime(tmp_path, keys):
    torch.manual_seed(1)
    model = prunekit.finalize(prunekit.prune(tiny_bert(), sparsity=0.5).model)
    example = _tokens(2)
    result = export_onnx(model, {k: example[k] for k in keys}, tmp_path / "bert.onnx")
    assert result.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    fresh = _tokens(3)
    got = _run(result.path, {k: fresh[k] for k in reversed(keys)})
    with torch.inference_mode():
        want = model(**fresh)
    assert got[0].shape == (3, 7, 16)
    assert abs(got[0] - want.last_hidden_state.numpy()).max() <= 1e-4
    assert abs(got[1] - want.pooler_output.numpy()).max() <= 1e-4


@pytest.mark.filterwarnings("ignore")
def test_tiny_bert_tensor_and_tuple_inputs(tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 40, (2, 6))
    alone = export_onnx(model, ids, tmp_path / "ids.onnx")
    pair = export_onnx(model, (ids, torch.ones_like(ids)), tmp_path / "pair.onnx")
    assert alone.input_names == ["input"] and pair.input_names == ["input_0", "input_1"]
    fresh = _tokens(3, length=6)
    ids, mask = fresh["input_ids"], fresh["attention_mask"]
    with torch.inference_mode():
        want_alone = model(ids).last_hidden_state.numpy()
        want_pair = model(ids, mask).last_hidden_state.numpy()
    assert abs(_run(alone.path, {"input": ids})[0] - want_alone).max() <= 1e-4
    got = _run(pair.path, {"input_0": ids, "input_1": mask})[0]
    assert abs(got - want_pair).max() <= 1e-4
    assert abs(want_pair - want_alone).max() > 1e-3  # the padding mask really reached the graph


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx("model", torch.randn(1, 2), tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(nn.Linear(2, 2), [torch.randn(1, 2)], tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x.onnx", exporter="jit")
    with pytest.raises(IsADirectoryError):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path)


class Drifts(nn.Module):
    """Agrees with ONNX only in eager mode: adds noise that tracing freezes as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand(()).item()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_mismatch_raises_and_writes_nothing(tmp_path):
    with pytest.raises(OnnxCheckError, match="differs.*not written"):
        export_onnx(Drifts(), torch.randn(2, 3), tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []  # no file at the target, no temporary left
    # an older file at the target is kept as it was
    (tmp_path / "d.onnx").write_bytes(b"old")
    with pytest.raises(OnnxCheckError):
        export_onnx(Drifts(), torch.randn(2, 3), tmp_path / "d.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["d.onnx"]
    assert (tmp_path / "d.onnx").read_bytes() == b"old"


def test_missing_extra_names_it(monkeypatch, tmp_path):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"prunekit\[onnx\]"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x.onnx")


HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


@pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="onnxscript not installed")
@pytest.mark.filterwarnings("ignore")
def test_hf_llama_structured_via_dynamo(tmp_path):
    model = tiny_llama()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}
    small = prunekit.prune_structured(model, inputs, ratio=0.3, progress=False).model
    result = export_onnx(small, inputs, tmp_path / "llama.onnx")
    assert result.exporter == "dynamo" and result.input_names == ["input_ids"]
    assert result.dynamic_batch
    ids = torch.randint(0, 64, (3, 8))
    (logits,) = _run(result.path, {"input_ids": ids})
    with torch.inference_mode():
        want = small(input_ids=ids, use_cache=False).logits
    assert logits.shape == (3, 8, 64)
    assert abs(logits - want.numpy()).max() <= 1e-4


@pytest.mark.skipif(HAS_ONNXSCRIPT, reason="onnxscript is installed")
@pytest.mark.filterwarnings("ignore")
def test_hf_llama_without_onnxscript_says_what_to_install(tmp_path):
    inputs = {"input_ids": torch.randint(0, 64, (1, 4)), "use_cache": False}
    with pytest.raises(RuntimeError, match="pip install onnxscript"):
        export_onnx(tiny_llama(), inputs, tmp_path / "llama.onnx")
    with pytest.raises(ImportError, match="onnxscript"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x.onnx", exporter="dynamo")
