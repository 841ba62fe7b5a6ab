"""Tiny models shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv -> conv -> linear -> head; input 1x8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def mlp(sizes: tuple[int, ...] = (16, 32, 24, 8)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def cnn_input() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer Llama with grouped-query attention (4 q heads, 2 kv heads), random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """The tiny Llama saved as a Hugging Face folder (with a stub tokenizer config)."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    tiny_llama().save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (training loops thrash on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
