"""oneshot_from_pretrained: block by block from safetensors shards, equal to the in-memory path."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.calibrate.oneshot import oneshot
from prunekit.calibrate.streaming import oneshot_from_pretrained
from prunekit.masks import finalize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from conftest import tiny_llama

    folder = tmp_path_factory.mktemp("stream") / "llama"
    tiny_llama(num_hidden_layers=3).save_pretrained(folder, max_shard_size="40KB")
    return folder


def _calib():
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 64, (1, 16), generator=gen) for _ in range(4)]


@pytest.mark.parametrize(
    "method, pattern, spill", [("wanda", "unstructured", None), ("sparsegpt", "2:4", 0.001)]
)
def test_streamed_equals_in_memory(sharded, tmp_path, one_thread, method, pattern, spill):
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    out = tmp_path / "out"
    summary = oneshot_from_pretrained(
        sharded,
        _calib(),
        out,
        method=method,
        pattern=pattern,
        max_activation_mb=spill,
        progress=False,
    )
    assert summary["blocks"] == 3 and summary["shards"] == 4
    assert (summary["activations_spilled"] > 0) == (spill is not None)
    streamed = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    whole, _ = _in_memory(sharded, method, pattern)
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    up = a["model.layers.2.mlp.up_proj.weight"]
    assert float((up == 0).float().mean()) == 0.5
    ids = _calib()[0]
    torch.testing.assert_close(streamed(ids).logits, whole(ids).logits, rtol=0, atol=0)
    assert (
        sorted(p.name for p in out.glob("*.safetensors"))[0] == "model-00001-of-00004.safetensors"
    )
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def _in_memory(folder, method, pattern, **kwargs):
    whole = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    report = oneshot(
        whole,
        [{"input_ids": s} for s in _calib()],
        method=method,
        pattern=pattern,
        inplace=True,
        progress=False,
        **kwargs,
    )
    finalize(whole, inplace=True)
    return whole, report


@pytest.mark.parametrize(
    "method, pattern, kwargs",
    [
        ("wanda", "unstructured", dict(allocation="owl", owl_lambda=0.1)),
        ("sparsegpt", "4:8", dict(allocation="owl", owl_lambda=0.2, owl_threshold=3.0)),
        ("wanda", "unstructured", dict(per_layer={"model.layers.1.*": 0.7})),
    ],
)
def test_streamed_allocation_equals_in_memory(
    sharded, tmp_path, one_thread, method, pattern, kwargs
):
    """OWL streamed (a first pass over the blocks from the shards for the outlier ratios) and
    per-layer overrides: the same per-layer sparsities and tensors as oneshot in memory."""
    out = tmp_path / "out"
    summary = oneshot_from_pretrained(
        sharded,
        _calib(),
        out,
        method=method,
        pattern=pattern,
        max_activation_mb=0.001 if method == "sparsegpt" else None,
        progress=False,
        **kwargs,
    )
    whole, report = _in_memory(sharded, method, pattern, **kwargs)
    assert summary["allocated"] == report.details["allocated"]
    assert len(set(summary["allocated"].values())) > 1  # not uniform: the allocation mattered
    streamed = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streamed_sensitivity_equals_in_memory(sharded, tmp_path, one_thread, method):
    """allocation="sensitivity" streamed (one pass: the subsample's states carried through the
    later blocks as they are loaded, spilled to disk here): the same damage, hence the same
    allocation and tensors, as oneshot in memory."""
    out = tmp_path / "out"
    kwargs = dict(allocation="sensitivity", sparsity=0.6)
    summary = oneshot_from_pretrained(
        sharded, _calib(), out, method=method, max_activation_mb=0.001, progress=False, **kwargs
    )
    whole, report = _in_memory(sharded, method, "unstructured", **kwargs)
    assert summary["allocated"] == report.details["allocated"]
    assert len(set(summary["allocated"].values())) > 1
    streamed = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    a, b = streamed.state_dict(), whole.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not list(tmp_path.glob(".*"))
