"""``prunekit compress`` and ``prunekit recipes`` through ``prunekit.cli.main`` on tiny Hugging
Face folders (a Llama and a BERT, with a word-level tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

import cli_models
from prunekit.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = cli_models.WORDS


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    generator = torch.Generator().manual_seed(0)
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, 60, (4000,), generator=generator)))
    return path


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return cli_models.llama_folder(transformers, tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return cli_models.bert_folder(transformers, tmp_path_factory.mktemp("hf") / "bert")


def test_recipes_command_lists_and_prints(capsys) -> None:
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert "llm-2of4-int8" in listed and "encoder-small" in listed and "cnn-small" in listed
    assert main(["recipes", "llm-2of4-int8"]) == 0
    assert "sparsegpt" in capsys.readouterr().out
    assert main(["recipes", "nope"]) == 2


def test_compress_llm_recipe_and_resume(llama_folder, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        "compress",
        str(llama_folder),
        "--recipe",
        "llm-2of4-int8",
        "--out",
        str(out),
        "--calib",
        str(text_file),
        "--n-samples",
        "4",
        "--seq-len",
        "16",
        "--eval",
        f"perplexity:{text_file}",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "03-save" in printed and "perplexity" in printed
    import prunekit

    model = prunekit.from_pretrained(out / "model")
    up = model.model.layers[1].mlp.up_proj.weight.detach()
    kept = (up.reshape(up.shape[0], -1, 4) != 0).sum(-1)
    assert torch.all(kept <= 2)
    # 2 of every 4 kept; int8 may round a tiny kept weight to zero, nothing more
    assert (kept == 2).float().mean() > 0.99
    assert (out / "model" / "tokenizer.json").is_file()  # side files kept
    report = json.loads((out / "report.json").read_text())
    assert [r["stage"] for r in report["table"]] == [
        "dense",
        "01-oneshot",
        "02-quantize",
        "03-save",
    ]
    assert report["table"][-1]["file_fraction"] < 0.5
    model_files = [
        p
        for p in (out / "model").iterdir()
        if p.suffix == ".safetensors" or p.name in ("config.json", "prunekit.json")
    ]
    assert report["table"][-1]["file_bytes"] == sum(p.stat().st_size for p in model_files)
    assert report["quality"] == {"name": "perplexity", "higher_is_better": False}
    assert report["run"]["command"].startswith("prunekit compress ")
    assert "llm-2of4-int8" in report["run"]["command"] and report["run"]["seed"] == 0

    assert main(args) == 0  # the same command again: every stage comes from its checkpoint
    assert "resuming after stage 3" in capsys.readouterr().out


def test_compress_encoder_recipe_with_training_data(bert_folder, text_file, tmp_path) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n"
        "  - oneshot: {method: wanda, sparsity: 0.5}\n"
        "  - finetune: {teacher: dense, max_steps: 2, kd_weight: 0.0,"
        ' hidden_layers: "re:encoder\\\\.layer\\\\.\\\\d+\\\\.output$"}\n'
        "  - quantize: {bits: 8, mode: int}\n"
        "  - save: {compressed: true}\n"
        "measure: {latency: false}\n"
    )
    args = [
        "compress",
        str(bert_folder),
        "--recipe",
        str(recipe),
        "--out",
        str(out),
        "--calib",
        str(text_file),
        "--data",
        str(text_file),
        "--n-samples",
        "4",
        "--seq-len",
        "16",
        "--eval",
        "fidelity",
    ]
    assert main(args) == 0
    table = json.loads((out / "report.json").read_text())["table"]
    assert table[0]["quality"] == pytest.approx(1.0)
    assert 0.0 < table[-1]["quality"] < 1.0


def test_compress_explains_why_a_bare_safetensors_file_is_not_enough(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(4, 4)}, str(tmp_path / "w.safetensors"))
    args = ["compress", str(tmp_path / "w.safetensors"), "--recipe", "llm-2of4-int8"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "no architecture to run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "nope"], "not a shipped recipe"),
        (["--recipe", "encoder-small"], "needs --data"),
        (["--recipe", "llm-2of4-int8", "--calib", "missing.txt"], "no such file"),
        (["--recipe", "llm-2of4-int8", "--seq-len", "4096"], "above the model's 64 positions"),
        (["--recipe", "llm-2of4-int8", "--eval", "perplexity:missing.txt"], "no such file"),
        (["--recipe", "llm-2of4-int8", "--eval", "bogus"], "unknown measure"),
    ],
)
def test_compress_bad_input_is_one_line_and_writes_nothing(
    llama_folder, tmp_path, capsys, extra, message
) -> None:
    out = tmp_path / "run"
    base = ["compress", str(llama_folder), "--out", str(out), "--seq-len", "16"]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--calib", "--data", "--eval"])
def test_compress_refuses_binary_text_files(llama_folder, tmp_path, capsys, flag) -> None:
    """--calib, --data and --eval perplexity: files must be UTF-8 text: refused up front,
    naming the flag and the file, nothing written."""
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"w1 w2 \xff\x00\x01" * 64)
    value = f"perplexity:{binary}" if flag == "--eval" else str(binary)
    out = tmp_path / "run"
    args = ["compress", str(llama_folder), "--recipe", "llm-2of4-int8", "--out", str(out)]
    assert main([*args, "--seq-len", "16", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value}: not a UTF-8 text file (binary data at byte 6" in err
    assert "Traceback" not in err and not out.exists()


def test_compress_goal_search_exit_status(llama_folder, text_file, tmp_path, capsys) -> None:
    """A goal recipe runs its search from the CLI; an unreachable goal exits 3 with the
    closest model written."""
    recipe = tmp_path / "goal.yaml"
    base = [
        "compress",
        str(llama_folder),
        "--recipe",
        str(recipe),
        "--calib",
        str(text_file),
        "--n-samples",
        "2",
        "--seq-len",
        "16",
    ]
    stages = (
        "measure: {latency: false}\n"
        "stages:\n  - oneshot: {method: magnitude, sparsity: search}\n  - save: {}\n"
    )
    recipe.write_text("goal: {nonzeros: 0.6, tolerance: 0.1}\n" + stages)
    assert main([*base, "--out", str(tmp_path / "met")]) == 0
    printed = capsys.readouterr().out
    assert "goal met" in printed and "<- chosen" in printed
    recipe.write_text("goal: {nonzeros: 0.01}\n" + stages)  # beyond the searched range
    assert main([*base, "--out", str(tmp_path / "missed")]) == 3
    captured = capsys.readouterr()
    assert "goal NOT met" in captured.out and "goal was not met" in captured.err
    assert (tmp_path / "missed" / "model" / "config.json").is_file()
