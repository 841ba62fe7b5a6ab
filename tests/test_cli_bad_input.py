"""The command line's bad-input matrix, through ``prunekit.cli.main``: for every command, a
missing path, a file where a folder is expected, bad and out-of-range numbers, an existing or
unwritable ``--out``, empty or too-short text files each give one line on stderr, exit status 2,
no traceback, and nothing written (the input folders and the output area are unchanged)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_models import bert_folder, llama_folder, text
from prunekit.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread (many threads thrash on a busy machine)."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    llama_folder(transformers, root / "llama")
    bert_folder(transformers, root / "bert")
    (root / "calib.txt").write_text(text(3000))
    (root / "short.txt").write_text(text(20))
    (root / "empty.txt").write_text("")
    (root / "notes.txt").write_text("not a model")
    (root / "emptydir").mkdir()
    (root / "taken").mkdir()
    (root / "taken" / "x").write_text("keep me")
    (root / "taken.onnx").write_text("keep me")
    (root / "sts.tsv").write_text(
        "".join(f"g\tf\ty\t{i}\t{i % 5}.0\tw1 w2\tw2 w{i}\n" for i in range(8))
    )
    import torch
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(8, 8)}, str(root / "w.safetensors"))
    return root


L, B, C = "{i}/llama", "{i}/bert", "{i}/calib.txt"
MISSING, FILE, DIR = "{i}/missing", "{i}/notes.txt", "{i}/emptydir"
OUT, TAKEN, UNWRITABLE = "{o}/out", "{i}/taken", "{i}/notes.txt/out"

CASES = [
    # stats
    (["stats", MISSING], "no such file"),
    (["stats", DIR], "safetensors"),
    (["stats", FILE], "not a .safetensors file"),
    # prune
    (["prune", MISSING, "--out", OUT], "no such file"),
    (["prune", FILE, "--out", OUT], "not a .safetensors file"),
    (["prune", DIR, "--out", OUT], "Hugging Face model folder"),
    (["prune", L, "--sparsity", "1.5", "--out", OUT], "--sparsity: must be in [0, 1)"),
    (["prune", L, "--sparsity", "half", "--out", OUT], "--sparsity: expected a number"),
    (["prune", L, "--pattern", "5:4", "--out", OUT], "1 <= N < M"),
    (["prune", L, "--pattern", "2:4", "--sparsity", "0.7", "--out", OUT], "implies sparsity 0.5"),
    (["prune", L, "--method", "taylor", "--out", OUT], "not available"),
    (["prune", L, "--scope", "galactic", "--out", OUT], "invalid choice"),
    (["prune", L, "--out", TAKEN], "already exists"),
    (["prune", L, "--out", UNWRITABLE], "is a file, not a folder"),
    (["prune", L, "--out", L + "/inner"], "nest inside the input"),
    pytest.param(
        ["prune", L, "--out", "/proc/prunekit-out"],
        "cannot write in /proc",
        marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc"),
    ),
    (["prune", L, "--per-layer", MISSING, "--out", OUT], "missing"),
    (["prune", "{i}/w.safetensors", "--out", TAKEN], "already exists"),
    # oneshot
    (["oneshot", MISSING, "--out", OUT], "no such file"),
    (["oneshot", FILE, "--out", OUT], "Hugging Face model folder"),
    (["oneshot", L, "--calib", MISSING, "--out", OUT], "--calib {i}/missing: no such file"),
    (["oneshot", L, "--calib", "{i}/empty.txt", "--out", OUT], "the file is empty"),
    (["oneshot", L, "--calib", DIR, "--out", OUT], "expected a file"),
    (
        [
            "oneshot",
            L,
            "--calib",
            "{i}/short.txt",
            "--n-samples",
            "4",
            "--seq-len",
            "16",
            "--out",
            OUT,
        ],
        "fewer than --n-samples x --seq-len",
    ),
    (["oneshot", L, "--calib", C, "--n-samples", "0", "--out", OUT], "--n-samples: must be"),
    (
        ["oneshot", L, "--calib", C, "--seq-len", "x", "--out", OUT],
        "--seq-len: expected an integer",
    ),
    (["oneshot", L, "--calib", C, "--seq-len", "1000", "--out", OUT], "above the model's 64"),
    (["oneshot", L, "--method", "obs", "--out", OUT], "invalid choice"),
    (["oneshot", L, "--out", TAKEN], "already exists"),
    (["oneshot", L, "--out", UNWRITABLE], "is a file, not a folder"),
    # prune-structured
    (["prune-structured", MISSING, "--out", OUT], "no such file"),
    (["prune-structured", FILE, "--out", OUT], "Hugging Face model folder"),
    (["prune-structured", L, "--ratio", "1", "--out", OUT], "--ratio: must be in [0, 1)"),
    (["prune-structured", L, "--ratio", "-0.1", "--out", OUT], "--ratio: must be in [0, 1)"),
    (["prune-structured", L, "--target-macs", "0", "--out", OUT], "--target-macs: must be"),
    (["prune-structured", L, "--seq-len", "0", "--out", OUT], "--seq-len: must be"),
    (["prune-structured", L, "--seq-len", "500", "--out", OUT], "above the model's 64"),
    (["prune-structured", L, "--unit", "atom", "--out", OUT], "atom"),
    (["prune-structured", L, "--uniform", "--scope", "global", "--out", OUT], "--scope local"),
    (["prune-structured", L, "--calib-text", "{i}/empty.txt", "--out", OUT], "the file is empty"),
    (["prune-structured", L, "--out", TAKEN], "already exists"),
    (["prune-structured", L, "--out", UNWRITABLE], "is a file, not a folder"),
    # count
    (["count", MISSING], "no such file"),
    (["count", FILE], "Hugging Face model folder"),
    (["count", L, "--seq-len", "0"], "--seq-len: must be"),
    (["count", L, "--seq-len", "100"], "above the model's 64"),
    # quantize
    (["quantize", MISSING, "--out", OUT], "no such file"),
    (["quantize", FILE, "--out", OUT], "Hugging Face model folder"),
    (["quantize", L, "--bits", "3", "--out", OUT], "invalid choice"),
    (["quantize", L, "--granularity", "group:x", "--out", OUT], "granularity"),
    (["quantize", L, "--out", TAKEN], "already exists"),
    (["quantize", L, "--out", UNWRITABLE], "is a file, not a folder"),
    # finetune
    (["finetune", L, "--data", MISSING, "--out", OUT], "--data {i}/missing: no such file"),
    (["finetune", L, "--data", "{i}/empty.txt", "--out", OUT], "the file is empty"),
    (["finetune", L, "--data", "{i}/short.txt", "--out", OUT], "fewer than one window"),
    (["finetune", L, "--data", C, "--lr", "-1", "--out", OUT], "--lr: must be"),
    (["finetune", L, "--data", C, "--epochs", "0", "--out", OUT], "--epochs: must be"),
    (["finetune", L, "--data", C, "--teacher", MISSING, "--out", OUT], "no such file"),
    (["finetune", B, "--data", C, "--seq-len", "16", "--out", OUT], "give --teacher"),
    (["finetune", L, "--data", C, "--out", TAKEN], "already exists"),
    (["finetune", L, "--data", C, "--out", UNWRITABLE], "is a file, not a folder"),
    # export
    (["export", MISSING, "--out", "{o}/m.onnx"], "no such file"),
    (["export", L, "--out", "{o}/m.txt"], "ending in .onnx"),
    (["export", L, "--out", "{i}/taken.onnx"], "already exists"),
    (["export", L, "--out", "{i}/notes.txt/m.onnx"], "is a file, not a folder"),
    (["export", L, "--atol", "-1", "--out", "{o}/m.onnx"], "--atol: must be"),
    (["export", L, "--seq-len", "100", "--out", "{o}/m.onnx"], "above the model's 64"),
    # eval
    (["eval", MISSING], "no such file"),
    (["eval", FILE], "Hugging Face model folder"),
    (["eval", B], "give --sts FILE"),
    (["eval", L, "--text", "{i}/empty.txt"], "the file is empty"),
    (["eval", L, "--reference", MISSING], "no such file"),
    (["eval", L, "--sts", "{i}/sts.tsv"], "--sts measures sentence encoders"),
    (["eval", L, "--seq-len", "0"], "--seq-len: must be"),
    # analyze
    (["analyze", MISSING, "--out", OUT], "Hugging Face model folder"),
    (["analyze", L, "--calib", MISSING, "--out", OUT], "no such file"),
    (["analyze", L, "--out", UNWRITABLE], "is a file, not a folder"),
    # bench
    (["bench", MISSING], "no such file"),
    (["bench", L, "--batch", "0"], "--batch: must be"),
    (["bench", L, "--seq-len", "100"], "above the 64 positions"),
    # compress, recipes
    (["compress", L, "--recipe", "no-such-recipe", "--out", OUT], "no-such-recipe"),
    (["compress", MISSING, "--recipe", "llm-2of4-int8", "--out", OUT], "no such file"),
    (["compress", L, "--recipe", "llm-2of4-int8", "--out", UNWRITABLE], "is a file, not a folder"),
    (["compress", L, "--recipe", "llm-2of4-int8", "--n-samples", "0", "--out", OUT], "must be"),
    (["recipes", "no-such-recipe"], "no shipped recipe"),
]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` with its size and modification time."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.stat()
                seen[str(path)] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return seen


def _id(case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(argv[:1] + argv[-2:])


@pytest.mark.parametrize("argv,message", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(inputs, tmp_path, capsys, argv, message):
    argv = [a.format(i=inputs, o=tmp_path) for a in argv]
    before = snapshot(inputs, tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err
    assert "\n" not in err, f"more than one line on stderr:\n{err}"
    assert err.startswith("prunekit")
    assert message.format(i=inputs) in err, err
    assert snapshot(inputs, tmp_path) == before


def test_the_matrix_covers_every_command() -> None:
    from prunekit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    covered = {(c.values[0] if hasattr(c, "values") else c[0])[0] for c in CASES}
    assert set(commands) == covered, set(commands) ^ covered
