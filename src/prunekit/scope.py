"""Scope: who competes with whom when units are selected by count.

* ``local``: each layer loses ``round(sparsity * units)`` of its own units.
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

SCOPES = ("local", "global")
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
