"""Sensitivity analysis, allocation under a budget, pruning to a quality floor, ``analyze``."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from cli_models import llama_with_plain_tokenizer
from conftest import mlp
from conftest import tiny_llama as _tiny_llama
from prunekit.analysis import allocate, allocate_by_sensitivity, load_per_layer, prune_to_floor
from prunekit.analysis.sensitivity import (
    SUBSAMPLE,
    SensitivityResult,
    _merge,
    oneshot_grid,
    sparsegpt_grid,
)
from prunekit.calibrate import calibration
from prunekit.calibrate.sparsegpt import sparsegpt_prune
from prunekit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ allocation


def _interp(points, x):
    pts = sorted([(0.0, 0.0), *points]) if min(p[0] for p in points) > 0 else sorted(points)
    for (x1, y1), (x2, y2) in zip(pts, pts[1:], strict=False):
        if x1 <= x <= x2:
            return y1 if x2 == x1 else y1 + (y2 - y1) * (x - x1) / (x2 - x1)
    raise AssertionError


def _brute_force(curves, sizes, removed, cost=None):
    """Every integer count vector: the exact optimum of the allocation problem."""
    names = list(curves)
    cost = cost or {n: 1 for n in names}
    best = (math.inf, None)
    ranges = [range(int(max(s for s, _ in curves[n]) * sizes[n] + 1e-9) + 1) for n in names]
    for counts in itertools.product(*ranges):
        if sum(cost[n] * k for n, k in zip(names, counts, strict=True)) != removed:
            continue
        damage = sum(_interp(curves[n], k / sizes[n]) for n, k in zip(names, counts, strict=True))
        best = min(best, (damage, counts))
    return best


HAND_MADE = {
    # convex, concave (a cliff late), and a plateau then a cliff (non-convex)
    "a": [(0.25, 0.1), (0.5, 0.3), (0.75, 0.9), (1.0, 3.0)],
    "b": [(0.25, 0.5), (0.5, 0.7), (0.75, 0.8), (0.9, 0.85)],
    "c": [(0.2, 0.0), (0.6, 0.05), (0.8, 2.0)],
}
SIZES = {"a": 8, "b": 12, "c": 10}


# a cliff then a plateau against a straight line: the Lagrangian (convex hull) answer is wrong
TRAP = {"a": [(0.5, 1.0), (1.0, 1.0)], "b": [(1.0, 1.5)], "c": [(0.3, 0.2), (0.6, 1.5)]}
TRAP_SIZES = {"a": 10, "b": 10, "c": 10}


@pytest.mark.parametrize(
    "curves, sizes, removed",
    [(HAND_MADE, SIZES, r) for r in (3, 9, 14, 20, 25)]
    + [(TRAP, TRAP_SIZES, r) for r in (3, 7, 12, 18)],
)
def test_allocation_is_optimal_on_hand_made_curves(curves, sizes, removed) -> None:
    alloc = allocate(curves, sizes=sizes, removed=removed)
    best, counts = _brute_force(curves, sizes, removed)
    assert sum(alloc.removed.values()) == removed
    assert alloc.predicted_damage == pytest.approx(best, abs=1e-12)
    assert [round(alloc.per_layer[n] * sizes[n]) for n in sizes] == list(alloc.removed.values())


def test_allocation_with_weighted_costs_is_optimal() -> None:
    cost = {"a": 3, "b": 1, "c": 2}
    for keep in (0.3, 0.55, 0.8):
        alloc = allocate(HAND_MADE, sizes=SIZES, cost=cost, keep=keep)
        budget = (1 - keep) * sum(cost[n] * SIZES[n] for n in SIZES)
        spent = sum(cost[n] * k for n, k in alloc.removed.items())
        assert abs(spent - budget) <= max(cost.values())  # exact to one weight's cost
        if spent == budget:
            assert alloc.predicted_damage == pytest.approx(
                _brute_force(HAND_MADE, SIZES, spent, cost)[0], abs=1e-12
            )


def test_allocation_meets_a_large_budget_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    grid = [0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    curves, sizes = {}, {}
    for i in range(30):
        steps = torch.rand(len(grid), generator=g).double() * (i % 5 + 1)
        curves[f"l{i}"] = list(zip(grid, torch.cumsum(steps, 0).tolist(), strict=True))
        sizes[f"l{i}"] = int(torch.randint(1_000, 300_000, (1,), generator=g))
    total = sum(sizes.values())
    for s in (0.5, 0.7, 0.9):
        alloc = allocate(curves, s, sizes=sizes)
        assert sum(alloc.removed.values()) == round(s * total)
        assert alloc.sparsity == pytest.approx(s, abs=1e-6)
    alloc = allocate(curves, sizes=sizes, nonzeros=1_234_567)
    assert alloc.nonzeros == 1_234_567
    # convex curves: the Lagrangian (hull) bound is attained to within a hair
    uniform = sum(_interp(curves[n], 0.7) for n in curves)
    assert allocate(curves, 0.7, sizes=sizes).predicted_damage <= uniform


def test_allocation_errors_name_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate(HAND_MADE, 0.5, sizes=SIZES, removed=3)
    with pytest.raises(ValueError, match="not reachable"):
        allocate({"a": [(0.5, 1.0)]}, 0.9, sizes={"a": 10})
    with pytest.raises(ValueError, match="keep="):
        allocate(HAND_MADE, sizes=SIZES, cost={"a": 1, "b": 1, "c": 1}, removed=3)
    with pytest.raises(ValueError, match="sizes"):
        allocate(HAND_MADE, 0.5)


# ------------------------------------------------------------------------------ sensitivity


def _data(n=3, batch=24, features=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, features, generator=g) for _ in range(n)]


def _kl(dense, out):
    la, lb = F.log_softmax(dense, -1), F.log_softmax(out, -1)
    return float((la.exp() * (la - lb)).sum(-1).sum().detach())


def test_output_mode_matches_pruning_each_layer_by_hand() -> None:
    torch.manual_seed(0)
    net = mlp((16, 32, 24, 8))
    data = _data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = prunekit.sensitivity(
        net, data, sparsities=(0.5, 0.8), targets=["0", "2", "4"], monotone=False, progress=False
    )
    assert result.metric == "kl" and result.mode == "output"
    for k, v in net.state_dict().items():  # the model is restored
        assert torch.equal(v, before[k])
    for layer in ("0", "2", "4"):
        for j, s in enumerate((0.5, 0.8)):
            pruned = prunekit.prune(net, s, scope="local", targets=[layer]).model
            expected = sum(_kl(net(x), pruned(x)) for x in data) / sum(len(x) for x in data)
            assert result.damage[f"{layer}.weight"][j] == pytest.approx(expected, rel=1e-5)


def test_monotone_curves_and_evaluate_metric() -> None:
    torch.manual_seed(0)
    net = mlp((16, 32, 8))
    data = _data()
    scores = iter([1.0, 0.9, 0.95, 0.5, 0.8, 0.7, 0.6])  # dense first, then per layer/sparsity

    result = prunekit.sensitivity(
        net,
        data,
        sparsities=(0.3, 0.6, 0.9),
        targets=["0", "2"],
        evaluate=lambda m: next(scores),
        progress=False,
    )
    assert result.metric == "evaluate" and result.dense == 1.0
    assert result.raw_damage["0.weight"] == pytest.approx([0.1, 0.05, 0.5])
    assert result.damage["0.weight"] == pytest.approx([0.1, 0.1, 0.5])  # running maximum
    assert result.damage["2.weight"] == pytest.approx([0.2, 0.3, 0.4])


def test_proxy_mode_is_the_relative_reconstruction_error() -> None:
    model = _tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    calib = calibration(torch.randint(0, 64, (3000,)), n_samples=4, seq_len=16)
    result = prunekit.sensitivity(
        model, calib, sparsities=(0.5, 0.9), method="wanda", progress=False
    )
    assert result.mode == "proxy" and result.metric == "recon"
    assert len(result.layers) == 14
    # reference: the layer's real inputs (dense model), its Wanda-pruned weight, the error
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    seen = []
    handle = layer.register_forward_hook(
        lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1]))
    )
    with torch.no_grad():
        for sample in calib:
            model(**sample)
    handle.remove()
    X = torch.cat(seen).double()
    W = layer.weight.detach().double()
    for j, s in enumerate((0.5, 0.9)):
        norms = (X**2).sum(0)
        score = W.abs() * norms.sqrt()[None, :]
        total = round(s * W.numel())  # Wanda's rows lose floor(share), the first rows one more
        keep = torch.ones_like(W, dtype=torch.bool)
        for row in range(W.shape[0]):
            k = total // W.shape[0] + (row < total % W.shape[0])
            keep[row, torch.topk(score[row], k, largest=False).indices] = False
        expected = float(((X @ (W * ~keep).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
        assert result.damage[f"{name}.weight"][j] == pytest.approx(expected, rel=1e-4)


def test_sparsegpt_grid_equals_one_run_per_sparsity() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(12, 40, generator=g), torch.randn(300, 40, generator=g)
    hessian = 2 * x.T @ x / 300
    outs = sparsegpt_grid(w, hessian, [0.3, 0.6, 0.85], block_size=16)
    for s, out in zip([0.3, 0.6, 0.85], outs, strict=True):
        assert torch.equal(out, sparsegpt_prune(w, hessian, s, block_size=16).weight)
    # frozen entries beyond the first block's share (100 of its 192, share 58 at 30 %) are
    # pruned in the sweep with compensation, as sparsegpt_prune does
    first = torch.zeros(12 * 16, dtype=torch.bool)
    first[torch.randperm(12 * 16, generator=g)[:100]] = True
    frozen = torch.cat([first.view(12, 16), torch.zeros(12, 24, dtype=torch.bool)], dim=1)
    outs = sparsegpt_grid(w, hessian, [0.3, 0.6], frozen=frozen, block_size=16)
    for s, out in zip([0.3, 0.6], outs, strict=True):
        ref = sparsegpt_prune(w, hessian, s, frozen=frozen, block_size=16).weight
        assert torch.equal(out, ref) and not out[frozen].any()


def test_results_write_csv_json_and_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    net = mlp((16, 32, 24, 8))
    result = prunekit.sensitivity(
        net, _data(), sparsities=(0.5, 0.9), targets=["0", "2", "4"], progress=False
    )
    text = str(result)
    assert "0.weight" in text and "0.9" in text
    rows = (result.to_csv(tmp_path / "s.csv")).read_text().splitlines()
    assert rows[0] == "layer,size,sparsity,damage,raw_damage" and len(rows) == 1 + 3 * 2
    again = SensitivityResult.from_json(result.to_json(tmp_path / "s.json"))
    assert again.damage == result.damage and again.sizes == result.sizes
    for heatmap in (False, True):
        path = result.plot(tmp_path / f"p{heatmap}.png", heatmap=heatmap)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ wiring


def _nonzeros(model, skip="lm_head"):
    return sum(
        int((m.weight != 0).sum())
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != skip
    )


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_oneshot_sensitivity_keeps_uniform_nonzeros_in_one_extra_pass(method) -> None:
    model = _tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    calib = calibration(torch.randint(0, 64, (3000,)), n_samples=4, seq_len=16)
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    uniform = prunekit.oneshot(model, calib, method=method, sparsity=0.7, progress=False)
    n_uniform = len(calls)
    calls.clear()
    report = prunekit.oneshot(
        model, calib, method=method, sparsity=0.7, allocation="sensitivity", progress=False
    )
    handle.remove()
    # the measurement is one block-by-block pass over the calibration set, plus one run per
    # block and sparsity of the grid on a subsample and the dense reference (each later block's
    # reference is the previous block's run at the target): not one pass per layer
    n_blocks = len(model.model.layers)
    batches = len(_merge(list(calib)[:SUBSAMPLE]))  # the subsample, joined into batches
    runs = (1 + n_blocks * len(oneshot_grid(0.7))) * batches
    assert len(calls) == n_uniform + len(calib) + runs
    assert _nonzeros(report.model) == _nonzeros(uniform.model)
    allocated = report.details["allocated"]
    assert len(set(round(v, 3) for v in allocated.values())) > 1
    # per_layer= takes the same table and gives the same model
    again = prunekit.oneshot(
        model, calib, method=method, sparsity=0.7, per_layer=allocated, progress=False
    )
    for (n, a), (_, b) in zip(
        report.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n


def test_prune_with_sensitivity_allocation_meets_the_budget() -> None:
    torch.manual_seed(0)
    net = mlp((16, 64, 48, 8))
    data = _data(2)
    layers = ["0", "2", "4"]
    report = prunekit.prune(
        net, 0.8, targets=layers, allocation="sensitivity", data=data, progress=False
    )
    total = sum(net.get_submodule(n).weight.numel() for n in layers)
    assert report.zeros == round(0.8 * total)
    per = {r.name: r.sparsity for r in report.layers}
    assert len(set(round(v, 4) for v in per.values())) > 1
    result = prunekit.sensitivity(net, data, targets=layers, progress=False)
    from_result = prunekit.prune(net, 0.8, targets=layers, allocation=result)
    assert from_result.zeros == round(0.8 * total)
    with pytest.raises(ValueError, match="data="):
        prunekit.prune(net, 0.8, targets=layers, allocation="sensitivity")


def test_refinement_keeps_the_best_measured_round() -> None:
    torch.manual_seed(0)
    net = mlp((16, 64, 48, 8))
    best, results = allocate_by_sensitivity(
        net, _data(2), 0.9, rounds=3, targets=["0", "2", "4"], progress=False
    )
    assert len(results) == 3 and results[1].sparsities[0] == 0.0  # curves around a base
    assert sum(best.removed.values()) == round(0.9 * sum(best.sizes.values()))
    assert "measured_damage" in best.budget


def _magnitude_from_dense(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The obvious reference: the round(s * n) smallest |w| of the dense weight set to zero."""
    k = round(sparsity * weight.numel())
    out = weight.clone().flatten()
    out[out.abs().argsort()[:k]] = 0
    return out.view_as(weight)


