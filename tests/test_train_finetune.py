"""Recovery: finetune keeps the mask, distils a teacher, stops early and restores the best state."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from conftest import mlp
from prunekit.masks import get_mask, is_masked, reapply_masks
from prunekit.train import GradualPruner, PolynomialSchedule, finetune, hidden_loss, kd_loss
from prunekit.train.checkpoint import latest_point, write_point
from prunekit.train.finetune import AUTO_LR_BOUNDS, RANGE_TEST_STEPS
from prunekit.train.lr import find_lr

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
        scheduler=None,  # a constant rate, as before schedules existed
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
    with pytest.raises(ValueError, match="'auto'"):
        finetune(dense, DATA, ce, lr="fast")
    with pytest.raises(ValueError, match="'cosine', 'linear', 'constant'"):
        finetune(dense, DATA, ce, scheduler="step")
    with pytest.raises(ValueError, match="warmup"):
        finetune(dense, DATA, ce, warmup=1.0)
    with pytest.raises(TypeError, match="checkpoint"):
        finetune(dense, DATA, ce, checkpoint=3)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the rate of its first group at every step."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[float] = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def rates(dense, **kwargs) -> list[float]:
    made: list[RecordingSGD] = []

    def factory(params):
        made.append(RecordingSGD(params, lr=0.5))
        return made[-1]

    finetune(dense, DATA, ce, epochs=4, optimizer=factory, progress=False, **kwargs)
    return made[0].seen


def reference_rates(kind: str, total: int, warm: int, peak: float = 0.5) -> list[float]:
    out = []
    for i in range(total):
        if i < warm:
            out.append(peak * (i + 1) / (warm + 1))
            continue
        p = (i - warm) / (total - warm)
        factor = {"cosine": (1 + math.cos(math.pi * p)) / 2, "linear": 1 - p, "constant": 1.0}
        out.append(peak * factor[kind])
    return out


def test_schedules_warm_up_then_decay(dense) -> None:
    total = 4 * len(DATA)  # 24 steps
    assert rates(dense, warmup=0.25) == pytest.approx(reference_rates("cosine", total, 6))
    assert rates(dense, scheduler="linear", warmup=0.25) == pytest.approx(
        reference_rates("linear", total, 6)
    )
    assert rates(dense, scheduler="constant") == pytest.approx(
        reference_rates("constant", total, 1)  # the default warm-up: 5 % of 24 steps
    )
    assert rates(dense, scheduler=None) == [0.5] * total  # constant, no warm-up
    assert rates(dense, max_steps=10, warmup=0.2) == pytest.approx(reference_rates("cosine", 10, 2))
    step = rates(
        dense, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=12, gamma=0.1)
    )
    assert step == pytest.approx([0.5] * 12 + [0.05] * 12)  # a torch scheduler: no warm-up


def test_range_test_restores_the_model_and_suggests_a_tenth_of_the_best() -> None:
    torch.manual_seed(0)
    net = nn.Linear(16, 8)
    before = copy.deepcopy(net.state_dict())
    losses_seen: list[float] = []

    def loss(batch):
        value = ce(net, batch)
        losses_seen.append(float(value.detach()))
        return value

    test = find_lr(net, DATA, loss, lambda p, lr: torch.optim.SGD(p, lr=lr), steps=40, end=1e3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert test.lrs[0] == pytest.approx(1e-7) and len(test.lrs) < 40  # stopped on divergence
    ratios = [b / a for a, b in zip(test.lrs, test.lrs[1:], strict=False)]
    assert ratios == pytest.approx([(1e10) ** (1 / 39)] * len(ratios))
    # the smoothed curve is the debiased exponential average of the raw losses
    avg, smooth = 0.0, []
    for i, value in enumerate(losses_seen[: len(test.lrs)]):
        avg = 0.9 * avg + 0.1 * value
        smooth.append(avg / (1 - 0.9 ** (i + 1)))
    assert test.losses == pytest.approx(smooth)
    best = min(range(len(smooth)), key=smooth.__getitem__)
    assert test.best_lr == test.lrs[best] and test.lr == pytest.approx(test.lrs[best] / 10)


def test_auto_lr_comes_from_the_range_test(dense) -> None:
    pruned = prunekit.prune(dense, 0.8).model
    zeros = zero_positions(pruned)
    result = finetune(pruned, DATA, ce, teacher=dense, epochs=2, progress=False)
    assert RANGE_TEST_STEPS == 100
    assert result.lr_test is not None and len(result.lr_test.lrs) <= 20  # 12 steps: the minimum
    low, high = AUTO_LR_BOUNDS
    assert result.lr == pytest.approx(min(max(result.lr_test.lr, low), high))
    assert all(torch.equal(a, b) for a, b in zip(zeros, zero_positions(result.model), strict=True))
    fixed = finetune(pruned, DATA, ce, teacher=dense, epochs=1, lr=1e-3, progress=False)
    assert fixed.lr == 1e-3 and fixed.lr_test is None


def test_auto_lr_peaks_at_the_range_tests_best_rate() -> None:
    # small true weights: AdamW steps above ~1e-3 overshoot, so the best rate lies inside
    # AUTO_LR_BOUNDS and the peak shows whether it is taken as is or divided
    gen = torch.Generator().manual_seed(1)
    true = 1e-3 * torch.randn(16, 1, generator=gen)
    xs = [torch.randn(32, 16, generator=gen) for _ in range(6)]
    data = [(x, x @ true) for x in xs]
    net = nn.Linear(16, 1, bias=False)
    nn.init.zeros_(net.weight)
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    result = finetune(net, data, mse, epochs=4, keep_zeros=False, progress=False)
    test = result.lr_test
    assert test is not None and test.best_lr is not None
    low, high = AUTO_LR_BOUNDS
    assert low < test.best_lr < high / 3
    # the warm-up + cosine run peaks at the rate of lowest loss itself (the one-cycle maximum),
    # not a fraction of it: a third of it recovered less on the character Llama at 50 % and 70 %
    assert result.lr == pytest.approx(test.best_lr) == test.lr
    assert test.best_lr == test.lrs[test.losses.index(min(test.losses))]
    assert mean_mse(result.model, data) < mean_mse(net, data) / 2


def mean_mse(model, data) -> float:
    with torch.no_grad():
        return sum(float(F.mse_loss(model(x), y)) for x, y in data) / len(data)


def test_auto_lr_with_a_pruner_is_tested_at_the_final_sparsity(dense) -> None:
    model = copy.deepcopy(dense)
    pruner = GradualPruner(model, PolynomialSchedule(final_sparsity=0.75, begin_step=0, end_step=8))
    result = finetune(model, DATA, ce, epochs=4, pruner=pruner, inplace=True, progress=False)
    # the reference: the range test on a copy pruned one-shot to 75 %, same loss, same steps
    probe = prunekit.prune(dense, 0.75).model
    reference = find_lr(
        probe,
        DATA,
        lambda b: ce(probe, b),
        lambda p, lr: torch.optim.AdamW(p, lr=lr),
        steps=20,  # 24 steps in the run: the minimum of 20
        divisor=3.0,
        after_step=lambda: reapply_masks(probe),
    )
    assert result.lr_test is not None
    # equal up to the last, divergent step at lr 1 (where float differences are amplified)
    assert result.lr_test.losses[:-1] == pytest.approx(reference.losses[:-1], rel=1e-5)
    low, high = AUTO_LR_BOUNDS
    assert result.lr == pytest.approx(min(max(reference.lr, low), high))
    assert pruner.sparsity == 0.75


class Interrupt:
    """An evaluate callback that raises KeyboardInterrupt at its n-th call (0 = never)."""

    def __init__(self, at: int = 0) -> None:
        self.calls, self.at = 0, at

    def __call__(self, model) -> float:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return -mean_loss(model)


def resumable_run(dense, folder, evaluate, epochs: int = 3) -> prunekit.train.FinetuneResult:
    torch.manual_seed(0)
    pruned = prunekit.prune(dense, 0.7).model
    x = torch.cat([b[0] for b in DATA])
    y = torch.cat([b[1] for b in DATA])
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    model = nn.Sequential(*pruned, nn.Dropout(0.2))  # dropout: the global generator counts too
    teacher = nn.Sequential(*dense, nn.Dropout(0.2))
    return finetune(
        model,
        data,
        ce,
        teacher=teacher,
        epochs=epochs,
        evaluate=evaluate,
        checkpoint=folder,
        progress=False,
    )


def test_checkpoint_resumes_to_the_uninterrupted_result(dense, tmp_path) -> None:
    straight = resumable_run(dense, tmp_path / "a", Interrupt())
    with pytest.warns(UserWarning, match="interrupted"):
        cut = resumable_run(dense, tmp_path / "b", Interrupt(at=3))  # in the 2nd epoch's eval
    assert cut.interrupted and sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "epoch-000001"
    ]
    resumed = resumable_run(dense, tmp_path / "b", Interrupt())
    assert resumed.resumed_epoch == 1 and resumed.steps == straight.steps == 3 * len(DATA)
    assert resumed.lr == straight.lr and resumed.best_step == straight.best_step
    assert [r["metric"] for r in resumed.history] == [r["metric"] for r in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # only whole points, no pickle: safetensors + JSON
    point = tmp_path / "b" / "epoch-000003"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch-000003"]
    assert sorted(p.name for p in point.iterdir()) == ["state.json", "state.safetensors"]
    assert json.loads((point / "state.json").read_text())["state"]["finished"] is True
    # a finished run is loaded, not trained again
    counting = Interrupt()
    again = resumable_run(dense, tmp_path / "b", counting)
    assert counting.calls == 0 and again.steps == straight.steps and again.resumed_epoch == 3
    c = again.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="epochs: checkpoint 3, this call 4"):
        resumable_run(dense, tmp_path / "b", Interrupt(), epochs=4)


def test_checkpoint_points_are_whole_and_checked(tmp_path) -> None:
    state = {"w": torch.arange(4.0), "betas": (0.9, 0.999), "state": {0: {"step": 3}}, "x": None}
    write_point(tmp_path, 2, state)
    (tmp_path / ".epoch-000003.tmp-dead").mkdir()  # a writer killed mid-way
    write_point(tmp_path, 3, {**state, "w": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000003"]
    epoch, loaded = latest_point(tmp_path)
    assert epoch == 3 and loaded["betas"] == (0.9, 0.999) and loaded["state"] == {0: {"step": 3}}
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["x"] is None
    blob = tmp_path / "epoch-000003" / "state.safetensors"
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        latest_point(tmp_path)
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        write_point(tmp_path / "other", 1, {"bad": object()})
    assert latest_point(tmp_path / "missing") is None


def test_killed_checkpoint_writer_leaves_a_whole_point(tmp_path) -> None:
    import os
    import random
    import signal
    import time

    rng = random.Random(0)
    for trial in range(6):
        folder = tmp_path / f"run{trial}"
        pid = os.fork()  # a writer that is killed mid-way (torch is already imported: fast)
        if pid == 0:  # pragma: no cover - the child
            try:
                for epoch in range(1, 100_000):
                    write_point(folder, epoch, {"epoch": epoch, "w": torch.full((64, 64), epoch)})
            finally:
                os._exit(0)
        deadline = time.monotonic() + 30
        while not (folder / "epoch-000001").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # the first point exists: kill somewhere after it
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        epoch, state = latest_point(folder)
        assert state["epoch"] == epoch >= 1
        assert torch.equal(state["w"], torch.full((64, 64), epoch))
        # the next write cleans up what the kill left (older points, temporaries)
        write_point(folder, epoch + 1, {"epoch": epoch + 1})
        assert [p.name for p in folder.iterdir()] == [f"epoch-{epoch + 1:06d}"]


def test_a_torch_loss_module_is_called_on_the_output_and_the_target(dense) -> None:
    # nn.CrossEntropyLoss() takes (output, target), not (model, batch): finetune calls it on the
    # model's output and the batch's target, and trains exactly as the (model, batch) function.
    want = finetune(dense, DATA, ce, epochs=2, lr=1e-2, progress=False).model
    got = finetune(dense, DATA, nn.CrossEntropyLoss(), epochs=2, lr=1e-2, progress=False).model
    assert all(torch.equal(a, b) for a, b in zip(want.parameters(), got.parameters(), strict=True))
    # a mapping batch: the model gets the other keys, the loss gets "labels"
    keyed = [{"x": x, "labels": y} for x, y in DATA]

    class Keyed(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    got = finetune(Keyed(dense), keyed, nn.CrossEntropyLoss(), epochs=2, lr=1e-2, progress=False)
    assert all(
        torch.equal(a, b) for a, b in zip(want.parameters(), got.model.parameters(), strict=True)
    )
    # no target to take: a clear error that says what is accepted, before any step
    triples = [(x, y, y) for x, y in DATA]
    with pytest.raises(TypeError, match=r"CrossEntropyLoss.*\(input, target\).*'labels'"):
        finetune(dense, triples, nn.CrossEntropyLoss(), lr=1e-2, progress=False)
