"""The SparseGPT solver (``prunekit.calibrate.sparsegpt``) against the algorithm written out.

The reference below is the optimal-brain-surgeon sweep of Frantar & Alistarh, column by column
in float64 with no blocking and no lazy updates: each removed weight's error is spread at once
over every later column of its row through the upper Cholesky factor U of (H + damping)^-1; the
unstructured mask is chosen per block of columns (the ``round(total * end / cols)`` share of the
block, lowest ``w^2 / U_jj^2`` first, on the weights as updated so far) and the N:M mask per
group of M columns in each row. The solver's lazy, blocked float32 updates must give the same
mask and the same weights to float32 rounding. The other tests pin its contract: exact counts,
dead inputs, frozen entries, damping and its warning, failures, dtypes, inputs left alone and
the one-thread factorisation. This file is the fast test selection that ``make mutation`` runs
for the solver.
"""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch

from prunekit.calibrate import sparsegpt as sg
from prunekit.scope import lowest_k


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return torch.randn(n, cols, generator=g) @ mix  # correlated columns


def reference(weight, hessian, sparsity=0.5, nm=None, frozen=None, block_size=128, damp=0.01):
    """The solver written out (float64, unblocked updates). Returns (weight, keep, damp)."""
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])
    must = torch.zeros(rows, cols, dtype=torch.bool) if frozen is None else frozen.clone()
    for j in range(cols):
        if H[j, j] == 0:  # an input that never fires: its weights go first
            H[j, j] = 1.0
            W[:, j] = 0.0
            must[:, j] = True
    mean_diag = max(float(torch.diagonal(H).mean()), 1e-12)
    U = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(H + damp * mean_diag * torch.eye(cols))),
        upper=True,
    )
    total = min(rows * cols, round(sparsity * rows * cols))
    pruned = must.clone()
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        if nm is None:
            k = round(total * end / cols) - round(total * start / cols)
            sal = []
            for i in range(rows):
                for j in range(start, end):
                    s = float("-inf") if must[i, j] else float(W[i, j] ** 2 / U[j, j] ** 2)
                    sal.append((s, i, j))
            for _, i, j in sorted(sal)[:k]:
                pruned[i, j] = True
        for j in range(start, end):
            if nm is not None and (j - start) % nm[1] == 0:
                n, m = nm
                for i in range(rows):
                    group = []
                    for c in range(j, min(j + m, cols)):
                        s = float("-inf") if must[i, c] else float(W[i, c] ** 2 / U[c, c] ** 2)
                        group.append((s, c))
                    for _, c in sorted(group)[: m - n]:
                        pruned[i, c] = True
            for i in range(rows):
                if pruned[i, j]:
                    err = W[i, j] / U[j, j]
                    for c in range(j, cols):
                        W[i, c] -= err * U[j, c]
                    W[i, j] = 0.0
    W[pruned] = 0.0
    return W, ~pruned


def check(result, ref_w, ref_keep) -> None:
    assert torch.equal(result.keep, ref_keep)
    assert torch.allclose(result.weight.double(), ref_w, rtol=1e-4, atol=1e-5)
    assert torch.all(result.weight[~result.keep] == 0)


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    ("rows", "cols", "sparsity", "block_size"),
    [(6, 12, 0.5, 128), (5, 16, 0.375, 4), (4, 10, 0.7, 3), (3, 9, 0.25, 1)],
)
def test_unstructured_matches_the_written_out_sweep(rows, cols, sparsity, block_size) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols))
    h = hessian_of(inputs(64, cols, seed=rows))
    result = sg.sparsegpt_prune(w, h, sparsity, block_size=block_size)
    ref_w, ref_keep = reference(w, h, sparsity, block_size=block_size)
    check(result, ref_w, ref_keep)
    assert int((~result.keep).sum()) == round(sparsity * rows * cols)
    assert result.damp == 0.01


