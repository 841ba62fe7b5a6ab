"""Command outputs chain: prune-structured -> oneshot -> quantize -> export on a tiny BERT and a
tiny Llama folder, each output loaded with transformers (where plain-loadable) and prunekit,
and compared with the same steps through the Python API. Side files (tokenizer,
sentence-transformers modules) and the run record travel along."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunekit
from cli_models import bert_folder, llama_folder, text
from prunekit.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread (many threads thrash on a busy machine)."""


ST_FILES = ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    bert_folder(transformers, root / "bert")
    llama_folder(transformers, root / "llama")
    (root / "calib.txt").write_text(text(3000))
    return root


def cli(*argv: object) -> None:
    assert main([str(a) for a in argv]) == 0


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(4, 64, (batch, seq), generator=torch.Generator().manual_seed(3))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def loads_plain_and_agrees(folder: Path, cls) -> torch.nn.Module:
    """transformers loads the folder; prunekit's loader gives the same outputs."""
    meta = json.loads((folder / "prunekit.json").read_text())
    assert meta["plain_loadable"] is True
    plain = cls.from_pretrained(folder).eval()
    ours = prunekit.from_pretrained(folder)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], ours(x)[0])
    return ours


def api_structured(source: Path, **kwargs) -> torch.nn.Module:
    from prunekit.graph.cli import example_inputs

    model = prunekit.from_pretrained(source)
    prunekit.prune_structured(
        model,
        example_inputs(model, 1, 16, 0),
        inplace=True,
        measure_latency=False,
        progress=False,
        **kwargs,
    )
    return model


def api_calib(source: Path, work: Path, n: int = 4, seq: int = 16):
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    return prunekit.calibration(str(work / "calib.txt"), tokenizer, n_samples=n, seq_len=seq)


def test_bert_chain_matches_the_python_api(work, capsys) -> None:
    bert, calib = work / "bert", work / "calib.txt"
    small, sparse, int8 = work / "b-small", work / "b-sparse", work / "b-int8"
    cli(
        "prune-structured",
        bert,
        "--out",
        small,
        "--ratio",
        "0.5",
        "--round-to",
        "8",
        "--no-latency",
    )
    cli("oneshot", small, "--out", sparse, "--calib", calib, "--n-samples", 4, "--seq-len", 16)
    cli("quantize", sparse, "--out", int8, "--bits", 8)
    printed = capsys.readouterr().out
    assert printed.count("loads with transformers' from_pretrained") == 3

    expected = api_structured(bert, ratio=0.5, unit="channel", round_to=8)
    same_state(loads_plain_and_agrees(small, transformers.BertModel), expected)
    assert json.loads((small / "config.json").read_text())["intermediate_size"] == 32
    prunekit.oneshot(expected, api_calib(bert, work), method="wanda", inplace=True, progress=False)
    prunekit.finalize(expected, inplace=True)
    same_state(loads_plain_and_agrees(sparse, transformers.BertModel), expected)
    prunekit.quantize(expected, bits=8, inplace=True)
    same_state(loads_plain_and_agrees(int8, transformers.BertModel), expected)
    assert expected.pooler.dense.weight.count_nonzero() == expected.pooler.dense.weight.numel()

    for folder in (small, sparse, int8):  # side files kept, stale exports not
        for name in (*ST_FILES, "README.md", "tokenizer.json"):
            assert (folder / name).is_file(), (folder, name)
        assert not (folder / "onnx").exists()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    emb = SentenceTransformer(str(int8), device="cpu").encode(["w1 w2 w3"])
    assert emb.shape == (1, 32)


