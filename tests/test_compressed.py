"""Compressed storage: exact round trips for every index kind, dtype and pattern; sizes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

import prunekit
from conftest import SmallCNN
from prunekit.compress.io import load_state
from prunekit.compress.quantize import quantize, quantize_tensor
from prunekit.compress.size import size_report
from prunekit.compress.sparse_format import INDEX_KINDS, decode, encode
from prunekit.masks import get_mask


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _pruned_weight(pattern: str, dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    sparsity = None if ":" in pattern and "block" not in pattern else 0.7
    pruned = prunekit.prune(layer, sparsity, pattern=pattern, targets="*").model
    return prunekit.finalize(pruned).weight.detach().to(dtype)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:4x4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", INDEX_KINDS)
def test_float_round_trip_is_bit_for_bit(pattern, dtype, index) -> None:
    w = _pruned_weight(pattern, dtype)
    w[0, 0], w[0, 1] = -0.0, float("nan")  # -0.0 comes back as +0.0; NaN is a value
    arrays, meta = encode(w, index)
    assert meta["index"] == index
    restored, q = decode(arrays, meta)
    assert q is None and restored.dtype == dtype
    if index != "dense":  # a dense tensor keeps every bit; an index stores zeros as +0.0
        w = torch.where(w == 0, torch.zeros_like(w), w)
    assert torch.equal(_bits(restored), _bits(w))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:4x4"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("index", INDEX_KINDS)
def test_quantized_round_trip_is_exact(pattern, bits, index) -> None:
    w = _pruned_weight(pattern, torch.float32)
    for granularity, symmetric in [("per_channel", True), ("group:16", False)]:
        q = quantize_tensor(w, bits, granularity, symmetric)
        arrays, meta = encode(q.dequantize(), index, q)
        restored, q2 = decode(arrays, meta)
        assert torch.equal(restored, q.dequantize())
        assert torch.equal(q2.codes, q.codes)
        assert torch.all(restored[w == 0] == 0)
        if bits == 4:
            assert arrays["values"].numel() <= (meta["count"] + 1) // 2


def test_auto_picks_the_smallest_and_sizes_scale_with_density() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = {}
    for density in (0.5, 0.1, 0.01):
        w = torch.randn(256, 256, generator=gen)
        w[torch.rand(256, 256, generator=gen) > density] = 0
        arrays, meta = encode(w)
        sizes[density] = sum(a.numel() * a.element_size() for a in arrays.values())
        forced = {
            kind: sum(a.numel() * a.element_size() for a in encode(w, kind)[0].values())
            for kind in INDEX_KINDS
        }
        assert sizes[density] == min(forced.values())
    assert sizes[0.01] < sizes[0.1] < sizes[0.5]
    assert sizes[0.1] < 0.2 * 256 * 256 * 4


def test_masked_model_round_trip_and_file_size(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    pruned = prunekit.prune(model, 0.9, scope="local").model
    dense_folder = prunekit.save(pruned, tmp_path / "dense")
    folder = prunekit.save(pruned, tmp_path / "small", compressed=True)
    meta = json.loads((folder / "prunekit.json").read_text())
    assert meta["format_version"] == 2 and meta["derived_masks"] == ["0.weight"]
    restored = prunekit.load(
        folder, nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    )
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert torch.equal(get_mask(restored[0]), get_mask(pruned[0]))
    layer_bytes = (folder / "model.safetensors").stat().st_size
    dense_bytes = (dense_folder / "model.safetensors").stat().st_size
    assert layer_bytes < 0.2 * dense_bytes + 11 * 257 * 4  # the dense head is stored as is
    report = size_report(folder)
    assert report.compressed_bytes < report.dense_fp32_bytes
    assert "gzip" in str(report) and report.compressed_gzip_bytes < report.dense_fp32_gzip_bytes


def test_int_quantized_model_saves_codes_and_loads_exact_values(cnn: SmallCNN, tmp_path) -> None:
    pruned = prunekit.finalize(prunekit.prune(cnn, 0.6).model)
    model = quantize(pruned, bits=4, granularity="group:32", mode="int").model
    folder = prunekit.save(model, tmp_path / "q", compressed=True)
    meta = json.loads((folder / "prunekit.json").read_text())
    assert meta["compressed"]["fc1.weight"]["quant"]["bits"] == 4
    assert "quant" not in meta["compressed"]["head.weight"]  # not quantized: float values
    restored = prunekit.load(folder, SmallCNN())
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    again = prunekit.load(prunekit.save(restored, tmp_path / "again", compressed=True), SmallCNN())
    assert torch.equal(again.fc1.weight, model.fc1.weight)


def test_save_bits_quantizes_every_weight(cnn: SmallCNN, tmp_path) -> None:
    pruned = prunekit.prune(cnn, 0.5).model
    folder = prunekit.save(pruned, tmp_path / "q", compressed=True, bits=8)
    state = load_state(folder)
    for name in ("conv1.weight", "fc1.weight", "head.weight"):
        expected = quantize_tensor(pruned.state_dict()[name], 8).dequantize()
        assert torch.equal(state[name], expected), name
    restored = prunekit.load(folder, SmallCNN())
    assert torch.equal(get_mask(restored.fc1), get_mask(pruned.fc1))


def test_save_bits_per_pattern(cnn: SmallCNN, tmp_path) -> None:
    rules = {"conv*": (4, "group:8"), "fc1*": 8}
    meta = json.loads(
        (
            prunekit.save(cnn, tmp_path / "q", compressed=True, bits=rules) / "prunekit.json"
        ).read_text()
    )["compressed"]
    assert meta["conv2.weight"]["quant"] == {
        "bits": 4,
        "group": 8,
        "transposed": False,
        "codes_shape": [16, 72],
    }
    assert meta["fc1.weight"]["quant"]["bits"] == 8 and "quant" not in meta["head.weight"]
    with pytest.raises(ValueError, match="use 8"):
        prunekit.save(cnn, tmp_path / "bad", compressed=True, bits={"*": 3})


def test_structurally_pruned_model_round_trips(tmp_path) -> None:
    from test_graph_zoo import ResNet, _randomize_bn, assert_close, outputs

    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    pruned = prunekit.prune_structured(
        _randomize_bn(ResNet()), img, ratio=0.5, progress=False
    ).model
    pruned = prunekit.prune(pruned, 0.5).model
    folder = prunekit.save(pruned, tmp_path / "m", compressed=True)
    restored = prunekit.load(folder, ResNet).eval()
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert_close(outputs(restored, img), outputs(pruned.eval(), img), atol=0)


def test_size_report_of_a_model_counts_every_tensor(cnn: SmallCNN) -> None:
    dense = size_report(cnn)
    sparse = size_report(prunekit.prune(cnn, 0.9).model, bits=8)
    assert dense.dense_fp32_bytes == sparse.dense_fp32_bytes
    assert sparse.compressed_bytes < 0.25 * dense.compressed_bytes
    assert sparse.ratio < 0.25


def test_bad_inputs(cnn: SmallCNN, tmp_path) -> None:
    with pytest.raises(ValueError, match="compressed=True"):
        prunekit.save(cnn, tmp_path / "a", bits=8)
    with pytest.raises(ValueError, match="use 8"):
        prunekit.save(cnn, tmp_path / "b", compressed=True, bits=2)
    with pytest.raises(ValueError, match="bitmask"):
        prunekit.save(cnn, tmp_path / "c", compressed=True, index="coo")
    with pytest.raises(ValueError, match="per_channel"):
        prunekit.save(cnn, tmp_path / "d", compressed=True, bits=8, granularity="rows")
    assert not any(tmp_path.iterdir())


def _masked_with_kept_zeros():
    """A 90 %-pruned, int8 model where three kept weights round to zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    pruned = prunekit.prune(net, 0.9).model
    raw = prunekit.masks.raw_parameter(pruned[0])
    kept = torch.nonzero(pruned[0].weight_mask.reshape(-1)).reshape(-1)[:3]
    with torch.no_grad():
        raw.view(-1)[kept] = 1e-7  # below half an int8 step: quantizes to 0
    return prunekit.quantize(pruned, bits=8, mode="int").model, kept


