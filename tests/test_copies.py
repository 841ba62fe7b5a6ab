"""No silent copies of large models: every inplace=False verb refuses, before changing
anything, a copy that would not fit in the memory left, and says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.runtime import copies


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_model_bytes_counts_shared_tensors_once() -> None:
    net = _net()
    assert copies.model_bytes(net) == sum(p.numel() * 4 for p in net.parameters())
    tied = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert copies.model_bytes(tied) == 8 * 8 * 4


def test_available_bytes_is_read_on_linux() -> None:
    room = copies.available_bytes()
    assert room is None or room > 0


VERBS = {
    "prune": lambda m: prunekit.prune(m, 0.5, progress=False),
    "oneshot": lambda m: prunekit.oneshot(m, [torch.randn(2, 32)], sparsity=0.5, progress=False),
    "quantize": lambda m: prunekit.quantize(m, bits=8),
    "finalize": lambda m: prunekit.finalize(m),
    "finetune": lambda m: prunekit.finetune(
        m, [(torch.randn(4, 32),)], lambda model, b: model(b[0]).pow(2).mean(), progress=False
    ),
}


@pytest.mark.parametrize("verb", VERBS)
def test_a_copy_that_does_not_fit_is_refused_before_any_change(verb, monkeypatch) -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    need = copies.model_bytes(net)
    monkeypatch.setattr(copies, "available_bytes", lambda: need)  # 80 % of it is too little
    with pytest.raises(MemoryError, match=rf"{verb}\(inplace=False\) would copy.*inplace=True"):
        VERBS[verb](net)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setenv(copies.ALLOW_ENV, "1")
    VERBS[verb](net)  # the user said copy anyway
    monkeypatch.delenv(copies.ALLOW_ENV)
    monkeypatch.setattr(copies, "available_bytes", lambda: 2 * need)  # fits: copied silently
    VERBS[verb](net)


def test_unknown_memory_never_refuses(monkeypatch) -> None:
    monkeypatch.setattr(copies, "available_bytes", lambda: None)
    assert copies.copy_model(_net(), "prune") is not None
