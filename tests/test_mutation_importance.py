"""Structured importance (``prunekit.graph.importance``): every criterion's score of every unit,
against values computed by hand on tiny traced models.

``test_reference_criteria.py`` checks which channels ``prune_structured`` removes; this file
checks the numbers: each group's score array (to float rounding), every ``reduce`` and
``normalize`` choice, the statistics the data-driven criteria collect (which inputs, which
tokens, which mode), and the errors and notes a user sees. It is part of the fast test
selection that ``make mutation`` runs for ``graph/importance.py``.
"""

from __future__ import annotations

import re
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from tqdm import std as tqdm_std

from prunekit.graph import importance as imp
from prunekit.graph.groups import build_groups
from prunekit.graph.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread")

if "mutmut" in sys.modules:  # see test_mutation_scores.py: tqdm's lock shared across forks
    tqdm_std.tqdm.set_lock(threading.RLock())
    tqdm_std.tqdm.monitor_interval = 0


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


X = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))


def scored(model, example, name, **kw):
    graph = trace(model, example)
    groups = build_groups(graph)
    scores, notes = imp.score_groups(
        imp.get_importance(name), model, graph, groups, progress=False, **kw
    )
    return {g.name: scores.get(g.index) for g in groups}, notes


def close(a, b, rtol=1e-6) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=1e-12))


def mlp_slices(net, first: int, second: int) -> list[list[np.ndarray]]:
    """Per unit of the layer ``first`` (read by ``second``): its row, bias and next column."""
    w, b, nxt = (t.detach().double().numpy() for t in (
        net[first].weight, net[first].bias, net[second].weight
    ))  # fmt: skip
    return [[w[i], b[i : i + 1], nxt[:, i]] for i in range(w.shape[0])]


# --------------------------------------------------------------------------- registry, helpers


