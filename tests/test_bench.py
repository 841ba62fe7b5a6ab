"""prunekit.runtime.bench: the latency harness and the ``prunekit bench`` command.

No timing targets are asserted: only that the figures are consistent with each other.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

import prunekit
from conftest import mlp
from prunekit.runtime.bench import BenchReport, bench
from prunekit.runtime.cli import add_commands

FAST = dict(warmup=1, repeats=6, rounds=3, progress=False)


@pytest.fixture
def pair() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = mlp((16, 64, 64, 8))
    pruned = prunekit.prune_structured(dense, torch.randn(2, 16), ratio=0.5, progress=False).model
    return {"dense": dense, "pruned": pruned}


def test_two_models_sane_numbers(pair):
    before = torch.get_num_threads()
    report = bench(pair, torch.randn(4, 16), threads=1, **FAST)
    assert torch.get_num_threads() == before
    assert isinstance(report, BenchReport)
    assert [r.model for r in report.rows] == ["dense", "pruned"]
    assert report.reference == "dense"
    for r in report.rows:
        assert r.batch == 4
        assert r.samples == 6
        assert r.median_ms > 0
        assert r.p10_ms <= r.median_ms <= r.p90_ms
        assert r.p25_ms <= r.median_ms <= r.p75_ms
        assert r.throughput == pytest.approx(4 / (r.median_ms / 1000))
        assert r.peak_mb >= 0
    assert report.row("dense").ratio == 1.0
    assert report.row("pruned").ratio == pytest.approx(
        report.row("pruned").median_ms / report.row("dense").median_ms
    )
    assert report.settings["threads"] == 1
    text = str(report)
    assert "median ms" in text and "pruned" in text and "this machine" in text
    d = report.to_dict()
    json.dumps(d)
    assert d["reference"] == "dense" and len(d["rows"]) == 2
    assert d["rows"][0]["ratio"] == 1.0


def test_threads_restored_after_error(pair):
    before = torch.get_num_threads()
    bad = {"dense": pair["dense"], "broken": nn.Linear(3, 3)}
    with pytest.raises(RuntimeError, match="broken"):
        bench(bad, torch.randn(2, 16), threads=1, **FAST)
    assert torch.get_num_threads() == before


def test_train_mode_restored(pair):
    pair["dense"].train()
    bench(pair, torch.randn(2, 16), **FAST)
    assert pair["dense"].training and all(m.training for m in pair["dense"].modules())


def test_single_module_and_batch_sizes():
    report = bench(mlp(), torch.randn(3, 16), batch_sizes=[1, 5], **FAST)
    assert [(r.model, r.batch) for r in report.rows] == [("model", 1), ("model", 5)]
    assert all(r.ratio == 1.0 for r in report.rows)
    assert report.row("model", 5).throughput == pytest.approx(
        5 / (report.row("model", 5).median_ms / 1000)
    )


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return (self.a(x) + self.b(y)) * scale


def test_tuple_and_dict_inputs():
    net = TwoInputs()
    x, y = torch.randn(3, 8), torch.randn(3, 6)
    t = bench({"a": net, "b": TwoInputs()}, (x, y), batch_sizes=[2, 3], **FAST)
    assert {r.batch for r in t.rows} == {2, 3}
    d = bench(net, {"x": x, "y": y, "scale": 2.0}, batch_sizes=[7], **FAST)
    assert d.rows[0].batch == 7 and d.rows[0].median_ms > 0
    assert d.settings["input_shapes"] == {"x": [3, 8], "y": [3, 6]}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(models=[nn.Linear(2, 2)]), TypeError, "nn.Module or a dict"),
        (dict(models={}), ValueError, "empty"),
        (dict(models={"a": "not a model"}), TypeError, "not an nn.Module"),
        (dict(example_inputs=[torch.randn(2, 16)]), TypeError, "tensor, a tuple"),
        (dict(example_inputs=(1.0,)), ValueError, "batch dimension"),
        (dict(example_inputs=torch.tensor(1.0)), ValueError, "batch dimension"),
        (dict(repeats=0), ValueError, "repeats"),
        (dict(warmup=-1), ValueError, "warmup"),
        (dict(rounds=0), ValueError, "rounds"),
        (dict(threads=0), ValueError, "threads"),
        (dict(threads=1.5), ValueError, "threads"),
        (dict(batch_sizes=[0]), ValueError, "batch size"),
        (dict(batch_sizes=4), TypeError, "batch_sizes"),
        (dict(batch_sizes=[]), ValueError, "empty"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    call = dict(models=mlp(), example_inputs=torch.randn(2, 16), **FAST)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        bench(**call)


def test_rounds_capped_by_repeats():
    report = bench(mlp(), torch.randn(2, 16), warmup=0, repeats=2, rounds=5, progress=False)
    assert report.rows[0].samples == 2 and report.settings["rounds"] == 2


# ---------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit")
    add_commands(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parses_defaults():
    args = _parser().parse_args(["bench", "a", "b", "--batch", "1", "32", "--threads", "2"])
    assert args.paths == ["a", "b"] and args.batch == [1, 32] and args.threads == 2
    assert args.seq_len == 128 and args.repeats == 50 and callable(args.func)


def test_cli_bench_hf_folders(llama_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    args = _parser().parse_args(
        ["bench", str(llama_dir), str(llama_dir), "--batch", "1", "2", "--seq-len", "8"]
        + ["--threads", "1", "--warmup", "1", "--repeats", "3", "--rounds", "3", "--json"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["batch"]) for r in out["rows"]] == [
        (f"{llama_dir}", 1),
        (f"{llama_dir} (2)", 1),
        (f"{llama_dir}", 2),
        (f"{llama_dir} (2)", 2),
    ]
    assert out["settings"]["seq_len"] == 8 and out["settings"]["threads"] == 1


def test_cli_bench_accelerate(llama_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    from conftest import tiny_llama

    pruned = prunekit.finalize(prunekit.prune(tiny_llama(), 0.8).model)
    pruned.save_pretrained(tmp_path / "pruned")
    args = _parser().parse_args(
        ["bench", str(llama_dir), str(tmp_path / "pruned"), "--accelerate", "--seq-len", "4"]
        + ["--threads", "1", "--warmup", "1", "--repeats", "3", "--rounds", "3", "--json"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in out["rows"]] == ["llama", "pruned", "pruned (accelerated)"]
    assert list(out["accelerate"]) == ["pruned"]  # the dense model has nothing to accelerate
    rows = out["accelerate"]["pruned"]["rows"]
    assert rows and all(r["input_shape"] == [1, 4, r["in_features"]] for r in rows)


def test_cli_errors(tmp_path):
    parser = _parser()
    args = parser.parse_args(["bench", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError):
        args.func(args)
    (tmp_path / "config.json").write_text("{}")
    args = parser.parse_args(["bench", str(tmp_path)])
    with pytest.raises(ValueError, match="safetensors"):
        args.func(args)
    from prunekit.cli import main  # argparse itself refuses --seq-len 0: one line, status 2

    assert main(["bench", str(tmp_path), "--seq-len", "0"]) == 2
