"""The benchmarks' ``doc_figure`` functions print blocks that fit the docs' tables.

Each is called with small made-up results (no benchmark runs): the printed block must parse
with ``benchmarks/figures.py``'s ``blocks()``, carry the id that the docs hold, and have the
header columns of the table that is in the docs now, so that ``make bench`` replaces a table
with one of the same layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

figures = pytest.importorskip("figures")


def header(table: str) -> list[str]:
    """The header cells of the Markdown table a block starts with."""
    return [c.strip() for c in table.strip().splitlines()[0].strip("|").split("|")]


def doc_block(path: str, fig_id: str) -> str:
    held = figures.blocks((ROOT / path).read_text())
    assert fig_id in held, f"{path} holds no block {fig_id!r}"
    return held[fig_id]


def printed_block(capsys, fig_id: str) -> str:
    held = figures.blocks(capsys.readouterr().out)
    assert list(held) == [fig_id]
    return held[fig_id]


def test_mnist_finetune_defaults_figure(capsys):
    bench = pytest.importorskip("mnist_finetune_defaults")
    rows = [
        {"method": m, "sparsity": s, "seed": k, "head_pruned": False,
         "accuracy": 0.99 + k / 1000 + (m == "gradual") / 500}
        for m in bench.ROWS for s in bench.SPARSITIES for k in (0, 1, 2)
    ]  # fmt: skip
    # a head-pruned row (--include-head) stays out of the table
    rows.append({"method": "default", "sparsity": 0.98, "seed": 0, "head_pruned": True,
                 "accuracy": 0.5})  # fmt: skip
    assert bench.documented(bench.parse_args([]), rows)
    assert not bench.documented(bench.parse_args(["--seeds", "0"]), rows)
    assert not bench.documented(bench.parse_args([]), rows[3:])  # a row missing
    bench.doc_figure(rows, 0.9944, 8)
    block = printed_block(capsys, "training-finetune-mnist")
    assert header(block) == header(doc_block("docs/training.md", "training-finetune-mnist"))
    lines = block.splitlines()
    assert lines[2].startswith("| 98 % | 99.10 (99.00 / 99.10 / 99.20) |")
    assert "| +0.00 | 99.30 (99.20 / 99.30 / 99.40) |" in lines[2]
    assert lines[3].endswith("| +0.20 |")  # gradual - gradual plain loop, paired by seed
    assert "dense 99.44" in block


def test_llm_finetune_defaults_figure(capsys):
    bench = pytest.importorskip("llm_finetune_defaults")
    found = []
    for seed in (0, 1):
        for sparsity in (0.5, 0.7):
            found.append({"rows": "oneshot", "sparsity": sparsity, "seed": seed,
                          "name": "no recovery", "perplexity": 6.777, "lr": None})  # fmt: skip
            for name, ppl in (("default", 5.25), ("old defaults", 5.35), ("plain loop", 5.36)):
                found.append({"rows": "oneshot", "sparsity": sparsity, "seed": seed,
                              "name": name, "perplexity": ppl + seed / 100, "lr": 1e-3})  # fmt: skip
        for name, ppl in zip(bench.GRADUAL_ROWS, (5.22, 5.25, 5.33), strict=True):
            found.append({"rows": "gradual", "sparsity": 0.7, "seed": seed, "name": name,
                          "perplexity": ppl + seed / 100, "lr": 1e-3})  # fmt: skip
    args = argparse.Namespace(epochs=2, batches=100, batch_size=16)
    bench.doc_figure(found, 5.263, args)
    block = printed_block(capsys, "training-finetune-llm")
    assert header(block) == header(doc_block("docs/training.md", "training-finetune-llm"))
    lines = block.splitlines()
    assert (
        lines[2]
        == "| one-shot magnitude | 50 % | 6.777 | 5.250 / 5.260 | 5.350 / 5.360 | 5.360 / 5.370 |"
    )
    assert lines[4].startswith("| gradual magnitude (`GradualPruner`) | 70 % | - | 5.220 / 5.230 |")
    assert "dense 5.263" in block and "seeds 0 / 1" in block


def test_llm_finetune_defaults_documented_run_matches_make_bench():
    """The arguments ``make bench`` passes are the documented run's (the block is printed)."""
    bench = pytest.importorskip("llm_finetune_defaults")
    runner = sys.modules.get("run_benchmarks")
    if runner is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "run_benchmarks", ROOT / "tools" / "run_benchmarks.py"
        )
        runner = importlib.util.module_from_spec(spec)
        sys.modules["run_benchmarks"] = runner  # dataclasses look their module up there
        spec.loader.exec_module(runner)
    entry = next(b for b in runner.BENCHMARKS if b.name == "llm_finetune_defaults")
    assert entry.figures == ("training-finetune-llm",)
    parsed = bench.parse_args(list(entry.args[1:]))
    assert {k: getattr(parsed, k) for k in bench.DOCUMENTED} == bench.DOCUMENTED


