"""The one-shot runner's speed paths give the results of the plain paths.

* the default chunk of stacked samples (by bytes of hidden states on a CPU);
* SparseGPT's per-sample Hessian products in column blocks, above the diagonal only;
* ``run(until=...)``: a statistics pass stops each block call once the layers it measures have
  their inputs, with the statistics, the propagated outputs and ``oneshot``'s masks and weights
  unchanged, and never stops a block whose layers do not run exactly once per call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_llama as _tiny_llama
from prunekit.calibrate import calibration, sequential
from prunekit.calibrate.oneshot import oneshot
from prunekit.calibrate.sequential import (
    BATCH_TOKENS,
    CPU_BATCH_BYTES,
    default_batch_tokens,
    run_sequential,
)
from prunekit.calibrate.stats import (
    InputStats,
    mirror_lower_,
    sample_products,
    samples_in_call,
)
from prunekit.masks import get_mask
from prunekit.targets import Target


def tiny_llama() -> nn.Module:
    return _tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _samples(n: int = 6, tokens: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 64, (1, tokens), generator=g)} for _ in range(n)]


def test_default_chunk_holds_a_fixed_number_of_bytes_on_a_cpu() -> None:
    x = torch.zeros(1, 16, 256)
    assert default_batch_tokens([((x,), {})], "cpu") == CPU_BATCH_BYTES // (256 * 4)
    assert default_batch_tokens([((x.double(),), {})], None) == CPU_BATCH_BYTES // (256 * 8)
    wide = torch.zeros(1, 2, CPU_BATCH_BYTES)  # one row over the budget: one token at least
    assert default_batch_tokens([((wide,), {})], "cpu") == 1
    assert default_batch_tokens([((), {"hidden_states": x})], "cuda") == BATCH_TOKENS
    block = nn.Linear(256, 256)
    assert default_batch_tokens([((x,), {})], None, block) == 1024


def _stats_per_block(model, data, names, until: bool, batch_tokens: int = 16):
    """Statistics of the layers ``names`` of every block (dense propagation), and how often
    each block's ``mlp.down_proj`` ran."""
    seen, calls = {}, {}
    blocks = model.model.layers
    for i, block in enumerate(blocks):
        block.mlp.down_proj.register_forward_hook(
            lambda *a, i=i: calls.__setitem__(i, calls.get(i, 0) + 1)
        )

    def on_block(index, block, run):
        targets = [Target(f"{index}.{n}", block.get_submodule(n)) for n in names]
        with InputStats(targets, {"norm", "hessian"}) as collected:
            run([t.module for t in targets] if until else None)
        seen[index] = collected.stats

    run_sequential(model, blocks, data, on_block, propagate="pruned", batch_tokens=batch_tokens)
    return seen, calls


def test_run_until_stops_after_the_measured_layers_with_the_same_statistics() -> None:
    model = tiny_llama()
    data = _samples()
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    full, full_calls = _stats_per_block(copy.deepcopy(model), data, names, until=False)
    fast, fast_calls = _stats_per_block(copy.deepcopy(model), data, names, until=True)
    for index in full:
        for name, entry in full[index].items():
            for key in ("norm", "hessian"):
                assert torch.equal(entry[key], fast[index][name][key]), (index, name, key)
    # 3 chunks of 2 samples; the first whole (it arms the stop), the next two stop after o_proj;
    # the runner's own propagation run adds one call per chunk, except after the last block,
    # and its check of stacking (2 samples stacked, then one by one) three on the first block
    assert full_calls == {0: 3 + 3 + 3, 1: 3}
    assert fast_calls == {0: 3 + 1 + 3, 1: 1}


