"""The fast one-shot paths against slow obvious references, bit for bit.

* SparseGPT's column sweep against the textbook loop (one column at a time, Q / Err written per
  column, the whole rest of the block updated, as in the paper's Algorithm 1 with lazy blocks);
* batched calibration statistics (several samples stacked in one forward call, shared inputs
  measured once) against one sample at a time;
* the sequential runner's stacked block calls against one sample per call, and its fall-back
  when stacking would change the outputs;
* masked layers run with their raw weights while calibrating; magnitude needs no forward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.calibrate import calibration
from prunekit.calibrate.oneshot import oneshot
from prunekit.calibrate.sequential import plain_weights, plan_chunks, run_sequential
from prunekit.calibrate.sparsegpt import (
    inverse_hessian_factor,
    sparsegpt_prune,
)
from prunekit.calibrate.stats import (
    InputStats,
    input_rows,
    mirror_lower_,
    sample_products,
    samples_in_call,
)
from prunekit.masks import apply_mask, get_mask, is_masked
from prunekit.scope import count_to_remove
from prunekit.targets import Target


def reference_sparsegpt(weight, hessian, sparsity, nm=None, frozen=None, block_size=128):
    """SparseGPT written out column by column (the loop of the paper and of prunekit before
    the fast sweep): returns (weight, keep)."""
    W = weight.clone().float()
    H = hessian.clone().float()
    rows, cols = W.shape
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])
    must = torch.zeros_like(W, dtype=torch.bool) if frozen is None else frozen.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    must[:, dead] = True
    factor, _ = inverse_hessian_factor(H, 0.01)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    total = count_to_remove(sparsity, W.numel())
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        F1 = factor[start:end, start:end]
        d1 = torch.diagonal(F1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            k = round(total * end / cols) - round(total * start / cols)
            sal = (W1**2 / d1[None, :] ** 2).masked_fill(must[:, start:end], float("-inf"))
            if k:
                P1.view(-1)[torch.topk(sal.reshape(-1), k, largest=False).indices] = True
            P1 |= must[:, start:end]  # frozen entries go in the sweep, compensated
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                group = (W1[:, i : i + m] ** 2 / d1[None, i : i + m] ** 2).masked_fill(
                    must[:, start + i : start + i + m], float("-inf")
                )
                drop = torch.topk(group, m - n, dim=1, largest=False).indices
                P1[:, i : i + m].scatter_(1, drop, True)
                P1[:, i : i + m] |= must[:, start + i : start + i + m]
            w = W1[:, i]
            q = w.clone()
            q[P1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / F1[i, i]
            W1[:, i:] -= err[:, None] * F1[i, i:][None, :]
            Err1[:, i] = err
        W[:, start:end] = Q1
        pruned[:, start:end] = P1 | must[:, start:end]
        W[:, end:] -= Err1 @ factor[start:end, end:]
    W[pruned] = 0.0
    return W, ~pruned


def _problem(rows, cols, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    x[:, list(dead)] = 0.0
    return w, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize(
    "sparsity, nm, block",
    [(0.5, None, 128), (0.7, None, 16), (0.3, None, 7), (0.5, (2, 4), 128), (0.5, (4, 8), 12)],
)
def test_sparsegpt_sweep_equals_the_column_loop(sparsity, nm, block) -> None:
    """Without sub-blocks the sweep is the column loop bit for bit; with them (the default)
    the same masks, and weights to float rounding."""
    w, h = _problem(24, 40, seed=3, dead=(5, 17))
    frozen = torch.zeros_like(w, dtype=torch.bool)
    frozen[2, :9] = True
    frozen[:, 30] = True
    expected_w, expected_keep = reference_sparsegpt(w, h, sparsity, nm, frozen, block)
    plain = sparsegpt_prune(w, h, sparsity, nm, frozen=frozen, block_size=block, sub_block=block)
    assert torch.equal(plain.keep, expected_keep)
    assert torch.equal(plain.weight, expected_w)
    for sub in (16, 4, 3):
        got = sparsegpt_prune(w, h, sparsity, nm, frozen=frozen, block_size=block, sub_block=sub)
        assert torch.equal(got.keep, expected_keep), sub
        assert torch.allclose(got.weight, expected_w, rtol=1e-5, atol=1e-5), sub
        assert not torch.equal(got.weight, w * got.keep)  # survivors were updated
    assert not got.keep[frozen].any() and not got.keep[:, [5, 17]].any()
    if nm is None:
        assert int((~got.keep).sum()) == count_to_remove(sparsity, w.numel())


def test_sparsegpt_sweep_changes_weights_like_the_loop_on_a_wide_layer() -> None:
    w, h = _problem(8, 300, seed=5)
    expected_w, expected_keep = reference_sparsegpt(w, h, 0.6)
    assert torch.equal(sparsegpt_prune(w, h, 0.6, sub_block=128).weight, expected_w)
    got = sparsegpt_prune(w, h, 0.6)
    assert torch.equal(got.keep, expected_keep)
    assert torch.allclose(got.weight, expected_w, rtol=1e-5, atol=1e-5)
    kept = got.keep & (w != 0)
    assert not torch.equal(got.weight[kept], w[kept])  # the survivors were updated


def test_oneshot_solves_layers_with_one_input_together(monkeypatch) -> None:
    """q / k / v and gate / up share their Hessians: oneshot sweeps them together, with the same
    model as one solve per layer."""
    import prunekit.calibrate.oneshot as oneshot_module
    from conftest import tiny_llama

    model = tiny_llama()
    calib = calibration(torch.randint(0, 64, (2000,)), n_samples=6, seq_len=16, seed=0)
    seen: list[list[str]] = []
    grouping = oneshot_module.same_hessian

    def record(targets, stats):
        groups = grouping(targets, stats)
        seen.extend([t.name for t in g] for g in groups)
        return groups

    monkeypatch.setattr(oneshot_module, "same_hessian", record)
    together = copy.deepcopy(model)
    oneshot(together, calib, method="sparsegpt", sparsity=0.6, inplace=True, progress=False)
    assert any(len(g) == 3 and g[0].endswith("q_proj.weight") for g in seen)
    assert any(len(g) == 2 and g[0].endswith("gate_proj.weight") for g in seen)
    monkeypatch.setattr(oneshot_module, "same_hessian", lambda ts, stats: [[t] for t in ts])
    alone = copy.deepcopy(model)
    oneshot(alone, calib, method="sparsegpt", sparsity=0.6, inplace=True, progress=False)
    for (name, a), b in zip(
        together.state_dict().items(), alone.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- statistics


class Shared(nn.Module):
    """Two layers reading the same tensor (like q / k / v), then one reading another."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 3)
        self.c = nn.Linear(5, 4)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + 0.5) + self.b(x).sum(-1, keepdim=True)


