"""Fault injection: odd layers through every verb.

Each fault is a tiny model ``fault -> relu -> head`` whose ``fault`` layer is one of: a
Linear(1, 1), a Linear(0, 4) and a Linear(4, 0) (zero-size weights), a Conv2d with one output
channel, a Linear holding one NaN, one holding one inf, an Embedding, a Linear whose weight is
all zeros and one whose weights are all equal (ties everywhere). Each verb (``prune`` with every
method and pattern, ``oneshot`` with magnitude / Wanda / SparseGPT, ``quantize``, ``save`` /
``load`` plain and compressed, ``finalize``, ``accelerate``, ``prune_structured``, ``count``,
``stats``, one ``finetune`` step) must end in the exact expected result or in one clear error
that names the layer and the problem, and a refused call leaves the model unchanged.

The expectations are spelled out per (fault, verb) in :func:`expected`; the cases run in a few
seconds together.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import prunekit
from prunekit.compress.quantize import quantize_tensor
from prunekit.masks import apply_mask, is_masked
from prunekit.runtime import kernels

acc_mod = importlib.import_module("prunekit.runtime.accelerate")


class Net(nn.Module):
    def __init__(self, fault: nn.Module, head_in: int, flat: bool = False) -> None:
        super().__init__()
        self.fault = fault
        self.head = nn.Linear(head_in, 3)
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fault(x)
        if self.flat:
            h = h.flatten(1)
        if h.dim() == 3:  # embedding: mean over the tokens
            h = h.mean(1)
        return self.head(torch.relu(h))


def _linear(i: int, o: int, fill: Callable[[torch.Tensor], Any] | None = None) -> nn.Linear:
    layer = nn.Linear(i, o)
    if fill is not None:
        with torch.no_grad():
            fill(layer.weight)
    return layer


def _set(index: tuple[int, int], value: float) -> Callable[[torch.Tensor], None]:
    def fill(w: torch.Tensor) -> None:
        w[index] = value

    return fill


# name -> (fault layer, head input width, flatten?, input)
FAULTS: dict[str, tuple[Callable[[], nn.Module], int, bool, Callable[[], torch.Tensor]]] = {
    "linear_1x1": (lambda: _linear(1, 1), 1, False, lambda: torch.randn(4, 1)),
    "linear_in0": (lambda: _linear(0, 4), 4, False, lambda: torch.randn(4, 0)),
    "linear_out0": (lambda: _linear(4, 0), 0, False, lambda: torch.randn(4, 4)),
    "conv_1out": (lambda: nn.Conv2d(3, 1, 3), 4, True, lambda: torch.randn(4, 3, 4, 4)),
    "nan": (lambda: _linear(8, 8, _set((0, 1), math.nan)), 8, False, lambda: torch.randn(4, 8)),
    "inf": (lambda: _linear(8, 8, _set((1, 2), math.inf)), 8, False, lambda: torch.randn(4, 8)),
    "embedding": (lambda: nn.Embedding(10, 8), 8, False, lambda: torch.randint(0, 10, (4, 5))),
    "all_zero": (lambda: _linear(8, 8, torch.Tensor.zero_), 8, False, lambda: torch.randn(4, 8)),
    "ties": (lambda: _linear(8, 8, lambda w: w.fill_(0.5)), 8, False, lambda: torch.randn(4, 8)),
}


def make(fault: str) -> Net:
    layer, head_in, flat, _ = FAULTS[fault]
    torch.manual_seed(0)
    return Net(layer(), head_in, flat)


def inputs(fault: str) -> torch.Tensor:
    torch.manual_seed(1)
    return FAULTS[fault][3]()


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


T = ["fault"]


# ---------------------------------------------------------------- the verbs


def _prune(method: str, pattern: str) -> Callable[[Net, str], Any]:
    def run(model: Net, fault: str) -> Any:
        sparsity = None if pattern == "2:4" else 0.5
        kw: dict[str, Any] = {}
        if method == "taylor":
            kw = {"data": [inputs(fault)], "loss_fn": loss_fn}
        return prunekit.prune(
            model, sparsity, method=method, pattern=pattern, targets=T, progress=False, **kw
        ).model

    return run


def _oneshot(method: str, pattern: str) -> Callable[[Net, str], Any]:
    def run(model: Net, fault: str) -> Any:
        sparsity = None if pattern == "2:4" else 0.5
        calib = [inputs(fault), inputs(fault)]
        return prunekit.oneshot(
            model, calib, method, sparsity, pattern=pattern, targets=T, progress=False
        ).model

    return run


def _save(kind: str) -> Callable[[Net, str], Any]:
    def run(model: Net, fault: str, tmp_path) -> Any:
        if kind == "int":
            model = prunekit.quantize(model, targets=T, mode="int").model
        options = {"plain": {}, "compressed": {"compressed": True}, "int": {"compressed": True}}
        options["bits8"] = {"compressed": True, "bits": 8}
        folder = tmp_path / "saved"
        try:
            prunekit.save(model, folder, **options[kind])
        except Exception:
            assert not folder.exists()  # nothing half written
            raise
        return model, prunekit.load(folder, make(fault))

    run.needs_path = True  # type: ignore[attr-defined]
    return run


def _finalize(model: Net, fault: str) -> Any:
    weight = model.fault.weight
    keep = (torch.arange(weight.numel()) % 2 == 0).reshape(weight.shape)
    apply_mask(model.fault, "weight", keep)
    return keep, prunekit.finalize(model)


def _accelerate(model: Net, fault: str) -> Any:
    fast, report = prunekit.accelerate(model, inputs(fault), min_speedup=0.0, progress=False)
    return fast, report


def _structured(model: Net, fault: str) -> Any:
    return prunekit.prune_structured(
        model, inputs(fault), 0.5, progress=False, measure_latency=False
    ).model


def _finetune(model: Net, fault: str) -> Any:
    return prunekit.finetune(
        model, [inputs(fault)], loss_fn, max_steps=1, lr=1e-2, progress=False
    ).model


VERBS: dict[str, Callable[..., Any]] = {
    **{
        f"prune:{m}:{p}": _prune(m, p)
        for m in ("magnitude", "random", "taylor")
        for p in ("unstructured", "2:4", "block:2x2")
    },
    **{
        f"oneshot:{m}:{p}": _oneshot(m, p)
        for m in ("magnitude", "wanda", "sparsegpt")
        for p in ("unstructured", "2:4")
    },
    "quantize:fake": lambda m, f: prunekit.quantize(m, targets=T),
    "quantize:int": lambda m, f: prunekit.quantize(m, targets=T, mode="int"),
    **{f"save:{k}": _save(k) for k in ("plain", "compressed", "bits8", "int")},
    "finalize": _finalize,
    "accelerate": _accelerate,
    "prune_structured": _structured,
    "count": lambda m, f: prunekit.count(m, inputs(f)),
    "stats": lambda m, f: prunekit.stats(m),
    "finetune": _finetune,
}

# ---------------------------------------------------------------- what each must give

NONFINITE = r"fault\.weight.*(NaN|inf)"
EMPTY = r"fault\.weight: the weight is empty"
NOT_TAKEN = (
    r"fault\.weight: (input size \d+ is not a multiple of M=4|shape \d+x\d+ is not divisible)"
)
NO_EMBEDDING = r"targets pattern 'fault' matches no prunable layer"


def expected(fault: str, verb: str) -> tuple[type[Exception], str] | None:
    """The error (type, message pattern) the call must raise, or None when it must succeed
    (the result is then checked by :func:`check_result`)."""
    kind = verb.split(":")[0]
    pattern = verb.split(":")[-1]
    nonfinite = fault in ("nan", "inf")
    empty = fault in ("linear_in0", "linear_out0")
    if kind in ("prune", "oneshot"):
        if nonfinite:
            return ValueError, NONFINITE
        if empty:
            return ValueError, EMPTY
        if fault == "embedding" and kind == "oneshot":
            return ValueError, NO_EMBEDDING
        if fault == "embedding" and "taylor" in verb:
            return ValueError, r"embedding tables \(fault\)"
        if fault in ("linear_1x1", "conv_1out") and pattern != "unstructured":
            return ValueError, NOT_TAKEN
        return None
    if kind == "quantize" or verb in ("save:int",):
        if nonfinite:
            return ValueError, NONFINITE
        if fault == "embedding":
            return ValueError, NO_EMBEDDING
        return None
    if verb == "save:bits8" and nonfinite:
        return ValueError, NONFINITE
    if kind in ("prune_structured", "finetune") and nonfinite:
        return ValueError, NONFINITE
    return None


def check_result(fault: str, verb: str, original: Net, result: Any) -> None:
    """The exact expected result of a call that succeeded."""
    kind = verb.split(":")[0]
    w0 = original.fault.weight.detach()
    if kind in ("prune", "oneshot"):
        w = result.fault.weight.detach()
        n = w.numel()
        if fault == "all_zero":
            assert int((w == 0).sum()) == n
            assert int(result.fault.weight_mask.sum()) == 0  # every zero masked: none revived
        elif verb.endswith("2:4"):
            groups = (w.reshape(w.shape[0], -1) != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert bool((groups <= 2).all()) and int((w == 0).sum()) == n // 2
        else:
            assert int((w == 0).sum()) == min(n, round(0.5 * n))  # exact count, ties included
        if "sparsegpt" not in verb:  # SparseGPT updates the kept weights; the others keep them
            kept = w != 0
            assert torch.equal(w[kept], w0[kept])
        return
    if kind == "quantize":
        report = result
        w = report.model.fault.weight.detach()
        assert w.shape == w0.shape and bool((w[w0 == 0] == 0).all())
        expected_w = quantize_tensor(w0, 8).dequantize()
        assert torch.equal(w, expected_w)
        if fault in ("all_zero", "linear_in0", "linear_out0"):
            assert report.layer("fault.weight").rel_error == 0.0
        return
    if kind == "save":
        model, loaded = result
        for (k, a), (k2, b) in zip(state(model).items(), state(loaded).items(), strict=True):
            assert k == k2
            if verb == "save:bits8" and a.is_floating_point() and a.dim() >= 2:
                a = quantize_tensor(a, 8).dequantize()
            assert same(a, b), k
        return
    if verb == "finalize":
        keep, plain = result
        assert not is_masked(plain.fault)
        assert same(plain.fault.weight.detach(), torch.where(keep, w0, torch.zeros_like(w0)))
        return
    if verb == "accelerate":
        fast, report = result
        x = inputs(fault)
        with torch.no_grad():
            ref, got = original(x), fast(x)
        assert torch.allclose(got, ref, atol=1e-5, equal_nan=True)
        rows = {r.name: r for r in report.rows}
        if fault in ("embedding",):
            assert "fault" not in rows  # not a Linear / Conv2d: left alone
        elif kernels.load() is not None:
            reason = rows["fault"].reason
            if fault in ("nan", "inf"):
                assert "NaN" in reason and not rows["fault"].swapped
            if fault in ("linear_in0", "linear_out0"):
                assert "empty weight" in reason and not rows["fault"].swapped
        return
    if verb == "prune_structured":
        x = inputs(fault)
        with torch.no_grad():
            out = result(x)
        assert out.shape == original(x).shape and bool(torch.isfinite(out).all())
        return
    if verb == "count":
        params = sum(p.numel() for p in original.parameters())
        assert result.params == params
        return
    if verb == "stats":
        names = [r.name for r in result.layers]
        if fault == "embedding":  # tables are listed once masked, like any pruned weight
            assert names == ["head.weight"]
            return
        row = result.layer("fault.weight")
        assert (row.params, row.nonzeros) == (w0.numel(), int((w0 != 0).sum()))
        return
    if verb == "finetune":
        w = result.fault.weight.detach()
        assert bool(torch.isfinite(w).all()) and bool((w[w0 == 0] == 0).all())  # no zero revived
        return
    raise AssertionError(f"no check for {verb}")


CASES = [(f, v) for f in FAULTS for v in VERBS]


@pytest.fixture
def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate's per-layer timing on a tiny budget: these tests check results, not speed."""
    monkeypatch.setattr(acc_mod, "_time_calls", functools.partial(acc_mod._time_calls, budget_s=0))