@pytest.mark.parametrize(
    ("nm", "block_size"), [((2, 4), 128), ((2, 4), 6), ((1, 3), 2), ((3, 4), 4)]
)
def test_n_m_matches_the_written_out_sweep(nm, block_size) -> None:
    n, m = nm
    cols = 4 * m
    w = torch.randn(5, cols, generator=torch.Generator().manual_seed(m))
    h = hessian_of(inputs(48, cols, seed=n))
    result = sg.sparsegpt_prune(w, h, 0.9, nm, block_size=block_size)  # sparsity is ignored
    ref_w, ref_keep = reference(w, h, nm=nm, block_size=block_size)
    check(result, ref_w, ref_keep)
    kept_per_group = result.keep.reshape(5, cols // m, m).sum(-1)
    assert torch.all(kept_per_group == n)  # N kept of every M consecutive inputs, in every row


def dead_and_frozen():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    x = inputs(40, 8, seed=2)
    x[:, [1, 6]] = 0.0  # two inputs that never fire
    frozen = torch.zeros(4, 8, dtype=torch.bool)
    frozen[0, 0] = frozen[2, 3] = frozen[3, 7] = True
    return w, hessian_of(x), frozen


def test_dead_inputs_and_frozen_entries_go_first() -> None:
    w, h, frozen = dead_and_frozen()
    result = sg.sparsegpt_prune(w, h, 0.5, frozen=frozen, block_size=4)
    ref_w, ref_keep = reference(w, h, 0.5, frozen=frozen, block_size=4)
    check(result, ref_w, ref_keep)
    assert not result.keep[:, [1, 6]].any() and not result.keep[frozen].any()
    # more must go than the sparsity asks for: all of them go, and nothing else
    result = sg.sparsegpt_prune(w, h, 0.0, frozen=frozen)
    expected = ~frozen
    expected[:, [1, 6]] = False
    assert torch.equal(result.keep, expected)
    result = sg.sparsegpt_prune(w, h, 0.0, (2, 4), frozen=frozen)  # N:M: frozen count in the M
    ref_w, ref_keep = reference(w, h, nm=(2, 4), frozen=frozen)
    check(result, ref_w, ref_keep)


def test_frozen_entries_beyond_a_blocks_share_are_compensated() -> None:
    # sparsity 0.25: the first block of 4 columns has a share of 4 but 6 entries that must go
    w, h, frozen = dead_and_frozen()
    result = sg.sparsegpt_prune(w, h, 0.25, frozen=frozen, block_size=4)
    ref_w, ref_keep = reference(w, h, 0.25, frozen=frozen, block_size=4)
    check(result, ref_w, ref_keep)


def test_zero_sparsity_keeps_everything_and_full_sparsity_removes_everything() -> None:
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    h = hessian_of(inputs(20, 6, seed=4))
    kept = sg.sparsegpt_prune(w, h, 0.0)
    assert kept.keep.all() and torch.allclose(kept.weight, w)
    gone = sg.sparsegpt_prune(w, h, 1.0)
    assert not gone.keep.any() and torch.equal(gone.weight, torch.zeros(3, 6))


@pytest.mark.parametrize(
    ("rows", "cols", "sparsity", "block_size", "sub_block", "damp"),
    [
        (4, 12, 0.5, 128, 5, 0.01),  # one block in sub-blocks of 5, 5 and 2 columns
        (3, 10, 0.6, 8, 3, 0.3),  # blocks of 8 and 2; sub-blocks 3, 3, 2 and 2
        (4, 9, 0.4, 4, 1, 0.01),  # one column per sub-block
        (3, 8, 0.5, 4, 4, 0.05),  # sub-block = block
        (3, 8, 0.5, 3, 7, 0.01),  # sub-block wider than the block: the plain column loop
    ],
)
def test_sub_blocks_match_the_written_out_sweep(
    rows, cols, sparsity, block_size, sub_block, damp
) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(10 + sub_block))
    h = hessian_of(inputs(48, cols, seed=cols))
    result = sg.sparsegpt_prune(
        w, h, sparsity, block_size=block_size, sub_block=sub_block, damp=damp
    )
    check(result, *reference(w, h, sparsity, block_size=block_size, damp=damp))
    assert result.damp == damp


