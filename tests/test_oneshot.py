"""Calibrated one-shot pruning: Wanda, SparseGPT, OWL, the sequential runner, perplexity."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import prunekit
from conftest import TINY_LLAMA
from conftest import tiny_llama as _tiny_llama
from prunekit.calibrate import calibration
from prunekit.calibrate.oneshot import oneshot
from prunekit.calibrate.sparsegpt import SparseGPTFailure, sparsegpt_prune
from prunekit.eval import perplexity
from prunekit.masks import get_mask
from prunekit.scope import owl_allocation

transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    return _tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def calib():
    return calibration(
        torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0)),
        n_samples=8,
        seq_len=32,
    )


def targeted(report):
    return {row.name: row for row in report.layers}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_per_layer(make, method, calib) -> None:
    report = oneshot(make(), calib, method=method, sparsity=0.6, progress=False)
    assert len(report.layers) >= 8
    for row in report.layers:
        assert row.zeros == round(0.6 * row.params), row.name
    ids = torch.randint(0, 64, (2, 16))
    assert torch.isfinite(report.model(ids).logits).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_n_m_in_every_group(make, method, nm, calib) -> None:
    n, m = nm
    report = oneshot(make(), calib, method=method, pattern=f"{n}:{m}", progress=False)
    model = report.model
    for name, module in model.named_modules():
        mask = get_mask(module)
        if mask is None:
            continue
        matrix = module.weight.detach()
        matrix = matrix.t() if type(module).__name__ == "MaskedConv1D" else matrix
        mask = mask.t() if type(module).__name__ == "MaskedConv1D" else mask
        # exactly n kept in every group of m, and the kept weights are the non-zero ones
        assert torch.all(mask.reshape(mask.shape[0], -1, m).sum(-1) == n), name
        assert torch.equal(matrix != 0, mask.bool()), name
        assert targeted(report)[f"{name}.weight"].zeros == matrix.numel() * (m - n) // m


def correlated_inputs(n: int = 512, features: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, features, generator=g)
    x += 0.3 * torch.randn(n, features, generator=g)
    return x * torch.linspace(0.1, 5.0, features)  # uneven feature scales, like LLM activations


def reconstruction_error(weight, pruned, x) -> float:
    return float(((x @ weight.T - x @ pruned.T) ** 2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    x = correlated_inputs()
    data = [x[i : i + 64] for i in range(0, 512, 64)]
    model = nn.Sequential(layer)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned = oneshot(
            model,
            data,
            method=method,
            sparsity=None if pattern == "2:4" else 0.5,
            pattern=pattern,
            targets="0",
            sequential=False,
            progress=False,
        ).model
        assert (pruned[0].weight == 0).sum() == 32 * 64 // 2
        errors[method] = reconstruction_error(layer.weight.detach(), pruned[0].weight.detach(), x)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_wanda_matches_slow_reference() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    x = correlated_inputs(64, 12, seed=3)
    pruned = prunekit.prune(
        nn.Sequential(layer),
        0.5,
        method="wanda",
        data=[x[:32], x[32:]],
        scope="row",
        targets="0",
        progress=False,
    ).model
    w = layer.weight.detach()
    expected = torch.ones_like(w, dtype=torch.bool)
    for i in range(5):
        scores = []
        for j in range(12):
            norm = math.sqrt(sum(float(x[t, j]) ** 2 for t in range(64)))
            scores.append((abs(float(w[i, j])) * norm, j))
        for _, j in sorted(scores)[:6]:
            expected[i, j] = False
    assert torch.equal(get_mask(pruned[0]), expected)


def test_sparsegpt_never_returns_nan() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    x = correlated_inputs(64, 32)
    x[:, :20] = 0  # dead inputs and a rank-deficient Hessian
    result = sparsegpt_prune(weight, 2 * x.T @ x / 64, 0.5)
    assert torch.isfinite(result.weight).all()
    assert int((result.weight == 0).sum()) >= 16 * 32 // 2
    assert torch.all(result.weight[:, :20] == 0)  # dead inputs are pruned first
    with pytest.raises(SparseGPTFailure):
        sparsegpt_prune(weight, torch.full((32, 32), float("nan")), 0.5)


def test_sparsegpt_raises_damping_with_a_warning() -> None:
    weight = torch.randn(4, 8)
    hessian = -torch.eye(8)  # negative definite: plain damping is not enough
    hessian[0, 0] = 1.0
    with pytest.warns(UserWarning, match="raised the damping"):
        result = sparsegpt_prune(weight, hessian * 1e-3 + torch.eye(8) * 1e-3 * 0.995, 0.5)
    assert torch.isfinite(result.weight).all()


def test_oneshot_falls_back_to_magnitude_when_sparsegpt_fails(calib, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise SparseGPTFailure("forced failure")

    monkeypatch.setattr(sys.modules["prunekit.calibrate.oneshot"], "sparsegpt_prune_shared", fail)
    model = tiny_llama()
    with pytest.warns(UserWarning, match="by magnitude instead"):
        report = oneshot(model, calib, method="sparsegpt", progress=False)
    assert report.sparsity == 0.5 and report.details["fallbacks"]
    # every layer fell back, those that share an input (q / k / v, gate / up) included
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {f"{n}.weight" for n in layers if n != "lm_head"} <= set(report.details["fallbacks"])


def test_owl_average_equals_target_and_stays_within_lambda(calib) -> None:
    allocation = owl_allocation([0.02, 0.05, 0.01, 0.03], [10, 30, 20, 40], 0.6, lam=0.1)
    assert sum(
        s * w for s, w in zip(allocation, [10, 30, 20, 40], strict=True)
    ) / 100 == pytest.approx(0.6, abs=1e-12)
    assert all(0.5 - 1e-12 <= s <= 0.7 + 1e-12 for s in allocation)
    assert min(allocation) == allocation[1]  # most outliers: most weights kept
    assert allocation[2] == pytest.approx(0.7)  # largest deviation from the mean ratio: +lambda
    report = oneshot(
        tiny_llama(),
        calib,
        method="wanda",
        sparsity=0.6,
        allocation="owl",
        owl_lambda=0.1,
        progress=False,
    )
    per_layer = sorted(set(round(v, 6) for v in report.details["allocated"].values()))
    assert len(per_layer) == 2 and all(0.5 - 1e-9 <= s <= 0.7 + 1e-9 for s in per_layer)
    assert report.zeros == pytest.approx(0.6 * report.params, abs=len(report.layers))


def test_sequential_and_all_at_once_give_the_same_wanda_masks(calib) -> None:
    model = tiny_llama()
    seq = oneshot(model, calib, method="wanda", propagate="dense", progress=False).model
    whole = oneshot(model, calib, method="wanda", sequential=False, progress=False).model
    pruned_prop = oneshot(model, calib, method="wanda", progress=False).model
    for (name, a), b, c in zip(
        seq.named_modules(), whole.modules(), pruned_prop.modules(), strict=True
    ):
        if get_mask(a) is not None:
            assert torch.equal(get_mask(a), get_mask(b)), name
            if ".layers.0." in name:  # the first block sees the same inputs either way
                assert torch.equal(get_mask(a), get_mask(c)), name


def test_oneshot_reports_time_and_memory_and_leaves_input_alone(calib) -> None:
    model = tiny_llama()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    report = oneshot(model, calib, method="sparsegpt", progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    assert report.settings["wall_time_s"] > 0 and "peak_memory_mb" in str(report)


PEAK_SCRIPT = """
import time, torch
from prunekit.runtime import PeakMemory
with PeakMemory(interval=0.001) as memory:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    deadline = time.monotonic() + 2.0  # hold it until the sampling thread has seen it
    while memory.peak_mb < 48 and time.monotonic() < deadline:
        time.sleep(0.01)
    del block
