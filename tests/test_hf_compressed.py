"""Compressed Hugging Face folders: save_pretrained(compressed=True) / from_pretrained round trips."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

import prunekit
from conftest import tiny_llama
from prunekit.compress.quantize import QUANT_ATTR, quantize_tensor
from prunekit.graph.hf import COMPRESSED_WEIGHTS_FILE

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
INPUTS = {"input_ids": IDS, "use_cache": False}


# tiny models run far faster on one thread (conftest.one_thread), and leave the other core be
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Loading a compressed folder must never unpickle anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, with -0.0 read as +0.0 (an index stores zeros as +0.0)."""
    t = torch.where(t == 0, torch.zeros_like(t), t)
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_weights(restored: torch.nn.Module, model: torch.nn.Module) -> None:
    expected = model.state_dict()
    state = restored.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
        assert torch.equal(_bits(state[key]), _bits(value)), key


def magnitude_pruned(sparsity: float = 0.7) -> torch.nn.Module:
    return prunekit.finalize(prunekit.prune(tiny_llama(), sparsity).model).eval()


def test_magnitude_pruned_round_trip_is_bit_for_bit(llama_dir, tmp_path) -> None:
    model = magnitude_pruned()
    folder = prunekit.save_pretrained(model, tmp_path / "c", source=llama_dir, compressed=True)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "prunekit-compressed.safetensors",
        "prunekit.json",
        "tokenizer_config.json",
    ]
    meta = json.loads((folder / "prunekit.json").read_text())
    assert meta["format_version"] == 2 and meta["plain_loadable"] is False
    assert meta["compressed_weights"] == {
        "file": COMPRESSED_WEIGHTS_FILE,
        "encoding": "prunekit-sparse",
        "encoding_version": 2,
    }
    entry = meta["compressed"]["model.layers.0.mlp.up_proj.weight"]
    assert entry["index"] in ("bitmask", "rle", "csr") and entry["nnz"] < 0.31 * 64 * 32
    assert meta["compressed"]["model.embed_tokens.weight"]["index"] == "dense"
    restored = prunekit.from_pretrained(folder)
    assert type(restored) is type(model) and not restored.training
    assert_same_weights(restored, model)
    assert torch.equal(_logits(restored), _logits(model))


def test_plain_transformers_refuses_a_compressed_folder(tmp_path) -> None:
    folder = prunekit.save_pretrained(magnitude_pruned(), tmp_path / "c", compressed=True)
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_compressed_folder_is_smaller_than_the_plain_one(tmp_path) -> None:
    model = magnitude_pruned(0.7)
    plain = prunekit.save_pretrained(model, tmp_path / "plain")
    small = prunekit.save_pretrained(model, tmp_path / "small", compressed=True)
    smaller = prunekit.save_pretrained(model, tmp_path / "int8", compressed=True, bits=8)
    plain_bytes = (plain / "model.safetensors").stat().st_size
    small_bytes = (small / COMPRESSED_WEIGHTS_FILE).stat().st_size
    int8_bytes = (smaller / COMPRESSED_WEIGHTS_FILE).stat().st_size
    assert small_bytes < 0.6 * plain_bytes
    assert int8_bytes < 0.75 * small_bytes
    # The plain folder reloads to the same weights as the compressed one.
    assert_same_weights(prunekit.from_pretrained(small), prunekit.from_pretrained(plain))


@pytest.mark.parametrize("unit", [["channel", "head"], "layer"])
def test_structurally_pruned_round_trip(unit, llama_dir, tmp_path) -> None:
    report = prunekit.prune_structured(tiny_llama(), INPUTS, ratio=0.5, unit=unit, progress=False)
    model = prunekit.finalize(prunekit.prune(report.model, 0.5).model).eval()
    folder = prunekit.save_pretrained(model, tmp_path / "s", source=llama_dir, compressed=True)
    meta = json.loads((folder / "prunekit.json").read_text())
    assert meta["structure"] and meta["original_config"]["num_hidden_layers"] == 2
    assert not (folder / "model.safetensors").exists()
    restored = prunekit.from_pretrained(folder)
    assert restored._prunekit_structure == meta["structure"]
    assert_same_weights(restored, model)
    assert torch.equal(_logits(restored), _logits(model))
    # Saved again, compressed or not, it still reloads to the same weights.
    again = prunekit.save_pretrained(restored, tmp_path / "again", compressed=True)
    assert_same_weights(prunekit.from_pretrained(again), model)
    plain = prunekit.save_pretrained(restored, tmp_path / "plain")
    assert_same_weights(prunekit.from_pretrained(plain), model)