def _targets(model):
    return [Target(name, module) for name, module in model.named_children()]


def _reference_stats(model, batch, sizes):
    """From the inputs each layer sees in ``model(batch)``, split back into the samples:
    sums of squares folded sample by sample; float64 sum of the per-sample float32 x^T x (each
    sample's product alone, as ``sample_products`` computes it; see test_oneshot_speed.py for
    its agreement with a plain x^T x)."""
    seen: dict[str, list] = {name: [] for name, _ in model.named_children()}
    handles = [
        module.register_forward_hook(
            lambda m, i, o, name=name, mod=module: seen[name].extend(
                input_rows(Target(name, mod), part).float() for part in i[0].split(list(sizes))
            )
        )
        for name, module in model.named_children()
    ]
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    out = {}
    for name, parts in seen.items():
        norm, hessian = None, None
        for rows in parts:
            sq = rows.pow(2).sum(0)
            norm = sq if norm is None else norm + sq
            p = sample_products(rows[None])
            hessian = p if hessian is None else hessian + p
        out[name] = (norm, mirror_lower_(hessian), sum(r.shape[0] for r in parts))
    return out


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (2, 2, 2), (1, 3, 2)])
def test_batched_statistics_equal_one_sample_at_a_time(sizes) -> None:
    torch.manual_seed(0)
    model = Shared().eval()
    batch = torch.cat([torch.randn(n, 7, 6) * 4 for n in sizes])
    expected = _reference_stats(model, batch, sizes)
    with torch.no_grad(), InputStats(_targets(model), {"norm", "hessian"}, True) as got:
        with samples_in_call(sizes):
            model(batch)
    for module_name, (norm, hessian, rows) in expected.items():
        name = Target(module_name, getattr(model, module_name)).name
        assert torch.equal(got.stats[name]["norm"], norm), name
        assert torch.equal(got.hessian_sums[name], hessian), name
        assert got.rows[name] == rows
        assert len(got.norm_parts[name]) == len(sizes)  # one part per sample, as ranks need
        expected_h = (hessian * (2.0 / rows)).float()
        assert torch.equal(got.stats[name]["hessian"], expected_h)


def test_batched_statistics_of_a_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    samples = [torch.randn(1, 3, 5, 5) for _ in range(3)]
    target = Target("conv", conv)
    with torch.no_grad(), InputStats([target], {"norm", "hessian"}) as one:
        for s in samples:
            conv(s)
    with torch.no_grad(), InputStats([target], {"norm", "hessian"}) as batched:
        with samples_in_call((1, 1, 1)):
            conv(torch.cat(samples))
    for key in ("norm", "hessian"):
        assert torch.equal(one.stats[target.name][key], batched.stats[target.name][key])