def test_cli_chain_figure(capsys):
    bench = pytest.importorskip("cli_chain")
    reports = {
        "structured": {
            "settings": {"ratio": 0.45805, "round_to": 16, "uniform": True},
            "groups": [{"kind": "channel", "units": 1536, "kept": 832}] * 6,
            "params_before": 22713216, "params_after": 19464960, "params_ratio": 0.857,
            "macs_before": 171196416, "macs_after": 119291904, "macs_ratio": 0.697,
            "plain_loadable": True,
        },
        "Wanda 50 %": {"sparsity": 0.5, "settings": {"calibration": "32 x 256 tokens"},
                       "plain_loadable": True},
        "int8": {"settings": {"bits": 8, "granularity": "per_channel", "symmetric": True}},
        "quality": {"measures": [
            {"measure": "sts_spearman", "model": 81.2472, "reference": 86.7163, "ratio": 0.9369},
            {"measure": "fidelity", "model": 0.5418, "reference": None, "ratio": None},
            {"measure": "params", "model": 19464960.0, "reference": 22713216.0, "ratio": 0.857},
            {"measure": "sparsity", "model": 0.4903, "reference": 0.0, "ratio": None},
        ]},
        "ONNX": {"max_abs_diff": 2.62e-6, "atol": 1e-4},
    }  # fmt: skip
    assert [step for step, _ in bench.CHAIN] == list(reports)
    steps = [
        {"step": step, "shown": f"prunekit {' '.join(argv)}",
         "result": bench.summary(step, reports[step], 78_000_000), "wall": 224.0, "cpu": 68.0}
        for step, argv in bench.CHAIN
    ]  # fmt: skip
    bench.doc_figure(steps)
    block = printed_block(capsys, "cli-chain")
    doc = doc_block("docs/cli.md", "cli-chain")
    assert header(block) == header(doc)
    rows = block.splitlines()[2:7]
    assert [r.split(" | ")[0] for r in rows] == [r.split(" | ")[0] for r in doc.splitlines()[2:7]]
    assert "MLP width 1536 -> 832 in every layer" in rows[0] and "(69.7 %)" in rows[0]
    assert "Spearman 81.2472, dense 86.7163 (0.9369 of dense)" in rows[3]
    assert "max abs diff 2.62e-06 (tolerance 0.0001), 78 MB" in rows[4]
    assert rows[1].endswith("| 3 min 44 s (1 min 8 s) |")


def test_oneshot_speed_figures(capsys):
    bench = pytest.importorskip("oneshot_speed")
    rows = [
        {"method": m, "config": c, "prunekit_s": 2.0, "prunekit_ppl": 5.3, "llmc_s": 5.0,
         "llmc_ppl": 5.31, "llmc_version": "0.0", "time_ratio": 0.4, "ppl_ratio": 0.998,
         "calibration_dtype": "bfloat16"}
        for m in ("sparsegpt", "wanda") for c in ("50%", "70%", "2:4")
    ]  # fmt: skip
    tuned = {**rows[0], "prunekit_s": 1.5, "time_ratio": 0.3, "tuned": "float32 calibration",
             "calibration_dtype": "float32"}  # fmt: skip
    bench.doc_figure([tuned, *rows], 1, 3)
    block = printed_block(capsys, "oneshot-speed")
    assert header(block)[:4] == ["method", "sparsity", "prunekit s", "llm-compressor s"]
    assert "| sparsegpt | 50% | 2.00 | 5.00 | **0.40** | 5.3000 / 5.3100 |" in block
    assert len(block.splitlines()[2:8]) == 6 and "fastest of 3" in block
    # a non-default row is labelled and comes after the default rows
    lines = block.splitlines()
    assert lines[8] == (
        "| sparsegpt, float32 calibration (*non-default*) | 50% | 1.50 | 5.00 | **0.30** "
        "| 5.3000 / 5.3100 |"
    )
    assert "*non-default*" not in "".join(lines[2:8]) and "judged on the default rows" in block
    assert "default rows calibrated in bfloat16" in block  # the dtype "auto" chose is named
    large = [{"method": "sparsegpt", "wall_time_s": 80.0, "s_per_block": 10.0,
              "peak_memory_mb": 800.0}]  # fmt: skip
    bench.large_figure(large, 128, 1)
    block = printed_block(capsys, "oneshot-speed-large")
    assert "| sparsegpt | 80.0 | 10.00 | 800 |" in block and "128 x 128" in block
    doc_block("README.md", "oneshot-speed")
    doc_block("README.md", "oneshot-speed-large")
