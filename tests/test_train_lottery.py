"""Lottery tickets: per-round sparsity and masks, and rewinding restores the saved weights exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from prunekit.masks import get_mask
from prunekit.train import lottery_ticket

pytestmark = pytest.mark.usefixtures("one_thread")


G = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 16, generator=G), torch.randint(0, 8, (64,), generator=G)


class Recorder:
    """A train_fn that records the weights it starts from and those after step 3 of round 0."""

    def __init__(self, steps: int = 6) -> None:
        self.steps = steps
        self.starts: list[dict[str, torch.Tensor]] = []
        self.after_step_3: dict[str, torch.Tensor] | None = None

    def __call__(self, model, ticket) -> dict[str, float]:
        self.starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(self.steps):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
            ticket.step()
            if ticket.round == 0 and ticket.steps == 3:
                self.after_step_3 = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            return {"accuracy": float((model(X).argmax(1) == Y).float().mean())}


@pytest.mark.parametrize("rewind_to", [0, 3])
def test_rewind_restores_exactly_the_saved_weights(rewind_to: int) -> None:
    torch.manual_seed(0)
    model = mlp()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = Recorder()
    result = lottery_ticket(model, train, rounds=3, rate=0.5, rewind_to=rewind_to, progress=False)
    saved = initial if rewind_to == 0 else train.after_step_3
    assert result.rewind_step == rewind_to
    assert all(torch.equal(result.rewind_state[n], saved[n]) for n in saved)
    for r, start in zip(result.rounds[1:], train.starts[1:], strict=True):
        for name, value in start.items():
            module_name = name.rsplit(".", 1)[0]
            keep = r.masks.get(name)
            expected = saved[name] if keep is None else saved[name] * keep
            assert torch.equal(value, expected), (r.round, name)
            if keep is not None:
                assert bool((value[keep] == saved[name][keep]).all())
                assert module_name in ("0", "2")
    assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters())  # not in place


def test_rounds_prune_a_share_of_what_remains_and_masks_nest() -> None:
    torch.manual_seed(0)
    result = lottery_ticket(mlp(), Recorder(steps=2), rounds=3, rate=0.2, progress=False)
    total = sum(m.numel() for m in result.rounds[1].masks.values())
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    assert result.rounds[0].sparsity == 0.0 and result.rounds[0].masks == {}
    for r, expected in zip(result.rounds[1:], (0.2, 0.36, 0.488), strict=True):
        zeros = sum(int((~m).sum()) for m in r.masks.values())
        assert zeros == round(expected * total)
        assert r.sparsity == pytest.approx(zeros / total)
        assert set(r.metrics) == {"accuracy"}
    for earlier, later in zip(result.rounds[1:], result.rounds[2:], strict=False):
        for name, keep in later.masks.items():
            assert not bool((keep & ~earlier.masks[name]).any())
    last = result.rounds[-1].masks
    assert torch.equal(get_mask(result.model[0]), last["0.weight"])


def test_explicit_sparsities_and_inplace() -> None:
    torch.manual_seed(0)
    model = mlp()
    result = lottery_ticket(
        model, Recorder(steps=1), sparsities=[0.5, 0.9], inplace=True, targets="0", progress=False
    )
    assert result.model is model
    # layer 0 has 32 x 16 = 512 weights: 256 and round(460.8) = 461 zeros
    assert [r.sparsity for r in result.rounds] == [0.0, 256 / 512, 461 / 512]


def test_bad_input() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="rate"):
        lottery_ticket(model, Recorder(), rate=1.0)
    with pytest.raises(ValueError, match="rise"):
        lottery_ticket(model, Recorder(), sparsities=[0.5, 0.5])
    with pytest.raises(ValueError, match="fixed sparsity"):
        lottery_ticket(model, Recorder(), pattern="2:4")
    with pytest.raises(ValueError, match="rewind_to"):
        lottery_ticket(model, Recorder(), rewind_to=-1)

    def no_steps(model, ticket):
        return None

    with pytest.raises(RuntimeError, match=r"ticket\.step\(\)"):
        lottery_ticket(copy.deepcopy(model), no_steps, rewind_to=2, progress=False)
