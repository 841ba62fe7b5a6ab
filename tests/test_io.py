"""save / load: safetensors + JSON, bit-for-bit, masks restored, shape mismatches refused."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import prunekit
from conftest import SmallCNN
from prunekit.compress.io import pack_mask, unpack_mask
from prunekit.masks import get_mask


def test_round_trip_is_bit_for_bit_with_masks(cnn: SmallCNN, cnn_input, tmp_path) -> None:
    pruned = prunekit.prune(cnn, 0.7, pattern="unstructured").model
    pruned = prunekit.prune(pruned, pattern="2:4", targets="fc1").model
    folder = prunekit.save(pruned, tmp_path / "saved")
    restored = prunekit.load(folder, SmallCNN())
    original_state, restored_state = pruned.state_dict(), restored.state_dict()
    assert original_state.keys() == restored_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, restored_state[key]), key
        assert value.dtype == restored_state[key].dtype
    assert torch.equal(restored(cnn_input), pruned(cnn_input))
    assert torch.equal(get_mask(restored.fc1), get_mask(pruned.fc1))


def test_saved_folder_needs_no_pickle_and_packs_masks(cnn: SmallCNN, tmp_path) -> None:
    pruned = prunekit.prune(cnn, 0.5).model
    folder = prunekit.save(pruned, tmp_path / "saved", metadata={"note": "hi"})
    meta = json.loads((folder / "prunekit.json").read_text())
    assert meta["prunekit_version"] == prunekit.__version__
    assert meta["masks"]["fc1.weight"] == [32, 256] and meta["note"] == "hi"
    assert meta["sparsity"]["fc1.weight"] == pytest.approx(
        prunekit.stats(pruned).layer("fc1").sparsity, abs=1e-6
    )
    with safe_open(folder / "model.safetensors", "pt") as f:
        packed = f.get_tensor("__prunekit_mask__.fc1.weight")
        assert "fc1.weight_mask" not in f.keys()
    assert packed.dtype == torch.uint8 and packed.numel() == 32 * 256 // 8
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "prunekit.json"]


def test_finalized_model_round_trips(cnn: SmallCNN, cnn_input, tmp_path) -> None:
    dense = prunekit.finalize(prunekit.prune(cnn, 0.5).model)
    restored = prunekit.load(prunekit.save(dense, tmp_path / "d"), SmallCNN())
    assert not any(prunekit.masks.is_masked(m) for m in restored.modules())
    assert torch.equal(restored(cnn_input), dense(cnn_input))


def test_mismatched_shapes_are_refused_before_loading(cnn: SmallCNN, tmp_path) -> None:
    folder = prunekit.save(prunekit.prune(cnn, 0.5).model, tmp_path / "s")
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        prunekit.load(folder, other)
    wider = SmallCNN()
    wider.fc1 = nn.Linear(256, 40)
    wider.head = nn.Linear(40, 10)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"fc1.weight: model has shape \(40, 256\), file has \(32, 256\)"
    ):
        prunekit.load(folder, wider)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    assert not any(prunekit.masks.is_masked(m) for m in wider.modules())


def test_save_refuses_to_overwrite_unless_asked(cnn: SmallCNN, tmp_path) -> None:
    folder = prunekit.save(cnn, tmp_path / "s")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prunekit.save(cnn, folder)
    prunekit.save(prunekit.prune(cnn, 0.5).model, folder, overwrite=True)
    assert "fc1.weight" in json.loads((folder / "prunekit.json").read_text())["masks"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary left behind


def test_tied_weights_are_stored_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.body = nn.Linear(8, 8)
            self.out = nn.Linear(8, 16, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.out(self.body(self.embed(idx)))

    import tempfile

    torch.manual_seed(0)
    model = prunekit.prune(Tied(), 0.5, targets="body").model
    with tempfile.TemporaryDirectory() as tmp:
        folder = prunekit.save(model, f"{tmp}/t")
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert (
                len([k for k in f.keys() if k.endswith("embed.weight") or k == "out.weight"]) == 1
            )
        restored = prunekit.load(folder, Tied())
    idx = torch.arange(5)
    assert torch.equal(restored(idx), model(idx))
    assert restored.out.weight.data_ptr() == restored.embed.weight.data_ptr()


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_mask_packing_round_trips(shape, seed) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), shape), mask)


def test_load_replaces_masks_the_model_already_has(cnn: SmallCNN, tmp_path) -> None:
    saved = prunekit.prune(cnn, 0.5, method="random", seed=1).model
    folder = prunekit.save(saved, tmp_path / "s")
    busy = prunekit.prune(SmallCNN(), 0.5, method="random", seed=2).model
    restored = prunekit.load(folder, busy)
    assert torch.equal(get_mask(restored.fc1), get_mask(saved.fc1))
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in saved.state_dict().items())


def test_structurally_pruned_model_loads_through_a_factory(
    cnn: SmallCNN, cnn_input, tmp_path
) -> None:
    from prunekit.graph import prune_structured

    pruned = prune_structured(cnn, cnn_input, ratio=0.5, progress=False).model
    folder = prunekit.save(pruned, tmp_path / "s")
    assert json.loads((folder / "prunekit.json").read_text())["structure"][0]["kind"] == "width"
    restored = prunekit.load(folder, SmallCNN)
    assert restored.fc1.out_features == 16 and restored.conv1.out_channels == 4
    assert torch.equal(restored(cnn_input), pruned(cnn_input))
    with pytest.raises(ValueError, match="does not fit"):
        prunekit.load(prunekit.save(cnn, tmp_path / "dense"), lambda: pruned)


def test_save_stores_masked_values_even_if_raw_weights_drifted(cnn: SmallCNN, tmp_path) -> None:
    pruned = prunekit.prune(cnn, 0.5).model
    with torch.no_grad():  # what stale optimiser momentum can do to a raw parameter
        prunekit.masks.raw_parameter(pruned.fc1).add_(1.0)
    folder = prunekit.save(pruned, tmp_path / "s")
    with safe_open(folder / "model.safetensors", "pt") as f:
        stored = f.get_tensor("fc1.weight")
    assert torch.equal(stored, pruned.fc1.weight.detach())
    assert int((stored == 0).sum()) == prunekit.stats(pruned).layer("fc1").zeros
