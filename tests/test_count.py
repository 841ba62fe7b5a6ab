"""prunekit.graph.count: parameters and MACs per layer, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit.graph as pg


class Ops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5))

    def forward(self, x, q):
        a = x @ self.w  # (2, 3, 4) @ (4, 5): 2*3*5 outputs x 4 = 120
        b = torch.einsum("bij,bjk->bik", x, self.w.expand(2, 4, 5))  # 120
        c = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # 10 rows x 5 keys x 16 = 800
        return a.sum() + b.sum() + c.sum()


@pytest.mark.parametrize(
    "module, inputs, macs",
    [
        (nn.Linear(8, 4), torch.randn(3, 8), 3 * 8 * 4),
        (nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 10, 10), 8 * 100 * 3 * 9),
        (nn.Conv2d(8, 8, 3, padding=1, groups=4), torch.randn(1, 8, 10, 10), 8 * 100 * 2 * 9),
        (nn.ConvTranspose2d(4, 2, 2, stride=2), torch.randn(1, 4, 5, 5), 2 * 100 * 4),
        (nn.LSTM(4, 8), torch.randn(3, 2, 4), 6 * 4 * 8 * (4 + 8)),
        (
            nn.GRU(4, 8, num_layers=2, bidirectional=True),
            torch.randn(3, 2, 4),
            2 * 6 * 3 * 8 * (4 + 8) + 2 * 6 * 3 * 8 * (16 + 8),
        ),
        (Ops(), (torch.randn(2, 3, 4), torch.randn(1, 2, 5, 8)), 120 + 120 + 800),
    ],
)
def test_macs_match_hand_counts(module, inputs, macs) -> None:
    report = pg.count(module, inputs)
    assert report.macs == macs
    assert report.params == sum(p.numel() for p in module.parameters())


def test_multihead_attention() -> None:
    mha = nn.MultiheadAttention(16, 4)
    x = torch.randn(5, 2, 16)
    report = pg.count(mha, (x, x, x))
    assert report.macs == 2 * 5 * 3 * 16 * 16 + 2 * 2 * 5 * 5 * 16 + 2 * 5 * 16 * 16


def test_per_layer_rows_tied_weights_and_table() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.body = nn.Linear(6, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, idx):
            return self.out(torch.relu(self.body(self.embed(idx))))

    model = Tied()
    report = pg.count(model, torch.arange(4).view(1, 4))
    assert report.params == 60 + 42
    assert report.layer("body").macs == 4 * 36 and report.layer("out").macs == 4 * 60
    assert report.layer("out").params == 0  # its weight is the embedding's
    text = str(report)
    assert "total" in text and "body" in text and "4" in report.inputs
    assert report.to_dict()["macs"] == report.macs
    with pytest.raises(KeyError, match="no layer 'nope'"):
        report.layer("nope")


def test_counts_a_hugging_face_model() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (1, 6))
    report = pg.count(model, {"input_ids": ids, "use_cache": False})
    per_layer = 6 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 48)  # q, o, k, v, gate, up, down
    attention = 4 * 6 * 6 * 16  # heads x queries x keys x (head_dim for QK^T + for AV)
    assert report.macs == 2 * (per_layer + attention) + 6 * 32 * 64
    assert report.params == sum(p.numel() for p in model.parameters())
