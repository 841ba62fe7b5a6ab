"""prunekit.compress.onnx_export: pruned models to ONNX, checked in onnxruntime."""

from __future__ import annotations

import builtins
import importlib.util

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
    weights = {i.name: i for i in onnx.load(str(result.path)).graph.initializer}
    shapes = sorted(tuple(w.dims) for w in weights.values() if len(w.dims) == 2)
    assert (small[0].out_features, 16) in shapes  # the smaller layer is what was exported


def test_masked_model_refused(cnn, cnn_input, tmp_path):
    masked = prunekit.prune(cnn, sparsity=0.5).model
    with pytest.raises(ValueError, match=r"prunekit\.finalize"):
        export_onnx(masked, cnn_input, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), self.b(y)


def test_dict_and_tuple_inputs_and_mode_restored(tmp_path):
    net = Keywords().train()
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    by_name = export_onnx(net, {"y": y, "x": x}, tmp_path / "k.onnx")
    assert by_name.input_names == ["x", "y"] and len(by_name.output_names) == 2
    assert by_name.max_abs_diff <= 1e-4
    by_position = export_onnx(net, (x, y), tmp_path / "p.onnx", check=False, dynamic_batch=False)
    assert not by_position.dynamic_batch
    assert by_position.max_abs_diff is None and by_position.path.is_file()
    assert net.training


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
def test_mismatch_raises(tmp_path):
    with pytest.raises(OnnxCheckError, match="differs"):
        export_onnx(Drifts(), torch.randn(2, 3), tmp_path / "d.onnx")


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
    assert result.exporter == "dynamo" and result.max_abs_diff <= 1e-4
    assert result.dynamic_batch
    (logits,) = _run(result.path, {"input_ids": torch.randint(0, 64, (3, 8))})
    assert logits.shape == (3, 8, 64)


@pytest.mark.skipif(HAS_ONNXSCRIPT, reason="onnxscript is installed")
@pytest.mark.filterwarnings("ignore")
def test_hf_llama_without_onnxscript_says_what_to_install(tmp_path):
    inputs = {"input_ids": torch.randint(0, 64, (1, 4)), "use_cache": False}
    with pytest.raises(RuntimeError, match="pip install onnxscript"):
        export_onnx(tiny_llama(), inputs, tmp_path / "llama.onnx")
    with pytest.raises(ImportError, match="onnxscript"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x.onnx", exporter="dynamo")
