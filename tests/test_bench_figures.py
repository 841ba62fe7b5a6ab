"""`make bench` figure blocks: what a benchmark prints replaces the same block in the docs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


figures = _load("figures", ROOT / "benchmarks" / "figures.py")
runner = _load("run_benchmarks", ROOT / "tools" / "run_benchmarks.py")


def test_md_table_and_bad_rows():
    assert figures.md_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    with pytest.raises(ValueError, match="2 cells"):
        figures.md_table(["a", "b"], [[1]])


def test_figure_ids_are_checked(capsys):
    with pytest.raises(ValueError, match="lower-case"):
        figures.figure("Bad Id", "x")
    figures.figure("speed-1", "| a |\n|---|\n| 2 |")
    assert figures.blocks(capsys.readouterr().out) == {"speed-1": "| a |\n|---|\n| 2 |"}


def test_only_the_named_blocks_are_replaced_and_text_around_is_kept():
    doc = (
        "intro\n<!-- figure: one -->\nold 1\n<!-- /figure -->\nmiddle\n"
        "<!-- figure: two -->\nold 2\n<!-- /figure -->\nend\n"
    )
    printed = "noise\n<!-- figure: two -->\nnew 2\n<!-- /figure -->\nmore noise\n"
    new, done = figures.replace_blocks(doc, figures.blocks(printed), "run X")
    assert done == ["two"]
    assert new == (
        "intro\n<!-- figure: one -->\nold 1\n<!-- /figure -->\nmiddle\n"
        "<!-- figure: two -->\nnew 2\n\n*run X*\n<!-- /figure -->\nend\n"
    )
    # a second run replaces the provenance line too instead of stacking them
    again, _ = figures.replace_blocks(new, {"two": "newer"}, "run Y")
    assert again.count("run") == 1 and "newer\n\n*run Y*" in again


def test_update_docs_writes_into_the_docs_that_hold_the_block(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- figure: a -->\nold\n<!-- /figure -->\n")
    (tmp_path / "docs" / "x.md").write_text("no blocks here\n")
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    out = "<!-- figure: a -->\nfresh\n<!-- /figure -->\n<!-- figure: b -->\nz\n<!-- /figure -->\n"
    assert runner.update_docs(out, "note") == {"a": ["README.md"], "b": []}
    assert "fresh\n\n*note*" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "docs" / "x.md").read_text() == "no blocks here\n"


def test_every_documented_block_has_a_writer_and_every_declared_block_is_documented(capsys):
    assert runner.list_figures() == 0, capsys.readouterr().out
