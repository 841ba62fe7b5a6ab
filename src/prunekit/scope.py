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


def lowest_k_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask (bool, flat) that removes exactly the ``k`` lowest of a flat score vector."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices] = False
    return keep


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
    per_row = torch.full((rows,), total // rows, dtype=torch.long, device=scores.device)
    per_row[: total - int(per_row.sum())] += 1
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
    return ranks >= per_row[:, None]


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
