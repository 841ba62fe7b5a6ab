"""GradualPruner: schedules applied exactly, no revival, exact resume, every method and pattern."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from conftest import mlp
from prunekit.masks import get_mask, is_masked, raw_parameter
from prunekit.train import (
    ConstantSchedule,
    GradualPruner,
    IterativeSchedule,
    PolynomialSchedule,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 16, generator=g), torch.randint(0, 8, (16,), generator=g))
        for _ in range(count)
    ]


def train_step(model, optimizer, batch, pruner=None) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()
    if pruner is not None:
        pruner.step()


def targeted_sparsity(model: nn.Module, names=("0", "2")) -> float:
    weights = [getattr(model, n).weight for n in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def make(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp()


def test_gradual_magnitude_follows_the_schedule_exactly() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = PolynomialSchedule(final_sparsity=0.8, begin_step=2, end_step=12, frequency=2)
    pruner = GradualPruner(model, schedule, optimizer=opt)
    total = sum(getattr(model, n).weight.numel() for n in ("0", "2"))
    for step, batch in enumerate(batches(15), start=1):
        train_step(model, opt, batch, pruner)
        assert pruner.step_count == step
        expected = schedule.sparsity_at(step)
        assert pruner.sparsity == expected
        zeros = sum(int((getattr(model, n).weight == 0).sum()) for n in ("0", "2"))
        assert zeros == round(expected * total)
    assert [s for s, _ in pruner.history] == [4, 6, 8, 10, 12]  # 0 at begin_step: no update
    assert not is_masked(model[4])  # the head is not targeted by default


def hand_gradual_magnitude(model, make_optimizer, schedule, data) -> list[torch.Tensor]:
    """Gradual magnitude pruning written by hand (no prunekit): after every optimizer step, on
    the schedule's update steps one global |w| threshold over the hidden layers sets the
    masks, and the masked weights are multiplied by them."""
    opt = make_optimizer(model.parameters())
    weights = [model[0].weight, model[2].weight]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    for step, batch in enumerate(data, start=1):
        train_step(model, opt, batch)
        target = schedule.sparsity_at(step)
        count = round(target * sum(w.numel() for w in weights))
        if count > sum(int((~m).sum()) for m in masks):
            scores = torch.cat([w.detach().abs().flatten() for w in weights])
            threshold = scores.kthvalue(count).values
            masks = [w.detach().abs() > threshold for w in weights]
        with torch.no_grad():
            for w, m in zip(weights, masks, strict=True):
                w.mul_(m)
    return [w.detach().clone() for w in weights]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_default_pruner_trains_exactly_like_a_hand_written_gradual_loop(make_optimizer) -> None:
    # the defaults (global magnitude over the hidden layers) on the cubic schedule: the same
    # masks at the same steps and the same surviving weights as the plain loop, step for step
    # (pruning later, earlier, per layer, or letting pruned momentum move a weight would not)
    schedule = PolynomialSchedule(final_sparsity=0.9, end_step=24, frequency=4)
    data = batches(30)
    expected = hand_gradual_magnitude(make(), make_optimizer, schedule, data)
    model = make()
    opt = make_optimizer(model.parameters())
    pruner = GradualPruner(model, schedule, optimizer=opt)
    for batch in data:
        train_step(model, opt, batch, pruner)
    assert [s for s, _ in pruner.history] == [4, 8, 12, 16, 20, 24]
    for got, want in zip((model[0].weight, model[2].weight), expected, strict=True):
        assert torch.equal(got == 0, want == 0)
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert targeted_sparsity(model) == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    ],
    ids=["sgd-momentum", "adamw", "adam-amsgrad"],
)
def test_masks_never_revive_and_optimizer_state_is_cleared(make_optimizer) -> None:
    model = make()
    opt = make_optimizer(model.parameters())
    # Dense steps first, so momentum / moments exist everywhere before anything is masked.
    schedule = PolynomialSchedule(final_sparsity=0.9, begin_step=5, end_step=25, frequency=5)
    pruner = GradualPruner(model, schedule, optimizer=opt)
    previous = {n: torch.ones_like(getattr(model, n).weight, dtype=torch.bool) for n in ("0", "2")}
    for batch in batches(40):
        train_step(model, opt, batch, pruner)
        for name in ("0", "2"):
            layer = getattr(model, name)
            keep = get_mask(layer)
            if keep is None:
                continue
            raw = raw_parameter(layer)
            assert not bool((keep & ~previous[name]).any()), "a pruned weight came back"
            assert bool((raw[~keep] == 0).all()), "a raw parameter drifted off zero"
            assert bool((layer.weight[~keep] == 0).all())
            state = opt.state[raw]
            tensors = [v for v in state.values() if torch.is_tensor(v) and v.shape == raw.shape]
            assert tensors, "expected per-weight optimizer state"
            for value in tensors:
                assert bool((value[~keep] == 0).all()), "optimizer state kept at a pruned weight"
                assert bool((value[keep] != 0).any())
            previous[name] = keep
    assert pruner.sparsity == 0.9
    assert targeted_sparsity(model) == pytest.approx(0.9, abs=1e-3)


def run(method: str, make_optimizer, steps: int, resume_at: int | None = None):
    """Train `steps` steps; with resume_at, checkpoint there and finish on fresh objects."""
    data = batches(steps, seed=3)
    schedule = PolynomialSchedule(final_sparsity=0.75, begin_step=2, end_step=14, frequency=3)
    model = make(0)
    opt = make_optimizer(model.parameters())
    pruner = GradualPruner(model, schedule, method=method, scope="local", optimizer=opt)
    for i in range(steps if resume_at is None else resume_at):
        train_step(model, opt, data[i], pruner)
    if resume_at is None:
        return model, pruner
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = make(99)  # a fresh, different initialisation
    opt = make_optimizer(model.parameters())
    pruner = GradualPruner(model, schedule, method=method, scope="local", optimizer=opt)
    pruner.load_state_dict(saved["pruner"])  # first: puts the masks on the fresh model
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for i in range(resume_at, steps):
        train_step(model, opt, data[i], pruner)
    return model, pruner


@pytest.mark.parametrize("method", ["magnitude", "movement", "taylor"])
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_resume_from_checkpoint_matches_an_uninterrupted_run(method, make_optimizer) -> None:
    straight, p1 = run(method, make_optimizer, steps=18)
    resumed, p2 = run(method, make_optimizer, steps=18, resume_at=7)
    assert p1.history == p2.history and p1.step_count == p2.step_count == 18
    for name in ("0", "2"):
        assert torch.equal(get_mask(getattr(straight, name)), get_mask(getattr(resumed, name)))
    for (n1, t1), (n2, t2) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(t1, t2), n1
    s1, s2 = p1.state_dict(), p2.state_dict()
    for group in ("scores", "previous"):
        assert s1[group].keys() == s2[group].keys()
        assert all(torch.equal(s1[group][k], s2[group][k]) for k in s1[group])


def single_layer(weights: list[float]) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(len(weights), 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([weights]))
    return model


def linear_loss_step(model, opt, pruner, coefficients: list[float]) -> None:
    """One step on loss = sum(c * w), so the gradient is exactly `coefficients`."""
    opt.zero_grad()
    (raw_parameter(model[0]) * torch.tensor([coefficients])).sum().backward()
    opt.step()
    pruner.step()


def test_movement_prunes_weights_moving_towards_zero_not_small_ones() -> None:
    # w = [5, 4, 0.1, 0.2], gradient [1, -1, -1, -1]: movement score -w*g = [-5, 4, 0.1, 0.2].
    # Magnitude would remove 0.1; movement removes 5, which descent is pulling towards zero.
    model = single_layer([5.0, 4.0, 0.1, 0.2])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: scores are exact
    pruner = GradualPruner(
        model, ConstantSchedule(0.25, begin_step=1), method="movement", targets="0", optimizer=opt
    )
    linear_loss_step(model, opt, pruner, [1.0, -1.0, -1.0, -1.0])
    assert get_mask(model[0]).tolist() == [[False, True, True, True]]
    scores = pruner.state_dict()["scores"]["0.weight"]
    assert torch.equal(
        scores, -torch.tensor([[5.0, 4.0, 0.1, 0.2]]) * torch.tensor([[1.0, -1, -1, -1]])
    )


def test_movement_accumulates_over_steps_and_taylor_uses_abs() -> None:
    # Two steps with opposite gradients on weight 0: movement cancels, taylor adds up.
    for method, expected_pruned in (("movement", 0), ("taylor", 3)):
        model = single_layer([1.0, 1.0, 1.0, 1.0])
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = GradualPruner(
            model, ConstantSchedule(0.25, begin_step=2), method=method, targets="0", optimizer=opt
        )
        linear_loss_step(model, opt, pruner, [3.0, -1.0, -1.0, -0.5])
        linear_loss_step(model, opt, pruner, [-3.0, -1.0, -1.0, -0.5])
        # movement: [0, 2, 2, 1] -> weight 0 lowest; taylor: [6, 2, 2, 1] -> weight 3 lowest
        keep = get_mask(model[0])[0]
        assert keep.tolist().index(False) == expected_pruned, method


def test_taylor_with_data_scores_like_one_shot_prune() -> None:
    model = make()
    data = batches(2, seed=5)

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    expected = prunekit.prune(model, 0.5, method="taylor", data=data, loss_fn=loss, progress=False)
    pruner = GradualPruner(model, 0.5, method="taylor", data=data, loss_fn=loss)
    for name in ("0", "2"):
        assert torch.equal(get_mask(getattr(model, name)), get_mask(getattr(expected.model, name)))
    assert pruner.history == [(0, 0.5)]


class RecordingPruner(GradualPruner):
    """Records the learning rate of every optimizer step it follows."""

    def step(self) -> bool:
        self.rates = [*getattr(self, "rates", []), self.optimizer.param_groups[0]["lr"]]
        return super().step()


def gradual_finetune(**kw):
    model, teacher = make(), make()
    pruner = RecordingPruner(model, PolynomialSchedule(final_sparsity=0.8, end_step=8, frequency=2))
    ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    prunekit.finetune(model, batches(4), ce, teacher=teacher, epochs=5, lr=1e-2, pruner=pruner,
                      inplace=True, progress=False, **kw)  # fmt: skip
    return model, pruner


def test_finetune_holds_the_peak_rate_until_the_pruning_schedule_ends() -> None:
    # 20 steps, 1 of warm-up: the decay starts when the schedule reaches its final sparsity
    # (step 8), not right after the warm-up, and still ends at zero
    _, pruner = gradual_finetune()
    rates = pruner.rates
    assert len(rates) == 20 and rates[0] < 1e-2
    assert rates[1:9] == pytest.approx([1e-2] * 8)
    assert all(a > b for a, b in zip(rates[8:], rates[9:], strict=False))
    assert rates[-1] < 1e-3 and pruner.sparsity == 0.8
    # scheduler=None still means a constant rate without warm-up
    assert gradual_finetune(scheduler=None)[1].rates == pytest.approx([1e-2] * 20)


def test_finetune_distils_at_the_gradual_temperature_with_a_pruner() -> None:
    # temperature=None (the default) with a pruner is T=4, not finetune's T=2 without one
    default, _ = gradual_finetune()
    at_four, _ = gradual_finetune(temperature=4.0)
    at_two, _ = gradual_finetune(temperature=2.0)
    for name in ("0", "2", "4"):
        assert torch.equal(getattr(default, name).weight, getattr(at_four, name).weight)
    assert not torch.equal(default[4].weight, at_two[4].weight)


def test_gradual_n_m_passes_through_3_4_to_2_4() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    schedule = PolynomialSchedule(final_sparsity=0.5, begin_step=1, end_step=10, power=1)
    pruner = GradualPruner(model, schedule, pattern="2:4", optimizer=opt)
    seen = set()
    for step in range(1, 12):
        opt.zero_grad()
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        pruner.step()
        keep = get_mask(model[0])
        kept_per_group = None if keep is None else set(keep.reshape(-1, 4).sum(1).tolist())
        seen.add(None if kept_per_group is None else tuple(sorted(kept_per_group)))
        if schedule.sparsity_at(step) < 0.25:
            assert keep is None
    assert seen == {None, (3,), (2,)}
    # linear from step 1 to 10: 0.5 * (t - 1) / 9 >= 0.25 first at t = 6
    assert [s for s, _ in pruner.history] == [6, 10]


def test_block_pattern_and_iterative_schedule() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = GradualPruner(
        model, IterativeSchedule(rate=0.5, rounds=2, every=3), pattern="block:2x2", optimizer=opt
    )
    assert pruner.sparsity == 0.5  # the first round happens at step 0
    for batch in batches(4):
        train_step(model, opt, batch, pruner)
    assert pruner.sparsity == 0.75
    keep = get_mask(model[0])
    tiles = keep.reshape(16, 2, 8, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    assert set(tiles.sum(1).tolist()) <= {0, 4}  # whole 2x2 tiles
    assert targeted_sparsity(model) == pytest.approx(0.75)


def test_optimizer_attached_later_loses_its_momentum_at_pruned_positions() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in batches(3):
        train_step(model, opt, batch)
    pruner = GradualPruner(model, 0.6)
    raw = raw_parameter(model[0])
    keep = get_mask(model[0])
    assert bool((opt.state[raw]["momentum_buffer"][~keep] != 0).any())
    pruner.optimizer = opt
    assert bool((opt.state[raw]["momentum_buffer"][~keep] == 0).all())


def test_schedule_going_down_warns_and_keeps_masks() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = GradualPruner(model, lambda step: 0.5 if step < 2 else 0.2, optimizer=opt)
    data = batches(3)
    train_step(model, opt, data[0], pruner)
    with pytest.warns(UserWarning, match="never shrink"):
        train_step(model, opt, data[1], pruner)
    assert pruner.sparsity == 0.5
    assert targeted_sparsity(model) == pytest.approx(0.5)


def test_finalize_gives_plain_layers_with_the_zeros() -> None:
    model = make()
    pruner = GradualPruner(model, 0.7)
    zeros = targeted_sparsity(model)
    assert pruner.finalize() is model
    assert type(model[0]) is nn.Linear and targeted_sparsity(model) == zeros
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.step()


def test_bad_input_is_rejected_before_anything_changes() -> None:
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="begin_step >= 1"):
        GradualPruner(model, 0.5, method="movement")
    with pytest.raises(ValueError, match="data"):
        GradualPruner(model, 0.5, method="snip")
    with pytest.raises(ValueError, match="unknown scope"):
        GradualPruner(model, 0.5, scope="everywhere")
    with pytest.raises(ValueError, match="pattern"):
        GradualPruner(model, 0.5, pattern="channel")
    with pytest.raises(ValueError, match="matches no prunable layer"):
        GradualPruner(model, 0.5, targets="nope*")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(is_masked(m) for m in model.modules())
    pruner = GradualPruner(make(), 0.5)
    with pytest.raises(ValueError, match="other layers"):
        pruner.load_state_dict({**pruner.state_dict(), "targets": ["x.weight"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradualPruner(make(), lambda step: 0.0).step()


def test_n_m_schedule_is_checked_and_reports_the_applied_sparsity() -> None:
    from prunekit.train import PolynomialSchedule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="stops at sparsity 0.5"):
        GradualPruner(net, PolynomialSchedule(final_sparsity=0.9, end_step=10), pattern="2:4")
    with pytest.raises(ValueError, match="scope 'row'"):
        GradualPruner(net, 0.5, pattern="2:4", scope="row")
    pruner = GradualPruner(
        net, PolynomialSchedule(final_sparsity=0.5, end_step=8, frequency=1), pattern="2:4"
    )
    seen = set()
    for _ in range(10):
        pruner.step()
        seen.add(pruner.sparsity)
    assert seen <= {0.0, 0.25, 0.5} and pruner.sparsity == 0.5
