"""The prune-structured and count commands, through ``prunekit.cli.main``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import prunekit.graph as pg
from conftest import tiny_llama
from prunekit.cli import main

transformers = pytest.importorskip("transformers")


def run(*argv: str) -> int:
    return main(list(argv))


def test_prune_structured_writes_a_loadable_folder(llama_dir, tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    assert (
        run(
            "prune-structured",
            str(llama_dir),
            "--out",
            str(out),
            "--unit",
            "channel,head",
            "--ratio",
            "0.5",
            "--round-to",
            "8",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "params" in printed and f"wrote {out}" in printed
    assert (out / "tokenizer_config.json").is_file()
    meta = json.loads((out / "prunekit.json").read_text())
    assert (
        meta["plain_loadable"] and meta["report"]["params_after"] < meta["report"]["params_before"]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 32 and model.config.num_key_value_heads == 1
    restored = pg.from_pretrained(out)
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(restored(ids).logits, model.eval()(ids).logits)


def test_prune_structured_layers_and_targets(llama_dir, tmp_path, capsys) -> None:
    out = tmp_path / "p"
    assert (
        run(
            "prune-structured",
            str(llama_dir),
            "--out",
            str(out),
            "--unit",
            "layer",
            "--ratio",
            "0.5",
            "--json",
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0])
    assert len(report["removed_layers"]) == 1
    assert (
        run(
            "prune-structured",
            str(llama_dir),
            "--out",
            str(out),
            "--target-macs",
            "0.6",
            "--overwrite",
        )
        == 0
    )
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["report"]["macs_after"] <= 0.6 * meta["report"]["macs_before"]


def test_count_command(llama_dir, capsys) -> None:
    assert run("count", str(llama_dir), "--seq-len", "4", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    # reference: every parameter once; MACs = tokens x in x out of every Linear (lm_head
    # included) + QK^T and AV: layers x heads x seq x seq x head_dim, twice
    model = tiny_llama()
    params = sum(p.numel() for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    linear = sum(m.in_features * m.out_features for m in linears)
    c = model.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    attention = 2 * c.num_hidden_layers * heads * 4 * 4 * head_dim
    want = (params, 4 * linear + attention, "1x4")
    assert (report["params"], report["macs"], report["inputs"]) == want
    assert run("count", str(llama_dir)) == 0
    assert "total" in capsys.readouterr().out


def test_cli_errors(llama_dir, tmp_path, capsys) -> None:
    def error(*argv: str) -> str:
        assert run(*argv) == 2
        return capsys.readouterr().err

    assert "no such file" in error("count", str(tmp_path / "missing"))
    assert "Hugging Face model folder" in error("count", str(tmp_path))
    assert "nest inside the input" in error(
        "prune-structured", str(llama_dir), "--out", str(llama_dir / "x")
    )
    (tmp_path / "taken").mkdir()
    assert "--overwrite" in error(
        "prune-structured", str(llama_dir), "--out", str(tmp_path / "taken")
    )
    assert "--ratio: must be in [0, 1)" in error(
        "prune-structured", str(llama_dir), "--out", str(tmp_path / "y"), "--ratio", "2"
    )
    assert not (tmp_path / "y").exists()


def test_prune_structured_reconstruct_and_allocation_flags(llama_dir, tmp_path, capsys) -> None:
    """--reconstruct and --allocation reach prune_structured (global fluctuation ranking with
    the repair, per-group widths under the MAC target) and need --calib-text."""
    import cli_models
    import prunekit

    folder = cli_models.llama_folder(transformers, tmp_path / "llama")
    text = tmp_path / "calib.txt"
    text.write_text(cli_models.text())
    base = ["prune-structured", str(folder), "--unit", "channel", "--calib-text", str(text)]
    out = tmp_path / "repaired"
    assert run(*base, "--out", str(out), "--ratio", "0.5", "--reconstruct", "lstsq", "--json") == 0
    meta = json.loads((out / "prunekit.json").read_text())["report"]
    assert meta["settings"]["scope"] == "global"
    assert meta["settings"]["importance"] == "fluctuation"
    assert "reconstruct" in json.dumps(meta["settings"])
    assert prunekit.from_pretrained(out) is not None
    out = tmp_path / "allocated"
    args = ["--out", str(out), "--target-macs", "0.7", "--allocation", "sensitivity"]
    assert run(*base, *args, "--no-latency") == 0
    meta = json.loads((out / "prunekit.json").read_text())["report"]
    assert meta["settings"]["allocation"] == "sensitivity"
    assert meta["macs_after"] <= 0.7 * meta["macs_before"] + 1
    capsys.readouterr()
    assert run("prune-structured", str(folder), "--out", str(tmp_path / "x"),
               "--reconstruct", "bias") == 2  # fmt: skip
    assert "--calib-text" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