@pytest.mark.parametrize(
    ("nm", "block_size", "sub_block"),
    [((1, 3), 128, 4), ((2, 4), 10, 5), ((2, 4), 128, 1), ((3, 4), 8, 6)],
)
def test_n_m_sub_blocks_hold_whole_groups(nm, block_size, sub_block) -> None:
    # sub_block (and block_size) are rounded down to a multiple of M: a group is chosen on
    # weights that have all of the sub-block's updates
    n, m = nm
    cols = 5 * m
    w = torch.randn(4, cols, generator=torch.Generator().manual_seed(20 + sub_block))
    h = hessian_of(inputs(48, cols, seed=m + sub_block))
    frozen = torch.zeros(4, cols, dtype=torch.bool)
    frozen[1, m + 1] = frozen[3, 2 * m] = True
    result = sg.sparsegpt_prune(
        w, h, 0.1, nm, frozen=frozen, block_size=block_size, sub_block=sub_block
    )
    check(result, *reference(w, h, nm=nm, frozen=frozen, block_size=block_size))
    assert torch.all(result.keep.reshape(4, 5, m).sum(-1) == n) and not result.keep[frozen].any()


def test_defaults_are_half_sparsity_blocks_of_128_and_sub_blocks_of_16() -> None:
    # 136 columns: a second column block of 8, where 128 and 129 choose different masks
    w = torch.randn(2, 136, generator=torch.Generator().manual_seed(30))
    h = hessian_of(inputs(160, 136, seed=31))
    explicit = sg.sparsegpt_prune(w, h, 0.5, None, block_size=128, sub_block=16, damp=0.01)
    default = sg.sparsegpt_prune(w, h)
    assert torch.equal(default.keep, explicit.keep) and torch.equal(default.weight, explicit.weight)
    assert int((~default.keep).sum()) == 136 and default.damp == 0.01
    other = sg.sparsegpt_prune(w, h, 0.5, block_size=129)
    assert not torch.equal(other.keep, explicit.keep)  # the block size matters on this layer


def test_deterministic_switches_the_one_thread_factorisation(monkeypatch) -> None:
    seen: list[tuple[str, bool]] = []
    real = sg.fixed_threads

    def spy(device: torch.device, enabled: bool = True):
        seen.append((device.type, enabled))
        return real(device, enabled)

    monkeypatch.setattr(sg, "fixed_threads", spy)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(40))
    h = hessian_of(inputs(32, 8, seed=41))
    ref_w, ref_keep = reference(w, h, 0.5)
    check(sg.sparsegpt_prune(w, h, 0.5), ref_w, ref_keep)
    assert seen == [("cpu", True)]
    seen.clear()
    check(sg.sparsegpt_prune(w, h, 0.5, deterministic=False), ref_w, ref_keep)
    assert seen == [("cpu", False)]


def test_a_dead_inputs_weights_reach_no_other_weight() -> None:
    # a zero diagonal marks an input as dead even where the caller left its off-diagonal
    # entries: its weights are zeroed before the sweep, so their values change nothing
    x = inputs(48, 6, seed=50)
    x[:, 2] *= 0.3
    h = hessian_of(x)
    h[2, 2] = 0.0
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(51))
    louder = w.clone()
    louder[:, 2] *= 5.0
    result = sg.sparsegpt_prune(w, h, 0.5, sub_block=2)
    check(result, *reference(w, h, 0.5))
    assert not result.keep[:, 2].any()
    again = sg.sparsegpt_prune(louder, h, 0.5, sub_block=2)
    assert torch.equal(again.keep, result.keep) and torch.equal(again.weight, result.weight)


# --------------------------------------------------------------------------- contract


def test_inputs_are_left_alone_and_the_dtype_is_kept() -> None:
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(5)).half()
    x = inputs(32, 8, seed=6)
    x[:, 2] = 0
    h = hessian_of(x)
    w0, h0 = w.clone(), h.clone()
    frozen = torch.zeros(4, 8, dtype=torch.uint8)
    frozen[1, 1] = 1
    result = sg.sparsegpt_prune(w, h.double(), 0.5, frozen=frozen)
    assert torch.equal(w, w0) and torch.equal(h, h0) and frozen.sum() == 1
    assert result.weight.dtype == torch.float16 and result.keep.dtype == torch.bool
    assert result.keep.shape == (4, 8) and not result.keep[1, 1] and not result.keep[:, 2].any()
    ref_w, ref_keep = reference(w.float(), h, 0.5, frozen=frozen.bool())
    assert torch.equal(result.keep, ref_keep)


def test_a_hessian_of_the_wrong_shape_is_refused() -> None:
    message = "fc1: Hessian shape (3, 3) does not match 4 inputs"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sg.sparsegpt_prune(torch.ones(2, 4), torch.eye(3), 0.5, name="fc1")
    with pytest.raises(ValueError, match=r"^layer: Hessian shape \(4, 2\) does not match 4"):
        sg.sparsegpt_prune(torch.ones(2, 4), torch.ones(4, 2), 0.5)