def test_a_tensor_changed_in_place_is_measured_again() -> None:
    layer_a, layer_b = nn.Linear(4, 2), nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with torch.no_grad(), InputStats([Target("a", layer_a), Target("b", layer_b)], {"norm"}) as s:
        layer_a(x)
        x.mul_(2)
        layer_b(x)
    assert torch.equal(s.stats["b.weight"]["norm"], x.pow(2).sum(0))
    assert torch.equal(s.stats["a.weight"]["norm"], (x / 2).pow(2).sum(0))


# ------------------------------------------------------------------------- sequential runner


class Block(nn.Module):
    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.mix = mix

    def forward(self, hidden, scale=None):
        out = torch.tanh(self.fc(hidden))
        if scale is not None:
            out = out * scale
        if self.mix:  # mixes samples along dim 0: stacking would change the outputs
            out = out - out.mean(0, keepdim=True)
        return (out,)


class Net(nn.Module):
    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([Block(mix) for _ in range(3)])

    def forward(self, x, scale=None):
        h = self.embed(x)
        for block in self.layers:
            h = block(h, scale)[0]
        return h


def _collect(model, data, batch_tokens, sparsity=0.5):
    """Norms seen by every block, pruning each block by magnitude after its statistics."""
    seen = {}
    calls = []

    def on_block(index, block, run):
        target = Target(f"layers.{index}.fc", block.fc)
        calls.append(index)
        with InputStats([target], {"norm", "hessian"}) as collected:
            run()
        seen[index] = collected.stats[target.name]
        keep = block.fc.weight.abs() > block.fc.weight.abs().median()
        apply_mask(block.fc, "weight", keep)

    run_sequential(model, model.layers, data, on_block, batch_tokens=batch_tokens)
    return seen