def test_registry_and_lookup() -> None:
    names = ["activation", "apoz", "bn_scale", "fluctuation", "l1", "l2", "random", "taylor"]
    assert sorted(imp.REGISTRY) == names
    for name in names:
        assert imp.get_importance(name).name == name
    own = imp.Magnitude(3)
    assert own.name == "l3" and imp.get_importance(own) is own
    accepted = ", ".join(repr(n) for n in names)
    message = (
        f"unknown importance 'l7'; accepted: {accepted} "
        "or a prunekit.graph.importance.GroupImportance instance"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        imp.get_importance("l7")
    assert imp.REDUCTIONS == ("sum", "mean", "max")
    assert imp.NORMALIZATIONS == ("mean", "max", "l2", "none")


def test_criterion_flags_and_base_class() -> None:
    flags = {  # name: (needs_data, needs_loss)
        "l1": (False, False),
        "l2": (False, False),
        "random": (False, False),
        "bn_scale": (False, False),
        "taylor": (True, True),
        "activation": (True, False),
        "apoz": (True, False),
        "fluctuation": (True, False),
    }
    for name, want in flags.items():
        c = imp.get_importance(name)
        assert (c.needs_data, c.needs_loss) == want, name
    bare = imp.GroupImportance()
    assert bare.name == "base" and bare.collect(None, None, [], None, None, False) == {}
    with pytest.raises(NotImplementedError):
        bare.score(None, None)
    new = imp.Magnitude(4)
    try:
        assert imp.register(new) is new and imp.get_importance("l4") is new
    finally:
        imp.REGISTRY.pop("l4", None)


def test_reduce_per_index_unit_sums_and_normalize() -> None:
    values = [np.array([1.0, -5.0, 3.0]), np.array([4.0, 2.0, -6.0])]
    assert close(imp._reduce(values, "sum"), [5.0, -3.0, -3.0])
    assert close(imp._reduce(values, "mean"), [2.5, -1.5, -1.5])
    assert close(imp._reduce(values, "max"), [4.0, 2.0, 3.0])

    t = torch.tensor([[[1.0, -2.0], [3.0, 4.0]], [[-5.0, 6.0], [7.0, -8.0]]])
    out = imp.per_index(t, 1, torch.abs)
    assert out.dtype == np.float64 and close(out, [1 + 2 + 5 + 6, 3 + 4 + 7 + 8])
    assert close(imp.per_index(t, 0, torch.square), [1 + 4 + 9 + 16, 25 + 36 + 49 + 64])
    assert close(imp.per_index(torch.tensor([-1.0, 2.0]), 0, torch.abs), [1.0, 2.0])
    assert close(imp.per_index(torch.tensor(-3.0), 0, torch.abs), [3.0])
    half = imp.per_index(torch.tensor([[1.0, 2.0]], dtype=torch.float16), 0, lambda x: x)
    assert half.dtype == np.float64 and close(half, [3.0])  # computed in float32 at least

    group = SimpleNamespace(slices={("w", 0): [np.array([0, 2]), np.array([1])]})
    sums = imp.unit_sums(group, ("w", 0), np.array([1.5, 2.0, 4.0]))
    assert sums.dtype == np.float64 and close(sums, [5.5, 2.0])

    s = np.array([3.0, -4.0, 1.0])
    assert imp.normalize(s, "none") is s
    assert close(imp.normalize(s, "mean"), s / (8 / 3))
    assert close(imp.normalize(s, "max"), s / 4)
    assert close(imp.normalize(s, "l2"), s / np.sqrt(26))
    zeros = np.zeros(3)
    for how in ("mean", "max", "l2"):
        assert close(imp.normalize(zeros, how), zeros)


def test_batch_input_and_default_loss() -> None:
    x = torch.ones(2)
    assert imp.batch_input((x, 1)) is x and imp.batch_input([x, 1]) is x
    assert imp.batch_input(x) is x
    d = {"a": x}
    assert imp.batch_input(d) is d

    class WithLoss(nn.Module):
        def forward(self, a):
            return SimpleNamespace(loss=a.sum() * 2)

    class DictLoss(nn.Module):
        def forward(self, a):
            return {"loss": a.sum() * 3, "logits": a}

    class NoLoss(nn.Module):
        def forward(self, a):
            return {"logits": a}

    assert float(imp.default_loss(WithLoss(), ({"a": x}, None))) == 4.0
    assert float(imp.default_loss(DictLoss(), x)) == 6.0
    message = (
        "this importance needs a loss: pass loss_fn=<callable(model, batch) -> scalar loss> "
        "(the model's output has no .loss)"
    )
    for model in (NoLoss(), nn.Identity()):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            imp.default_loss(model, x)


# --------------------------------------------------------------------------- data-free criteria


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("p", [1, 2])
def test_lp_of_every_slice_reduced_over_members(p: int, reduce: str) -> None:
    net = mlp()
    got, notes = scored(net, X, f"l{p}", reduce=reduce)
    assert notes == []
    for name, (first, second) in {"0": (0, 2), "2": (2, 4)}.items():
        ref = []
        for unit in mlp_slices(net, first, second):
            per_member = [np.abs(s).sum() if p == 1 else (s**2).sum() for s in unit]
            r = {"sum": sum, "mean": np.mean, "max": max}[reduce](per_member)
            ref.append(r if p == 1 else np.sqrt(r))
        assert close(got[name], ref), (name, got[name], ref)


def conv_bn() -> nn.Module:
    class ConvBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.9, -0.2, 0.5, -0.7]))
        model.bn.bias.copy_(torch.tensor([0.1, -0.3, 0.2, 0.05]))
        model.bn.running_mean.copy_(torch.tensor([5.0, -6.0, 7.0, -8.0]))  # buffers: not counted
        model.bn.running_var.copy_(torch.tensor([9.0, 10.0, 11.0, 12.0]))
    return model.eval()


IMG = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))


def test_lp_of_a_conv_channel_counts_parameters_not_buffers() -> None:
    model = conv_bn()
    got, _ = scored(model, IMG, "l1")
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    ref = [
        float(
            p["conv1.weight"][i].abs().sum()
            + p["conv1.bias"][i].abs()
            + p["bn.weight"][i].abs()
            + p["bn.bias"][i].abs()
            + p["conv2.weight"][:, i].abs().sum()
        )
        for i in range(4)
    ]
    assert close(got["conv1"], ref)


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_bn_scale_is_abs_gamma_and_none_without_batchnorm(reduce: str) -> None:
    model = conv_bn()
    got, notes = scored(model, IMG, "bn_scale", reduce=reduce)
    assert close(got["conv1"], [0.9, 0.2, 0.5, 0.7]) and notes == []
    got, notes = scored(mlp(), X, "bn_scale")
    assert got == {"0": None, "2": None}
    assert notes == [
        "bn_scale cannot score group 0: left whole",
        "bn_scale cannot score group 2: left whole",
    ]


