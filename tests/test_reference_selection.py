"""Patterns and scopes (``prunekit.patterns``, ``prunekit.scope``) against plain references.

How scores become masks, checked unit by unit against loops written here: N:M keeps the N
highest of every M, block tiles are pooled by their L2 norm (their sum when scores are signed),
global scope ranks every unit of every layer together, row scope gives every row its share,
normalisations divide by what they say, and OWL moves each layer by its centred outlier ratio.
These are the functions ``prune``, ``oneshot`` and the train-time pruner all go through.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prunekit import patterns, scope
from prunekit.patterns import NM, Block, Unstructured, parse_pattern


def distinct_scores(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return (torch.randperm(n, generator=g).float() + 1).reshape(shape) / n


def lowest_set(values: list[float], k: int) -> set[int]:
    return set(sorted(range(len(values)), key=lambda i: values[i])[:k])


# --------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (3, 8), (1, 3)])
def test_n_m_keeps_the_n_highest_of_every_m(n: int, m: int) -> None:
    scores = distinct_scores(5, 4 * m)
    keep = NM(n, m).keep_mask(scores)
    for r, start in itertools.product(range(5), range(0, 4 * m, m)):
        group = scores[r, start : start + m].tolist()
        best = set(sorted(range(m), key=lambda i: -group[i])[:n])
        assert {i for i in range(m) if keep[r, start + i]} == best
    assert NM(n, m).sparsity == pytest.approx(1 - n / m)


def reference_tile_scores(scores: torch.Tensor, r: int, c: int) -> list[float]:
    out_f, in_f = scores.shape
    signed = bool((torch.where(torch.isneginf(scores), 0.0, scores) < 0).any())
    tiles = []
    for i, j in itertools.product(range(0, out_f, r), range(0, in_f, c)):  # row-major tiles
        tile = [float(scores[a, b]) for a in range(i, i + r) for b in range(j, j + c)]
        if all(v == float("-inf") for v in tile):
            tiles.append(float("-inf"))
            continue
        finite = [0.0 if v == float("-inf") else v for v in tile]
        tiles.append(sum(finite) if signed else math.sqrt(sum(v * v for v in finite)))
    return tiles


@pytest.mark.parametrize("signed", [False, True])
def test_block_tiles_pool_by_norm_or_signed_sum(signed: bool) -> None:
    block = Block(2, 3)
    scores = distinct_scores(4, 9)
    if signed:
        scores = scores - 0.5
    scores[0:2, 0:3] = float("-inf")  # a dead tile
    scores[2, 4] = float("-inf")  # a zero inside a live tile
    got = block.unit_scores(scores).tolist()
    assert got == pytest.approx(reference_tile_scores(scores, 2, 3))
    assert got[0] == float("-inf")
    # expand: a unit's keep flag covers exactly its r x c tile
    keep = torch.tensor([(k % 2) == 0 for k in range(6)])
    mask = block.expand(keep, (4, 9))
    for a, b in itertools.product(range(4), range(9)):
        assert bool(mask[a, b]) == bool(keep[(a // 2) * 3 + b // 3])


def test_unstructured_units_are_the_weights_in_row_major_order() -> None:
    scores = distinct_scores(3, 4)
    p = Unstructured()
    assert torch.equal(p.unit_scores(scores), scores.reshape(-1))
    keep = torch.arange(12) % 3 == 0
    assert torch.equal(p.expand(keep, (3, 4)), keep.reshape(3, 4))
    assert p.unit_size == 1 and Block(2, 5).unit_size == 10 and p.selects_by_count


@pytest.mark.parametrize(
    "pattern, shape, reason",
    [
        (Unstructured(), (0, 4), "the weight is empty (shape 0x4)"),
        (NM(2, 4), (3, 0), "the weight is empty (shape 3x0)"),
        (NM(2, 4), (3, 6), "input size 6 is not a multiple of M=4"),
        (Block(2, 2), (3, 4), "shape 3x4 is not divisible into 2x2 blocks"),
        (Block(2, 2), (4, 3), "shape 4x3 is not divisible into 2x2 blocks"),
        (Block(2, 2), (0, 4), "the weight is empty (shape 0x4)"),
    ],
)
def test_skip_reasons(pattern, shape, reason) -> None:
    assert pattern.skip_reason(shape) == reason


@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4), NM(1, 2), Block(4, 4), Block(1, 8)])
def test_fitting_shapes_have_no_skip_reason(pattern) -> None:
    assert pattern.skip_reason((8, 16)) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("unstructured", Unstructured()),
        (" Element ", Unstructured()),
        ("2:4", NM(2, 4)),
        (" 4 : 8 ", NM(4, 8)),
        ("block:4x4", Block(4, 4)),
        ("BLOCK : 2 x 16", Block(2, 16)),
    ],
)
def test_parse_pattern(text: str, expected) -> None:
    assert parse_pattern(text) == expected
    assert parse_pattern(expected) is expected
    assert str(expected) in ("unstructured", "2:4", "4:8", "block:4x4", "block:2x16")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("4:4", "needs 1 <= N < M"),
        ("0:4", "needs 1 <= N < M"),
        ("block:0x4", "needs R, C >= 1"),
        ("block:4x0", "needs R, C >= 1"),
        ("2:4:8", "unknown pattern '2:4:8'"),
        ("blocks:4x4", "unknown pattern"),
        (24, "pattern must be a string"),
    ],
)
def test_bad_patterns_say_what_is_accepted(bad, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_pattern(bad)
    assert patterns.ACCEPTED in str(err.value)


def test_pattern_names() -> None:
    assert [str(p) for p in (Unstructured(), NM(2, 4), Block(2, 3))] == [
        "unstructured",
        "2:4",
        "block:2x3",
    ]


# --------------------------------------------------------------------------- scope


@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_lowest_k_keep_and_local(k: int) -> None:
    scores = distinct_scores(12, seed=k)
    keep = scope.lowest_k_keep(scores, k)
    assert keep.dtype == torch.bool and keep.shape == (12,)
    assert {i for i in range(12) if not keep[i]} == lowest_set(scores.tolist(), k)
    local = scope.select_local(scores, k / 12)
    assert torch.equal(local, keep)


@pytest.mark.parametrize(
    "sparsity, units, expected", [(0.5, 7, 4), (0.25, 10, 2), (0.3, 10, 3), (0.999, 3, 3)]
)
def test_count_to_remove_rounds_to_the_nearest_unit(sparsity, units, expected) -> None:
    assert scope.count_to_remove(sparsity, units) == expected
    assert scope.count_to_remove(1.2, 5) == 5  # never more than there are


def test_global_scope_ranks_every_unit_of_every_layer_together() -> None:
    layers = [
        distinct_scores(7, seed=1) * 3,
        distinct_scores(5, seed=2),
        distinct_scores(9, seed=3),
    ]
    flat = [float(v) for layer in layers for v in layer]
    keeps = scope.select_global(layers, 0.4)
    got = {i for i, kept in enumerate(torch.cat(keeps).tolist()) if not kept}
    assert got == lowest_set(flat, round(0.4 * 21))
    assert [k.shape[0] for k in keeps] == [7, 5, 9]
    assert scope.select_global([], 0.5) == []


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.1, 0.75])
def test_row_scope_gives_every_row_its_share(sparsity: float) -> None:
    rows, cols = 5, 7
    scores = distinct_scores(rows, cols, seed=4)
    keep = scope.select_rows(scores, sparsity)
    total = round(sparsity * rows * cols)
    for r in range(rows):
        count = total // rows + (1 if r < total % rows else 0)  # the first rows one more
        removed = {c for c in range(cols) if not keep[r, c]}
        assert removed == lowest_set(scores[r].tolist(), count), (r, count)


def test_row_scope_ties_break_by_column() -> None:
    keep = scope.select_rows(torch.zeros(2, 4), 0.5)
    assert keep.tolist() == [[False, False, True, True]] * 2
    # wide rows of many ties (an unstable sort reorders ties from 64 columns on)
    scores = torch.randint(0, 3, (3, 200), generator=torch.Generator().manual_seed(0)).float()
    keep = scope.select_rows(scores, 0.4)
    for r in range(3):
        by_score_then_column = sorted(range(200), key=lambda c: (float(scores[r, c]), c))
        assert {c for c in range(200) if not keep[r, c]} == set(by_score_then_column[:80])


def by_score_then_index(values: list[float], k: int) -> set[int]:
    """The k lowest of ``values``, equal values lowest index first; NaN above everything."""
    key = [(1, 0.0, i) if math.isnan(v) else (0, v, i) for i, v in enumerate(values)]
    return {i for _, _, i in sorted(key)[:k]}


@pytest.mark.parametrize("k", [0, 1, 37, 100, 199, 200])
def test_lowest_k_takes_ties_in_index_order(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (200,), generator=gen).float()
    scores[::17] = float("-inf")
    got = scope.lowest_k(scores, k)
    assert got.dtype == torch.bool and got.shape == (200,)
    assert {i for i in range(200) if got[i]} == by_score_then_index(scores.tolist(), k)
    matrix = scores.reshape(8, 25)  # flat order is row-major
    assert torch.equal(scope.lowest_k(matrix, k), got.reshape(8, 25))


def test_lowest_k_with_nan_scores_takes_them_last() -> None:
    scores = torch.tensor([2.0, float("nan"), 1.0, float("nan"), 0.0])
    for k in range(6):
        got = scope.lowest_k(scores, k)
        assert {i for i in range(5) if got[i]} == by_score_then_index(scores.tolist(), k), k
    # many NaNs and ties: the cut falls among the NaNs, taken in index order
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (300,), generator=gen).float()
    scores[torch.randperm(300, generator=gen)[:120]] = float("nan")
    for k in (150, 181, 299):
        got = scope.lowest_k(scores, k)
        assert got.dtype == torch.bool and got.shape == (300,)
        assert {i for i in range(300) if got[i]} == by_score_then_index(scores.tolist(), k), k


@pytest.mark.parametrize("k", [0, 1, 9, 30, 31])
@pytest.mark.parametrize("nans", [1, 25])
def test_lowest_k_per_row_against_a_sort(k: int, nans: int) -> None:
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 5, (6, 31), generator=gen).float()
    scores[1] = torch.randn(31, generator=gen)
    # NaNs in row 2: with 25 of them, a cut beyond the 6 numbers takes the sorting path
    scores[2, torch.randperm(31, generator=gen)[:nans]] = float("nan")
    got = scope.lowest_k_per_row(scores, k)
    assert got.dtype == torch.bool and got.shape == (6, 31)
    for r in range(6):
        chosen = {c for c in range(31) if got[r, c]}
        assert chosen == by_score_then_index(scores[r].tolist(), k), (r, k)


@pytest.mark.parametrize("how", ["none", "mean", "l2", "max"])
def test_normalize_divides_by_what_it_says(how: str) -> None:
    values = [0.5, -2.0, 3.0, 1.5]
    scores = torch.tensor([*values, float("-inf")])
    divisor = {
        "none": 1.0,
        "mean": sum(abs(v) for v in values) / len(values),
        "l2": math.sqrt(sum(v * v for v in values)),
        "max": max(abs(v) for v in values),
    }[how]
    got = scope.normalize_scores(scores, how)
    assert got[:4].tolist() == pytest.approx([v / divisor for v in values])
    assert got[4] == float("-inf")


def test_normalize_edge_cases() -> None:
    dead = torch.full((3,), float("-inf"))
    assert torch.equal(scope.normalize_scores(dead, "mean"), dead)
    one = torch.tensor([float("-inf"), -4.0, float("-inf")])  # a single finite score
    for how in ("mean", "l2", "max"):
        assert scope.normalize_scores(one, how).tolist() == [float("-inf"), -1.0, float("-inf")]
    zeros = torch.zeros(3)
    assert torch.equal(scope.normalize_scores(zeros, "l2"), zeros)  # no division by zero
    with pytest.raises(ValueError, match="unknown normalize 'sum'; accepted: auto, none"):
        scope.normalize_scores(torch.ones(2), "sum")


def test_owl_allocation_follows_the_centred_outlier_ratios() -> None:
    ratios, sizes, target, lam = [0.01, 0.05, 0.02, 0.04], [100, 300, 200, 400], 0.6, 0.1
    got = scope.owl_allocation(ratios, sizes, target, lam)
    mean = sum(r * s for r, s in zip(ratios, sizes, strict=True)) / sum(sizes)
    deviations = [r - mean for r in ratios]
    largest = max(abs(d) for d in deviations)
    assert got == pytest.approx([target - d * lam / largest for d in deviations])
    # computed in float64: the weighted average is the target to 1e-12, not float32's 1e-7
    average = sum(g * s for g, s in zip(got, sizes, strict=True)) / sum(sizes)
    assert average == pytest.approx(target, rel=0, abs=1e-12)
    assert max(abs(g - target) for g in got) == pytest.approx(lam)
    # equal ratios: uniform (their weighted mean is not exactly 0.2 in floating point)
    assert scope.owl_allocation([0.2, 0.2], [5, 7], 0.5, 0.1) == [0.5, 0.5]
    assert scope.owl_allocation([0.0, 0.0], [5, 7], 0.5, 0.1) == [0.5, 0.5]
    # tiny ratios that differ still move the layers (the tolerance is relative)
    assert scope.owl_allocation([1e-13, 3e-13], [1, 1], 0.5, 0.1) == pytest.approx([0.6, 0.4])
    # lambda defaults to 0.08
    assert scope.owl_allocation([0.01, 0.03], [1, 1], 0.5) == pytest.approx([0.58, 0.42])


@pytest.mark.parametrize(
    "args, message",
    [
        (([0.1], [1, 2], 0.5, 0.1), "^owl_allocation needs one outlier ratio per size"),
        (([], [], 0.5, 0.1), "^owl_allocation needs one outlier ratio per size, and at least one$"),
        (([0.1, 0.2], [1, 2], 0.5, 0.0), r"owl lambda must be in \(0, min"),
        (([0.1, 0.2], [1, 2], 0.9, 0.2), r"\(0, 0.1\]"),
        (([0.1, 0.2], [1, 2], 0.2, 0.25), r"\(0, 0.2\]"),
    ],
)
def test_owl_refuses_bad_arguments(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scope.owl_allocation(*args)


def test_owl_lambda_may_equal_the_bound() -> None:
    got = scope.owl_allocation([0.0, 1.0], [1, 1], 0.9, 0.1)
    assert got == pytest.approx([1.0, 0.8])
