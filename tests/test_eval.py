"""prunekit.eval: perplexity against a token-by-token reference, and clear refusals of models
that are not causal language models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from prunekit.eval import accuracy, evaluate, perplexity


def _reference_perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int):
    """Slow and obvious: windows start at 0, stride, 2*stride, ...; token t is predicted by the
    first window that ends after it, from that window's tokens before t (one forward pass per
    token); a token that opens its window has no context and is not predicted."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, tokens.numel()):
            k = max(0, (t - seq_len) // stride + 1)
            start = k * stride
            if start == t:
                continue
            logits = model(tokens[start:t][None]).logits[0, -1]
            nll += float(nn.functional.cross_entropy(logits[None], tokens[t : t + 1]))
            count += 1
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_llama()


@pytest.mark.parametrize("n, seq_len, stride", [(45, 16, 16), (45, 16, 8), (45, 16, 5), (33, 8, 1)])
def test_perplexity_with_stride_equals_token_by_token_reference(llama, n, seq_len, stride):
    tokens = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n + stride))
    want, count = _reference_perplexity(llama, tokens, seq_len, stride)
    # every token but the first is predicted once when windows overlap; without overlap the
    # first token of every window is not
    windows = -(-n // seq_len)
    assert count == (n - 1 if stride < seq_len else n - windows)
    got = perplexity(llama, tokens, seq_len, stride=stride, batch_size=3)
    assert got == pytest.approx(want, rel=1e-5)
    assert perplexity(llama, tokens.tolist(), seq_len, stride=stride) == pytest.approx(got)


def tiny_bert(cls_name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM"])
def test_encoder_refused_with_what_to_use_instead(cls_name):
    with pytest.raises(TypeError, match="causal language model") as info:
        perplexity(tiny_bert(cls_name), torch.randint(0, 40, (40,)), 16)
    message = str(info.value)
    assert cls_name in message and "AutoModelForCausalLM" in message
    assert "prunekit.eval.evaluate" in message


class DictEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": self.embed(ids)}


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


def test_models_without_next_token_logits_refused():
    tokens = torch.randint(0, 40, (40,))
    with pytest.raises(TypeError, match=r"causal language model.*returned dict with last_hidden"):
        perplexity(DictEncoder(), tokens, 16)
    with pytest.raises(TypeError, match=r"logits of shape \(2, 3\)"):
        perplexity(Classifier(), tokens, 16)


def test_bad_tokens_refused(llama):
    encoding = {"input_ids": torch.zeros(1, 8), "attention_mask": torch.ones(1, 8)}
    with pytest.raises(
        TypeError, match=r"keys input_ids, attention_mask: pass encoding\['input_ids'\]"
    ):
        perplexity(llama, encoding, 4)
    with pytest.raises(TypeError, match="integer token ids"):
        perplexity(llama, torch.rand(20), 4)
    with pytest.raises(ValueError, match="1 <= stride <= seq_len"):
        perplexity(llama, torch.arange(20), 4, stride=5)
    with pytest.raises(ValueError, match="too few"):
        perplexity(llama, torch.arange(1), 4)


def test_evaluate_and_accuracy_restore_mode():
    torch.manual_seed(0)
    net = Classifier().train()
    ids = torch.randint(0, 40, (10, 4))
    labels = net(ids).argmax(-1)
    labels[:3] = (labels[:3] + 1) % 3  # three wrong
    assert accuracy(net, [(ids[:6], labels[:6]), (ids[6:], labels[6:])]) == pytest.approx(0.7)
    assert evaluate(net, {"acc": lambda m: accuracy(m, [(ids, labels)])}) == {"acc": 0.7}
    assert net.training
