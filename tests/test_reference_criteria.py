"""Every importance criterion against a slow, obvious reference written in this file.

Each test builds a tiny model, computes what the criterion should score with plain loops and
hand-written forward passes (no prunekit code), and asserts that the weights / channels / layers
prunekit removed are exactly the ones the reference ranks lowest. The scores are made distinct
(random weights, chosen offsets), so "exactly" is well defined; a criterion that scores the
opposite way (negated), forgets a slice of a unit, or sums where it should take absolute values
chooses other units and fails here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import prunekit
from prunekit.scores.synflow import make_synflow

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


def lowest(scores: dict[tuple, float], k: int) -> set[tuple]:
    """The keys of the ``k`` lowest scores, after checking the choice is not a tie."""
    ranked = sorted(scores, key=lambda key: scores[key])
    if 0 < k < len(ranked):
        below, above = scores[ranked[k - 1]], scores[ranked[k]]
        assert below < above, f"reference tie at the cut ({below} == {above}): change the seed"
    return set(ranked[:k])


def removed_positions(weight: torch.Tensor) -> set[tuple]:
    """Positions of the zeros of a weight whose dense entries were all non-zero."""
    return {tuple(int(i) for i in idx) for idx in (weight == 0).nonzero()}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).eval()


def manual_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP above, written out: tanh(x W0^T + b0) W2^T + b2."""
    hidden = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    return hidden @ params["2.weight"].T + params["2.bias"]


def batches(n: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(7, 6, generator=g), torch.randn(7, 4, generator=g)) for _ in range(n)]


