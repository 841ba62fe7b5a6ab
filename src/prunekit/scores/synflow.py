"""SynFlow: iterative, data-free pruning at initialisation that avoids layer collapse.

From "Pruning neural networks without any data by iteratively conserving synaptic flow"
(Tanaka et al., 2020). Every weight is made positive (|w|), an all-ones input is pushed through
the network, and ``R`` is the sum of the outputs (the "synaptic flow", a product of weight
magnitudes along every input-output path). The score of a weight is ``|dR/dw * w|``. Because
scores are recomputed after every small pruning step, a layer that gets thin sees its remaining
weights become more important, so no layer is emptied (single-shot scores, magnitude included,
can empty a whole layer at extreme sparsity and disconnect the network).

How it fits ``prunekit.prune`` in one call without knowing the target sparsity in advance: the
scorer runs the whole iterative procedure once, removing a fixed share of the remaining weights
in each of ``iterations`` steps (density ``min_density ** (k / iterations)`` after step ``k``),
and scores every weight by *when* it was removed (step ``k`` plus its rank inside that step;
survivors score highest). Selecting the lowest scores by count with ``scope="global"`` is then
exactly iterative SynFlow stopped at the requested sparsity (the last step taken partially, by
that step's scores). The defaults (200 steps down to a density of 1e-4) remove 4.5 % of the
remaining weights per step, as the paper's 100 steps to 1 % do. Scores are an elimination order,
comparable across layers.

No data is used: ``data`` only provides one example input, for its shape (its values are
ignored); ``loss_fn`` is not needed. The scorer works on a float64 copy of the model in eval mode
and changes nothing in the model.

Example:
    >>> import torch, prunekit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    >>> report = prunekit.prune(net, 0.95, method="synflow", data=[torch.zeros(1, 8)],
    ...                         targets=["0", "2"], progress=False)
    >>> all(row.nonzeros > 0 for row in report.layers)
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import trange

from prunekit.masks import raw_parameter
from prunekit.scores.base import Criterion, LayerContext, register
from prunekit.targets import Target

DEFAULT_ITERATIONS = 200
DEFAULT_MIN_DENSITY = 1e-4
STAT = "synflow_order"


def example_input(data: Iterable[Any]) -> torch.Tensor:
    """The first input tensor in ``data``: a tensor, or the first element of a tuple / list."""
    for batch in data:
        value = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                "synflow needs an example input tensor for its shape: pass data=[x] (or batches "
                f"whose first element is the input); got a {type(value).__name__}"
            )
        if not value.is_floating_point():
            raise TypeError(
                f"synflow pushes an all-ones float input through the model; got a {value.dtype} "
                "input (token ids?). SynFlow suits networks with floating-point inputs."
            )
        if value.dim() < 1:
            raise TypeError("synflow needs a batched example input (batch dimension first)")
        return value
    raise ValueError("synflow got no example input from `data`")


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"synflow needs the model to return a tensor, got {type(output).__name__}")


def elimination_order(
    model: nn.Module,
    targets: list[Target],
    example: torch.Tensor,
    iterations: int = DEFAULT_ITERATIONS,
    min_density: float = DEFAULT_MIN_DENSITY,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Iterative SynFlow order scores (float64, weight-shaped) for ``targets``.

    A weight removed in step ``k`` (1-based) scores in ``(k, k + 1)``, lower for lower SynFlow
    score in that step; weights still alive after the last step score in
    ``(iterations + 1, iterations + 2)``. Weights that are already zero score 0.
    """
    net = copy.deepcopy(model).double().eval()
    modules = dict(net.named_modules())
    copies = [Target(t.module_name, modules[t.module_name], t.param_name) for t in targets]
    params = [raw_parameter(t.module, t.param_name) for t in copies]
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
            p.requires_grad_(False)
        for b in net.buffers():
            if b.is_floating_point():
                b.abs_()
        base = [t.weight().clone() for t in copies]
    for p in params:
        p.requires_grad_(True)
    # One flat vector over all targets: alive flags and the order scores.
    sizes = [b.numel() for b in base]
    flat_base = torch.cat([b.reshape(-1) for b in base])
    alive = flat_base != 0
    order = torch.zeros_like(flat_base)
    total = flat_base.numel()
    n_alive = int(alive.sum())
    x = torch.ones((1, *example.shape[1:]), dtype=torch.float64, device=flat_base.device)

    def flow_scores() -> torch.Tensor:
        with torch.no_grad():
            current = (flat_base * alive).split(sizes)
            for p, c in zip(params, current, strict=True):
                p.copy_(c.view_as(p))
        flow = _first_tensor(net(x)).sum()
        if not torch.isfinite(flow):
            raise FloatingPointError(
                "synflow: the synaptic flow overflowed float64; the network is too deep or its "
                "weights too large for SynFlow"
            )
        grads = torch.autograd.grad(flow, params, allow_unused=True)
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g * p).detach().abs().reshape(-1)
                for p, g in zip(params, grads, strict=True)
            ]
        )

    def remove_lowest(count: int, offset: float) -> None:
        """Remove the ``count`` lowest-scored alive weights, scoring them ``offset + rank``."""
        scores = flow_scores().masked_fill(~alive, float("inf"))
        lowest = torch.topk(scores, count, largest=False, sorted=True).indices
        ranks = torch.arange(1, count + 1, dtype=torch.float64, device=order.device)
        order[lowest] = offset + ranks / (count + 1)
        alive[lowest] = False

    for k in trange(1, iterations + 1, desc="synflow", disable=not progress, leave=False):
        keep = int(round(min_density ** (k / iterations) * total))
        if n_alive > keep:
            remove_lowest(n_alive - keep, float(k))
            n_alive = keep
    if n_alive:
        remove_lowest(n_alive, float(iterations + 1))
    return [o.view_as(b).cpu() for o, b in zip(order.split(sizes), base, strict=True)]


def synflow_score(layer: LayerContext) -> torch.Tensor:
    """The elimination-order score computed by the collector."""
    return layer.stats[STAT].to(layer.weight.device)


def make_synflow(
    iterations: int = DEFAULT_ITERATIONS, min_density: float = DEFAULT_MIN_DENSITY
) -> Criterion:
    """A SynFlow criterion with its own number of steps and final density of the sweep.

    Sparsities above ``1 - min_density`` are reached by one last single-shot step.

    Example:
        >>> import prunekit
        >>> fine = prunekit.scores.synflow.make_synflow(iterations=500)
        >>> fine.name
        'synflow'
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not (isinstance(min_density, (int, float)) and 0 < min_density < 1):
        raise ValueError(f"min_density must be in (0, 1), got {min_density!r}")
    if math.isnan(min_density):  # pragma: no cover - caught above
        raise ValueError("min_density must not be NaN")

    def collect(
        model: nn.Module,
        targets: list[Target],
        *,
        data: Iterable[Any],
        loss_fn: Any = None,
        max_batches: int | None = None,
        progress: bool = True,
    ) -> dict[str, dict[str, torch.Tensor]]:
        example = example_input(data)
        orders = elimination_order(model, targets, example, iterations, min_density, progress)
        return {t.name: {STAT: o} for t, o in zip(targets, orders, strict=True)}

    return Criterion(
        "synflow",
        synflow_score,
        comparable_across_layers=True,
        collect=collect,
    )


register(make_synflow())