def test_bn_scale_reduces_two_batchnorms() -> None:
    class TwoBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.out = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            h = self.conv(x)
            return self.out(self.bn1(h) + self.bn2(h))

    model = TwoBN().eval()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, -4.0, 2.0]))
        model.bn2.weight.copy_(torch.tensor([-3.0, 0.5, 2.5]))
    for reduce, ref in (
        ("sum", [4.0, 4.5, 4.5]),
        ("mean", [2.0, 2.25, 2.25]),
        ("max", [3, 4, 2.5]),
    ):
        got, _ = scored(model, IMG, "bn_scale", reduce=reduce)
        assert close(got["conv"], ref), reduce


def test_random_follows_the_seed_in_float64() -> None:
    for seed in (0, 5):
        got, _ = scored(mlp(), X, "random", seed=seed)
        gen = torch.Generator().manual_seed(seed)
        first = torch.rand(4, generator=gen, dtype=torch.float64).numpy()
        second = torch.rand(3, generator=gen, dtype=torch.float64).numpy()
        assert np.array_equal(got["0"], first) and np.array_equal(got["2"], second)
        assert got["0"].dtype == np.float64


# --------------------------------------------------------------------------- taylor


def hand_unit_terms(net, batch) -> dict[str, list[np.ndarray]]:
    """w * dL/dw (mse) of every slice of every unit, through the forward pass written out."""
    p = {k: v.detach().clone().double().requires_grad_(True) for k, v in net.state_dict().items()}
    h1 = torch.relu(batch[0].double() @ p["0.weight"].T + p["0.bias"])
    h2 = torch.relu(h1 @ p["2.weight"].T + p["2.bias"])
    out = h2 @ p["4.weight"].T + p["4.bias"]
    ((out - batch[1].double()) ** 2).mean().backward()
    wg = {k: (v.detach() * v.grad).numpy() for k, v in p.items()}
    terms = {}
    for name, (first, second) in {"0": (0, 2), "2": (2, 4)}.items():
        w, b, nxt = wg[f"{first}.weight"], wg[f"{first}.bias"], wg[f"{second}.weight"]
        terms[name] = [np.concatenate([w[i], b[i : i + 1], nxt[:, i]]) for i in range(len(b))]
    return terms


def calib_batches(n: int = 2):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g)) for _ in range(n)]


def mse(model, batch) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.parametrize("grouped", [False, True])
def test_taylor_per_batch_sums(grouped: bool) -> None:
    net = mlp().train()
    calib = calib_batches()
    name = "taylor_group" if grouped else "taylor"
    graph = trace(net, X)
    groups = build_groups(graph)
    modes = []
    net[0].register_forward_hook(lambda m, a, o: modes.append(m.training))
    scores, notes = imp.score_groups(
        imp.Taylor(name), net, graph, groups, calib=calib, loss_fn=mse, progress=False
    )
    assert notes == [] and modes == [False, False] and net.training
    ref = {"0": np.zeros(4), "2": np.zeros(3)}
    for batch in calib:
        for gname, units in hand_unit_terms(net, batch).items():
            if grouped:  # (sum of w g over the unit)^2, per batch
                ref[gname] += np.array([u.sum() ** 2 for u in units])
            else:  # sum of |w g| over the unit, per batch
                ref[gname] += np.array([np.abs(u).sum() for u in units])
    for g in groups:
        assert close(scores[g.index], ref[g.name], rtol=1e-4), (g.name, scores[g.index])


def test_taylor_skips_frozen_parameters_and_uses_the_model_loss() -> None:
    class HFLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x, labels):
            return {"loss": ((self.net(x) - labels) ** 2).mean()}

    model = HFLike().eval()
    model.net[2].bias.requires_grad_(False)  # frozen: contributes nothing
    calib = [({"x": x, "labels": y}, None) for x, y in calib_batches()]
    graph = trace(model, {"x": X, "labels": torch.zeros(6, 2)})
    groups = build_groups(graph)
    scores, _ = imp.score_groups(imp.Taylor(), model, graph, groups, calib=calib, progress=False)
    ref = {"0": np.zeros(4), "2": np.zeros(3)}
    for x, y in calib_batches():
        for gname, units in hand_unit_terms(model.net, (x, y)).items():
            if gname == "2":
                units = [np.delete(u, 4) for u in units]  # the row (4 entries), then the bias
            ref[gname] += np.array([np.abs(u).sum() for u in units])
    for g in groups:
        assert close(scores[g.index], ref[g.name.removeprefix("net.")], rtol=1e-4), g.name
    assert not model.training
    assert all(p.grad is None for p in model.parameters())  # .grad fields untouched