def mse(model: nn.Module, batch) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def reference_grads(net: nn.Sequential, batch) -> dict[str, torch.Tensor]:
    """d(mse)/dW of the two weights on one batch, through the hand-written forward."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.state_dict().items()}
    loss = ((manual_forward(params, batch[0]) - batch[1]) ** 2).mean()
    loss.backward()
    return {k: params[k].grad for k in ("0.weight", "2.weight")}


def pruned_zeros(report, names=("0", "2")) -> set[tuple]:
    model = report.model
    out = set()
    for name in names:
        out |= {(name, *p) for p in removed_positions(model.get_submodule(name).weight)}
    return out


def weight_scores(net: nn.Sequential, fn) -> dict[tuple, float]:
    """``fn(name, i, j)`` for every entry of both weights."""
    scores = {}
    for name in ("0", "2"):
        w = net.get_submodule(name).weight
        for i, j in itertools.product(range(w.shape[0]), range(w.shape[1])):
            scores[(name, i, j)] = float(fn(name, i, j))
    return scores


# --------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("scope", ["global", "local"])
def test_magnitude_removes_the_smallest_absolute_weights(scope: str) -> None:
    net = mlp()
    ref = weight_scores(net, lambda n, i, j: abs(net.get_submodule(n).weight[i, j].item()))
    report = prunekit.prune(net, 0.4, "magnitude", scope=scope, targets=["0", "2"], progress=False)
    if scope == "global":
        expected = lowest(ref, round(0.4 * len(ref)))
    else:
        expected = set()
        for name in ("0", "2"):
            layer = {k: v for k, v in ref.items() if k[0] == name}
            expected |= lowest(layer, round(0.4 * len(layer)))
    assert pruned_zeros(report) == expected


def _wanda_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    # columns on different scales, so the input norms reorder the weights' magnitudes
    return [torch.randn(9, 6, generator=g) * torch.tensor([0.2, 3.0, 1.0, 0.5, 2.0, 0.1])]


@pytest.mark.parametrize("scope", ["row", "local"])
def test_wanda_is_weight_times_input_norm(scope: str) -> None:
    net = mlp()
    data = _wanda_inputs()
    # the inputs each layer sees, computed by hand
    inputs = {"0": torch.cat(data)}
    inputs["2"] = torch.tanh(inputs["0"] @ net[0].weight.T + net[0].bias).detach()

    def score(name: str, i: int, j: int) -> float:
        column = inputs[name][:, j]
        norm = sum(float(v) ** 2 for v in column) ** 0.5
        return abs(net.get_submodule(name).weight[i, j].item()) * norm

    ref = weight_scores(net, score)
    report = prunekit.prune(
        net, 0.5, "wanda", scope=scope, targets=["0", "2"], data=data, progress=False
    )
    expected = set()
    for name in ("0", "2"):
        rows, cols = net.get_submodule(name).weight.shape
        total = round(0.5 * rows * cols)
        if scope == "row":  # every row its share; the first rows one more if it does not divide
            for i in range(rows):
                count = total // rows + (1 if i < total % rows else 0)
                row = {k: v for k, v in ref.items() if k[0] == name and k[1] == i}
                expected |= lowest(row, count)
        else:
            layer = {k: v for k, v in ref.items() if k[0] == name}
            expected |= lowest(layer, total)
    assert pruned_zeros(report) == expected


@pytest.mark.parametrize("method", ["taylor", "snip", "movement"])
def test_gradient_criteria_match_hand_written_gradients(method: str) -> None:
    net = mlp()
    data = batches(2)
    grads = [reference_grads(net, b) for b in data]  # one dict per batch

    def score(name: str, i: int, j: int) -> float:
        w = net.get_submodule(name).weight[i, j].item()
        per_batch = [float(g[f"{name}.weight"][i, j]) for g in grads]
        if method == "taylor":  # |w g| per batch, summed: opposite batches do not cancel
            return sum(abs(w * g) for g in per_batch)
        if method == "snip":  # the gradients summed first, |.| once
            return abs(w * sum(per_batch))
        return -sum(w * g for g in per_batch)  # movement: signed, -w g summed

    ref = weight_scores(net, score)
    report = prunekit.prune(
        net, 0.5, method, scope="local", targets=["0", "2"], data=data, loss_fn=mse, progress=False
    )
    expected = set()
    for name in ("0", "2"):
        layer = {k: v for k, v in ref.items() if k[0] == name}
        expected |= lowest(layer, round(0.5 * len(layer)))
    assert pruned_zeros(report) == expected


@pytest.mark.parametrize("method", ["taylor", "snip", "movement", "wanda"])
def test_max_batches_limits_the_data_used(method: str) -> None:
    # scored on the first batch only: the same mask as being given that batch alone
    net, data = mlp(), batches(3)
    kw = {"targets": ["0", "2"], "scope": "local", "progress": False}
    if method == "wanda":
        data = [x for x, _ in data]
    else:
        kw["loss_fn"] = mse
    limited = prunekit.prune(net, 0.5, method, data=data, max_batches=1, **kw)
    first = prunekit.prune(net, 0.5, method, data=data[:1], **kw)
    every = prunekit.prune(net, 0.5, method, data=data, **kw)
    assert pruned_zeros(limited) == pruned_zeros(first)
    assert pruned_zeros(limited) != pruned_zeros(every)  # the other batches would change it


def test_taylor_and_snip_differ_where_batches_disagree() -> None:
    # the reference above tells them apart only if some gradient changes sign between batches
    net = mlp()
    grads = [reference_grads(net, b) for b in batches(2)]
    flips = (grads[0]["0.weight"] * grads[1]["0.weight"] < 0).sum()
    assert int(flips) > 0


def _reference_synflow(net: nn.Sequential, remove: int, iterations: int, min_density: float):
    """Iterative SynFlow (Tanaka et al.), written out: |params|, all-ones input, R = sum of the
    outputs, score |dR/dw * w| of the alive weights, remove the lowest share, repeat; the step
    that would pass ``remove`` is taken partially, by its own scores."""
    base = {k: v.detach().double().abs() for k, v in net.state_dict().items()}
    names = ["0.weight", "2.weight"]
    alive = {k: torch.ones_like(base[k], dtype=torch.bool) for k in names}
    total = sum(base[k].numel() for k in names)
    gone: set[tuple] = set()
    for step in range(1, iterations + 1):
        keep = int(round(min_density ** (step / iterations) * total))
        n_alive = total - len(gone)
        if n_alive <= keep:
            continue
        params = dict(base)
        for k in names:
            params[k] = (base[k] * alive[k]).requires_grad_(True)
        x = torch.ones(1, 6, dtype=torch.float64)
        hidden = torch.relu(x @ params["0.weight"].T + params["0.bias"])
        flow = (hidden @ params["2.weight"].T + params["2.bias"]).sum()
        flow.backward()
        scores = {}
        for k in names:
            w, g = params[k].detach(), params[k].grad
            for i, j in itertools.product(range(w.shape[0]), range(w.shape[1])):
                if alive[k][i, j]:
                    scores[(k[0], i, j)] = abs(float(g[i, j] * w[i, j]))
        take = min(n_alive - keep, remove - len(gone))
        for key in sorted(scores, key=scores.get)[:take]:
            gone.add(key)
            alive[f"{key[0]}.weight"][key[1], key[2]] = False
        if len(gone) == remove:
            return gone
    raise AssertionError("the reference sweep ended before reaching the sparsity")


def test_synflow_is_iterative_synaptic_flow() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()
    iterations, min_density = 6, 0.1
    criterion = make_synflow(iterations=iterations, min_density=min_density)
    sparsity = 0.7
    remove = round(sparsity * (30 + 20))
    expected = _reference_synflow(net, remove, iterations, min_density)
    report = prunekit.prune(
        net, sparsity, criterion, targets=["0", "2"], data=[torch.zeros(1, 6)], progress=False
    )
    assert pruned_zeros(report) == expected


def test_random_removes_the_exact_count_and_follows_the_seed() -> None:
    net = mlp()
    masks = {}
    for seed in (0, 0, 1):
        for scope in ("local", "global"):
            report = prunekit.prune(
                net, 0.3, "random", scope=scope, targets=["0", "2"], seed=seed, progress=False
            )
            zeros = pruned_zeros(report)
            if scope == "local":
                assert sum(1 for k in zeros if k[0] == "0") == round(0.3 * 30)
                assert sum(1 for k in zeros if k[0] == "2") == round(0.3 * 20)
            assert len(zeros) == round(0.3 * 50)  # 9 + 6 locally, 15 of 50 globally
            masks.setdefault((seed, scope), []).append(zeros)
    assert masks[(0, "local")][0] == masks[(0, "local")][1]  # same seed, same mask
    assert masks[(0, "local")][0] != masks[(1, "local")][0]  # another seed, another mask


# --------------------------------------------------------------------------- structured


def _kept_rows(pruned: torch.Tensor, dense: torch.Tensor) -> set[int]:
    """Which rows of ``dense`` survive in ``pruned`` (rows matched bit for bit, in order)."""
    kept, start = [], 0
    for row in pruned:
        match = next(i for i in range(start, dense.shape[0]) if torch.equal(dense[i], row))
        kept.append(match)
        start = match + 1
    return set(kept)


def _removed_channels(report, name: str, dense: nn.Module, width: int) -> set[int]:
    pruned = report.model.get_submodule(name).weight.detach()
    return set(range(width)) - _kept_rows(pruned, dense.get_submodule(name).weight.detach())


def structured_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


X5 = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))


def _structured(model, inputs, importance, ratio=0.25, **kw):
    if kw.get("unit") != "layer":
        kw["round_to"] = 1  # exactly round(ratio * width) channels
    return prunekit.prune_structured(
        model,
        inputs,
        ratio=ratio,
        importance=importance,
        measure_latency=False,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("p", [1, 2])
def test_lp_importance_sums_every_slice_of_a_neuron(p: int) -> None:
    net = structured_mlp()
    w0, b0, w2 = net[0].weight.detach(), net[0].bias.detach(), net[2].weight.detach()
    ref = {}
    for i in range(8):
        entries = [*w0[i].tolist(), float(b0[i]), *w2[:, i].tolist()]  # row, bias, next column
        ref[i] = sum(abs(v) for v in entries) if p == 1 else sum(v * v for v in entries) ** 0.5
    report = _structured(net, X5, f"l{p}")
    assert _removed_channels(report, "0", net, 8) == lowest(ref, 2)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def conv_bn(seed: int = 0) -> ConvBN:
    torch.manual_seed(seed)
    model = ConvBN()
    with torch.no_grad():  # BN scales of both signs and distinct sizes; shifts non-zero
        model.bn.weight.copy_(torch.tensor([0.9, -0.1, 0.5, -0.7, 0.05, 1.2, -0.3, 0.6]))
        model.bn.bias.copy_(torch.randn(8) * 0.1)
        model.bn.running_mean.copy_(torch.randn(8) * 0.1)
        model.bn.running_var.copy_(torch.rand(8) + 0.5)
    return model.eval()


IMG = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def test_bn_scale_removes_the_smallest_absolute_gammas() -> None:
    model = conv_bn()
    gamma = model.bn.weight.detach()
    ref = {i: abs(float(gamma[i])) for i in range(8)}
    report = _structured(model, IMG, "bn_scale", ratio=0.375)
    assert _removed_channels(report, "conv1", model, 8) == lowest(ref, 3)  # {4, 1, 6}


@pytest.mark.parametrize("p", [1, 2])
def test_lp_importance_counts_conv_bias_batchnorm_and_consumer(p: int) -> None:
    model = conv_bn()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = {}
    for i in range(8):
        entries = [
            *params["conv1.weight"][i].flatten().tolist(),
            float(params["conv1.bias"][i]),
            float(params["bn.weight"][i]),
            float(params["bn.bias"][i]),
            *params["conv2.weight"][:, i].flatten().tolist(),
        ]  # running statistics are buffers, not weights: not counted
        ref[i] = sum(abs(v) for v in entries) if p == 1 else sum(v * v for v in entries) ** 0.5
    report = _structured(model, IMG, f"l{p}", ratio=0.375)
    assert _removed_channels(report, "conv1", model, 8) == lowest(ref, 3)


def test_structured_taylor_is_per_batch_sum_of_abs_weight_times_grad() -> None:
    net = structured_mlp()
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)) for _ in range(2)]
    ref = dict.fromkeys(range(8), 0.0)
    for x, y in calib:
        p = {k: v.detach().clone().requires_grad_(True) for k, v in net.state_dict().items()}
        out = torch.relu(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]
        ((out - y) ** 2).mean().backward()
        p = {k: (v.detach(), v.grad) for k, v in p.items()}
        for i in range(8):
            (w0, g0), (b0, gb0), (w2, g2) = p["0.weight"], p["0.bias"], p["2.weight"]
            ref[i] += (
                sum(abs(float(w0[i, j] * g0[i, j])) for j in range(5))  # the neuron's row
                + abs(float(b0[i] * gb0[i]))  # its bias
                + sum(abs(float(w2[k, i] * g2[k, i])) for k in range(3))  # the column reading it
            )
    report = _structured(net, X5, "taylor", calib=calib, loss_fn=mse)
    assert _removed_channels(report, "0", net, 8) == lowest(ref, 2)


def _activation_net() -> tuple[nn.Sequential, torch.Tensor]:
    """Hidden unit i is relu(x0 + offset_i): its zero rate and mean are set by the offset."""
    net = structured_mlp()
    offsets = torch.tensor([0.3, -0.6, 0.8, -0.1, 0.55, -0.85, 0.1, -0.35])
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:, 0] = 1.0
        net[0].weight[:, 1:] = torch.randn(8, 4) * 1e-3  # rows stay distinguishable
        net[0].bias.copy_(offsets)
    x = torch.zeros(64, 5)
    x[:, 0] = torch.linspace(-1, 1, 64)
    return net, x


@pytest.mark.parametrize("importance", ["activation", "apoz"])
def test_activation_statistics_of_what_the_next_layer_reads(importance: str) -> None:
    net, x = _activation_net()
    hidden = torch.relu(x @ net[0].weight.T + net[0].bias).detach()  # what net[2] reads
    ref = {}
    for i in range(8):
        column = hidden[:, i].tolist()
        if importance == "activation":
            ref[i] = sum(abs(v) for v in column) / len(column)
        else:  # 1 - the share of zeros
            ref[i] = 1 - sum(1 for v in column if v == 0) / len(column)
    report = _structured(net, x[:2], importance, ratio=0.375, calib=[x])
    assert _removed_channels(report, "0", net, 8) == lowest(ref, 3)


# --------------------------------------------------------------------------- depth


class Block(nn.Module):
    def __init__(self, d: int, strength: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        with torch.no_grad():
            self.fc.weight.mul_(strength)
            self.fc.bias.mul_(strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(6, s) for s in (0.9, 0.05, 1.5, 0.3, 0.6))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i != skip:
                x = block(x)
        return self.head(x)


def test_depth_loss_removes_the_blocks_whose_skipping_costs_least() -> None:
    model = Deep().eval()
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(2)]

    def mean_loss(skip: int | None) -> float:
        with torch.no_grad():
            return sum(float(((model(x, skip) - y) ** 2).mean()) for x, y in calib) / len(calib)

    base = mean_loss(None)
    ref = {i: mean_loss(i) - base for i in range(5)}
    report = _structured(
        model, calib[0][0], "loss", ratio=0.4, unit="layer", calib=calib, loss_fn=mse
    )
    assert set(report.removed_layers) == {f"blocks.{i}" for i in lowest(ref, 2)}
    assert len(report.model.blocks) == 3


def test_depth_random_follows_its_seed() -> None:
    model = Deep().eval()
    x = torch.randn(3, 6)
    chosen = {}
    for seed in range(4):
        ref = torch.rand(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        report = _structured(model, x, "random", ratio=0.4, unit="layer", seed=seed)
        expected = {f"blocks.{i}" for i in lowest(dict(enumerate(ref.tolist())), 2)}
        assert set(report.removed_layers) == expected
        chosen[seed] = expected
    assert len({frozenset(v) for v in chosen.values()}) > 1  # the seed matters
