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


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _unchanged(net: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = net.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "inplace, says",
    [
        (False, "compress keeps your model as the dense reference and runs the stages on a copy"),
        (True, "compress keeps the dense model as the reference every stage is measured against"),
    ],
)
def test_compress_refuses_its_own_copies_before_any_work(inplace, says, monkeypatch) -> None:
    """compress copies the model whatever inplace says (the dense reference, or the working
    model): a copy that does not fit is refused up front, with the reason, and the model is
    untouched; PRUNEKIT_ALLOW_COPY=1 runs it."""
    recipe = {"measure": {"latency": False}, "stages": [{"prune": {"sparsity": 0.5}}]}
    net = _net()
    before = _snapshot(net)
    need = copies.model_bytes(net)
    monkeypatch.setattr(copies, "available_bytes", lambda: need)
    with pytest.raises(MemoryError, match=rf"{says}.*\({need / 2**20:.1f} MiB\).*ALLOW_COPY=1"):
        prunekit.compress(net, recipe, inplace=inplace, progress=False)
    assert _unchanged(net, before)
    monkeypatch.setenv(copies.ALLOW_ENV, "1")
    report = prunekit.compress(net, recipe, inplace=inplace, progress=False)
    assert (report.model is net) == inplace
    assert float((report.model[0].weight == 0).float().mean()) == 0.5


def test_compress_search_trials_copy_through_the_guard(monkeypatch) -> None:
    """Every model copy of a search (each trial's start, the stages kept before the searched
    one) goes through the guard: with memory for two copies only, the search is refused at the
    third, saying why."""
    from prunekit.recipes import runner

    reasons = []
    original = runner.copy_model

    def counted(model, verb, reason=None):
        reasons.append(reason)
        return original(model, verb, reason)

    monkeypatch.setattr(runner, "copy_model", counted)
    recipe = {
        "measure": {"latency": False},
        "goal": {"nonzeros": 0.4, "tolerance": 0.05},
        "stages": [{"prune": {"sparsity": {"search": [0.5, 0.95]}}}],
    }
    x = torch.randn(2, 32)
    report = prunekit.compress(_net(), recipe, example_inputs=x, progress=False)
    assert report.search is not None and len(report.search.trials) >= 2
    assert reasons.count(runner._TRIAL) >= len(report.search.trials)
    assert set(reasons) <= {runner._TRIAL, runner._WORKING}

    need = copies.model_bytes(_net())
    left = iter([10 * need, 10 * need])  # two copies fit, then the memory is gone
    monkeypatch.setattr(copies, "available_bytes", lambda: next(left, need))
    with pytest.raises(MemoryError, match="compress starts every search trial"):
        prunekit.compress(_net(), recipe, example_inputs=x, progress=False)


@pytest.mark.parametrize("inplace", [False, True])
def test_prune_structured_refuses_its_verification_copy(inplace, monkeypatch) -> None:
    """prune_structured cuts the units out of a copy and verifies it (inplace=True too): a copy
    that does not fit is refused with that reason, the model untouched; the override copies."""
    import prunekit.graph as pg

    net, x = _net(), torch.randn(2, 32)
    before = _snapshot(net)
    need = copies.model_bytes(net)
    monkeypatch.setattr(copies, "available_bytes", lambda: need)
    with pytest.raises(MemoryError, match=r"prune_structured cuts the units out of a copy"):
        pg.prune_structured(net, x, ratio=0.5, round_to=1, inplace=inplace, progress=False)
    assert _unchanged(net, before)
    monkeypatch.setenv(copies.ALLOW_ENV, "1")
    pruned = pg.prune_structured(net, x, ratio=0.5, round_to=1, inplace=inplace, progress=False)
    assert pruned.model[0].out_features == 16 and (pruned.model is net) == inplace
