"""Damaged or hostile save folders: one clear error naming the file and the field, model untouched.

Each test damages a folder the way issue 14 found it could be damaged (a missing key, a shortened
packed mask, a tensor of the wrong dtype, a header that lies about its dtype, a huge declared
shape, a hostile structure record) and checks that loading raises ``SavedModelError`` (a
``ValueError``) naming the file and field, before the target model changed. Most tests remove
the integrity record first, so that they exercise the specific check rather than the checksum
(which catches every one of these edits by itself, as the first test shows).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import prunekit
from conftest import SmallCNN
from prunekit.compress.io import MASK_PREFIX, load_state
from prunekit.compress.validate import SavedModelError, read_header


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[type]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [type(m) for m in model.modules()]


def assert_unchanged(model: nn.Module, before) -> None:
    state, classes = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert classes == before[1]


def edit_meta(folder: Path, change, keep_integrity: bool = False) -> None:
    path = folder / "prunekit.json"
    meta = json.loads(path.read_text())
    if not keep_integrity:
        meta.pop("integrity", None)
    change(meta)
    path.write_text(json.dumps(meta))


def edit_tensors(folder: Path, change, keep_integrity: bool = False) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    if not keep_integrity:
        edit_meta(folder, lambda m: None)


@pytest.fixture
def folder(tmp_path) -> Path:
    torch.manual_seed(0)
    model = prunekit.prune(SmallCNN(), 0.6).model
    return prunekit.save(model, tmp_path / "saved")


@pytest.fixture
def target() -> nn.Module:
    """A model carrying masks of its own, which a failed load must leave in place."""
    torch.manual_seed(5)
    return prunekit.prune(SmallCNN(), 0.3, method="random", seed=3).model


def expect_refused(folder: Path, target: nn.Module, *words: str, model_free: bool = True) -> str:
    before = snapshot(target)
    with pytest.raises(SavedModelError) as info:
        prunekit.load(folder, target)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert_unchanged(target, before)
    if model_free:  # a problem of the file alone: found without a model too
        with pytest.raises((SavedModelError, FileNotFoundError)):
            load_state(folder)
    return message


def test_checksum_catches_any_edit_of_the_weights(folder, target) -> None:
    edit_tensors(folder, lambda t: t["fc1.weight"].mul_(1.0001), keep_integrity=True)
    expect_refused(folder, target, "model.safetensors", "changed or damaged after saving")


def test_checksum_catches_an_edit_of_what_loads_in_the_record(folder, target) -> None:
    edit_meta(folder, lambda m: m["aliases"].update({"x": "fc1.weight"}), keep_integrity=True)
    expect_refused(folder, target, "prunekit.json", "integrity.fields_sha256")


def test_informational_fields_may_change(folder, target) -> None:
    edit_meta(folder, lambda m: m.update(note="hi", total_sparsity="n/a"), keep_integrity=True)
    restored = prunekit.load(folder, target)
    assert restored.fc1.weight.count_nonzero() < restored.fc1.weight.numel()


def test_record_without_masks(folder, target) -> None:
    edit_meta(folder, lambda m: m.pop("masks"))
    expect_refused(folder, target, "prunekit.json", "masks", "missing")


def test_record_missing_one_layers_mask(folder, target) -> None:
    edit_meta(folder, lambda m: m["masks"].pop("fc1.weight"))
    expect_refused(folder, target, "model.safetensors", MASK_PREFIX + "fc1.weight", "not list")


def test_packed_mask_of_the_wrong_dtype(folder, target) -> None:
    key = MASK_PREFIX + "fc1.weight"
    edit_tensors(folder, lambda t: t.update({key: t[key].to(torch.int32)}))
    expect_refused(folder, target, key, "uint8 of shape [1024]", "int32")


def test_shortened_packed_mask(folder, target) -> None:
    key = MASK_PREFIX + "fc1.weight"
    edit_tensors(folder, lambda t: t.update({key: t[key][:-3].clone()}))
    expect_refused(folder, target, key, "uint8 of shape [1024]", "[1021]")


def test_dropped_mask_tensor(folder, target) -> None:
    key = MASK_PREFIX + "conv2.weight"
    edit_tensors(folder, lambda t: t.pop(key))
    expect_refused(folder, target, key, "missing")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16, torch.float64])
def test_weight_of_another_dtype(folder, target, dtype) -> None:
    edit_tensors(folder, lambda t: t.update({"fc1.weight": t["fc1.weight"].to(dtype)}))
    expect_refused(
        folder, target, "fc1.weight", "model has dtype float32", str(dtype)[6:], model_free=False
    )


def _patch_header(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + n].decode()
    assert old in header
    header = header.replace(old, new, 1)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data[8 + n :])


def _entry(path: Path, name: str) -> str:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8 : 8 + n])[name]
    return json.dumps({name: entry}, separators=(",", ":"))[1:-1]


def test_header_that_declares_int32_over_float32_bytes(folder, target) -> None:
    path = folder / "model.safetensors"
    entry = _entry(path, "fc1.weight")
    _patch_header(path, entry, entry.replace('"F32"', '"I32"'))
    expect_refused(folder, target, "model.safetensors", "changed or damaged")
    edit_meta(folder, lambda m: None)  # an older save, without checksums: the dtype check
    message = expect_refused(folder, target, "fc1.weight", "file has int32", model_free=False)
    assert "model has dtype float32" in message


def test_header_whose_dtype_does_not_fit_its_bytes(folder, target) -> None:
    path = folder / "model.safetensors"
    entry = _entry(path, "fc1.weight")
    _patch_header(path, entry, entry.replace('"F32"', '"F16"'))
    expect_refused(folder, target, "model.safetensors", "fc1.weight", "F16", "data_offsets")


def test_huge_declared_shape_is_refused_before_allocation(folder, target) -> None:
    path = folder / "model.safetensors"
    entry = _entry(path, "fc1.weight")
    _patch_header(path, entry, entry.replace("[32,256]", "[99999999,99999999]"))
    expect_refused(folder, target, "fc1.weight", "more than this machine's memory")
    edit_meta(folder, lambda m: m["masks"].update({"fc1.weight": [2**40, 2**40]}))
    expect_refused(folder, target, "masks['fc1.weight']", "more than this machine's memory")


def test_truncated_weights_file(folder, target) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    expect_refused(folder, target, "model.safetensors", "truncated")
    path.write_bytes(b"\x01\x02")
    expect_refused(folder, target, "model.safetensors", "too short")


def test_record_that_is_not_json(folder, target) -> None:
    (folder / "prunekit.json").write_text('{"format": "prunekit", "masks": ')
    expect_refused(folder, target, "prunekit.json", "line 1", "not valid JSON")


def test_record_of_wrong_types(folder, target) -> None:
    edit_meta(folder, lambda m: m.update(format_version="2"))
    expect_refused(folder, target, "prunekit.json", "version '2'")
    edit_meta(folder, lambda m: m.update(format_version=1, aliases=["a"]))
    expect_refused(folder, target, "prunekit.json", "aliases")
    edit_meta(folder, lambda m: m.update(aliases={}, masks={"fc1.weight": "32x256"}))
    expect_refused(folder, target, "prunekit.json", "masks")


def test_load_state_checks_too(folder) -> None:
    edit_tensors(folder, lambda t: t.update({"fc1.weight": t["fc1.weight"][:, :10].clone()}), True)
    with pytest.raises(SavedModelError, match="changed or damaged"):
        load_state(folder)


# ------------------------------------------------------------------- compressed folders


@pytest.fixture
def compressed(tmp_path) -> Path:
    torch.manual_seed(0)
    model = prunekit.prune(SmallCNN(), 0.8).model
    return prunekit.save(model, tmp_path / "c", compressed=True, bits=8)


def test_compressed_entry_with_an_unknown_dtype(compressed, target) -> None:
    edit_meta(compressed, lambda m: m["compressed"]["fc1.weight"].update(dtype="nonexistent"))
    expect_refused(compressed, target, "prunekit.json", "compressed['fc1.weight']", "nonexistent")


def test_compressed_entry_with_a_wrong_count(compressed, target) -> None:
    entry = json.loads((compressed / "prunekit.json").read_text())["compressed"]["fc1.weight"]
    edit_meta(compressed, lambda m: m["compressed"]["fc1.weight"].update(nnz=entry["nnz"] + 1))
    expect_refused(compressed, target, "model.safetensors", "'fc1.weight'", "cannot be decoded")


@pytest.mark.parametrize(("index", "array"), [("csr", "col"), ("rle", "gaps"), ("bitmask", "bits")])
def test_compressed_index_that_points_outside(tmp_path, target, index, array) -> None:
    torch.manual_seed(0)
    model = prunekit.prune(SmallCNN(), 0.8).model
    folder = prunekit.save(model, tmp_path / "c", compressed=True, index=index)
    key = f"__prunekit_sparse__.conv2.weight.{array}"
    edit_tensors(folder, lambda t: t[key].fill_(255))
    expect_refused(folder, target, "conv2.weight", array)


# ------------------------------------------------------------------- structure records


@pytest.fixture
def structured(tmp_path) -> Path:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = prunekit.prune_structured(SmallCNN(), x, ratio=0.5, progress=False).model
    return prunekit.save(model, tmp_path / "s")


def _change(meta: dict, module: str) -> dict:
    return next(c for c in meta["structure"][0]["changes"] if c["module"] == module)


# (edit of fc1's change, words of the error, found by the record's own check without a model)
HOSTILE = [
    (lambda c: c.update({"attrs": {"forward": "x"}}), ["'forward'", "not an attribute"], True),
    (lambda c: c["attrs"].update({"num_features": 3}), ["may not be changed on a"], False),
    (
        lambda c: c.update({"class": "prunekit.graph.modules.PrunableMultiheadAttention"}),
        ["only for", "torch.nn.modules.activation.MultiheadAttention", "Linear"],
        False,
    ),
    (lambda c: c.update({"class": "os.system"}), ["only prunekit's module classes"], True),
    (lambda c: c.update({"class": "prunekit.graph.modules.F"}), ["surgery only swaps in"], True),
    (lambda c: c["attrs"].update({"out_features": 5}), ["out_features", "tensors say"], False),
    (lambda c: c["tensors"].update({"weight": [64, 256]}), ["only shrinks"], False),
    (lambda c: c["tensors"].update({"weight": [16]}), ["number of dimensions"], False),
    (lambda c: c.update({"module": "nowhere"}), ["no module 'nowhere'"], False),
    (lambda c: c["attrs"].update({"out_features": True}), ["positive integer"], True),
]


@pytest.mark.parametrize(("edit", "words", "model_free"), HOSTILE)
def test_hostile_structure_records_are_refused(structured, target, edit, words, model_free) -> None:
    edit_meta(structured, lambda m: edit(_change(m, "fc1")))
    expect_refused(structured, target, "prunekit.json", "structure", *words, model_free=model_free)
    before = SmallCNN()
    with pytest.raises(SavedModelError):
        prunekit.load(structured, lambda: before)


def test_depth_records_are_checked(structured, target) -> None:
    bad = {"kind": "depth", "removed": [{"container": "fc1", "indices": [0], "before": 1}]}
    edit_meta(structured, lambda m: m["structure"].insert(0, bad))
    expect_refused(structured, target, "structure", "indices")
    edit_meta(structured, lambda m: m["structure"][0]["removed"][0].update(indices=[7], before=9))
    expect_refused(structured, target, "structure", "not a ModuleList", model_free=False)


def test_good_structure_still_loads(structured) -> None:
    restored = prunekit.load(structured, SmallCNN)
    assert restored.fc1.out_features == 16


def test_read_header_reports_tensor_layout(folder) -> None:
    info = read_header(folder / "model.safetensors")["fc1.weight"]
    assert info.dtype == "float32" and info.shape == (32, 256) and info.nbytes == 32 * 256 * 4