def test_curves_around_a_base_prune_each_layer_from_its_dense_weight() -> None:
    # the layer being measured is pruned from its dense weight at every grid point, the others
    # sit at the base; a grid below the base must bring the layer's weights back (a grid cut
    # from the base weight would keep its zeros: a wrong refinement round)
    torch.manual_seed(0)
    net = mlp((16, 64, 48, 8))
    x = torch.cat(_data(2))
    dense = {n: m.weight.detach().clone() for n, m in net.named_children() if hasattr(m, "weight")}
    with torch.no_grad():
        ref_out = net(x)
    base = {"0": 0.8, "2": 0.8, "4": 0.5}
    grid = [0.2, 0.5, 0.9]

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return -float(F.mse_loss(model(x), ref_out))

    result = prunekit.sensitivity(
        net, [x], targets=list(base), sparsities=grid, evaluate=evaluate, base=base,
        monotone=False, progress=False,
    )  # fmt: skip
    assert set(grid) <= set(result.sparsities)
    for layer in base:
        for s, got in zip(result.sparsities, result.raw_damage[f"{layer}.weight"], strict=True):
            probe = copy.deepcopy(net)
            with torch.no_grad():
                for name, weight in dense.items():
                    at = s if name == layer else base[name]
                    probe.get_submodule(name).weight.copy_(_magnitude_from_dense(weight, at))
            assert got == pytest.approx(-evaluate(probe), rel=1e-5, abs=1e-9), (layer, s)
    for name, weight in dense.items():  # the model is left as it was
        assert torch.equal(net.get_submodule(name).weight, weight)


