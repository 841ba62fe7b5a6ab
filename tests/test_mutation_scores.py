"""The criteria of ``prunekit.scores`` called directly, against values computed by hand.

``test_reference_criteria.py`` checks which weights ``prunekit.prune`` removes; this file checks
the numbers underneath (score tensors and collected statistics, bit for bit or to float
rounding), the registry, the shared gradient loop's contract (batches counted, flags and modes
restored, exceptions), and every error a user can meet, with its type and message. It is the
fast test selection that ``make mutation`` runs for ``scores/`` (each mutant must change a
value, a flag or a message checked here).
"""

from __future__ import annotations

import re
import sys
import threading

import pytest
import torch
from torch import nn
from tqdm import std as tqdm_std

from prunekit.scores import base, magnitude, movement, snip, synflow, taylor, wanda
from prunekit.scores import random as random_scores
from prunekit.scores.base import Criterion, LayerContext
from prunekit.targets import Target

pytestmark = pytest.mark.usefixtures("one_thread")

if "mutmut" in sys.modules:
    # Under `make mutation` every mutant runs in a process forked from one parent. tqdm's
    # default lock includes a multiprocessing semaphore shared by all those processes (and
    # taken by tqdm's monitor thread); one process stopped at its time limit while holding it
    # hangs every later one. A lock of each process's own, and no monitor thread, instead.
    tqdm_std.tqdm.set_lock(threading.RLock())
    tqdm_std.tqdm.monitor_interval = 0

NAMES = ["magnitude", "movement", "random", "snip", "synflow", "taylor", "wanda"]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def targets_of(net: nn.Module, names=("0", "2")) -> list[Target]:
    return [Target(n, net.get_submodule(n)) for n in names]


def batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)]


def mse(model: nn.Module, batch) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def hand_grads(net: nn.Sequential, batch) -> dict[str, torch.Tensor]:
    """d(mse)/dW of both weights, through the forward pass written out (no hooks, no prunekit)."""
    p = {k: v.detach().clone().double().requires_grad_(True) for k, v in net.state_dict().items()}
    out = torch.tanh(batch[0].double() @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T
    loss = ((out + p["2.bias"] - batch[1].double()) ** 2).mean()
    loss.backward()
    return {"0.weight": p["0.weight"].grad, "2.weight": p["2.weight"].grad}


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_criterion_sorted_and_looks_them_up() -> None:
    names = base.list_criteria()
    assert names == sorted(names)
    assert set(NAMES) <= set(names)
    for name in NAMES:
        criterion = base.get_criterion(name)
        assert isinstance(criterion, Criterion) and criterion.name == name
    own = Criterion("own", magnitude.magnitude_score)
    assert base.get_criterion(own) is own  # a Criterion passes through unregistered
    assert "own" not in base.list_criteria()


@pytest.mark.parametrize("method", ["wisdom", 3, None])
def test_unknown_method_names_every_accepted_one(method) -> None:
    accepted = ", ".join(base.list_criteria())
    message = f"unknown method {method!r}; accepted: {accepted}, or a prunekit.scores.Criterion"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        base.get_criterion(method)


def test_register_adds_and_replaces_by_name() -> None:
    first = Criterion("test-mutation-criterion", magnitude.magnitude_score)
    second = Criterion("test-mutation-criterion", random_scores.random_score)
    try:
        assert base.register(first) is first
        assert base.get_criterion("test-mutation-criterion") is first
        assert base.register(second) is second
        assert base.get_criterion("test-mutation-criterion") is second
        assert base.list_criteria().count("test-mutation-criterion") == 1
    finally:
        base._REGISTRY.pop("test-mutation-criterion", None)


def test_criterion_flags() -> None:
    plain = Criterion("x", magnitude.magnitude_score)
    assert plain.comparable_across_layers is True
    assert plain.collect is None and plain.needs_data is False and plain.needs_loss is False
    expected = {  # name: (comparable_across_layers, needs_data, needs_loss)
        "magnitude": (True, False, False),
        "random": (True, False, False),
        "wanda": (False, True, False),
        "taylor": (True, True, True),
        "snip": (True, True, True),
        "movement": (False, True, True),
        "synflow": (True, True, False),
    }
    for name, flags in expected.items():
        c = base.get_criterion(name)
        assert (c.comparable_across_layers, c.needs_data, c.needs_loss) == flags, name
    assert base.get_criterion("magnitude").score is magnitude.magnitude_score
    assert base.get_criterion("random").score is random_scores.random_score
    assert base.get_criterion("wanda").score is wanda.wanda_score
    assert base.get_criterion("wanda").collect is wanda.collect_wanda
    assert base.get_criterion("taylor").collect is taylor.collect_taylor
    assert base.get_criterion("snip").collect is snip.collect_snip
    assert base.get_criterion("movement").collect is movement.collect_movement
    assert base.get_criterion("synflow").score is synflow.synflow_score


def test_layer_context_defaults() -> None:
    net = mlp()
    ctx = LayerContext(targets_of(net)[0], net[0].weight.detach())
    assert ctx.stats == {} and ctx.generator is None
    other = LayerContext(targets_of(net)[0], net[0].weight.detach())
    assert ctx.stats is not other.stats  # not one shared dict


# --------------------------------------------------------------------------- data-free scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_magnitude_is_absolute_value_in_float32(dtype: torch.dtype) -> None:
    w = torch.tensor([[-1.5, 0.25], [0.0, -3.0]], dtype=dtype)
    net = nn.Linear(2, 2)
    out = magnitude.magnitude_score(LayerContext(Target("", net), w))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[1.5, 0.25], [0.0, 3.0]]))