def test_taylor_restores_the_mode_after_an_error() -> None:
    net = mlp().train()
    graph = trace(net, X)
    groups = build_groups(graph)

    def broken(model, batch):
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        imp.Taylor().collect(net, graph, groups, calib_batches(), broken, False)
    assert net.training


# --------------------------------------------------------------------------- activation, apoz


class Branches(nn.Module):
    """fc1's output is read by fc2 (called with a keyword) and by fc3; fc3's by head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.fc3 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        g = torch.relu(self.fc3(h))
        return self.fc2(input=h) + self.head(g)


def activation_reference(x_list, fn) -> np.ndarray:
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in x_list]).double()
    return fn(x).mean(0).numpy()


@pytest.mark.parametrize("name", ["activation", "apoz"])
def test_activation_statistics_of_the_consumers_inputs(name: str) -> None:
    model = Branches().train()
    g = torch.Generator().manual_seed(5)
    calib = [torch.randn(3, 2, 3, generator=g), (torch.randn(5, 3, generator=g), "label")]
    xs = [c if isinstance(c, torch.Tensor) else c[0] for c in calib]
    hs = [torch.relu(model.fc1(x)).detach() for x in xs]
    gs = [torch.relu(model.fc3(h)).detach() for h in hs]

    def fn(t):
        return t.abs() if name == "activation" else 1.0 - (t == 0).double()

    got, notes = scored(model, xs[1], name, calib=calib)
    assert notes == [] and model.training
    assert close(got["fc1"], activation_reference(hs, fn))  # fc2 and fc3 read the same h
    assert close(got["fc3"], activation_reference(gs, fn))
    assert got["fc1"].dtype == np.float64


def test_activation_of_a_conv_channel_and_groups_nobody_reads() -> None:
    model = conv_bn()
    got, _ = scored(model, IMG, "activation", calib=[IMG, IMG[:1]])
    h = torch.relu(model.bn(model.conv1(IMG))).detach().double()
    h = torch.cat([h, h[:1]])
    assert close(got["conv1"], h.abs().mean(dim=(0, 2, 3)).numpy())

    got, notes = scored(Averaged(), X[:, :3], "activation", calib=[X[:, :3]])
    assert got == {"fc": None}
    assert notes == ["activation cannot score group fc: left whole"]


class Averaged(nn.Module):
    """fc's channels are averaged away: a group (fc) that no module reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)).mean(-1, keepdim=True).expand(-1, 4))


# --------------------------------------------------------------------------- fluctuation


