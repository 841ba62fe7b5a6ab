"""Scope: who competes with whom when units are selected by count.

* ``local``: each layer loses ``round(sparsity * units)`` of its own units.
* ``row``: each output row of each layer loses the same share of its weights (Wanda's
  comparison group); row counts differ by at most one so the layer total is exact.
* ``global``: all layers in the pool compete in one ranking; ``round(sparsity * all units)`` go.
  Layers given their own sparsity through ``per_layer`` leave the pool and are local.

When raw scores are not comparable across layers, global ranking normalises each layer's scores
first (``normalize="mean"``: divide by the layer's mean score; ``"l2"``: by its L2 norm;
``"max"``: by its maximum; ``"none"``). ``"auto"`` picks ``"none"`` for criteria that declare
themselves comparable (magnitude, as in classic global magnitude pruning; Taylor, an estimate of
the loss change; random) and ``"mean"`` otherwise.

Scores of ``-inf`` mark units that are already zero: they are removed first and never revived.
"""

from __future__ import annotations

import torch

SCOPES = ("local", "global", "row")
NORMALIZATIONS = ("auto", "none", "mean", "l2", "max")


def normalize_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Divide a layer's finite scores by their mean, L2 norm or max (``-inf`` stays ``-inf``)."""
    if how == "none":
        return scores
    finite = scores[torch.isfinite(scores)]
    if finite.numel() == 0:
        return scores
    if how == "mean":
        scale = finite.abs().mean()
    elif how == "l2":
        scale = finite.norm()
    elif how == "max":
        scale = finite.abs().max()
    else:
        raise ValueError(f"unknown normalize {how!r}; accepted: {', '.join(NORMALIZATIONS)}")
    return scores / scale if scale > 0 else scores


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of ``scores``) of exactly the ``k`` lowest scores; equal scores at the
    cut go in index order (row-major), lowest index first.

    A k-th value threshold (a selection, linear time) rather than a sort or a top-k, which are
    several times slower for the large ``k`` that pruning asks; NaN scores count as highest.

    Example:
        >>> lowest_k(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist()
        [False, True, False, True]
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    cut = torch.kthvalue(flat, k).values
    if torch.isnan(cut):  # fewer than k numbers: NaNs sort last, so take them in index order
        order = torch.argsort(flat, stable=True)
        chosen = torch.zeros(n, dtype=torch.bool, device=flat.device)
        chosen[order[:k]] = True
        return chosen.reshape(scores.shape)
    below = flat < cut
    ties = flat == cut
    need = k - int(below.sum())
    return (below | (ties & (torch.cumsum(ties, 0) <= need))).reshape(scores.shape)


def lowest_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores of every row of a 2-D ``scores`` (equal scores at a
    row's cut in column order); the row-wise :func:`lowest_k`.

    Example:
        >>> lowest_k_per_row(torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 0.0]]), 1).tolist()
        [[False, True, False], [True, False, False]]
    """
    rows, cols = scores.shape
    if k <= 0 or rows == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    cut = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    if torch.isnan(cut).any():  # a row with fewer than k numbers: sort those rows
        order = torch.argsort(scores, dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
        return ranks < k
    below = scores < cut
    ties = scores == cut
    need = k - below.sum(1, keepdim=True)
    return below | (ties & (torch.cumsum(ties, 1) <= need))


def lowest_k_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask (bool, flat) that removes exactly the ``k`` lowest of a flat score vector."""
    return ~lowest_k(scores.reshape(-1), k)


def count_to_remove(sparsity: float, units: int) -> int:
    """How many of ``units`` a sparsity removes (rounded to the nearest unit)."""
    return min(units, int(round(sparsity * units)))


def select_local(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One layer on its own."""
    return lowest_k_keep(scores, count_to_remove(sparsity, scores.numel()))


def select_global(unit_scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """All layers in one ranking; returns one flat keep-mask per layer."""
    if not unit_scores:
        return []
    flat = torch.cat([s.reshape(-1).float().cpu() for s in unit_scores])
    keep = lowest_k_keep(flat, count_to_remove(sparsity, flat.numel()))
    out, start = [], 0
    for s in unit_scores:
        out.append(keep[start : start + s.numel()].to(s.device))
        start += s.numel()
    return out


def select_rows(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of an (out, in) score matrix removing the lowest scores of every row.

    The layer loses exactly ``round(sparsity * out * in)`` weights: every row loses
    ``floor`` of its share, and the first rows one more.
    """
    rows, cols = scores.shape
    total = count_to_remove(sparsity, rows * cols)
    base, extra = divmod(total, rows)
    prune = torch.empty_like(scores, dtype=torch.bool)
    prune[:extra] = lowest_k_per_row(scores[:extra], base + 1)
    prune[extra:] = lowest_k_per_row(scores[extra:], base)
    return ~prune


def owl_allocation(
    outlier_ratios: list[float], sizes: list[int], sparsity: float, lam: float = 0.08
) -> list[float]:
    """OWL: layers (or blocks) with more outliers keep more weights.

    From "Outlier Weighed Layerwise Sparsity" (Yin et al., 2024): each unit's sparsity is the
    target minus its centred outlier ratio, scaled so the largest deviation is ``lam``. So every
    sparsity lies within ``sparsity +- lam``, and the average weighted by ``sizes`` (weights per
    unit) equals ``sparsity`` exactly. Equal ratios give the uniform allocation.

    Example:
        >>> owl_allocation([0.01, 0.03], [100, 100], 0.5, lam=0.1)
        [0.6, 0.4]
    """
    if len(outlier_ratios) != len(sizes) or not sizes:
        raise ValueError("owl_allocation needs one outlier ratio per size, and at least one")
    if not 0 < lam < min(sparsity, 1 - sparsity) + 1e-12:
        raise ValueError(
            f"owl lambda must be in (0, min(sparsity, 1 - sparsity)] = (0, "
            f"{min(sparsity, 1 - sparsity):g}] so every layer stays in [0, 1); got {lam!r}"
        )
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    weights = torch.tensor(sizes, dtype=torch.float64)
    deviation = ratios - (ratios * weights).sum() / weights.sum()
    largest = deviation.abs().max()
    if largest <= 1e-12 * ratios.abs().max():  # equal ratios (the mean rounds: not exactly 0)
        return [sparsity] * len(sizes)
    return (sparsity - deviation * (lam / largest)).tolist()
