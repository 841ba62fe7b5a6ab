"""Analysis: choose the ratios.

* :func:`sensitivity` prunes one layer at a time at several sparsities and records the damage
  (divergence from the dense outputs, a user metric, or, block by block for large models, the
  relative reconstruction error of each layer's output);
* :func:`allocate` turns the curves into per-layer sparsities that minimise the predicted damage
  under an exact budget (non-zeros, MACs, bytes or any per-weight cost);
* :func:`structured_sensitivity` / :func:`allocate_widths` do the same for structured pruning
  (per-group head / neuron / channel widths under a MAC budget);
* :func:`prune_to_floor` finds the most compressed model whose quality stays above a floor.

``prunekit analyze`` (see :mod:`prunekit.analysis.cli`) runs them from the command line.
"""

from prunekit.analysis.allocate import Allocation, allocate, load_per_layer
from prunekit.analysis.search import FloorPoint, FloorSearchReport, prune_to_floor
from prunekit.analysis.sensitivity import SensitivityResult, allocate_by_sensitivity, sensitivity
from prunekit.analysis.structured_sensitivity import (
    StructuredSensitivity,
    allocate_widths,
    structured_sensitivity,
)

__all__ = [
    "Allocation",
    "FloorPoint",
    "FloorSearchReport",
    "SensitivityResult",
    "StructuredSensitivity",
    "allocate",
    "allocate_by_sensitivity",
    "allocate_widths",
    "load_per_layer",
    "prune_to_floor",
    "sensitivity",
    "structured_sensitivity",
]