def test_int8_quantized_model_stores_codes_and_loads_the_dequantized_values(tmp_path) -> None:
    pruned = magnitude_pruned(0.5)
    model = prunekit.quantize(pruned, bits=8, mode="int").model
    folder = prunekit.save_pretrained(model, tmp_path / "q", compressed=True)
    meta = json.loads((folder / "prunekit.json").read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    assert meta["compressed"][name]["quant"]["bits"] == 8
    assert "quant" not in meta["compressed"]["lm_head.weight"]  # not a quantize() target
    assert meta["quantization"]["mode"] == "int"
    stored = load_file(str(folder / COMPRESSED_WEIGHTS_FILE))
    assert stored[f"__prunekit_sparse__.{name}.values"].dtype == torch.int8
    restored = prunekit.from_pretrained(folder)
    assert_same_weights(restored, model)  # the weights of model are the dequantized values
    expected = quantize_tensor(pruned.state_dict()[name], 8).dequantize()
    assert torch.equal(restored.state_dict()[name], expected)
    assert torch.equal(_logits(restored), _logits(model))
    codes = getattr(restored, QUANT_ATTR)["layers"][name].codes
    assert torch.equal(codes, getattr(model, QUANT_ATTR)["layers"][name].codes)
    again = prunekit.save_pretrained(restored, tmp_path / "again", compressed=True)
    resaved = load_file(str(again / COMPRESSED_WEIGHTS_FILE))
    assert sorted(resaved) == sorted(stored)
    assert all(torch.equal(resaved[k], stored[k]) for k in stored)


def test_int4_groups_and_forced_index(tmp_path) -> None:
    model = prunekit.quantize(magnitude_pruned(0.5), bits=4, granularity="group:16", mode="int")
    model = model.model
    folder = prunekit.save_pretrained(model, tmp_path / "q4", compressed=True, index="bitmask")
    meta = json.loads((folder / "prunekit.json").read_text())["compressed"]
    assert {entry["index"] for entry in meta.values()} == {"bitmask"}
    assert meta["model.layers.0.mlp.down_proj.weight"]["quant"]["group"] == 16
    restored = prunekit.from_pretrained(folder)
    assert_same_weights(restored, model)


def test_masks_are_baked_in(tmp_path) -> None:
    masked = prunekit.prune(tiny_llama(), 0.6).model
    folder = prunekit.save_pretrained(masked, tmp_path / "m", compressed=True)
    restored = prunekit.from_pretrained(folder)
    assert_same_weights(restored, prunekit.finalize(masked))
    assert not any(k.endswith("_mask") for k in restored.state_dict())
    assert torch.equal(_logits(restored), _logits(masked))


@pytest.mark.parametrize("structured", [False, True])
def test_a_plain_folder_of_a_masked_model_holds_no_masks(structured, tmp_path) -> None:
    """Without ``compressed``, a model that still has masks is saved with its effective weights
    under the architecture's names: plain transformers loads it with no unexpected keys, and
    from_pretrained rebuilds it (after structured pruning too)."""
    model = tiny_llama()
    if structured:
        model = prunekit.prune_structured(model, INPUTS, ratio=0.5, progress=False).model
    masked = prunekit.prune(model, 0.6).model
    folder = prunekit.save_pretrained(masked, tmp_path / "m")
    stored = load_file(str(folder / "model.safetensors"))
    assert not any(k.endswith("_mask") for k in stored)
    restored = prunekit.from_pretrained(folder)
    assert_same_weights(restored, prunekit.finalize(masked))
    assert torch.equal(_logits(restored), _logits(masked))
    assert any(k.endswith("_mask") for k in masked.state_dict()) is not False  # still masked
    if not structured:
        plain, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, output_loading_info=True
        )
        assert not info["unexpected_keys"] and not info["missing_keys"]
        assert torch.equal(_logits(plain.eval()), _logits(masked))


def test_bad_arguments_are_refused_before_writing(tmp_path) -> None:
    model = magnitude_pruned()
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="compressed=True"):
        prunekit.save_pretrained(model, out, bits=8)
    with pytest.raises(ValueError, match="compressed=True"):
        prunekit.save_pretrained(model, out, index="csr")
    with pytest.raises(ValueError, match="'auto'.*bitmask, rle, csr, dense"):
        prunekit.save_pretrained(model, out, compressed=True, index="zip")
    with pytest.raises(ValueError, match="use 8"):
        prunekit.save_pretrained(model, out, compressed=True, bits=3)
    with pytest.raises(ValueError, match="granularity"):
        prunekit.save_pretrained(model, out, compressed=True, bits=8, granularity="rows")
    with pytest.raises(TypeError, match="Hugging Face"):
        prunekit.save_pretrained(torch.nn.Linear(2, 2), out, compressed=True)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_from_pretrained_refuses_what_it_cannot_read(tmp_path) -> None:
    folder = prunekit.save_pretrained(magnitude_pruned(), tmp_path / "c", compressed=True)
    with pytest.raises(TypeError, match="accepted: attn_implementation, dtype"):
        prunekit.from_pretrained(folder, revision="main")
    half = prunekit.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    meta_path = folder / "prunekit.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="up to version 2"):
        prunekit.from_pretrained(folder)
    meta_path.write_text(json.dumps(meta))
    (folder / COMPRESSED_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        prunekit.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        prunekit.from_pretrained(tmp_path / "nowhere")


def test_other_prunekit_json_files_still_load_as_plain_folders(tmp_path) -> None:
    model = magnitude_pruned()
    folder = tmp_path / "cli"
    model.save_pretrained(folder)  # as `prunekit prune` writes it
    (folder / "prunekit.json").write_text(json.dumps({"format": "prunekit-hf", "sparsity": 0.7}))
    assert_same_weights(prunekit.from_pretrained(folder), model)
    mine = prunekit.save_pretrained(
        model, tmp_path / "c", compressed=True, metadata={"compressed_weights": "mine"}
    )
    meta = json.loads((mine / "prunekit.json").read_text())
    assert meta["compressed_weights"]["file"] == COMPRESSED_WEIGHTS_FILE  # not hidden
    meta["compressed_weights"]["encoding"] = "zstd"
    (mine / "prunekit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'prunekit-sparse' up to version 2"):
        prunekit.from_pretrained(mine)


def test_bfloat16_model_round_trips_in_its_dtype(tmp_path) -> None:
    model = magnitude_pruned().to(torch.bfloat16)
    folder = prunekit.save_pretrained(model, tmp_path / "bf16", compressed=True)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    restored = prunekit.from_pretrained(folder)
    assert_same_weights(restored, model)
    assert torch.equal(_logits(restored), _logits(model))