@pytest.mark.parametrize(("fault", "verb"), CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_fault_layer_through_verb(fault: str, verb: str, tmp_path, quick_timing) -> None:
    model = make(fault)
    original = make(fault)
    before = state(model)
    fn = VERBS[verb]
    call = (lambda: fn(model, fault, tmp_path)) if getattr(fn, "needs_path", False) else None
    call = call or (lambda: fn(model, fault))
    error = expected(fault, verb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already sparser", "no repeated blocks", ...
        if error is not None:
            with pytest.raises(error[0], match=error[1]):
                call()
            after = state(model)
            assert after.keys() == before.keys()
            assert all(same(before[k], after[k]) for k in before)  # nothing changed
            return
        result = call()
    check_result(fault, verb, original, result)


def test_case_count() -> None:
    """Every fault meets every verb (the matrix the closing note counts)."""
    assert len(CASES) == len(FAULTS) * len(VERBS) == 9 * 27


# ---------------------------------------------------------------- one behaviour across verbs


def mixed_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("pattern", ["2:4", "block:4x4"])
def test_unpatternable_layer_same_in_prune_oneshot_and_gradual_pruner(pattern: str) -> None:
    """A layer that cannot take the pattern (6 inputs for 2:4, 8x6 for 4x4 blocks) is skipped
    with one warning and listed, by prune, oneshot and GradualPruner alike; with no other
    layer targeted, all three raise the same ValueError."""
    sparsity = None if pattern == "2:4" else 0.5
    with pytest.warns(UserWarning, match=r"skipping 0\.weight") as caught:
        pruned = prunekit.prune(mixed_model(), sparsity, pattern=pattern)
    assert len([w for w in caught if "skipping" in str(w.message)]) == 1
    assert set(pruned.skipped) == {"0.weight"}
    if pattern == "2:4":  # oneshot takes unstructured and N:M patterns
        with pytest.warns(UserWarning, match=r"skipping 0\.weight"):
            shot = prunekit.oneshot(
                mixed_model(), [torch.randn(4, 6)], "magnitude", pattern=pattern, progress=False
            )
        assert set(shot.skipped) == {"0.weight"}

    model = mixed_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradual = prunekit.GradualPruner(model, 0.5, pattern=pattern)
        for _ in range(3):
            gradual.step()
    skips = [w for w in caught if "skipping 0.weight" in str(w.message)]
    assert len(skips) == 1  # one warning, not one per update
    assert gradual.skipped == pruned.skipped
    assert not is_masked(model[0]) and torch.equal(model[0].weight, mixed_model()[0].weight)
    assert torch.equal(model[2].weight, pruned.model[2].weight)  # same masks as prune

    builds = [
        lambda: prunekit.prune(mixed_model(), sparsity, pattern=pattern, targets=["0"]),
        lambda: prunekit.GradualPruner(mixed_model(), 0.5, pattern=pattern, targets=["0"]),
    ]
    if pattern == "2:4":
        builds.append(
            lambda: prunekit.oneshot(
                mixed_model(),
                [torch.randn(4, 6)],
                "magnitude",
                pattern=pattern,
                targets=["0"],
                progress=False,
            )  # fmt: skip
        )
    for build in builds:
        with (
            pytest.warns(UserWarning),
            pytest.raises(
                ValueError, match=rf"no targeted layer can take pattern {pattern}: 0\.weight: "
            ),
        ):
            build()


def test_a_masked_nan_becomes_zero() -> None:
    """A mask zeroes its entries even where the raw value is NaN or inf (NaN * 0 is NaN)."""
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
        layer.weight[1, 1] = math.inf
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 0] = keep[1, 1] = False
    apply_mask(layer, "weight", keep)
    assert bool(torch.isfinite(layer.weight).all())
    assert layer.weight[0, 0] == 0 and layer.weight[1, 1] == 0
    plain = prunekit.finalize(nn.Sequential(layer))
    assert bool(torch.isfinite(plain[0].weight).all())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("magnitude", [1e-44, 1e-40, 3e38])
def test_quantize_keeps_tiny_and_huge_weights(magnitude: float, symmetric: bool) -> None:
    """Subnormal weights (whose scale underflows to 0) are not rounded to zero, weights near
    float32's max do not overflow the asymmetric range into NaN, and the reported error is the
    real one (its norm taken in float64, where a subnormal norm is not 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(8, 8).sign() * magnitude)
        net[0].weight[0, 0] = 0.0
    w0 = net[0].weight.detach().clone()
    report = prunekit.quantize(net, bits=8, symmetric=symmetric)
    w = report.model[0].weight.detach()
    assert bool(torch.isfinite(w).all())
    assert torch.equal(w == 0, w0 == 0)  # zeros stay zero, nothing else becomes zero
    actual = float((w.double() - w0.double()).norm() / w0.double().norm())
    assert actual < 0.01
    assert report.layer("0.weight").rel_error == pytest.approx(actual, rel=1e-3, abs=1e-12)


def test_finetune_stops_when_the_loss_diverges() -> None:
    """A loss that turns NaN / inf stops finetune with an error (it used to return a model full
    of NaN): the caller's model is unchanged, and with inplace=True its zero masks are gone."""
    torch.manual_seed(0)
    net = prunekit.finalize(
        prunekit.prune(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5).model
    )
    before = state(net)
    data = [torch.randn(4, 8) * 1e20 for _ in range(4)]
    with pytest.raises(ValueError, match=r"training loss is (nan|inf) at step \d"):
        prunekit.finetune(net, data, loss_fn, max_steps=4, lr=1e30, progress=False)
    assert all(same(before[k], v) for k, v in state(net).items())
    with pytest.raises(ValueError, match="keeps the weights of the steps before"):
        prunekit.finetune(net, data, loss_fn, max_steps=4, lr=1e30, progress=False, inplace=True)
    assert not any(is_masked(m) for m in net.modules())  # the run's zero masks are removed
    assert net.training


def test_sensitivity_skips_unpatternable_and_empty_layers_as_prune_does() -> None:
    """sensitivity left such layers out silently and returned an empty result when no layer
    fitted; now it warns per layer and raises like prune."""
    with pytest.warns(UserWarning, match=r"skipping 0\.weight for pattern block:4x4"):
        result = prunekit.sensitivity(
            mixed_model(), [torch.randn(4, 6)], sparsities=(0.5,), pattern="block:4x4",
            progress=False,
        )  # fmt: skip
    assert list(result.layers) == ["2.weight"]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=EMPTY):
        prunekit.sensitivity(
            make("linear_in0"), [inputs("linear_in0")], sparsities=(0.5,), targets=T,
            progress=False,
        )  # fmt: skip
