"""Wanda: |W| times the L2 norm of each input feature over the calibration tokens.

From "A Simple and Effective Pruning Approach for Large Language Models" (Sun et al., 2023):
score_ij = |W_ij| * ||X_j||_2, compared within each output row (``scope="row"``, the default of
``prunekit.oneshot``) for unstructured sparsity and within each group for N:M. Needs calibration
data but no loss and no gradient. Scores of different layers are not on one scale, so a global
ranking normalises them per layer.
"""

from __future__ import annotations

import torch

from prunekit.calibrate.stats import collect_input_stats
from prunekit.scores.base import Criterion, LayerContext, register


def wanda_score(layer: LayerContext) -> torch.Tensor:
    """|W| * ||X_j|| with the input norms broadcast along the (out, in) view of the weight."""
    target = layer.target
    norms = layer.stats["norm"].to(layer.weight.device).sqrt()
    matrix = target.as_matrix(layer.weight.abs().float()) * norms[None, :]
    return target.from_matrix(matrix, layer.weight.shape)


def collect_wanda(model, targets, *, data, loss_fn=None, max_batches=None, progress=True):
    """Input norms of every target over ``data``."""
    return collect_input_stats(model, targets, data, {"norm"}, max_batches, progress)


register(Criterion("wanda", wanda_score, comparable_across_layers=False, collect=collect_wanda))