class Tokens(nn.Module):
    """Token inputs (batch, seq, 5) with an attention mask; fc1 -> relu -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x, attention_mask=None):
        return self.fc2(torch.relu(self.fc1(x)))


def population_var(rows: torch.Tensor) -> np.ndarray:
    rows = rows.double()
    return ((rows - rows.mean(0)) ** 2).mean(0).numpy()


def test_fluctuation_is_variance_times_column_norm_on_unmasked_tokens() -> None:
    model = Tokens().train()
    g = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(2, 3, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    mask1 = torch.tensor([[1, 1, 0], [1, 0, 0]])
    calib = [{"x": x1, "attention_mask": mask1}, ({"x": x2}, "label")]
    got, notes = scored(model, {"x": x1}, "fluctuation", calib=calib)
    assert notes == [] and model.training
    tokens = torch.cat([x1[mask1.bool()], x2.reshape(-1, 5)])  # padding tokens left out
    hidden = torch.relu(model.fc1(tokens)).detach()
    w2 = model.fc2.weight.detach().double()
    ref = population_var(hidden) * (w2**2).sum(0).numpy()
    assert close(got["fc1"], ref, rtol=1e-5)


def test_fluctuation_ignores_a_mask_of_another_shape() -> None:
    model = Tokens()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, generator=g)
    for mask in (torch.ones(2, 4), torch.ones(2, 3, 1)):  # neither (batch, seq) of x
        got, _ = scored(model, {"x": x}, "fluctuation", calib=[{"x": x, "attention_mask": mask}])
        hidden = torch.relu(model.fc1(x.reshape(-1, 5))).detach()
        ref = population_var(hidden) * (model.fc2.weight.detach().double() ** 2).sum(0).numpy()
        assert close(got["fc1"], ref, rtol=1e-5)


def test_fluctuation_of_conv_channels_and_unscorable_groups() -> None:
    model = conv_bn()
    got, notes = scored(model, IMG, "fluctuation", calib=[IMG])
    h = torch.relu(model.bn(model.conv1(IMG))).detach()
    per_channel = h.movedim(1, -1).reshape(-1, 4)
    w = model.conv2.weight.detach().double()
    ref = population_var(per_channel) * (w**2).sum(dim=(0, 2, 3)).numpy()
    assert close(got["conv1"], ref, rtol=1e-5) and notes == []

    got, notes = scored(Averaged(), X[:, :3], "fluctuation", calib=[X[:, :3]])
    assert got == {"fc": None}
    assert notes == ["fluctuation cannot score group fc: left whole"]


def test_fluctuation_of_a_constant_unit_is_zero() -> None:
    model = Tokens()
    with torch.no_grad():
        model.fc1.weight[1].zero_()  # unit 1 outputs relu(bias): constant
        model.fc1.bias[1] = 0.5
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(9))
    got, _ = scored(model, {"x": x}, "fluctuation", calib=[{"x": x}])
    assert got["fc1"][1] == 0.0 and bool((np.delete(got["fc1"], 1) > 0).all())


# --------------------------------------------------------------------------- details


def test_fresh_instances_score_like_the_registered_ones() -> None:
    net = mlp()
    for fresh, name in ((imp.Magnitude(1), "l1"), (imp.Magnitude(2), "l2")):
        assert fresh.p == int(name[1]) and fresh.name == name
        got, _ = scored(net, X, name)
        graph = trace(net, X)
        groups = build_groups(graph)
        mine, _ = imp.score_groups(fresh, net, graph, groups, progress=False)
        assert all(close(mine[g.index], got[g.name]) for g in groups)
    assert imp.Taylor().name == "taylor" and imp.Taylor("taylor_group").name == "taylor_group"
    assert imp.Activation("apoz").name == "apoz"


def test_normalize_divides_by_scales_below_one() -> None:
    s = np.array([0.2, -0.1, 0.3])
    assert close(imp.normalize(s, "mean"), s / 0.2)
    assert close(imp.normalize(s, "max"), s / 0.3)
    assert close(imp.normalize(s, "l2"), s / np.sqrt(0.14))


def test_score_groups_defaults_and_a_custom_criterion() -> None:
    net = mlp()
    graph = trace(net, X)
    groups = build_groups(graph)
    default, _ = imp.score_groups(imp.get_importance("random"), net, graph, groups, progress=False)
    seeded, _ = imp.score_groups(
        imp.get_importance("random"), net, graph, groups, seed=0, progress=False
    )
    assert all(np.array_equal(default[i], seeded[i]) for i in default)  # seed 0 by default

    class Half(imp.GroupImportance):  # a user's criterion returning float32 lists
        name = "half"

        def score(self, group, ctx):
            return [np.float32(0.5)] * group.n_units

    out, notes = imp.score_groups(Half(), net, graph, groups, progress=False)
    assert notes == [] and all(
        v.dtype == np.float64 and close(v, [0.5] * len(v)) for v in out.values()
    )


@pytest.mark.parametrize("name", ["taylor", "activation", "fluctuation"])
def test_data_criteria_show_progress_by_default(name: str, capsys) -> None:
    net = mlp()
    graph = trace(net, X)
    groups = build_groups(graph)
    crit = imp.get_importance(name)
    kw = {"calib": calib_batches(), "loss_fn": mse}
    imp.score_groups(crit, net, graph, groups, **kw)
    err = capsys.readouterr().err
    assert err.startswith(f"\r{name}:") and " 0/2 " in err
    assert err.endswith("\r") and "\n" not in err  # cleared at the end
    imp.score_groups(crit, net, graph, groups, progress=True, **kw)
    assert capsys.readouterr().err.startswith(f"\r{name}:")
    imp.score_groups(crit, net, graph, groups, progress=False, **kw)
    assert capsys.readouterr().err == ""


class Branchy(nn.Module):
    """``alt`` reads fc1's output only for batches of more than 3 rows (traced with 4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(3, 4)
        self.alt = nn.Linear(4, 2)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        y = self.alt(h) if x.shape[0] > 3 else 0.0
        return y + self.out(input=h)