class Twice(nn.Module):
    """A block whose first layer runs twice per call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        return (self.out(self.fc(torch.tanh(self.fc(x)))),)


class TwiceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Twice(), Twice()])

    def forward(self, x):
        for block in self.layers:
            x = block(x)[0]
        return x


def test_run_until_never_stops_a_block_whose_layer_runs_twice() -> None:
    torch.manual_seed(0)
    model = TwiceNet().eval()
    data = [torch.randn(1, 3, 4) for _ in range(4)]
    outs = []

    def on_block(index, block, run):
        target = Target(f"{index}.fc", block.fc)
        handle = block.out.register_forward_hook(lambda *a: outs.append(index))
        with InputStats([target], {"norm"}) as until_stats:
            run([block.fc])
        with InputStats([target], {"norm"}) as full_stats:
            run()
        handle.remove()
        assert torch.equal(
            until_stats.stats[target.name]["norm"], full_stats.stats[target.name]["norm"]
        )
        assert until_stats.rows[target.name] == 2 * 4 * 3  # both calls of fc, every sample

    run_sequential(model, model.layers, data, on_block, batch_tokens=6)
    # two chunks per run, two runs per block, none stopped early (the stacking check and the
    # propagation run happen outside on_block)
    assert outs == [0] * 4 + [1] * 4


@pytest.mark.parametrize(
    "method, propagate, pattern",
    [
        ("sparsegpt", "pruned", "unstructured"),
        ("sparsegpt", "pruned", "2:4"),
        ("wanda", "pruned", "unstructured"),
        ("wanda", "dense", "unstructured"),
    ],
)
def test_oneshot_with_early_stops_equals_oneshot_without(
    monkeypatch, method, propagate, pattern
) -> None:
    model = tiny_llama()
    calib = calibration(
        torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0)),
        n_samples=12,
        seq_len=16,
    )
    stopped = []
    original = sequential._UntilEntered.call

    def counting(self, *args):
        original(self, *args)
        stopped.append(self.armed)

    monkeypatch.setattr(sequential._UntilEntered, "call", counting)
    kwargs = dict(method=method, pattern=pattern, propagate=propagate, progress=False)
    fast = oneshot(copy.deepcopy(model), calib, **kwargs).model
    assert any(stopped)  # the early stop was in use
    monkeypatch.setattr(sequential._UntilEntered, "_hook", lambda self, module, args: None)
    slow = oneshot(copy.deepcopy(model), calib, **kwargs).model
    masked = 0
    for (name, a), b in zip(fast.named_modules(), slow.modules(), strict=True):
        if isinstance(a, nn.Linear) and get_mask(a) is not None:
            masked += 1
            assert torch.equal(get_mask(a), get_mask(b)), name
            assert torch.equal(a._parameters["weight"], b._parameters["weight"]), name
    assert masked == 14  # every projection of both blocks


# --------------------------------------------------------------------------- Hessian products


def test_blocked_sample_products_are_x_transpose_x() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, 230, generator=g) * torch.rand(230, generator=g) * 3
    total = mirror_lower_(sample_products(x))  # 230 columns: blocks of 96, 96 and 38
    exact = sum(p.double().t() @ p.double() for p in x)
    assert torch.equal(total, total.t())
    assert torch.allclose(total, exact, rtol=1e-5, atol=1e-4 * float(exact.abs().max()))
    # a sample's product does not depend on the samples computed with it (exact float64 sums)
    alone = sum(sample_products(p[None]) for p in x)
    assert torch.equal(mirror_lower_(alone), total)


def test_statistics_of_a_wide_layer_batched_equal_one_sample_at_a_time() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(200, 3)
    target = Target("wide", layer)
    samples = [torch.randn(1, 6, 200) * 2 for _ in range(4)]
    with torch.no_grad(), InputStats([target], {"hessian"}, keep_parts=True) as one:
        for s in samples:
            layer(s)
    with torch.no_grad(), InputStats([target], {"hessian"}, keep_parts=True) as batched:
        with samples_in_call((1, 1, 1, 1)):
            layer(torch.cat(samples))
    assert torch.equal(one.hessian_sums[target.name], batched.hessian_sums[target.name])
    h = batched.stats[target.name]["hessian"]
    rows = torch.cat(samples).reshape(-1, 200).double()
    expected = (2 * rows.t() @ rows / rows.shape[0]).float()
    assert torch.equal(h, h.t())
    assert torch.allclose(h, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
