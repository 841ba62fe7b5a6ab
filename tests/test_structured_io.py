"""Saving and loading structurally pruned models: safetensors + JSON, factories, HF folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import prunekit
import prunekit.graph as pg
from prunekit.graph.modules import PrunableMultiheadAttention
from test_graph_zoo import ResNet, RNNNet, ViT, _randomize_bn, assert_close, hf_models, outputs

IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# tiny models run far faster on one thread (conftest.one_thread), and leave the other core be
pytestmark = pytest.mark.usefixtures("one_thread")


def _fresh(cls):
    def factory():
        torch.manual_seed(1234)  # different weights from the pruned model's
        return cls()

    return factory


@pytest.mark.parametrize(
    "cls, inputs, unit",
    [
        (ResNet, IMG, "channel"),
        (ResNet, IMG, "layer"),
        (ViT, IMG, ["channel", "head"]),
        (
            RNNNet,
            torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0)),
            "channel",
        ),
    ],
)
def test_round_trip_with_a_factory(cls, inputs, unit, tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(cls())
    pruned = pg.prune_structured(model, inputs, ratio=0.5, unit=unit, progress=False).model
    folder = prunekit.save(pruned, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "prunekit.json"]
    meta = json.loads((folder / "prunekit.json").read_text())
    assert meta["structure"][0]["kind"] == ("depth" if unit == "layer" else "width")
    restored = prunekit.load(folder, _fresh(cls)).eval()
    assert_close(outputs(restored, inputs), outputs(pruned.eval(), inputs), atol=0)
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    again = prunekit.load(folder, _fresh(cls)())  # an instance works too
    assert_close(outputs(again.eval(), inputs), outputs(pruned, inputs), atol=0)
    if cls is ViT and unit != "layer":
        assert isinstance(restored.blocks[0].attn, PrunableMultiheadAttention)


def test_pruned_twice_and_resaved(tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(ResNet())
    once = pg.prune_structured(model, IMG, ratio=0.3, progress=False).model
    twice = pg.prune_structured(once, IMG, ratio=1 / 4, unit="layer", progress=False).model
    folder = prunekit.save(twice, tmp_path / "m")
    restored = prunekit.load(folder, _fresh(ResNet)).eval()
    assert_close(outputs(restored, IMG), outputs(twice.eval(), IMG), atol=0)
    resaved = prunekit.load(prunekit.save(restored, tmp_path / "again"), _fresh(ResNet)).eval()
    assert_close(outputs(resaved, IMG), outputs(twice, IMG), atol=0)


def test_wrong_architecture_is_refused_before_changing_it(tmp_path) -> None:
    torch.manual_seed(0)
    pruned = pg.prune_structured(_randomize_bn(ResNet()), IMG, ratio=0.5, progress=False).model
    folder = prunekit.save(pruned, tmp_path / "m")
    other = ViT()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises((ValueError, AttributeError)):
        prunekit.load(folder, other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError, match="callable"):
        prunekit.load(folder, 42)


def test_refuses_foreign_classes_in_the_record(tmp_path) -> None:
    from prunekit.compress.structured import apply_structure

    steps = [
        {
            "kind": "width",
            "changes": [{"module": "fc", "class": "os.system", "tensors": {}, "attrs": {}}],
        }
    ]
    with pytest.raises(ValueError, match="only prunekit's module classes"):
        apply_structure(ResNet(), steps)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("unit", ["channel", "head", "layer"])
def test_hugging_face_folders_reload(name: str, unit: str, tmp_path) -> None:
    model, inputs = hf_models()[name]
    pruned = pg.prune_structured(model, inputs, ratio=0.5, unit=unit, progress=False).model
    folder = pg.save_pretrained(pruned, tmp_path / "out")
    meta = json.loads((folder / "prunekit.json").read_text())
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    restored = pg.from_pretrained(folder)
    assert_close(outputs(restored, inputs), outputs(pruned, inputs), atol=1e-6)
    plain_expected = not (unit == "head" and name in ("bert", "gpt2")) and not (
        unit == "channel" and name == "gpt2"
    )
    assert meta["plain_loadable"] == plain_expected
    if plain_expected:
        plain = type(model).from_pretrained(folder).eval()
        assert_close(outputs(plain, inputs), outputs(pruned, inputs), atol=1e-6)
    else:
        with pytest.raises(RuntimeError, match="mismatch"):  # transformers' size-mismatch error
            type(model).from_pretrained(folder)
    if name == "gpt2":
        assert restored.lm_head.weight is restored.transformer.wte.weight


def test_save_pretrained_needs_a_hugging_face_model(tmp_path) -> None:
    with pytest.raises(TypeError, match="Hugging Face"):
        pg.save_pretrained(nn.Linear(2, 2), tmp_path / "x")


def test_structured_safetensors_hold_only_the_kept_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    pruned = pg.prune_structured(
        model, torch.randn(1, 8), ratio=0.75, round_to=1, progress=False
    ).model
    folder = prunekit.save(pruned, tmp_path / "m")
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_slice("0.weight").get_shape() == [8, 8]
    meta = json.loads((folder / "prunekit.json").read_text())
    change = {c["module"]: c for c in meta["structure"][0]["changes"]}
    assert change["0"]["attrs"] == {"out_features": 8} and change["2"]["tensors"] == {
        "weight": [2, 8]
    }


def test_qwen2_layer_types_follow_depth_then_width_pruning(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (1, 7)), "use_cache": False}
    shallow = pg.prune_structured(
        model,
        inputs,
        ratio=0.5,
        unit="layer",
        layers=["model.layers.1", "model.layers.3"],
        progress=False,
    )
    assert (
        shallow.removed_layers == ["model.layers.1", "model.layers.3"]
        or len(shallow.removed_layers) == 1
    )
    pruned = pg.prune_structured(
        shallow.model, inputs, ratio=0.5, unit=["channel", "head"], gqa="q", progress=False
    ).model
    kept = [i for i in range(4) if f"model.layers.{i}" not in shallow.removed_layers]
    assert pruned.config.layer_types == [config.layer_types[i] for i in kept]
    folder = pg.save_pretrained(pruned, tmp_path / "q")
    restored = pg.from_pretrained(folder)
    assert restored.config.layer_types == pruned.config.layer_types
    assert_close(outputs(restored, inputs), outputs(pruned, inputs), atol=1e-6)
