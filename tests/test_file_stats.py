"""`prunekit stats` on every kind of output: the true per-layer sparsity, in model order, with
the same whole-model total as `prunekit count` (parameters once each, no buffers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import prunekit
from conftest import tiny_llama
from prunekit.cli import main
from prunekit.file_stats import file_stats, natural_key
from prunekit.masks import masked_parameters


def _cli_stats(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["stats", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _reference(model: nn.Module) -> tuple[list[tuple[str, int, int]], int, int]:
    """Slow and obvious: (name, params, zeros) of every floating parameter with two or more
    dimensions, in named_parameters order, and (params, zeros) over the distinct parameters."""
    rows, total, zeros, seen = [], 0, 0, set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        z = sum(1 for v in p.detach().flatten().tolist() if v == 0.0)
        total += p.numel()
        zeros += z
        if p.dim() >= 2:
            rows.append((name, p.numel(), z))
    return rows, total, zeros


def _check(report: dict, model: nn.Module) -> None:
    rows, total, zeros = _reference(model)
    got = [(r["name"], r["params"], r["zeros"]) for r in report["layers"]]
    assert got == rows
    assert (report["model_params"], report["model_zeros"]) == (total, zeros)


class WithBuffers(nn.Module):
    """Conv + BatchNorm (float and integer buffers) + a registered integer buffer + layers whose
    alphabetical order (fc10 < fc2 < fc3) and natural order differ from model order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc3 = nn.Linear(6, 12)
        self.fc10 = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 4)
        self.register_buffer("position_ids", torch.arange(16).unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc10(torch.relu(self.fc3(x)))))


@pytest.fixture
def net() -> WithBuffers:
    torch.manual_seed(0)
    model = WithBuffers()
    model.bn.running_mean.uniform_()  # non-zero statistics: counting them would show
    return model


@pytest.mark.parametrize(
    "kind", ["masked", "finalized", "compressed", "compressed-8bit", "compressed-csr"]
)
def test_save_folders(net, tmp_path, capsys, kind):
    masked = prunekit.prune(net, sparsity=0.6, scope="global").model
    options = {
        "masked": {},
        "finalized": {},
        "compressed": {"compressed": True},
        "compressed-8bit": {"compressed": True, "bits": 8},
        "compressed-csr": {"compressed": True, "index": "csr"},
    }[kind]
    model = masked if kind == "masked" else prunekit.finalize(masked)
    folder = prunekit.save(model, tmp_path / kind, **options)
    report = _cli_stats(folder, capsys)
    if kind == "compressed-8bit":  # quantization keeps zeros, and adds those rounded to zero
        model = prunekit.finalize(prunekit.load(folder, WithBuffers()))
    _check(report, prunekit.finalize(model) if kind == "masked" else model)
    assert not any(r["name"].startswith("__prunekit") for r in report["layers"])
    flagged = [r["name"] for r in report["layers"] if r["masked"]]
    pruned = [f"{m}.{p}" for m, _, p in masked_parameters(masked)]
    assert pruned == ["conv.weight", "fc3.weight", "fc10.weight"]  # not the output layer
    assert flagged == (pruned if kind == "masked" else [])
    # the whole-model total is what prunekit.stats and prunekit count call the parameters
    assert report["model_params"] == prunekit.stats(model).model_params
    assert report["model_params"] == prunekit.count(model, torch.randn(1, 2, 5, 5)).params
    # 60 % of the pruned layers' weights (global scope: together) are zero
    n = sum(r["params"] for r in report["layers"] if r["name"] in pruned)
    z = sum(r["zeros"] for r in report["layers"] if r["name"] in pruned)
    assert z == round(0.6 * n) if kind != "compressed-8bit" else z >= round(0.6 * n)