def test_a_consumer_that_does_not_run_on_the_calibration_data() -> None:
    model = Branchy()
    g = torch.Generator().manual_seed(11)
    calib = [(torch.randn(2, 3, generator=g), torch.randn(2, 2, generator=g)) for _ in range(2)]
    xs = torch.cat([x for x, _ in calib])
    h = torch.relu(model.fc1(xs)).detach().double()
    # activation: only `out` (called with a keyword) was seen
    got, notes = scored(model, torch.randn(4, 3), "activation", calib=calib)
    assert notes == [] and close(got["fc1"], h.abs().mean(0).numpy())
    # fluctuation: alt's columns are skipped (no statistics), out's are scored
    got, _ = scored(model, torch.randn(4, 3), "fluctuation", calib=calib)
    w = model.out.weight.detach().double()
    assert close(got["fc1"], population_var(h) * (w**2).sum(0).numpy(), rtol=1e-5)
    # taylor: alt's weight has no gradient on these batches and counts nothing
    got, _ = scored(model, torch.randn(4, 3), "taylor", calib=calib, loss_fn=mse)
    ref = np.zeros(4)
    for x, y in calib:
        p = {
            k: v.detach().clone().double().requires_grad_(True)
            for k, v in model.state_dict().items()
        }
        hh = torch.relu(x.double() @ p["fc1.weight"].T + p["fc1.bias"])
        out = hh @ p["out.weight"].T + p["out.bias"]
        ((out - y.double()) ** 2).mean().backward()
        wg = {k: (v.detach() * v.grad).numpy() for k, v in p.items() if v.grad is not None}
        ref += (
            np.abs(wg["fc1.weight"]).sum(1)
            + np.abs(wg["fc1.bias"])
            + np.abs(wg["out.weight"]).sum(0)
        )
    assert close(got["fc1"], ref, rtol=1e-4)


def test_one_token_statistics() -> None:
    model = Tokens()
    x = torch.randn(1, 1, 5, generator=torch.Generator().manual_seed(1))
    h = torch.relu(model.fc1(x.reshape(1, 5))).detach().double()[0]
    assert int((h > 0).sum()) == 2  # units 2 and 3 fire: the check below is not all zeros
    got, _ = scored(model, {"x": x}, "fluctuation", calib=[{"x": x}])
    assert close(got["fc1"], np.zeros(4))  # one token: no variance
    got, _ = scored(model, {"x": x}, "activation", calib=[{"x": x}])
    assert close(got["fc1"], h.abs().numpy())


def test_nested_module_names() -> None:
    class Nest(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.block = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
            self.head = nn.Sequential(nn.Conv2d(3, 2, 1))

        def forward(self, x):
            return self.head(self.block(x))

    model = Nest().eval()
    with torch.no_grad():
        model.block[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    got, _ = scored(model, IMG, "bn_scale")
    assert close(got["block.0"], [0.5, 2.0, 1.0])
    got, _ = scored(model, IMG, "fluctuation", calib=[IMG])
    h = model.block(IMG).detach().movedim(1, -1).reshape(-1, 3)
    w = model.head[0].weight.detach().double()
    assert close(got["block.0"], population_var(h) * (w**2).sum(dim=(0, 2, 3)).numpy(), rtol=1e-5)


@pytest.mark.parametrize("reduce", ["sum", "max", "mean"])
def test_fluctuation_reduces_over_consumers(reduce: str) -> None:
    model = Branches()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(13))
    got, _ = scored(model, x, "fluctuation", calib=[x], reduce=reduce)
    h = torch.relu(model.fc1(x)).detach()
    var = population_var(h)
    per = [var * (m.weight.detach().double() ** 2).sum(0).numpy() for m in (model.fc3, model.fc2)]
    ref = {"sum": per[0] + per[1], "max": np.maximum(*per), "mean": (per[0] + per[1]) / 2}[reduce]
    assert close(got["fc1"], ref, rtol=1e-5)


def test_fluctuation_ignores_a_mask_that_is_not_a_tensor() -> None:
    model = Tokens()
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(14))
    got, _ = scored(model, {"x": x}, "fluctuation", calib=[{"x": x, "attention_mask": [[1, 0, 0]]}])
    hidden = torch.relu(model.fc1(x.reshape(-1, 5))).detach()
    ref = population_var(hidden) * (model.fc2.weight.detach().double() ** 2).sum(0).numpy()
    assert close(got["fc1"], ref, rtol=1e-5)
