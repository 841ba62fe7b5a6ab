"""Random: uniform scores from the call's seeded generator (a baseline; reproducible by seed)."""

from __future__ import annotations

import torch

from prunekit.scores.base import Criterion, LayerContext, register


def random_score(layer: LayerContext) -> torch.Tensor:
    """Uniform [0, 1) scores drawn from the seeded generator."""
    return torch.rand(layer.weight.shape, generator=layer.generator, dtype=torch.float32)


register(Criterion("random", random_score))