def test_random_is_uniform_from_the_generator_in_float32() -> None:
    w = torch.zeros(3, 4, dtype=torch.float16)
    ctx = LayerContext(Target("", nn.Linear(4, 3)), w, generator=torch.Generator().manual_seed(7))
    out = random_scores.random_score(ctx)
    expected = torch.rand((3, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


# --------------------------------------------------------------------------- wanda


def test_wanda_score_is_weight_times_root_of_the_norm_statistic() -> None:
    lin = nn.Linear(3, 2)
    w = torch.tensor([[1.0, -2.0, 0.5], [-4.0, 0.0, 3.0]])
    stats = {"norm": torch.tensor([4.0, 9.0, 0.25])}  # sums of squares -> norms 2, 3, 0.5
    out = wanda.wanda_score(LayerContext(Target("", lin), w, stats))
    assert torch.equal(out, torch.tensor([[2.0, 6.0, 0.25], [8.0, 0.0, 1.5]]))


def test_wanda_score_of_a_conv_broadcasts_over_the_flattened_kernel() -> None:
    conv = nn.Conv2d(2, 3, 2)
    w = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    norm = torch.arange(1.0, 9.0)  # one per (in channel, kh, kw), row-major
    out = wanda.wanda_score(LayerContext(Target("", conv), w, {"norm": norm}))
    expected = torch.empty_like(w)
    for o in range(3):
        for c in range(2):
            for i in range(2):
                for j in range(2):
                    expected[o, c, i, j] = abs(w[o, c, i, j]) * norm[c * 4 + i * 2 + j].sqrt()
    assert out.shape == w.shape and torch.allclose(out, expected, rtol=1e-6, atol=0)


def test_collect_wanda_sums_squares_of_what_each_layer_reads() -> None:
    net = mlp().train()
    xs = [x for x, _ in batches(3)]
    stats = wanda.collect_wanda(net, targets_of(net), data=xs, max_batches=2, progress=False)
    seen = torch.cat(xs[:2])
    hidden = torch.tanh(seen @ net[0].weight.T + net[0].bias).detach()
    assert torch.allclose(stats["0.weight"]["norm"], (seen**2).sum(0), rtol=1e-5)
    assert torch.allclose(stats["2.weight"]["norm"], (hidden**2).sum(0), rtol=1e-5)
    assert net.training  # mode restored


# --------------------------------------------------------------------------- gradient criteria


def test_collectors_match_hand_written_gradients() -> None:
    net = mlp()
    data = batches(3)
    grads = [hand_grads(net, b) for b in data]
    ts = targets_of(net)
    got_taylor = taylor.collect_taylor(net, ts, data=data, loss_fn=mse, progress=False)
    got_snip = snip.collect_snip(net, ts, data=data, loss_fn=mse, progress=False)
    got_move = movement.collect_movement(net, ts, data=data, loss_fn=mse, progress=False)
    for name in ("0.weight", "2.weight"):
        w = net.get_submodule(name[0]).weight.detach().double()
        ref_taylor = sum((w * g[name]).abs() for g in grads)
        ref_snip = sum(g[name] for g in grads)
        ref_move = -sum(w * g[name] for g in grads)
        for got, ref in (
            (got_taylor[name]["taylor"], ref_taylor),
            (got_snip[name]["snip_grad"], ref_snip),
            (got_move[name]["movement"], ref_move),
        ):
            assert got.dtype == torch.float32 and got.shape == w.shape
            assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-7)
        # the score functions read those statistics
        ctx = LayerContext(ts[int(name[0]) // 2], w.float(), {**got_taylor[name]})
        assert torch.equal(taylor.taylor_score(ctx), got_taylor[name]["taylor"])
        ctx = LayerContext(ts[int(name[0]) // 2], w.float(), {**got_move[name]})
        assert torch.equal(movement.movement_score(ctx), got_move[name]["movement"])
        ctx = LayerContext(ts[int(name[0]) // 2], w.float(), {**got_snip[name]})
        assert torch.allclose(snip.snip_score(ctx).double(), (w * ref_snip).abs(), rtol=1e-4)


def test_snip_score_is_abs_of_weight_times_summed_gradient() -> None:
    w = torch.tensor([[2.0, -1.0], [0.5, 3.0]], dtype=torch.float16)
    g = torch.tensor([[-0.5, -2.0], [4.0, 0.0]])
    out = snip.snip_score(LayerContext(Target("", nn.Linear(2, 2)), w, {"snip_grad": g}))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [2.0, 0.0]]))


class ModeProbe(nn.Module):
    """Linear -> Dropout(0.5): records the mode of every forward call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.drop(self.fc(x))


@pytest.mark.parametrize(
    ("collect", "scoring_mode"),
    [(taylor.collect_taylor, False), (movement.collect_movement, False), (snip.collect_snip, True)],
)
def test_collectors_score_in_their_mode_and_restore_it(collect, scoring_mode: bool) -> None:
    # taylor and movement score in eval mode; SNIP in the mode the model is in (training here)
    model = ModeProbe().train()
    collect(model, [Target("fc", model.fc)], data=batches(2), loss_fn=mse, progress=False)
    assert model.modes == [scoring_mode, scoring_mode]
    assert model.training
    model.eval()
    collect(model, [Target("fc", model.fc)], data=batches(1), loss_fn=mse, progress=False)
    assert not model.training


@pytest.mark.parametrize("collect", [taylor.collect_taylor, movement.collect_movement])
def test_collectors_restore_the_mode_after_an_error(collect) -> None:
    model = ModeProbe().train()

    def broken(m, b):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        collect(model, [Target("fc", model.fc)], data=batches(1), loss_fn=broken, progress=False)
    assert model.training


@pytest.mark.parametrize(
    "collect", [taylor.collect_taylor, snip.collect_snip, movement.collect_movement]
)
def test_unused_target_scores_zero(collect) -> None:
    # a target the loss does not reach has no gradient: its statistic stays exactly zero
    net = mlp()
    extra = nn.Linear(4, 3)
    ts = [*targets_of(net, ("0",)), Target("extra", extra)]
    out = collect(net, ts, data=batches(2), loss_fn=mse, progress=False)
    (stat,) = out["extra.weight"].values()
    assert torch.equal(stat, torch.zeros(3, 4))
    (used,) = out["0.weight"].values()
    assert bool((used != 0).all())


@pytest.mark.parametrize(
    ("collect", "desc"),
    [
        (taylor.collect_taylor, "taylor scores"),
        (snip.collect_snip, "snip scores"),
        (movement.collect_movement, "movement scores"),
    ],
)
def test_collectors_need_a_loss_and_batches(collect, desc: str) -> None:
    net = mlp()
    message = f"{desc} needs loss_fn=<callable(model, batch) -> scalar loss>"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        collect(net, targets_of(net), data=batches(1), progress=False)
    with pytest.raises(ValueError, match=f"^{re.escape(desc)} got no batches from `data`$"):
        collect(net, targets_of(net), data=[], loss_fn=mse, progress=False)
    with pytest.raises(ValueError, match="got no batches"):
        collect(net, targets_of(net), data=batches(2), loss_fn=mse, max_batches=0, progress=False)


@pytest.mark.parametrize("bad", [lambda m, b: 1.0, lambda m, b: m(b[0])])
def test_loss_must_be_a_scalar_tensor(bad) -> None:
    net = mlp()
    with pytest.raises(TypeError, match=r"^loss_fn\(model, batch\) must return a scalar tensor$"):
        taylor.collect_taylor(net, targets_of(net), data=batches(1), loss_fn=bad, progress=False)


def test_accumulate_gradients_contract() -> None:
    """Batches counted and capped, the weights and gradients handed over, .grad untouched,
    requires_grad restored (also after an error)."""
    net = mlp()
    ts = targets_of(net)
    net[0].weight.requires_grad_(False)  # a frozen target is still scored
    net[2].weight.grad = torch.full((2, 3), 7.0)
    seen: list[tuple[list, list]] = []

    def on_batch(weights, grads):
        assert all(not w.requires_grad for w in weights)
        seen.append((weights, grads))

    data = batches(4)
    used = base.accumulate_gradients(net, ts, data, mse, 3, False, "probe", on_batch)
    assert used == 3 and len(seen) == 3
    for (weights, grads), batch in zip(seen, data, strict=False):
        assert torch.equal(weights[0], net[0].weight) and torch.equal(weights[1], net[2].weight)
        ref = hand_grads(net, batch)
        assert torch.allclose(grads[0].double(), ref["0.weight"], rtol=1e-4, atol=1e-7)
        assert torch.allclose(grads[1].double(), ref["2.weight"], rtol=1e-4, atol=1e-7)
    assert net[0].weight.requires_grad is False and net[2].weight.requires_grad is True
    assert net[0].weight.grad is None
    assert torch.equal(net[2].weight.grad, torch.full((2, 3), 7.0))
    assert base.accumulate_gradients(net, ts, data, mse, None, False, "probe", on_batch) == 4

    def failing(weights, grads):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        base.accumulate_gradients(net, ts, data, mse, None, False, "probe", failing)
    assert net[0].weight.requires_grad is False and net[2].weight.requires_grad is True


def test_accumulate_gradients_progress_bar(capsys) -> None:
    net = mlp()
    base.accumulate_gradients(
        net, targets_of(net), batches(2), mse, None, False, "qq", lambda *a: 0
    )
    assert capsys.readouterr().err == ""
    base.accumulate_gradients(net, targets_of(net), batches(3), mse, 2, True, "qq", lambda *a: 0)
    err = capsys.readouterr().err
    # titled, counting batches out of max_batches, and cleared at the end (leave=False)
    assert err.startswith("\rqq:   0%") and " 0/2 " in err and "batch/s" in err
    assert err.endswith("\r") and "\n" not in err


# --------------------------------------------------------------------------- synflow


def test_example_input_takes_the_first_tensor() -> None:
    x = torch.zeros(2, 3)
    assert synflow.example_input([x]) is x
    assert synflow.example_input([(x, 1)]) is x
    assert synflow.example_input([[x, 1]]) is x
    assert synflow.example_input(iter([x, None])) is x


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (
            [{"x": torch.zeros(1)}],
            TypeError,
            "synflow needs an example input tensor for its shape: pass data=[x] (or batches "
            "whose first element is the input); got a dict",
        ),
        (
            [()],
            TypeError,
            "synflow needs an example input tensor for its shape: pass data=[x] (or batches "
            "whose first element is the input); got a tuple",
        ),
        (
            [torch.zeros(1, 3, dtype=torch.long)],
            TypeError,
            "synflow pushes an all-ones float input through the model; got a torch.int64 input "
            "(token ids?). SynFlow suits networks with floating-point inputs.",
        ),
        (
            [torch.tensor(1.0)],
            TypeError,
            "synflow needs a batched example input (batch dimension first)",
        ),
        ([], ValueError, "synflow got no example input from `data`"),
    ],
)
def test_example_input_errors(data, error, message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        synflow.example_input(data)


def test_first_tensor_of_model_outputs() -> None:
    a, b = torch.ones(1), torch.zeros(1)
    assert synflow._first_tensor(a) is a
    assert synflow._first_tensor((a, b)) is a
    assert synflow._first_tensor([a, b]) is a
    assert synflow._first_tensor({"logits": a, "other": b}) is a
    for bad, kind in (([], "list"), ((1, a), "tuple"), ({}, "list"), (3.0, "float")):
        message = f"synflow needs the model to return a tensor, got {kind}"
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            synflow._first_tensor(bad)


@pytest.mark.parametrize("iterations", [0, -1, 1.0, True, "3", None])
def test_make_synflow_rejects_bad_iterations(iterations) -> None:
    message = f"iterations must be a positive integer, got {iterations!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        synflow.make_synflow(iterations=iterations)


@pytest.mark.parametrize("density", [0, 1, 0.0, 1.0, -0.5, 2, "0.5", None, float("nan")])
def test_make_synflow_rejects_bad_min_density(density) -> None:
    message = f"min_density must be in (0, 1), got {density!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        synflow.make_synflow(min_density=density)


def test_make_synflow_builds_a_data_free_comparable_criterion() -> None:
    c = synflow.make_synflow(iterations=1, min_density=0.5)
    assert c.name == "synflow" and c.comparable_across_layers and c.needs_data
    assert not c.needs_loss and c.score is synflow.synflow_score
    for ok in (1, 7):
        assert synflow.make_synflow(iterations=ok).name == "synflow"
    assert synflow.DEFAULT_ITERATIONS == 200 and synflow.DEFAULT_MIN_DENSITY == 1e-4


def reference_order(
    net: nn.Sequential, iterations: int, min_density: float
) -> dict[str, torch.Tensor]:
    """The elimination order written out: |params| in float64, all-ones input, R = sum of the
    outputs, |dR/dw * w| of the alive weights; step k removes the alive weights beyond
    round(min_density ** (k / iterations) * total), lowest first, scoring them
    k + rank / (count + 1); the survivors are removed last as step iterations + 1."""
    state = {k: v.detach().double().abs() for k, v in net.state_dict().items()}
    names = ["0.weight", "2.weight"]
    order = {k: torch.zeros_like(state[k]) for k in names}
    alive = {k: state[k] != 0 for k in names}
    total = sum(state[k].numel() for k in names)

    def take(count: int, offset: float) -> None:
        params = dict(state)
        for k in names:
            params[k] = (state[k] * alive[k]).requires_grad_(True)
        x = torch.ones(1, 4, dtype=torch.float64)
        hidden = torch.relu(x @ params["0.weight"].T + params["0.bias"])
        flow = (hidden @ params["2.weight"].T + params["2.bias"]).sum()
        flow.backward()
        scored = []
        for k in names:
            s = (params[k].grad * params[k].detach()).abs()
            for idx in zip(*torch.nonzero(alive[k], as_tuple=True), strict=True):
                idx = tuple(int(i) for i in idx)
                scored.append((float(s[idx]), k, idx))
        scored.sort(key=lambda e: e[0])
        for rank, (_, k, idx) in enumerate(scored[:count], start=1):
            order[k][idx] = offset + rank / (count + 1)
            alive[k][idx] = False

    n_alive = sum(int(a.sum()) for a in alive.values())
    for step in range(1, iterations + 1):
        keep = int(round(min_density ** (step / iterations) * total))
        if n_alive > keep:
            take(n_alive - keep, float(step))
            n_alive = keep
    if n_alive:
        take(n_alive, float(iterations + 1))
    return order


def synflow_net() -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[1, 2] = 0.0  # already zero: scores 0, never counted alive
    return net.train()


@pytest.mark.parametrize(("iterations", "min_density"), [(3, 0.3), (1, 0.5), (4, 0.9)])
def test_elimination_order_is_the_written_out_sweep(iterations: int, min_density: float) -> None:
    net = synflow_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = synflow.elimination_order(
        net, targets_of(net), torch.zeros(5, 4), iterations, min_density, progress=False
    )
    ref = reference_order(net, iterations, min_density)
    for g, name in zip(got, ("0.weight", "2.weight"), strict=True):
        assert g.dtype == torch.float64 and g.device.type == "cpu"
        assert torch.allclose(g, ref[name], rtol=0, atol=1e-12), name
    assert float(got[0][1, 2]) == 0.0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    assert net.training and all(p.requires_grad for p in net.parameters())


def test_elimination_order_defaults_and_the_collector() -> None:
    net = synflow_net()
    got = synflow.elimination_order(net, targets_of(net), torch.zeros(1, 4), progress=False)
    ref = reference_order(net, 200, 1e-4)
    for g, name in zip(got, ("0.weight", "2.weight"), strict=True):
        assert torch.allclose(g, ref[name], rtol=0, atol=1e-12)
    crit = synflow.make_synflow(iterations=3, min_density=0.3)
    stats = crit.collect(net, targets_of(net), data=[(torch.randn(2, 4), 0)], progress=False)
    ref = reference_order(net, 3, 0.3)
    for name in ("0.weight", "2.weight"):
        assert torch.allclose(stats[name]["synflow_order"], ref[name], rtol=0, atol=1e-12)
        ctx = LayerContext(targets_of(net)[0], net[0].weight.detach(), stats[name])
        assert synflow.synflow_score(ctx) is stats[name]["synflow_order"]


def test_elimination_order_progress_bar(capsys) -> None:
    net = synflow_net()
    synflow.elimination_order(net, targets_of(net), torch.zeros(1, 4), 2, 0.5, progress=False)
    assert capsys.readouterr().err == ""
    synflow.elimination_order(net, targets_of(net), torch.zeros(1, 4), 2, 0.5, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rsynflow:   0%") and " 0/2 " in err
    assert err.endswith("\r") and "\n" not in err


class Shifted(nn.Module):
    """Linear whose output adds a buffer (negative values) and returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(3, 3)
        self.register_buffer("shift", torch.tensor([-2.0, 0.5, -1.0]))
        self.register_buffer("count", torch.tensor(3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.fc(x) * self.shift, "n": self.count}


def test_elimination_order_makes_buffers_positive_and_reads_dict_outputs() -> None:
    model = Shifted()
    got = synflow.elimination_order(
        model, [Target("fc", model.fc)], torch.zeros(1, 3), 1, 0.5, False
    )
    # one step removes round(0.5 * 9) = 4 or 5 weights: the lowest |dR/dw * w| with R computed
    # on |W|, |b| and |shift|
    w = model.fc.weight.detach().double().abs()
    score = (w * model.shift.double().abs()[:, None]).flatten()  # dR/dw_ij = |shift_i| * 1
    keep = int(round(0.5 * 9))
    ranked = torch.argsort(score)
    expected = torch.zeros(9, dtype=torch.float64)
    removed = 9 - keep
    for rank, i in enumerate(ranked[:removed].tolist(), start=1):
        expected[i] = 1 + rank / (removed + 1)
    for rank, i in enumerate(ranked[removed:].tolist(), start=1):
        expected[i] = 2 + rank / (keep + 1)
    assert torch.allclose(got[0].flatten(), expected, rtol=0, atol=1e-12)
    assert float(model.shift[0]) == -2.0  # the model itself keeps its values


def test_elimination_order_refuses_an_overflowing_flow() -> None:
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])  # (4e38)^10 > 1.8e308
    with torch.no_grad():
        for layer in net:
            layer.weight.fill_(1e38)
    message = (
        "synflow: the synaptic flow overflowed float64; the network is too deep or its weights "
        "too large for SynFlow"
    )
    with pytest.raises(FloatingPointError, match=f"^{re.escape(message)}$"):
        synflow.elimination_order(net, targets_of(net, ("0",)), torch.zeros(1, 4), 2, 0.5, False)


# --------------------------------------------------------------------------- details every criterion shares


@pytest.mark.parametrize(
    ("score", "stat"),
    [
        (movement.movement_score, "movement"),
        (taylor.taylor_score, "taylor"),
        (synflow.synflow_score, "synflow_order"),
        (snip.snip_score, "snip_grad"),
    ],
)
def test_scores_follow_the_weight_to_its_device(score, stat: str) -> None:
    # statistics are gathered on the CPU; the score lives where the weight lives (meta here;
    # snip computes on it: the first arithmetic on meta tensors imports torch._dynamo, a few
    # seconds once per session, which the ONNX tests pay anyway)
    lin = nn.Linear(3, 2)
    weight = torch.empty(2, 3, device="meta")
    values = torch.ones(2, 3)
    out = score(LayerContext(Target("", lin), weight, {stat: values}))
    assert out.device.type == "meta" and out.shape == (2, 3)


@pytest.mark.parametrize(
    ("collect", "desc", "kw"),
    [
        (taylor.collect_taylor, "taylor scores", {"loss_fn": mse}),
        (snip.collect_snip, "snip scores", {"loss_fn": mse}),
        (movement.collect_movement, "movement scores", {"loss_fn": mse}),
        (wanda.collect_wanda, "calibration", {}),
    ],
)
def test_collectors_show_progress_by_default(collect, desc: str, kw: dict, capsys) -> None:
    net = mlp()
    data = batches(2) if kw else [x for x, _ in batches(2)]
    collect(net, targets_of(net), data=data, **kw)
    assert capsys.readouterr().err.startswith(f"\r{desc}:")
    collect(net, targets_of(net), data=data, progress=True, **kw)
    assert capsys.readouterr().err.startswith(f"\r{desc}:")
    collect(net, targets_of(net), data=data, progress=False, **kw)
    assert capsys.readouterr().err == ""


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.usefixtures("float64_default")
def test_statistics_and_random_scores_are_float32_whatever_the_default_dtype() -> None:
    net = mlp()  # built in float64
    assert net[0].weight.dtype == torch.float64
    for collect in (taylor.collect_taylor, snip.collect_snip, movement.collect_movement):
        out = collect(net, targets_of(net), data=batches(1), loss_fn=mse, progress=False)
        for stats in out.values():
            (value,) = stats.values()
            assert value.dtype == torch.float32, collect.__name__
    w = torch.zeros(2, 3)
    ctx = LayerContext(Target("", nn.Linear(3, 2)), w, generator=torch.Generator().manual_seed(0))
    assert random_scores.random_score(ctx).dtype == torch.float32


class Gain(nn.Module):
    """y = (x @ kernel^T) * gain: the prunable tensors are not called ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.kernel = nn.Parameter(torch.randn(2, 4))
        self.gain = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.kernel.T) * self.gain


def test_gradient_criteria_score_the_named_parameter() -> None:
    model = Gain()
    target = Target("", model, "gain")
    data = batches(2)
    out = taylor.collect_taylor(model, [target], data=data, loss_fn=mse, progress=False)
    ref = torch.zeros(2, dtype=torch.float64)
    for x, y in data:
        k, g = model.kernel.detach().double(), model.gain.detach().double().requires_grad_(True)
        (((x.double() @ k.T) * g - y.double()) ** 2).mean().backward()
        ref += (g.detach() * g.grad).abs()
    assert torch.allclose(out["gain"]["taylor"].double(), ref, rtol=1e-5)


def test_synflow_scores_the_named_parameter_and_unused_targets() -> None:
    model = Gain()
    unused = nn.Linear(3, 3)
    holder = nn.ModuleDict({"gain": model, "unused": unused})

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = holder

        def forward(self, x):
            return self.parts["gain"](x)

    net = Wrapper()
    ts = [Target("parts.gain", model, "gain"), Target("parts.unused", unused)]
    gain, dead = synflow.elimination_order(net, ts, torch.zeros(1, 4), 1, 0.4, progress=False)
    # R = sum_i |gain_i| * sum_j |kernel_ij|; score_i = R's share of gain_i (both > 0); the
    # unused layer's 9 weights have no flow: they go first, then the lower gain entry
    flow = model.gain.detach().double().abs() * model.kernel.detach().double().abs().sum(1)
    keep = round(0.4 ** (1 / 1) * 11)  # 4 of 11 kept after the single step
    assert keep == 4
    assert sorted(dead.flatten().tolist()) == [1 + r / 8 for r in range(1, 8)] + [
        2 + r / 5 for r in range(1, 3)
    ]  # seven of the nine flow-less weights removed in step 1, two kept to the end
    lo, hi = (0, 1) if flow[0] < flow[1] else (1, 0)
    assert gain[lo] == 2 + 3 / 5 and gain[hi] == 2 + 4 / 5


def test_example_input_accepts_a_one_dimensional_batch() -> None:
    x = torch.zeros(5)
    assert synflow.example_input([x]) is x


def test_elimination_order_shows_progress_by_default(capsys) -> None:
    net = synflow_net()
    synflow.elimination_order(net, targets_of(net), torch.zeros(1, 4), 2, 0.5)
    assert capsys.readouterr().err.startswith("\rsynflow:")


def test_synflow_collector_shows_progress_by_default(capsys) -> None:
    net = synflow_net()
    crit = synflow.make_synflow(iterations=2, min_density=0.5)
    crit.collect(net, targets_of(net), data=[torch.zeros(1, 4)])
    assert capsys.readouterr().err.startswith("\rsynflow:")
    crit.collect(net, targets_of(net), data=[torch.zeros(1, 4)], progress=True)
    assert capsys.readouterr().err.startswith("\rsynflow:")
    crit.collect(net, targets_of(net), data=[torch.zeros(1, 4)], progress=False)
    assert capsys.readouterr().err == ""
