"""Hardware-aware widths for ``prune_structured``'s MAC / parameter targets: candidates, measured.

Removing half the MACs does not halve the time: the backend pads channel counts to its vector
block (oneDNN's nChw16c with AVX-512), and some layers cost more time per MAC than others
(depthwise convs, narrow early layers, per-op overhead at batch 1). With a target and no
``round_to``, ``prune_structured`` builds a few selections that all meet the target (each with
the same rounding-aware search) and keeps the one that measures fastest on the example inputs:

* ``uniform``: one ratio for every group, widths at multiples of the backend's vector width,
  halved for narrow groups (the static default, used without measurement);
* ``whole``: the same with the full multiple everywhere (a group narrower than two multiples
  stays whole or loses whole multiples);
* ``time``: groups whose units cost more measured time per MAC (:func:`time_per_mac`, from one
  hook-timed forward pass) lose more of them: group g keeps ``(1 - r) ** w_g`` of its units,
  with ``w_g`` its time per MAC over the MAC-weighted mean, clipped to
  [:data:`MIN_WEIGHT`, :data:`MAX_WEIGHT`]; ``time-whole``: the same at full multiples.

A candidate whose widths cannot reach the target is left out.

A candidate replaces ``uniform`` only when it measures at least :data:`MIN_GAIN` faster (the
uniform one spreads the damage most evenly) and its outputs on the example inputs stay as close
to the dense model's as the uniform one's (relative error at most :data:`MAX_ERROR_RISE` above
it): a few per cent of speed is not worth a worse model (on the MNIST CNN the ``whole`` widths
were 3 % faster at batch 1 and lost 2.7 points of accuracy against ``uniform``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.graph import latency as _latency
from prunekit.graph.groups import Group
from prunekit.graph.plan import CostModel, Selection
from prunekit.graph.trace import Graph

# (name, halve narrow groups' multiple, weigh ratios by measured time per MAC)
CANDIDATES = (
    ("uniform", True, False),
    ("whole", False, False),
    ("time", True, True),
    ("time-whole", False, True),
)
MIN_WEIGHT, MAX_WEIGHT = 0.5, 2.0
MIN_GAIN = 0.03  # a candidate must measure this much faster than "uniform" to replace it
MAX_ERROR_RISE = 0.10  # ... and its output error may exceed uniform's by at most this fraction


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, a tuple / list, a dict or a
    ``ModelOutput``), in order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def output_error(dense: nn.Module, model: nn.Module, example_inputs: Any) -> float:
    """Relative output error of ``model`` against ``dense`` on the example inputs:
    ``||y - y_dense|| / ||y_dense||`` over every floating output tensor (eval mode, restored).

    Example:
        >>> net = nn.Linear(4, 2)
        >>> output_error(net, net, torch.randn(3, 4))
        0.0
    """
    outs = []
    for net in (dense, model):
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        try:
            with torch.no_grad():
                if isinstance(example_inputs, Mapping):
                    out = net(**example_inputs)
                elif isinstance(example_inputs, (tuple, list)):
                    out = net(*example_inputs)
                else:
                    out = net(example_inputs)
        finally:
            for m, training in modes:
                m.train(training)
        outs.append(torch.cat([t.detach().flatten().double() for t in output_tensors(out)]))
    ref, got = outs
    if ref.shape != got.shape:
        raise ValueError(f"outputs of {ref.numel()} and {got.numel()} values cannot be compared")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def time_per_mac(
    graph: Graph,
    groups: list[Group],
    cost: CostModel,
    times: dict[str, float],
) -> dict[int, float]:
    """Measured ms per MAC of one unit of each group: the share of every module's time that one
    unit represents (its indices over the module's dim), summed over the group's modules, over
    the MACs the unit carries. Groups without MACs or without timed modules are left out."""
    dense_macs = cost.evaluate(np.zeros(0, dtype=np.int64))[0]
    out: dict[int, float] = {}
    for g in groups:
        share: dict[str, float] = {}
        for (key, dim), per_unit in g.slices.items():
            module = key.rpartition(".")[0]
            if module not in times or key not in graph.tensors:
                continue
            size = graph.tensors[key][1][dim]
            if size:
                share[module] = max(share.get(module, 0.0), len(per_unit[0]) / size)
        ms = sum(times[m] * f for m, f in share.items())
        macs = (dense_macs - cost.evaluate(g.roots)[0]) / max(g.n_units, 1)
        if ms > 0 and macs > 0:
            out[g.index] = ms / macs
    return out


def weights(groups: list[Group], cost: CostModel, per_mac: dict[int, float]) -> dict[int, float]:
    """Each group's time per MAC over the MAC-weighted mean, clipped (1 where unmeasured)."""
    dense_macs = cost.evaluate(np.zeros(0, dtype=np.int64))[0]
    macs = {g.index: dense_macs - cost.evaluate(g.roots)[0] for g in groups}
    total = sum(macs[i] for i in per_mac)
    if not per_mac or total <= 0:
        return {g.index: 1.0 for g in groups}
    mean = sum(per_mac[i] * macs[i] for i in per_mac) / total
    return {
        g.index: float(np.clip(per_mac[g.index] / mean, MIN_WEIGHT, MAX_WEIGHT))
        if g.index in per_mac and mean > 0
        else 1.0
        for g in groups
    }


def weighted_overrides(
    groups: list[Group], w: dict[int, float], ratio: float, fixed: dict[int, float]
) -> dict[int, float]:
    """Per-group ratios for one search ratio: group g keeps ``(1 - ratio) ** w[g]`` of its units;
    ``fixed`` (the user's ``per_layer`` entries) wins."""
    out = {g.index: 1.0 - (1.0 - ratio) ** w.get(g.index, 1.0) for g in groups}
    out.update(fixed)
    return out


def pick_fastest(
    model: nn.Module,
    candidates: dict[str, Selection],
    build: Callable[[Selection], nn.Module],
    example_inputs: Any,
    *,
    threads: int | None,
) -> tuple[str, dict[str, float], dict[str, Any]]:
    """Build every distinct candidate, time them all beside the dense model in one measurement
    (rotating rounds), measure each one's output error on the example inputs, and return the
    chosen name (:func:`choose`), every candidate's ms and the measurement (``"error"``: each
    candidate's output error). Candidates that remove the same units are built and timed once."""
    distinct: dict[str, Selection] = {}
    same: dict[str, str] = {}
    for name, sel in candidates.items():
        key = next((k for k, s in distinct.items() if _same(s, sel)), None)
        if key is None:
            distinct[name] = sel
        else:
            same[name] = key
    models: dict[str, nn.Module] = {"dense": model}
    for name, sel in distinct.items():
        models[name] = build(sel)
    got = _latency.measure(
        models,
        example_inputs,
        threads=threads,
        budget_s=0.75 * len(models),
        min_repeats=5,
    )
    ms = {n: float(got["ms"][n]) for n in distinct}
    error = {n: output_error(model, models[n], example_inputs) for n in distinct}
    for name, key in same.items():
        ms[name], error[name] = ms[key], error[key]
    chosen = choose(ms, error, first=next(iter(candidates)))
    got["error"] = error
    got["built"] = {n: models[n] for n in distinct}
    got["same"] = same
    return chosen, ms, got


def choose(ms: dict[str, float], error: dict[str, float], first: str) -> str:
    """The fastest candidate that is at least :data:`MIN_GAIN` faster than ``first`` with an
    output error at most :data:`MAX_ERROR_RISE` above ``first``'s; else ``first``.

    Example:
        >>> choose({"uniform": 10.0, "whole": 9.0}, {"uniform": 0.2, "whole": 0.3}, "uniform")
        'uniform'
    """
    bar = error[first] * (1 + MAX_ERROR_RISE) + 1e-12
    fine = [n for n in ms if n != first and error[n] <= bar and ms[n] < ms[first] * (1 - MIN_GAIN)]
    return min(fine, key=ms.__getitem__) if fine else first


def _same(a: Selection, b: Selection) -> bool:
    keys = {i for i, r in a.removed.items() if len(r)} | {i for i, r in b.removed.items() if len(r)}
    return all(
        np.array_equal(
            np.sort(a.removed.get(i, np.zeros(0, dtype=np.int64))),
            np.sort(b.removed.get(i, np.zeros(0, dtype=np.int64))),
        )
        for i in keys
    )
