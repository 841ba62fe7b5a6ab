"""Recovery: finetune keeps the mask, distils a teacher, stops early and restores the best state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from conftest import mlp
from prunekit.masks import get_mask, is_masked
from prunekit.train import GradualPruner, PolynomialSchedule, finetune, hidden_loss, kd_loss

pytestmark = pytest.mark.usefixtures("one_thread")


G = torch.Generator().manual_seed(0)
DATA = [
    (torch.randn(32, 16, generator=G), torch.randint(0, 8, (32,), generator=G)) for _ in range(6)
]


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def mean_loss(model) -> float:
    with torch.no_grad():
        return sum(float(ce(model, b)) for b in DATA) / len(DATA)


@pytest.fixture
def dense() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp()


def zero_positions(model) -> list[torch.Tensor]:
    return [(getattr(model, n).weight == 0) for n in ("0", "2", "4")]


def test_finetune_keeps_the_mask_and_learns(dense) -> None:
    pruned = prunekit.prune(dense, 0.8).model
    zeros = zero_positions(pruned)
    before = copy.deepcopy(pruned.state_dict())
    result = finetune(
        pruned,
        DATA,
        ce,
        epochs=4,
        lr=3e-2,
        weight_decay=0.1,
        evaluate=lambda m: -mean_loss(m),
        progress=False,
    )
    assert result.model is not pruned
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())  # untouched
    assert all(torch.equal(a, b) for a, b in zip(zeros, zero_positions(result.model), strict=True))
    assert is_masked(result.model[0])
    assert mean_loss(result.model) < mean_loss(pruned) - 0.1
    assert result.steps == 4 * len(DATA)
    assert [row["step"] for row in result.history] == [0, 6, 12, 18, 24]


def test_a_finalized_model_stays_sparse_and_plain(dense) -> None:
    sparse = prunekit.finalize(prunekit.prune(dense, 0.7).model)
    zeros = zero_positions(sparse)
    result = finetune(sparse, DATA, ce, epochs=2, lr=1e-2, progress=False)
    assert type(result.model[0]) is nn.Linear and not any(
        is_masked(m) for m in result.model.modules()
    )
    assert all(torch.equal(a, b) for a, b in zip(zeros, zero_positions(result.model), strict=True))
    assert not torch.equal(result.model[0].weight, sparse[0].weight)


def test_kd_loss_is_t_squared_kl() -> None:
    s, t = torch.randn(5, 7, generator=G), torch.randn(5, 7, generator=G)
    p_t = F.softmax(t / 3, dim=-1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / 3, dim=-1))).sum(-1).mean() * 9
    torch.testing.assert_close(kd_loss(s, t, temperature=3.0), manual)
    assert float(kd_loss(s, s)) == 0.0
    # log-probabilities work as logits
    torch.testing.assert_close(kd_loss(F.log_softmax(s, -1), t, 3.0), kd_loss(s, t, 3.0))
    # sequences: every position is an example
    seq = torch.randn(2, 4, 7, generator=G)
    torch.testing.assert_close(
        kd_loss(seq, seq.flip(0)), kd_loss(seq.reshape(8, 7), seq.flip(0).reshape(8, 7))
    )


def test_hidden_loss_ignores_padding() -> None:
    a, b = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    b[1, 2] = 10.0  # a padding position
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert float(hidden_loss(a, b, mask)) == 0.0
    assert float(hidden_loss(a, b)) == pytest.approx(100 * 4 / 24)


def test_distillation_moves_the_student_towards_the_teacher(dense) -> None:
    student = prunekit.prune(dense, 0.6).model
    inputs = [b[0] for b in DATA]

    def gap(model) -> float:
        with torch.no_grad():
            return sum(float(kd_loss(model(x), dense(x))) for x in inputs)

    result = finetune(
        student,
        inputs,  # unlabelled: pure distillation
        teacher=dense,
        hidden_layers=["2"],
        epochs=5,
        lr=5e-3,
        progress=False,
    )
    assert gap(result.model) < 0.5 * gap(student)
    assert all(not m._forward_hooks for m in result.model.modules())
    assert all(not m._forward_hooks for m in dense.modules())
    assert all(p.grad is None for p in dense.parameters())
    assert all(
        torch.equal(a, b)
        for a, b in zip(zero_positions(student), zero_positions(result.model), strict=True)
    )


def test_hidden_state_distillation_alone(dense) -> None:
    student = prunekit.prune(dense, 0.6).model
    inputs = [b[0] for b in DATA]

    def gap(model) -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(model[:3](x), dense[:3](x))) for x in inputs)

    result = finetune(
        student,
        inputs,
        teacher=dense,
        kd_weight=0,
        hidden_layers="2",
        epochs=5,
        lr=5e-3,
        progress=False,
    )
    assert gap(result.model) < 0.5 * gap(student)


def test_early_stopping_restores_the_best_weights(dense) -> None:
    metrics = iter([0.5, 0.9, 0.7, 0.6, 0.8, 0.95])  # best at the first evaluation after training
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate(model) -> float:
        seen.append(copy.deepcopy(model.state_dict()))
        return next(metrics)

    result = finetune(
        dense,
        DATA,
        ce,
        epochs=10,
        lr=1e-2,
        evaluate=evaluate,
        eval_every=3,
        patience=2,
        progress=False,
    )
    assert result.stopped_early and not result.interrupted
    assert result.best_metric == 0.9 and result.best_step == 3
    assert [row["metric"] for row in result.history] == [0.5, 0.9, 0.7, 0.6]
    assert result.steps == 9
    assert all(torch.equal(seen[1][k], v) for k, v in result.model.state_dict().items())


def test_pruner_inside_finetune_reaches_its_sparsity(dense) -> None:
    model = copy.deepcopy(dense)
    pruner = GradualPruner(model, PolynomialSchedule(final_sparsity=0.75, begin_step=2, end_step=8))
    result = finetune(
        model,
        DATA,
        ce,
        epochs=3,
        lr=1e-2,
        pruner=pruner,
        inplace=True,
        evaluate=lambda m: -mean_loss(m),
        progress=False,
    )
    assert result.model is model and pruner.optimizer is not None
    assert pruner.sparsity == 0.75
    masks = [get_mask(model[0]), get_mask(model[2])]
    zeros = sum(int((~m).sum()) for m in masks)
    assert zeros == round(0.75 * sum(m.numel() for m in masks))
    assert [row["sparsity"] for row in result.history][-1] == 0.75
    assert (
        result.best_step is not None and result.best_step >= 8
    )  # best among final-sparsity states


def test_bad_input(dense) -> None:
    with pytest.raises(ValueError, match="loss_fn"):
        finetune(dense, DATA)
    with pytest.raises(ValueError, match="patience"):
        finetune(dense, DATA, ce, patience=2)
    with pytest.raises(ValueError, match="epochs"):
        finetune(dense, DATA, ce, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        finetune(dense, DATA, ce, lr=math.nan)
    with pytest.raises(ValueError, match="hidden_layers pattern"):
        finetune(dense, DATA, ce, teacher=copy.deepcopy(dense), hidden_layers="encoder*")
    with pytest.raises(ValueError, match="inplace=True"):
        finetune(dense, DATA, ce, pruner=GradualPruner(dense, 0.5))
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="factory"):
        finetune(dense, DATA, ce, optimizer=opt)
