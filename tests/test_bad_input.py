"""Every bad input is a clear error raised before any weight changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from conftest import SmallCNN

BAD_CALLS = [
    ({"sparsity": 1.0}, "sparsity must be a number in \\[0, 1\\)"),
    ({"sparsity": -0.1}, "sparsity must be a number in \\[0, 1\\)"),
    ({"sparsity": "half"}, "sparsity must be a number"),
    ({"sparsity": True}, "sparsity must be a number"),
    ({"pattern": "4:2"}, "needs 1 <= N < M"),
    ({"pattern": "2:2"}, "needs 1 <= N < M"),
    ({"pattern": "0:4"}, "needs 1 <= N < M"),
    ({"pattern": "1.5:4"}, "unknown pattern"),
    ({"pattern": "block:0x4"}, "R, C >= 1"),
    ({"pattern": "diagonal"}, "unknown pattern '.*accepted: 'unstructured'"),
    ({"pattern": "2:4", "sparsity": 0.7}, "implies sparsity 0.5"),
    ({"method": "wisdom"}, "unknown method 'wisdom'; accepted: magnitude, .*random, .*taylor"),
    ({"scope": "galactic"}, "unknown scope 'galactic'; accepted: 'local', 'global', 'row'"),
    ({"normalize": "zscore"}, "unknown normalize"),
    ({"method": "taylor"}, "pass data=.*loss_fn="),
    (
        {"targets": "conv9"},
        "targets pattern 'conv9' matches no prunable layer. Prunable layers: conv1, conv2, fc1, head",
    ),
    ({"ignore": "re:nothing.*"}, "ignore pattern"),
    ({"per_layer": {"fc7": 0.5}}, "per_layer pattern 'fc7' matches no"),
    ({"per_layer": {"fc1": 1.5}}, "per_layer\\['fc1'\\] must be a number in \\[0, 1\\)"),
    ({"targets": "conv*", "ignore": "conv*"}, "nothing to prune"),
    ({"max_batches": 0, "method": "taylor", "data": [], "loss_fn": lambda m, b: 0}, "max_batches"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CALLS, ids=[str(k) for k, _ in BAD_CALLS])
def test_bad_input_raises_before_any_change(cnn: SmallCNN, kwargs, message) -> None:
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prunekit.prune(cnn, **kwargs, inplace=True)
    after = cnn.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_with_nothing_to_prune() -> None:
    with pytest.raises(ValueError, match="has no prunable layer"):
        prunekit.prune(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), 0.5)


def test_head_only_model_needs_explicit_target() -> None:
    with pytest.raises(ValueError, match="name it in `targets`"):
        prunekit.prune(nn.Linear(4, 2), 0.5)
    assert prunekit.prune(nn.Linear(4, 2), 0.5, targets="*").zeros == 4


def test_pattern_that_no_layer_can_take(cnn: SmallCNN) -> None:
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no targeted layer can take"):
        prunekit.prune(cnn, pattern="3:7", targets="conv1", inplace=True)
    assert not any(prunekit.masks.is_masked(m) for m in cnn.modules())


def test_lower_sparsity_than_present_warns_and_keeps_zeros(cnn: SmallCNN) -> None:
    pruned = prunekit.prune(cnn, 0.8, scope="local").model
    with pytest.warns(UserWarning, match="already sparser"):
        again = prunekit.prune(pruned, 0.3, scope="local")
    assert again.zeros == prunekit.stats(pruned).zeros - prunekit.stats(pruned).layer("head").zeros


def test_taylor_loss_must_be_scalar(cnn: SmallCNN, cnn_input) -> None:
    with pytest.raises(TypeError, match="scalar"):
        prunekit.prune(
            cnn,
            0.5,
            method="taylor",
            data=[cnn_input],
            loss_fn=lambda m, b: m(b),
            progress=False,
            inplace=True,
        )
    assert all(p.grad is None for p in cnn.parameters())