def _matmul_ignores_row_count() -> bool:
    """Whether this machine's float32 matrix product gives a row the same bits whatever the
    number of rows (true of this project's CI CPUs; an Intel Xeon with AMX, torch 2.11, gave
    15-row and 5-row products that differ in the last bits)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(15, 8, generator=g), torch.randn(8, 8, generator=g)
    return torch.equal(torch.nn.functional.linear(x, w)[:5], torch.nn.functional.linear(x[:5], w))


@pytest.mark.parametrize("mix", [False, True], ids=["stackable", "mixing-falls-back"])
def test_stacked_blocks_equal_one_sample_per_call(mix) -> None:
    torch.manual_seed(0)
    dense = Net(mix).eval()
    data = [torch.randn(1, 5, 4) for _ in range(7)]
    slow = _collect(copy.deepcopy(dense), data, batch_tokens=0)
    fast = _collect(copy.deepcopy(dense), data, batch_tokens=15)
    bitwise = _matmul_ignores_row_count()
    for index in slow:
        for key in ("norm", "hessian"):
            if bitwise or index == 0:  # block 0 sees the captured inputs themselves
                assert torch.equal(slow[index][key], fast[index][key]), (index, key)
            else:  # the earlier blocks' stacked outputs: equal up to float rounding
                torch.testing.assert_close(slow[index][key], fast[index][key], rtol=1e-5,
                                           atol=1e-6, msg=str((index, key)))  # fmt: skip


def test_chunks_split_where_arguments_differ_and_at_the_token_budget() -> None:
    x = torch.zeros(1, 4, 8)
    one, two = torch.ones(1), torch.full((1,), 2.0)
    inputs = [((x,), {"scale": one})] * 3 + [((x,), {"scale": two})] * 2 + [((x,), {})]
    assert plan_chunks(inputs, batch_tokens=8) == [[0, 1], [2], [3, 4], [5]]
    assert plan_chunks(inputs, batch_tokens=100) == [[0, 1, 2], [3, 4], [5]]
    assert plan_chunks(inputs, batch_tokens=0) == [[i] for i in range(6)]
    longer = torch.zeros(1, 5, 8)
    assert plan_chunks([((x,), {}), ((longer,), {})], 100) == [[0], [1]]


def test_per_sample_arguments_are_not_stacked_wrongly() -> None:
    torch.manual_seed(0)
    dense = Net().eval()
    data = [(torch.randn(1, 3, 4), torch.full((1,), float(i + 1))) for i in range(5)]
    slow = _collect(copy.deepcopy(dense), data, batch_tokens=0)
    fast = _collect(copy.deepcopy(dense), data, batch_tokens=1000)
    for index in slow:
        assert torch.equal(slow[index]["norm"], fast[index]["norm"])


def test_plain_weights_runs_raw_weights_and_restores_the_mask() -> None:
    torch.manual_seed(0)
    block = Block()
    keep = torch.rand(8, 8) > 0.5
    apply_mask(block.fc, "weight", keep)
    x = torch.randn(2, 8)
    masked_out = block(x)[0]
    with plain_weights(block):
        assert not is_masked(block.fc)
        assert torch.equal(block(x)[0], masked_out)
    assert is_masked(block.fc) and torch.equal(get_mask(block.fc), keep)
    with torch.no_grad():  # a raw value moved under the mask: the mask must stay in force
        block.fc._parameters["weight"][~keep] = 1.0
    with plain_weights(block):
        assert is_masked(block.fc)
        assert torch.equal(block(x)[0], masked_out)
    with pytest.raises(RuntimeError), plain_weights(block):
        raise RuntimeError("interrupted")
    assert is_masked(block.fc)


def test_magnitude_oneshot_runs_no_block_forward() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    calls = []
    for block in model.layers:
        block.register_forward_hook(lambda *a: calls.append(1))
    data = calibration([torch.randn(1, 3, 4) for _ in range(4)])
    report = oneshot(model, data, method="magnitude", sparsity=0.5, progress=False)
    assert calls == []
    assert [r.name for r in report.layers] == [
        "embed.weight",
        "layers.0.fc.weight",
        "layers.1.fc.weight",
    ]
    for block, original in zip(report.model.layers, model.layers, strict=True):
        w = block.fc._parameters["weight"].detach()
        keep = get_mask(block.fc)
        if keep is None:  # the last layer of the model is its head, left dense by default
            continue
        assert int((~keep).sum()) == 32
        assert w[~keep].abs().max() == 0
        dense = original.fc.weight.abs()
        assert dense[keep].min() >= dense[~keep].max()


def test_input_groups_and_owners_keep_layers_with_one_input_on_one_rank() -> None:
    """InputStats names the layers that read one tensor in every call; sparsegpt_owners gives
    each such group to one rank (costed as its stacked rows), every other layer on its own."""
    from prunekit.distributed.solve import assign, sparsegpt_cost, sparsegpt_owners

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(4, 2)
            self.sometimes = nn.Linear(6, 5)

        def forward(self, x: torch.Tensor, split: bool = False) -> torch.Tensor:
            h = self.a(x) + self.b(x).sum(-1, keepdim=True)
            # `sometimes` reads x in the first call and a copy of it in the second
            s = self.sometimes(x.clone() if split else x).sum(-1, keepdim=True)
            return self.c(h) + s

    net = Shared()
    targets = [Target(n, m, "weight") for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad(), InputStats(targets, {"hessian"}) as collected:
        net(torch.randn(3, 6))
        net(torch.randn(3, 6), split=True)
    assert collected.input_groups() == [
        ["a.weight", "b.weight"],
        ["c.weight"],
        ["sometimes.weight"],
    ]
    owners = sparsegpt_owners(targets, collected.input_groups(), world=2)
    assert owners["a.weight"] == owners["b.weight"]
    jobs = [sparsegpt_cost(7, 6), sparsegpt_cost(2, 4), sparsegpt_cost(5, 6)]
    expected = assign(jobs, world=2)
    assert [owners["a.weight"], owners["c.weight"], owners["sometimes.weight"]] == expected
    alone = sparsegpt_owners(targets, world=2)
    assert list(alone.values()) == assign([sparsegpt_cost(*t.weight().shape) for t in targets], 2)


def test_hf_calibration_runs_without_a_cache_and_stacks_samples() -> None:
    """A Hugging Face model calibrated on bare input-id tensors (not only on dicts) runs with
    use_cache=False: no per-sample cache reaches the blocks, so the samples stack into one
    block call; bare tensors and dicts of the same ids give the same pruned weights."""
    from conftest import tiny_llama
    from prunekit.calibrate.sequential import capture_block_inputs, find_blocks

    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 64, (1, 6), generator=gen) for _ in range(5)]
    _, blocks = find_blocks(model)
    for data in (ids, [{"input_ids": x} for x in ids]):
        inputs = capture_block_inputs(model, blocks, data)
        for _, kwargs in inputs:
            assert kwargs.get("past_key_values", kwargs.get("cache")) is None
        assert plan_chunks(inputs, batch_tokens=1000) == [[0, 1, 2, 3, 4]]
    calls = []
    hook = blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        bare = copy.deepcopy(model)
        oneshot(bare, ids, method="sparsegpt", sparsity=0.5, progress=False, inplace=True)
    finally:
        hook.remove()
    # the five samples' capture (one call each, through the model) and then stacked calls only
    assert len(calls) <= 5 + 3, len(calls)
    named = copy.deepcopy(model)
    data = [{"input_ids": x} for x in ids]
    oneshot(named, data, method="sparsegpt", sparsity=0.5, progress=False, inplace=True)
    for (name, a), b in zip(bare.state_dict().items(), named.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
