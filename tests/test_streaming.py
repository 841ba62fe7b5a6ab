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
    whole = transformers.AutoModelForCausalLM.from_pretrained(sharded).eval()
    oneshot(
        whole,
        [{"input_ids": s} for s in _calib()],
        method=method,
        pattern=pattern,
        inplace=True,
        progress=False,
    )
    finalize(whole, inplace=True)
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