# ------------------------------------------------------------------------------ quality floor


def test_prune_to_floor_reports_every_point_and_keeps_the_best() -> None:
    torch.manual_seed(0)
    net = mlp((16, 32, 8))
    recovered = []

    def quality(model):  # falls linearly with the sparsity of the targeted layers
        return 1.0 - 0.5 * prunekit.stats(model).sparsity

    report = prune_to_floor(
        net,
        quality,
        floor=0.6,
        relative=False,
        recover=lambda m: recovered.append(m),
        targets=["0", "2"],
        tolerance=0.02,
        progress=False,
    )
    # the floor 0.6 is crossed at a sparsity of 0.8 of the targeted layers (0.8005 with rounding)
    limit = 0.8005
    phases = [p.phase for p in report.points]
    assert phases[:4] == ["ladder"] * 4 and set(phases[4:]) == {"bisect"}  # 0.9 fails
    assert report.sparsity <= limit < report.sparsity + 0.02 + 1e-9
    assert all(p.passed == (p.value >= 0.6) for p in report.points)
    assert len(recovered) == len(report.points)
    assert report.best.value >= 0.6 and quality(report.model) == report.best.value
    assert "best: sparsity" in str(report)


# ------------------------------------------------------------------------------ command line


def test_analyze_command_writes_curves_plot_and_allocation(llama_dir, tmp_path) -> None:
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    folder, text = llama_with_plain_tokenizer(llama_dir, tmp_path, 3000)
    out = tmp_path / "analysis"
    common = ["--calib", str(text), "--n-samples", "4", "--seq-len", "16"]
    args = ["analyze", str(folder), "--out", str(out), "--sparsity", "0.6", *common]
    assert main(args) == 0
    for name in ("sensitivity.csv", "sensitivity.json", "allocation.json"):
        assert (out / name).is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("prunekit analyze ") and "seed" in run
    per_layer = load_per_layer(out / "allocation.json")
    assert len(per_layer) == 14
    pruned = tmp_path / "pruned"
    assert (
        main(
            [
                "oneshot",
                str(folder),
                "--out",
                str(pruned),
                "--per-layer",
                str(out / "allocation.json"),
                *common,
            ]
        )
        == 0
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned)
    for name, s in per_layer.items():
        weight = model.get_parameter(name)
        assert int((weight == 0).sum()) == round(s * weight.numel())
    meta = json.loads((out / "allocation.json").read_text())
    assert meta["format"] == "prunekit-allocation" and meta["removed"]
