"""The prunekit command: --help, --version, stats and prune on HF folders and safetensors files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit
from cli_models import llama_with_plain_tokenizer
from prunekit.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file(
        {
            "fc1.weight": torch.randn(16, 32),
            "fc1.bias": torch.randn(16),
            "embed.weight": torch.randn(10, 32),
            "conv.weight": torch.randn(8, 4, 3, 3),
        },
        str(path),
    )
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunekit", *args], capture_output=True, text=True)


def test_help_and_version() -> None:
    out = run_cli("--help")
    assert out.returncode == 0 and "stats" in out.stdout and "prune" in out.stdout
    assert run_cli("--version").stdout.strip() == f"prunekit {prunekit.__version__}"
    assert "--pattern" in run_cli("prune", "--help").stdout


def test_prune_safetensors_file_2_4(weights_file, tmp_path, capsys) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["prune", str(weights_file), "--pattern", "2:4", "--out", str(out)]) == 0
    pruned, original = load_file(str(out)), load_file(str(weights_file))
    assert pruned.keys() == original.keys()
    assert torch.all((pruned["fc1.weight"].reshape(16, 8, 4) != 0).sum(-1) == 2)
    assert torch.all((pruned["conv.weight"].reshape(8, 9, 4) != 0).sum(-1) == 2)
    assert torch.equal(pruned["embed.weight"], original["embed.weight"])  # embeddings untouched
    assert torch.equal(pruned["fc1.bias"], original["fc1.bias"])
    assert torch.count_nonzero(original["fc1.weight"]) == 16 * 32  # input untouched
    assert main(["stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.split("wrote")[-1].split("\n", 1)[1])
    rows = {r["name"]: r for r in stats["layers"]}
    assert rows["fc1.weight"]["sparsity"] == 0.5 and rows["embed.weight"]["sparsity"] == 0.0


def test_prune_hf_folder_reloads_with_from_pretrained(llama_dir, tmp_path) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", str(llama_dir), "--sparsity", "0.6", "--out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    report = prunekit.stats(model)
    targeted = [r for r in report.layers if ".layers." in r.name]
    assert sum(r.zeros for r in targeted) == round(0.6 * sum(r.params for r in targeted))
    assert report.layer("lm_head").zeros == 0
    assert (out / "tokenizer_config.json").is_file() and (out / "prunekit.json").is_file()
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["settings"]["sparsity"] == 0.6
    ids = torch.arange(8)[None]
    assert torch.isfinite(model(ids).logits).all()


def test_prune_refuses_to_overwrite(llama_dir, weights_file, tmp_path, capsys) -> None:
    assert main(["prune", str(llama_dir), "--out", str(llama_dir)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    existing = tmp_path / "exists.safetensors"
    existing.write_text("x")
    assert main(["prune", str(weights_file), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_text() == "x"


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "missing", "--out", "o"], "no such file"),
        (["prune", "{w}", "--pattern", "5:4", "--out", "{t}/o.safetensors"], "1 <= N < M"),
        (
            ["prune", "{w}", "--sparsity", "1.2", "--out", "{t}/o.safetensors"],
            "--sparsity: must be in [0, 1)",
        ),
        (["prune", "{w}", "--method", "taylor", "--out", "{t}/o.safetensors"], "not available"),
        (["stats", "{t}/model.bin"], "no such file"),
    ],
)
def test_cli_errors_are_clear(weights_file, tmp_path, capsys, args, message) -> None:
    args = [a.format(w=weights_file, t=tmp_path) for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_stats_reads_prunekit_save_folder(tmp_path, capsys) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    folder = prunekit.save(prunekit.prune(model, 0.5).model, tmp_path / "s")
    assert main(["stats", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "0.weight *" in text and "50.00 %" in text and "__prunekit_mask__" not in text


def test_oneshot_command_on_hf_folder_with_tokenizer(llama_dir, tmp_path, capsys) -> None:
    pytest.importorskip("tokenizers")
    folder, text = llama_with_plain_tokenizer(llama_dir, tmp_path, 3000)
    out = tmp_path / "sparse"
    args = [
        "oneshot",
        str(folder),
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--calib",
        str(text),
        "--n-samples",
        "8",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "prunekit oneshot (method=sparsegpt" in printed and "prunekit prune" not in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    up = model.model.layers[1].mlp.up_proj.weight.detach()
    # exactly two of every four consecutive inputs kept (SparseGPT's updates leave them non-zero)
    assert torch.all((up.reshape(up.shape[0], -1, 4) != 0).sum(-1) == 2)
    assert json.loads((out / "prunekit.json").read_text())["settings"]["method"] == "sparsegpt"
    assert (out / "tokenizer.json").is_file()
    assert (
        main(["oneshot", str(folder), "--calib", "missing.txt", "--out", str(tmp_path / "x")]) == 2
    )


def test_prune_file_whole_model_row_counts_every_tensor_as_stats_does(
    weights_file, tmp_path, capsys
) -> None:
    """The "whole model" totals of prune on a bare file include its biases and embeddings, as
    `prunekit stats` on the written file counts them."""
    out = tmp_path / "out.safetensors"
    assert main(["prune", str(weights_file), "--sparsity", "0.5", "--out", str(out), "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert main(["stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert pruned["model_params"] == stats["model_params"] == 16 * 32 + 16 + 10 * 32 + 8 * 36
    assert pruned["model_zeros"] == stats["model_zeros"]


def test_oneshot_refuses_a_binary_calibration_file(llama_dir, tmp_path, capsys) -> None:
    """A binary --calib file (here gzip) is refused before any model is loaded, saying why,
    instead of calibrating on replacement characters."""
    import gzip

    calib = tmp_path / "text.txt.gz"
    calib.write_bytes(gzip.compress(b"w1 w2 w3 " * 100))
    out = tmp_path / "sparse"
    assert main(["oneshot", str(llama_dir), "--calib", str(calib), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--calib {calib}: not a UTF-8 text file" in err and "gzip-compressed" in err
    assert not out.exists()


def test_cli_reports_broken_files_without_a_traceback(tmp_path, capsys) -> None:
    broken = tmp_path / "bad.safetensors"
    broken.write_bytes(b"\xff" * 64)
    assert main(["stats", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error:") and "Traceback" not in err


def test_cli_creates_the_output_folder(weights_file, tmp_path) -> None:
    out = tmp_path / "new" / "deeper" / "o.safetensors"
    assert main(["prune", str(weights_file), "--out", str(out)]) == 0
    assert out.is_file()


def test_cli_never_loads_pickled_checkpoints(llama_dir, tmp_path, capsys) -> None:
    import shutil

    folder = tmp_path / "bin-only"
    shutil.copytree(llama_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert main(["prune", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "never loads pickle" in capsys.readouterr().err