def test_damping_is_raised_tenfold_with_a_warning() -> None:
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))  # mean diagonal 0.625
    # -0.5 + f * 0.625 > 0 needs f > 0.8: 0.01 and 0.1 fail, 1.0 factorises
    with pytest.warns(UserWarning) as caught:
        result = sg.sparsegpt_prune(w, h, 0.5, name="mlp.up")
    (warning,) = caught
    assert warning.filename != sg.__file__  # attributed to a caller, not to the solver itself
    assert str(warning.message) == (
        "prunekit: SparseGPT raised the damping of mlp.up from 0.01 to 1 to factorise its Hessian"
    )
    assert result.damp == 1.0
    ref_w, ref_keep = reference(w, h, 0.5, damp=1.0)
    check(result, ref_w, ref_keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the first damping works
        assert sg.sparsegpt_prune(w, torch.eye(4), 0.5, damp=0.05).damp == 0.05
    factor, used = sg.inverse_hessian_factor(h, 0.9)  # 0.9 is already enough
    assert used == 0.9
    expected = torch.linalg.cholesky(torch.inverse(h + 0.9 * 0.625 * torch.eye(4)), upper=True)
    assert torch.allclose(factor, expected, rtol=1e-5)


def test_a_hessian_that_never_factorises_raises() -> None:
    h = torch.diag(torch.tensor([1.0, -100.0]))  # needs a damping fraction above 2
    message = "the Hessian of attn.q does not factorise even with damping 100"
    with pytest.raises(sg.SparseGPTFailure, match=f"^{re.escape(message)}$"):
        sg.sparsegpt_prune(torch.ones(2, 2), h, 0.5, name="attn.q", damp=0.01)
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))  # needs a fraction above 0.8
    with pytest.warns(UserWarning, match="from 0.0001 to 1 "):
        assert sg.inverse_hessian_factor(h, 0.0001)[1] == 1.0  # the fifth and last try
    with pytest.raises(sg.SparseGPTFailure, match="^the Hessian of layer does not factorise"):
        sg.inverse_hessian_factor(torch.diag(torch.tensor([1.0, -100.0])), 0.01)  # default name
    assert issubclass(sg.SparseGPTFailure, RuntimeError)


def test_non_finite_results_raise() -> None:
    w = torch.ones(2, 4)
    w[1, 2] = float("inf")
    with pytest.raises(sg.SparseGPTFailure, match=r"^l3: the SparseGPT update produced non-"):
        sg.sparsegpt_prune(w, torch.eye(4), 0.25, name="l3")
    nan_h = torch.full((4, 4), float("nan"))
    with pytest.raises(sg.SparseGPTFailure, match="does not factorise"):
        sg.sparsegpt_prune(torch.ones(2, 4), nan_h, 0.5)


def test_an_all_zero_hessian_prunes_every_input() -> None:
    result = sg.sparsegpt_prune(torch.ones(2, 3), torch.zeros(3, 3), 0.0)
    assert not result.keep.any() and torch.equal(result.weight, torch.zeros(2, 3))


def test_lowest() -> None:
    scores = torch.tensor([[3.0, -1.0, 2.0], [0.5, 7.0, float("-inf")]])
    assert not lowest_k(scores, 0).any()
    assert lowest_k(scores, 0).shape == (2, 3)
    assert lowest_k(scores, 2).tolist() == [[False, True, False], [False, False, True]]
    assert lowest_k(scores, 3).tolist() == [[False, True, False], [True, False, True]]


# --------------------------------------------------------------------------- one-thread factorisation


# Nothing here may run a parallel region on two threads when mutmut runs the tests: an OpenMP pool
# started in its parent process hangs every test process forked from it afterwards. The spies
# below record the thread count and then compute on one thread.
under_mutmut = pytest.mark.skipif("mutmut" in sys.modules, reason="forks after an OpenMP pool hang")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def thread_spy(monkeypatch):
    seen: list[int] = []

    def spying(fn):
        def spy(*args, **kwargs):
            seen.append(torch.get_num_threads())
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(before)

        return spy

    monkeypatch.setattr(torch.linalg, "cholesky", spying(torch.linalg.cholesky))
    monkeypatch.setattr(torch, "cholesky_inverse", spying(torch.cholesky_inverse))
    return seen