def test_llama_chain_heads_2of4_compressed_and_onnx(work, capsys) -> None:
    llama, calib = work / "llama", work / "calib.txt"
    small, sparse, packed = work / "l-small", work / "l-sparse", work / "l-packed"
    onnx_file = work / "l.onnx"
    cli(
        "prune-structured", llama, "--out", small, "--unit", "channel,head",
        "--target-macs", "0.6", "--round-to", "1", "--no-latency",
    )  # fmt: skip
    config = json.loads((small / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["intermediate_size"] < 64
    cli(
        "oneshot", small, "--out", sparse, "--calib", calib, "--n-samples", 4, "--seq-len", 16,
        "--method", "sparsegpt", "--pattern", "2:4", "--json",
    )  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{") :])
    assert report["settings"]["pattern"] == "2:4" and report["plain_loadable"] is True
    assert report["run"]["seed"] == 0 and "oneshot" in report["run"]["command"]
    cli(
        "quantize", sparse, "--out", packed, "--bits", 4, "--granularity", "group:8", "--compressed"
    )
    assert "transformers' from_pretrained cannot load it (its weights are stored compressed)" in (
        capsys.readouterr().out
    )
    cli("export", packed, "--out", onnx_file)

    report = json.loads((small / "prunekit.json").read_text())["report"]
    assert report["macs_after"] <= 0.6 * report["macs_before"]
    assert report["settings"]["uniform"] is True
    # --uniform: the target's ratio, the same for every layer, as the Python API does it
    expected = api_structured(
        llama, unit=["channel", "head"], ratio=report["settings"]["ratio"], round_to=1
    )
    small_model = loads_plain_and_agrees(small, transformers.LlamaForCausalLM)
    same_state(small_model, expected)
    prunekit.oneshot(
        small_model, api_calib(llama, work), method="sparsegpt", pattern="2:4", inplace=True,
        progress=False,
    )  # fmt: skip
    prunekit.finalize(small_model, inplace=True)
    same_state(loads_plain_and_agrees(sparse, transformers.LlamaForCausalLM), small_model)
    up = small_model.model.layers[0].mlp.up_proj.weight
    assert torch.all((up.reshape(up.shape[0], -1, 4) != 0).sum(-1) <= 2)
    prunekit.quantize(small_model, bits=4, granularity="group:8", mode="int", inplace=True)
    loaded = prunekit.from_pretrained(packed)
    same_state(loaded, small_model)
    with pytest.raises(OSError):
        transformers.LlamaForCausalLM.from_pretrained(packed)

    import onnx
    import onnxruntime as ort

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["prunekit_run"])["command"].startswith("prunekit export ")

    x = ids(seq=16)  # the graph's sequence length is export's --seq-len (16)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(
        None, {"input_ids": x.numpy(), "attention_mask": torch.ones_like(x).numpy()}
    )
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(logits), loaded(x, use_cache=False).logits, atol=1e-4, rtol=1e-4
        )


def test_structured_bert_heads_chain_into_prune(work, capsys) -> None:
    """Per-layer shapes config.json cannot say: the CLI says so, and prune still reads it."""
    bert = work / "bert"
    heads, pruned = work / "b-heads", work / "b-heads-pruned"
    cli(
        "prune-structured",
        bert,
        "--out",
        heads,
        "--unit",
        "channel,head",
        "--ratio",
        "0.5",
        "--no-latency",
    )
    out = capsys.readouterr().out
    assert "transformers' from_pretrained cannot load it" in out
    assert "attention" in out and "prunekit.from_pretrained" in out
    cli("prune", heads, "--out", pruned, "--sparsity", "0.5", "--seed", "7")
    model = prunekit.from_pretrained(pruned)
    expected = prunekit.from_pretrained(heads)
    prunekit.prune(expected, 0.5, inplace=True, seed=7)
    prunekit.finalize(expected, inplace=True)
    same_state(model, expected)
    assert model.encoder.layer[0].attention.self.query.weight.shape[0] == 16
    run = json.loads((pruned / "prunekit.json").read_text())["run"]
    assert run["seed"] == 7 and run["command"].startswith("prunekit prune ")
    assert (pruned / "1_Pooling" / "config.json").is_file()