def test_kept_weights_rounded_to_zero_cost_a_few_positions_not_a_bitmask(tmp_path) -> None:
    model, kept = _masked_with_kept_zeros()
    assert int((model[0].weight != 0).sum()) == int(model[0].weight_mask.sum()) - 3
    path = prunekit.save(model, tmp_path / "m", compressed=True)
    meta = json.loads((path / "prunekit.json").read_text())
    assert meta["kept_zeros"] == {"0.weight": kept.tolist()}
    assert "__prunekit_mask__.0.weight" not in safe_open(path / "model.safetensors", "pt").keys()
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    restored = prunekit.load(path, fresh)
    assert torch.equal(restored[0].weight_mask, model[0].weight_mask)
    assert torch.equal(restored[0].weight, model[0].weight)


@pytest.mark.parametrize(
    ("positions", "says"), [([5000], "positions in [0, 4096)"), ([2, 1], "sorted distinct")]
)
def test_hostile_kept_zeros_are_refused(tmp_path, positions, says) -> None:
    model, _ = _masked_with_kept_zeros()
    path = prunekit.save(model, tmp_path / "m", compressed=True)
    meta = json.loads((path / "prunekit.json").read_text())
    meta["kept_zeros"]["0.weight"] = positions
    meta.pop("integrity", None)  # as an older or hand-made file would have it
    (path / "prunekit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(says)):
        prunekit.load(path, nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)))