@pytest.mark.usefixtures("two_threads")
def test_fixed_threads_runs_on_one_thread_and_restores() -> None:
    with sg.fixed_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with sg.fixed_threads(torch.device("cpu"), enabled=False):
        assert torch.get_num_threads() == 2
    with sg.fixed_threads(torch.device("meta")):
        assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), sg.fixed_threads(torch.device("cpu")):
        raise KeyError("inside")
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with sg.fixed_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 1


@pytest.mark.usefixtures("two_threads")
def test_the_factorisation_runs_on_one_thread_unless_asked_not_to(thread_spy) -> None:
    h = hessian_of(inputs(16, 4, seed=0))
    sg.inverse_hessian_factor(h, 0.01)
    assert thread_spy == [1, 1, 1]  # cholesky, its inverse, the upper factor
    thread_spy.clear()
    sg.inverse_hessian_factor(h, 0.01, deterministic=False)
    assert thread_spy == [2, 2, 2]
    assert torch.get_num_threads() == 2


@under_mutmut
@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("deterministic", [True, False])
def test_sparsegpt_prune_passes_deterministic_on(deterministic: bool, thread_spy) -> None:
    h = hessian_of(inputs(16, 4, seed=0))
    sg.sparsegpt_prune(torch.ones(2, 4), h, 0.5, deterministic=deterministic)
    assert thread_spy == ([1, 1, 1] if deterministic else [2, 2, 2])
    assert torch.get_num_threads() == 2


# --------------------------------------------------------------------------- one sweep, several layers


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_shared_sweep_has_the_bits_of_separate_solves(nm) -> None:
    """Layers that read one input are swept together; each keeps its own count, frozen mask and
    the exact weights of a solve on its own (odd row counts, several blocks, two thread counts)."""
    x = inputs(800, 200, seed=7)
    x[:, 11] = 0.0  # a dead input
    h = hessian_of(x)
    gen = torch.Generator().manual_seed(8)
    weights = [torch.randn(rows, 200, generator=gen) for rows in (37, 5, 64)]
    weights[0][3, :50] = 0.0
    frozen = [w == 0 for w in weights]
    levels = [0.5, 0.7, 0.3]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            shared = sg.sparsegpt_prune_shared(weights, h, levels, nm, frozen=frozen, block_size=64)
            assert len(shared) == 3
            for w, f, s, got in zip(weights, frozen, levels, shared, strict=True):
                alone = sg.sparsegpt_prune(w, h, s, nm, frozen=f, block_size=64)
                assert got.weight.shape == w.shape
                assert torch.equal(got.weight, alone.weight)
                assert torch.equal(got.keep, alone.keep)
                if nm is None:
                    assert int((~got.keep).sum()) == sg.count_to_remove(s, w.numel())
    finally:
        torch.set_num_threads(before)
    one_level = sg.sparsegpt_prune_shared(weights[:2], h, 0.6, frozen=[None, frozen[1]])
    for w, got in zip(weights[:2], one_level, strict=True):
        assert torch.equal(got.weight, sg.sparsegpt_prune(w, h, 0.6).weight)


@pytest.mark.parametrize(
    "args, message",
    [
        (([],), "no weights to prune"),
        (
            ([torch.randn(4, 16), torch.randn(3, 7)],),
            r"\(out, 16\) matrices, got \[\(4, 16\), \(3, 7\)\]",
        ),
        (([torch.randn(4, 16), torch.randn(16)],), "matrices"),
        (([torch.randn(4, 16)] * 3, None, [0.5, 0.5]), "2 sparsities for 3 weights"),
        (([torch.randn(4, 16)] * 2, None, 0.5, None, [None]), "1 frozen masks for 2 weights"),
    ],
)
def test_shared_sweep_refuses_what_does_not_fit(args, message) -> None:
    h = hessian_of(inputs(64, 16, seed=1))
    weights, rest = args[0], list(args[1:])
    hessian = h if not rest or rest[0] is None else rest[0]
    extra = dict(zip(["sparsity", "nm", "frozen"], rest[1:], strict=False))
    with pytest.raises(ValueError, match=message):
        sg.sparsegpt_prune_shared(weights, hessian, **extra)
