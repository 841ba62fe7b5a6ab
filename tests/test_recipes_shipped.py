"""The shipped ``encoder-small`` and ``llm-2of4-int8`` recipes end to end on tiny Hugging Face
models: the saved, reloaded model holds what each recipe promises (sparsity per row or per group
of four, weights on the 4-bit or 8-bit grid), checked tensor by tensor."""

from __future__ import annotations

import pytest
import torch

import prunekit
from conftest import tiny_llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _groups(weight: torch.Tensor, size: int) -> torch.Tensor:
    """(rows * in / size, size): consecutive groups of ``size`` inputs within each row."""
    return weight.detach().reshape(weight.shape[0], -1, size).reshape(-1, size)


def _max_levels(weight: torch.Tensor, size: int) -> int:
    """The most distinct values any group of ``size`` inputs holds (zero included)."""
    return max(int(torch.unique(g).numel()) for g in _groups(weight, size))


def _on_grid(weight: torch.Tensor, size: int, qmax: int) -> bool:
    """Every group is ``codes * scale`` with integer codes in [-qmax - 1, qmax]."""
    for group in _groups(weight, size):
        scale = group.abs().max() / qmax
        if scale == 0:
            continue
        codes = group / scale
        if not torch.allclose(codes, codes.round(), atol=1e-3):
            return False
    return True


def _tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def _sentences(n: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, length), generator=generator)
    return [{"input_ids": ids[i : i + 1], "attention_mask": torch.ones(1, length, dtype=torch.long)}
            for i in range(n)]  # fmt: skip


def test_encoder_small_prunes_and_quantizes_what_it_says(tmp_path) -> None:
    model = _tiny_bert()
    calib = _sentences(8, 12, seed=1)
    data = [
        {"input_ids": torch.cat([s["input_ids"] for s in calib[i : i + 4]]),
         "attention_mask": torch.ones(4, 12, dtype=torch.long)}
        for i in (0, 4)
    ]  # fmt: skip
    recipe = prunekit.recipes.load_recipe("encoder-small").to_dict()
    recipe["measure"] = {**recipe["measure"], "latency": False}  # weights are what is checked
    report = prunekit.compress(
        model,
        recipe,
        calib=calib,
        data=data,
        example_inputs=calib[0],
        out=tmp_path / "run",
        progress=False,
    )
    result = report.model
    assert (tmp_path / "run" / "model" / "prunekit-compressed.safetensors").is_file()
    emb = result.embeddings.word_embeddings.weight.detach()
    # 60 % of each token's 128 values pruned (76.8 a row: 76 or 77, exactly 60 % in all; at
    # least, as a kept value may also round to zero in 4 bits)
    assert int((emb != 0).sum(1).max()) <= 128 - 76
    assert int((emb == 0).sum()) >= round(0.6 * emb.numel())
    assert _max_levels(emb, 128) <= 16 and _on_grid(emb, 128, 7)
    linears = [
        m for n, m in result.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n
    ]
    assert len(linears) == 12
    for layer in linears:
        w = layer.weight.detach()
        assert float((w == 0).float().mean()) >= 0.7 - 1e-6
        assert _max_levels(w, 128) <= 16 and _on_grid(w, 128, 7)
    # the rest (position embeddings, pooler) in int8, one scale per row
    for w in (result.embeddings.position_embeddings.weight, result.pooler.dense.weight):
        assert _max_levels(w, w.shape[1]) <= 256 and _on_grid(w, w.shape[1], 127)
    final = report.rows()[-1]
    assert final["file_bytes"] < report.dense["fp32_bytes"] / 4


def test_llm_2of4_int8_keeps_two_of_every_four_on_the_int8_grid(tmp_path) -> None:
    model = tiny_llama(vocab_size=64)
    calib = prunekit.calibration(torch.arange(2000) % 64, n_samples=8, seq_len=16, seed=0)
    report = prunekit.compress(
        model, "llm-2of4-int8", calib=calib, example_inputs=calib[0], out=tmp_path / "run",
        progress=False,
    )  # fmt: skip
    result = report.model
    linears = [
        m for n, m in result.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    ]
    assert len(linears) == 14
    for layer in linears:
        w = layer.weight.detach()
        assert int((_groups(w, 4) != 0).sum(1).max()) <= 2
        assert float((w == 0).float().mean()) >= 0.5
        assert _on_grid(w, w.shape[1], 127)
    for w in (result.model.embed_tokens.weight, result.lm_head.weight):
        assert _on_grid(w, w.shape[1], 127) and _max_levels(w, w.shape[1]) <= 256


def test_encoder_fast_searches_sparsity_by_the_latency_as_served(tmp_path) -> None:
    model = _tiny_bert()
    calib = _sentences(8, 12, seed=1)
    report = prunekit.compress(
        model,
        "encoder-fast",
        calib=calib,
        example_inputs=calib[0],
        evaluate=lambda m: 1.0,  # the quality check is not what this test is about
        out=tmp_path / "run",
        progress=False,
    )
    trials = report.search.trials
    assert trials and trials[0].value == pytest.approx(0.9)  # the fastest end is tried first
    for trial in trials:
        assert [c.name for c in trial.checks] == ["latency b1", "quality"]
    # every trial's latency (only the last stage is measured) is timed after accelerate
    latency = report.stages[-1].metrics["latency"]["1"]
    assert latency["accelerated"]["layers"] == 13  # 12 encoder Linear + the pooler
    chosen = report.search.chosen.value
    linears = [
        m for n, m in report.model.named_modules()
        if isinstance(m, torch.nn.Linear) and "encoder" in n
    ]  # fmt: skip
    for layer in linears:
        w = layer.weight.detach()
        assert float((w == 0).float().mean()) == pytest.approx(chosen, abs=0.01)
        assert _on_grid(w, w.shape[1], 127)
