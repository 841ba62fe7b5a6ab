"""The model a recipe's latency column times: the model as prunekit would serve it.

Unstructured and N:M zeros make a model faster only once :func:`prunekit.accelerate` swaps
sparse kernels in; timed as a plain ``nn.Module``, a 70 %-sparse encoder runs at the dense
speed, and a ``latency`` goal could never be met by a sparsity search. So a stage's model with
sparse layers is timed after ``accelerate`` (``measure.accelerate``: ``auto``, the default,
does that when some Linear / Conv2d weight is at least :data:`SPARSE_ENOUGH` zeros; ``true``
always; ``false`` never). ``accelerate`` decides per layer by timing at the input shape, so it
runs once per measured batch size, on the example inputs at that batch. The stage's model
itself is left as it is (trainable, saveable); call ``prunekit.accelerate`` on the result to
serve it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SPARSE_ENOUGH = 0.2
"""Share of zero weights in at least one Linear / Conv2d from which ``auto`` accelerates."""


def has_sparse_layers(model: nn.Module, zeros: float = SPARSE_ENOUGH) -> bool:
    """Whether some ``nn.Linear`` / ``nn.Conv2d`` weight (masks applied) has at least
    ``zeros`` of its entries zero.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> has_sparse_layers(layer)
        False
        >>> with torch.no_grad():
        ...     layer.weight[:, :2] = 0
        >>> has_sparse_layers(layer)
        True
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            weight = module.weight
            if weight.numel() and float((weight == 0).sum()) >= zeros * weight.numel():
                return True
    return False


def serves_accelerated(model: nn.Module, accelerate: bool | None) -> bool:
    """``measure.accelerate`` resolved for this model: True / False as given; None (auto) when
    the model is on the CPU, where the sparse kernels run, and has sparse layers
    (:func:`has_sparse_layers`)."""
    if accelerate is not None:
        return accelerate
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        return False
    with torch.no_grad():
        return has_sparse_layers(model)


def served_at(
    model: nn.Module, example_inputs: Any, batch: int, threads: int | None
) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` after :func:`prunekit.accelerate` on ``example_inputs`` re-batched to
    ``batch``, and what it swapped (``{"swapped": k, "layers": n}``, for the report)."""
    from prunekit.runtime.accelerate import accelerate
    from prunekit.runtime.bench import _batch_of, _rebatch

    inputs = _rebatch(example_inputs, _batch_of(example_inputs), batch)
    fast, report = accelerate(model, inputs, threads=threads, progress=False)
    return fast, {"swapped": len(report.swapped), "layers": len(report.rows)}