class Embedded(nn.Module):
    """An embedding (not prunable by default) before layers whose names sort out of order."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.fc3 = nn.Linear(6, 12)
        self.fc10 = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 4)


@pytest.mark.parametrize("compressed", [False, True])
def test_save_folder_model_order_with_an_unpruned_embedding(tmp_path, capsys, compressed):
    torch.manual_seed(0)
    model = prunekit.finalize(prunekit.prune(Embedded(), sparsity=0.5).model)
    folder = prunekit.save(model, tmp_path / "e", compressed=compressed)
    _check(_cli_stats(folder, capsys), model)  # embed, fc3, fc10, fc2


def test_single_file_natural_order(tmp_path, capsys):
    tensors = {
        "layers.10.weight": torch.zeros(3, 2),
        "layers.2.weight": torch.tensor([[0.0, 1.0], [2.0, 3.0]]),
        "layers.2.bias": torch.tensor([0.0, 1.0]),
        "layers.1.bn.num_batches_tracked": torch.tensor(7),
        "layers.1.bn.running_var": torch.ones(4),
        "position_ids": torch.arange(8),
    }
    save_file(tensors, str(tmp_path / "w.safetensors"))
    report = _cli_stats(tmp_path / "w.safetensors", capsys)
    assert [(r["name"], r["params"], r["zeros"]) for r in report["layers"]] == [
        ("layers.2.weight", 4, 1),
        ("layers.10.weight", 6, 6),
    ]
    assert (report["model_params"], report["model_zeros"]) == (12, 8)
    assert sorted(["b.10", "b.9", "a.2.x", "a.10"], key=natural_key) == [
        "a.2.x",
        "a.10",
        "b.9",
        "b.10",
    ]


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


def _count_cli(folder, capsys) -> int:
    capsys.readouterr()
    assert main(["count", str(folder), "--json", "--seq-len", "8"]) == 0
    return json.loads(capsys.readouterr().out)["params"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["finalized", "compressed", "structured"])
def test_hf_folders_agree_with_model_and_count(tmp_path, capsys, kind):
    model = tiny_bert()
    if kind == "structured":
        inputs = {"input_ids": torch.randint(0, 40, (2, 8))}
        model = prunekit.prune_structured(model, inputs, ratio=0.5, progress=False).model
    else:
        model = prunekit.finalize(prunekit.prune(model, sparsity=0.5).model)
    folder = prunekit.save_pretrained(
        model, tmp_path / kind, compressed=kind == "compressed", overwrite=True
    )
    report = _cli_stats(folder, capsys)
    _check(report, model)  # BERT's position_ids / token_type_ids buffers are not counted
    if kind == "compressed":
        assert (folder / "prunekit-compressed.safetensors").is_file()
    else:
        assert report["model_params"] == _count_cli(folder, capsys)
    if kind == "structured":
        widths = {r["name"]: r["shape"] for r in report["layers"]}
        inter = "encoder.layer.0.intermediate.dense.weight"
        assert widths[inter] == list(model.encoder.layer[0].intermediate.dense.weight.shape)
        assert widths[inter][0] < 24


@pytest.mark.filterwarnings("ignore")
def test_tied_weights_counted_once(tmp_path, capsys):
    model = prunekit.finalize(
        prunekit.prune(tiny_llama(tie_word_embeddings=True), sparsity=0.5).model
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hf = _cli_stats(prunekit.save_pretrained(model, tmp_path / "hf"), capsys)
    plain = _cli_stats(prunekit.save(model, tmp_path / "plain", compressed=True), capsys)
    rows, total, zeros = _reference(model)
    for report in (hf, plain):
        assert (report["model_params"], report["model_zeros"]) == (total, zeros)
    assert [(r["name"], r["params"], r["zeros"]) for r in hf["layers"]] == rows


def test_python_api_and_errors(net, tmp_path):
    folder = prunekit.save(prunekit.finalize(prunekit.prune(net, 0.5).model), tmp_path / "f")
    report = file_stats(folder)
    assert report.layer("fc10").params == 144
    with pytest.raises(FileNotFoundError, match="no such file"):
        file_stats(tmp_path / "missing")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors only"):
        file_stats(tmp_path / "w.bin")
    # a compressed folder whose record lost a tensor's entry: one clear error, exit 2 in the CLI
    folder = prunekit.save(net, tmp_path / "c", compressed=True)
    meta = json.loads((folder / "prunekit.json").read_text())
    del meta["compressed"]["fc10.weight"]
    (folder / "prunekit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"__prunekit_sparse__\.fc10\.weight\..*no tensor listed"):
        file_stats(folder)
    assert main(["stats", str(folder)]) == 2