def test_bits_rules_from_json_or_yaml_lists_equal_tuples(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    as_list = prunekit.save(net, tmp_path / "a", compressed=True, bits={"0.*": [4, "group:32"]})
    as_tuple = prunekit.save(net, tmp_path / "b", compressed=True, bits={"0.*": (4, "group:32")})
    a, b = load_state(as_list), load_state(as_tuple)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], net[0].weight)  # really quantized to 4 bits
    with pytest.raises(ValueError, match="bits or \\(bits, granularity\\)"):
        prunekit.save(net, tmp_path / "c", compressed=True, bits={"*": [4, "group:32", 1]})


def test_bits_patterns_that_decide_no_weight_are_refused(tmp_path) -> None:
    """A bits pattern that matches no weight, or only weights an earlier pattern takes, would
    leave them in float32 without a word: refused, naming the pattern and the weights."""
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    with pytest.raises(ValueError, match=r"'fc1\*' matches no weight.*0\.weight, 1\.weight"):
        prunekit.save(net, tmp_path / "a", compressed=True, bits={"fc1*": 4})
    with pytest.raises(ValueError, match=r"'0\.\*' decides no weight.*first matching pattern"):
        prunekit.save(net, tmp_path / "b", compressed=True, bits={"*": 8, "0.*": 4})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    prunekit.save(net, tmp_path / "c", compressed=True, bits={"0.*": 4, "*": 8})  # fine


def test_size_report_without_gzip_and_with_progress(monkeypatch, capsys) -> None:
    from prunekit.compress import size as size_module

    net = prunekit.prune(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), 0.9).model
    full = size_report(net)
    quick = size_report(net, gzip=False)
    assert (quick.dense_fp32_bytes, quick.compressed_bytes) == (
        full.dense_fp32_bytes,
        full.compressed_bytes,
    )
    assert quick.gzip_ratio is None and full.gzip_ratio is not None
    assert "-" in str(quick).splitlines()[-1]
    monkeypatch.setattr(size_module, "PROGRESS_BYTES", 1)
    size_report(net)
    err = capsys.readouterr().err
    assert "gzip -9 of the dense fp32 file" in err and "gzip -9 of the compressed folder" in err
    size_report(net, progress=False)
    assert capsys.readouterr().err == ""
