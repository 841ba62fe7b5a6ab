"""The eval and finetune commands, --help of every command, the pooler in file and folder mode,
the OWL + N:M warning and quiet transformers, through ``prunekit.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit
from cli_models import bert_folder, llama_folder, text
from prunekit.cli import build_parser, main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread (many threads thrash on a busy machine)."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("commands")
    bert_folder(transformers, root / "bert")
    llama_folder(transformers, root / "llama")
    (root / "calib.txt").write_text(text(3000))
    return root


def json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def test_every_command_help_shows_defaults_and_an_example(capsys) -> None:
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in commands:
        assert main([name, "--help"]) == 0
        page = capsys.readouterr().out
        assert "example" in page, name
        if name not in ("stats", "recipes"):  # these two have no option with a default
            assert "(default: " in page, name


def test_eval_perplexity_matches_the_metric_and_reference(work, capsys) -> None:
    llama, calib = work / "llama", work / "calib.txt"
    sparse = work / "sparse"
    assert main(["prune", str(llama), "--sparsity", "0.5", "--out", str(sparse)]) == 0
    capsys.readouterr()
    argv = ["eval", str(sparse), "--reference", str(llama), "--text", str(calib), "--seq-len", "32"]
    assert main([*argv, "--json"]) == 0
    rows = {r["measure"]: r for r in json_out(capsys)["measures"]}
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    ids = torch.tensor(tokenizer.encode(calib.read_text(), add_special_tokens=False))
    want = prunekit.eval.perplexity(prunekit.from_pretrained(sparse), ids[:16384], seq_len=32)
    assert rows["perplexity"]["model"] == pytest.approx(want, rel=1e-6)
    dense = prunekit.eval.perplexity(prunekit.from_pretrained(llama), ids[:16384], seq_len=32)
    assert rows["perplexity"]["reference"] == pytest.approx(dense, rel=1e-6)
    assert rows["sparsity"]["reference"] == 0 and rows["sparsity"]["model"] > 0.3
    assert main(argv) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_encoder_fidelity_and_sts(work, tmp_path, capsys) -> None:
    bert = work / "bert"
    sts = tmp_path / "sts.tsv"
    rows = [f"g\tf\t2020\t{i}\t{i % 5}.0\tw1 w{i} w3\tw{i} w2 w3\n" for i in range(12)]
    sts.write_text("".join(rows))
    argv = ["eval", str(bert), "--reference", str(bert), "--sts", str(sts), "--text"]
    assert main([*argv, str(work / "calib.txt"), "--seq-len", "16", "--json"]) == 0
    measures = {r["measure"]: r for r in json_out(capsys)["measures"]}
    assert measures["fidelity"]["model"] == pytest.approx(1.0, abs=1e-6)  # the model itself
    assert measures["sts_spearman"]["model"] == pytest.approx(measures["sts_spearman"]["reference"])


def test_finetune_causal_keeps_zeros_and_records_the_run(work, capsys) -> None:
    llama, calib = work / "llama", work / "calib.txt"
    sparse, tuned = work / "ft-sparse", work / "ft-tuned"
    assert main(["prune", str(llama), "--sparsity", "0.5", "--out", str(sparse)]) == 0
    argv = ["finetune", str(sparse), "--out", str(tuned), "--data", str(calib), "--seq-len", "16"]
    assert main([*argv, "--max-steps", "2", "--lr", "1e-2", "--batch-size", "4"]) == 0
    assert "finetune: 2 steps" in capsys.readouterr().out
    before, after = (
        load_file(str(sparse / "model.safetensors")),
        load_file(str(tuned / "model.safetensors")),
    )
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(before[w], after[w])  # trained
    assert torch.equal(before[w] == 0, after[w] == 0)  # zeros kept, none revived
    meta = json.loads((tuned / "prunekit.json").read_text())
    assert meta["finetune"]["steps"] == 2 and "--max-steps 2" in meta["run"]["command"]


def test_finetune_encoder_distils_from_a_teacher(work, capsys) -> None:
    bert, calib = work / "bert", work / "calib.txt"
    small, tuned = work / "ft-bert-small", work / "ft-bert-tuned"
    assert main(["prune-structured", str(bert), "--out", str(small), "--no-latency"]) == 0
    argv = ["finetune", str(small), "--out", str(tuned), "--data", str(calib), "--seq-len", "16"]
    argv += ["--teacher", str(bert), "--max-steps", "2", "--lr", "1e-3", "--json"]
    assert main(argv) == 0
    result = json_out(capsys)
    assert result["steps"] == 2 and result["teacher"] == str(bert)
    assert transformers.BertModel.from_pretrained(tuned) is not None


def test_pooler_is_left_whole_in_file_and_folder_mode(work, tmp_path) -> None:
    bert = work / "bert"
    folder_out, file_out = tmp_path / "folder", tmp_path / "pruned.safetensors"
    assert main(["prune", str(bert), "--sparsity", "0.5", "--out", str(folder_out)]) == 0
    assert main(["prune", str(bert / "model.safetensors"), "--out", str(file_out)]) == 0
    for tensors in (load_file(str(folder_out / "model.safetensors")), load_file(str(file_out))):
        key = next(k for k in tensors if k.endswith("pooler.dense.weight"))
        assert tensors[key].count_nonzero() == tensors[key].numel()
        layer = next(k for k in tensors if k.endswith("layer.0.intermediate.dense.weight"))
        assert tensors[layer].count_nonzero() < tensors[layer].numel()


def test_pooler_pruned_when_named(tmp_path) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"pooler.dense.weight": torch.randn(8, 8)}, str(file))
    out = tmp_path / "o.safetensors"
    assert main(["prune", str(file), "--targets", "pooler.dense", "--out", str(out)]) == 0
    assert load_file(str(out))["pooler.dense.weight"].count_nonzero() == 32


def test_owl_with_2of4_warns_and_commands_are_quiet(work, tmp_path, capfd) -> None:
    out = tmp_path / "owl"
    argv = ["oneshot", str(work / "llama"), "--out", str(out), "--calib", str(work / "calib.txt")]
    argv += ["--n-samples", "2", "--seq-len", "16", "--pattern", "2:4", "--allocation", "owl"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "warning: --allocation owl" in err and "--pattern unstructured" in err
    for noise in ("Writing model shards", "Loading weights", "huggingface/tokenizers"):
        assert noise not in err, err


def test_bench_says_why_accelerate_kept_layers_dense() -> None:
    from types import SimpleNamespace

    from prunekit.runtime.cli import _swap_summary

    rows = [SimpleNamespace(swapped=False, reason="not faster")] * 3 + [
        SimpleNamespace(swapped=False, reason="density 0.90 above 0.60"),
        SimpleNamespace(swapped=True, reason="faster"),
    ]
    report = SimpleNamespace(rows=rows, swapped=["x"], settings={"kernels": "avx2"})
    line = _swap_summary(report)
    assert line.startswith("accelerate swapped 1/5 layer(s) (avx2)")
    assert "kept dense: 3 not faster, 1 density 0.90 above 0.60" in line


def test_no_uniform_target_says_why_transformers_cannot_load(work, tmp_path, capsys) -> None:
    from prunekit.graph.hf_config import plain_mismatch

    out = tmp_path / "per-layer"
    argv = ["prune-structured", str(work / "llama"), "--out", str(out), "--unit", "channel,head"]
    argv += ["--target-macs", "0.6", "--round-to", "1", "--no-latency", "--no-uniform"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "transformers' from_pretrained cannot load it" in printed
    assert "--uniform keeps one width for all layers" in printed
    assert json.loads((out / "prunekit.json").read_text())["plain_loadable"] is False
    mismatch = plain_mismatch(out)
    assert mismatch and "config.json builds" in mismatch and mismatch in printed
    assert plain_mismatch(work / "llama") is None
    assert prunekit.from_pretrained(out) is not None  # prunekit rebuilds the shapes
