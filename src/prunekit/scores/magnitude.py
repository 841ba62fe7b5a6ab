"""Magnitude: |w|. The classic criterion; needs no data."""

from __future__ import annotations

import torch

from prunekit.scores.base import Criterion, LayerContext, register


def magnitude_score(layer: LayerContext) -> torch.Tensor:
    """Absolute value of each weight."""
    return layer.weight.abs().float()


register(Criterion("magnitude", magnitude_score))
