"""save / save_pretrained: accelerated models, quantized models, empty folders, permissions,
crash-safe overwrite."""

from __future__ import annotations

import json
import os

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


# ------------------------------------------------------------------- folders and permissions


def test_save_accepts_an_existing_empty_folder(tmp_path, cnn_input) -> None:
    model = _sparse_cnn()
    for compressed in (False, True):
        target = tmp_path / f"empty{compressed}"
        target.mkdir()
        prunekit.save(model, target, compressed=compressed)
        assert torch.equal(prunekit.load(target, SmallCNN())(cnn_input), model(cnn_input))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prunekit.save(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def _modes(folder) -> set[int]:
    return {p.stat().st_mode & 0o777 for p in [folder, *folder.iterdir()]}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask) -> None:
    transformers = pytest.importorskip("transformers")  # noqa: F841
    model = _sparse_cnn()
    llama = prunekit.finalize(prunekit.prune(tiny_llama(), 0.5).model)
    old = os.umask(umask)
    try:
        folders = [
            prunekit.save(model, tmp_path / "plain"),
            prunekit.save(model, tmp_path / "compressed", compressed=True),
            prunekit.save_pretrained(llama, tmp_path / "hf"),
            prunekit.save_pretrained(llama, tmp_path / "hfc", compressed=True),
        ]
        folders.append(prunekit.save(model, tmp_path / "plain", overwrite=True))
    finally:
        os.umask(old)
    for folder in folders:
        dirs = {folder.stat().st_mode & 0o777}
        files = {p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert dirs == {0o777 & ~umask}, folder
        assert files == {0o666 & ~umask}, folder


# ------------------------------------------------------------------- interrupted overwrites


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_old_version_is_restored_after_a_kill_between_the_renames(tmp_path, cnn_input) -> None:
    old_model, new_model = _sparse_cnn(), prunekit.prune(SmallCNN(), 0.5).model
    target = prunekit.save(old_model, tmp_path / "net")
    pid = _dead_pid()
    # what a process killed after its first rename leaves: the old version aside, the new one
    # complete in its temporary folder, nothing under the final name
    aside = tmp_path / f".net.old-{pid}-0badc0de"
    os.replace(target, aside)
    prunekit.save(new_model, tmp_path / "staging")
    os.replace(tmp_path / "staging", tmp_path / f".net.tmp-{pid}-0badc0de")
    (tmp_path / ".net.tmp-1a2b3c").mkdir()  # an older prunekit's temporary name
    restored = prunekit.load(target, SmallCNN())
    assert torch.equal(restored(cnn_input), old_model(cnn_input))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_the_next_save_repairs_and_overwrites(tmp_path, cnn_input) -> None:
    old_model, new_model = _sparse_cnn(), prunekit.prune(SmallCNN(), 0.5).model
    target = prunekit.save(old_model, tmp_path / "net")
    os.replace(target, tmp_path / f".net.old-{_dead_pid()}-feedbeef")
    with pytest.raises(FileExistsError):  # the restored old version is there again
        prunekit.save(new_model, target)
    assert torch.equal(prunekit.load(target, SmallCNN())(cnn_input), old_model(cnn_input))
    prunekit.save(new_model, target, overwrite=True)
    assert torch.equal(prunekit.load(target, SmallCNN())(cnn_input), new_model(cnn_input))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_a_running_writers_temporary_folder_is_left_alone(tmp_path) -> None:
    busy = tmp_path / f".net.tmp-{os.getppid()}-12345678"
    busy.mkdir()
    prunekit.save(_sparse_cnn(), tmp_path / "net")
    assert busy.is_dir()


def test_files_and_folders_are_flushed_to_disk(tmp_path, monkeypatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    prunekit.save(_sparse_cnn(), tmp_path / "net")
    assert len(synced) >= 4  # two files, the new folder, its parent


# ------------------------------------------------------------------- quantized in any mode


@pytest.mark.parametrize(
    ("bits", "granularity", "symmetric"),
    [(8, "per_channel", True), (4, "group:16", True), (8, "group:32", False)],
)
def test_fake_quantized_model_saves_as_small_as_int_mode(
    tmp_path, cnn_input, bits, granularity, symmetric
) -> None:
    model = _sparse_cnn()
    options = dict(bits=bits, granularity=granularity, symmetric=symmetric)
    fake = prunekit.quantize(model, **options).model  # mode="fake", the default
    real = prunekit.quantize(model, **options, mode="int").model
    sizes = {}
    for name, quantized in (("fake", fake), ("int", real)):
        folder = prunekit.save(quantized, tmp_path / name, compressed=True)
        sizes[name] = (folder / "model.safetensors").stat().st_size
        entries = json.loads((folder / "prunekit.json").read_text())["compressed"]
        assert all(entries[f"{n}.weight"]["quant"]["bits"] == bits for n in ("conv1", "fc1")), name
        restored = prunekit.load(folder, SmallCNN())
        for key, value in quantized.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), (name, key)
    assert sizes["fake"] == sizes["int"]
    plain = prunekit.save(model, tmp_path / "float", compressed=True)
    assert sizes["fake"] < 0.75 * (plain / "model.safetensors").stat().st_size


def test_weights_changed_after_fake_quantization_stay_floats(tmp_path) -> None:
    fake = prunekit.quantize(_sparse_cnn(), bits=8).model
    with torch.no_grad():
        fake.fc1.weight.mul_(1.001)  # off the grid now
    folder = prunekit.save(fake, tmp_path / "q", compressed=True)
    entries = json.loads((folder / "prunekit.json").read_text())["compressed"]
    assert "quant" not in entries["fc1.weight"] and "quant" in entries["conv2.weight"]
    assert torch.equal(prunekit.load(folder, SmallCNN()).fc1.weight, fake.fc1.weight)


def test_codes_on_grid_recovers_every_scale_exactly() -> None:
    from prunekit.compress.io import codes_on_grid
    from prunekit.compress.quantize import quantize_tensor

    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        w = torch.randn(16, 40, generator=gen) * torch.rand(16, 1, generator=gen) * 3
        for granularity, symmetric in (("per_channel", True), ("group:16", False)):
            bits = 8 if i % 2 else 4
            values = quantize_tensor(w, bits, granularity, symmetric).dequantize()
            q = codes_on_grid(values, bits, granularity, symmetric)
            assert q is not None and torch.equal(q.dequantize(), values)
    assert codes_on_grid(w, 8, "per_channel") is None


def test_fake_quantized_hugging_face_model_saves_codes(tmp_path) -> None:
    pytest.importorskip("transformers")
    base = prunekit.finalize(prunekit.prune(tiny_llama(), 0.5).model)
    sizes = {}
    for mode in ("fake", "int"):
        model = prunekit.quantize(base, bits=8, mode=mode).model
        folder = prunekit.save_pretrained(model, tmp_path / mode, compressed=True)
        sizes[mode] = (folder / "prunekit-compressed.safetensors").stat().st_size
        restored = prunekit.from_pretrained(folder)
        for key, value in model.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), (mode, key)
    assert sizes["fake"] == sizes["int"]