print(memory.peak_mb)
"""


def test_peak_memory_sees_a_large_allocation() -> None:
    # In a fresh process: in this long-lived one, the allocator may serve 64 MiB from memory
    # earlier tests freed but kept resident, and RSS would not grow (see PeakMemory's docstring).
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) >= 48


def test_unreachable_target_stops_oneshot_before_any_change(calib) -> None:
    model = tiny_llama()
    model.model.layers[1].mlp.spare = nn.Linear(32, 32)  # registered, never called
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="never run on the calibration data: model.layers.1.mlp.spare"
    ):
        oneshot(model, calib, method="wanda", inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "obs"}, "unknown method"),
        ({"pattern": "block:2x2"}, "unstructured and N:M"),
        ({"allocation": "owl", "owl_lambda": 0.6}, "owl lambda"),
        ({"allocation": "magic"}, "unknown allocation"),
        ({"sparsity": 1.0}, "sparsity must be"),
        ({"blocks": "model.nothing"}, "no such submodule"),
        ({"blocks": "model.norm"}, "must name a non-empty"),
        ({"scope": "global"}, "unknown scope"),
    ],
)
def test_oneshot_bad_input(kwargs, message, calib) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        oneshot(model, calib, progress=False, inplace=True, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_sources(tmp_path) -> None:
    def char_tokenizer(text: str) -> list[int]:
        return [ord(c) % 64 for c in text]

    default = calibration(tokenizer=char_tokenizer, n_samples=4, seq_len=50)
    assert len(default) == 4 and default[0]["input_ids"].shape == (1, 50)
    assert "pydoc" in default.description
    path = tmp_path / "text.txt"
    path.write_text("to be or not to be " * 20)
    from_file = calibration(str(path), char_tokenizer, n_samples=3, seq_len=10, seed=1)
    again = calibration(path, char_tokenizer, n_samples=3, seq_len=10, seed=1)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(from_file, again, strict=True)
    )
    ready = calibration([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}] * 10, n_samples=5)
    assert len(ready) == 5
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration("some text")
    with pytest.raises(ValueError, match="does not exist"):
        calibration("data/missing.txt", char_tokenizer)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibration(torch.arange(10), seq_len=20)


def test_perplexity_matches_manual_computation() -> None:
    model = tiny_llama()
    tokens = torch.randint(0, 64, (70,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll, count = 0.0, 0
        for start in range(0, 70, 16):
            window = tokens[start : start + 16][None]
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1]
            nll += float(nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    assert perplexity(model, tokens, 16, batch_size=3) == pytest.approx(
        math.exp(nll / count), rel=1e-5
    )
    # strided windows: tests/test_eval.py compares them with a token-by-token reference


def _tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(TINY_LLAMA, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "opt":
        config = transformers.OPTConfig(
            vocab_size=64,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
        return transformers.OPTForCausalLM(config).eval()
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()


@pytest.mark.parametrize("arch", ["opt", "mistral", "qwen2"])
def test_other_causal_lms(arch, calib) -> None:
    model = _tiny(arch)
    report = oneshot(model, calib, method="sparsegpt", sparsity=0.5, progress=False)
    assert len(report.layers) >= 8 and all(r.zeros == r.params // 2 for r in report.layers)
    assert torch.isfinite(report.model(torch.randint(0, 64, (1, 12))).logits).all()


def test_device_option_moves_each_block_for_its_turn_only(calib, monkeypatch) -> None:
    """Without a second device here, a spy on ``Module.to`` shows the movement: each block is
    moved to the asked device before it runs and home after its last run, before the next
    block moves (tests/test_cuda.py checks the real GPU round trip)."""
    model = tiny_llama()
    blocks = list(model.model.layers)
    events: list[tuple] = []
    real_to = nn.Module.to

    def spy(self, *args, **kwargs):
        if any(self is b for b in blocks):
            events.append(("to", next(i for i, b in enumerate(blocks) if b is self)))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: events.append(("run", i)))
    report = oneshot(model, calib, method="wanda", device="cpu", inplace=True, progress=False)
    assert report.sparsity == 0.5
    assert all(p.device.type == "cpu" for p in report.model.parameters())
    moved = events[events.index(("to", 0)) :]  # before it: the one-sample check of the targets
    turns = [[e for e in moved if e[1] == i] for i in range(len(blocks))]
    for i, turn in enumerate(turns):
        assert turn[0] == ("to", i) and turn[-1] == ("to", i)  # there, then back home
        assert ("run", i) in turn and turn.count(("to", i)) == 2
        first, last = moved.index(turn[0]), len(moved) - 1 - moved[::-1].index(turn[-1])
        assert all(e[1] == i for e in moved[first : last + 1])  # nothing else moved meanwhile


def test_owl_with_n_m_keeps_the_average_exact(calib) -> None:
    from prunekit.calibrate.oneshot import round_nm_allocation
    from prunekit.patterns import NM

    assert round_nm_allocation([0.42, 0.5, 0.56, 0.52], [1, 1, 1, 1], NM(4, 8)) == [
        0.375,
        0.5,
        0.625,
        0.5,
    ]
    report = oneshot(
        tiny_llama(),
        calib,
        method="wanda",
        pattern="4:8",
        allocation="owl",
        owl_lambda=0.15,
        progress=False,
    )
    assert report.zeros == report.params // 2
    assert set(report.details["allocated"].values()) <= {0.375, 0.5, 0.625}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: blocks move to the GPU")
def test_owl_on_cuda_blocks(calib) -> None:
    report = oneshot(
        tiny_llama(), calib, method="wanda", allocation="owl", device="cuda", progress=False
    )
    assert report.zeros == pytest.approx(0.5 * report.params, abs=len(report.layers))
    assert all(p.device.type == "cpu" for p in report.model.parameters())
