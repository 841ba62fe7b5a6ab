"""Which units to remove: ratios, local / global scope, rounding, targets; and a cost model.

Nothing here touches a weight: the result is a set of removed units (root atoms), which surgery
applies in one go after everything has been validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prunekit.graph.groups import Group
from prunekit.graph.importance import normalize
from prunekit.graph.trace import Graph


@dataclass
class Selection:
    """Units chosen for removal, per group (indices into the group's units)."""

    removed: dict[int, np.ndarray]

    def roots(self, groups: list[Group]) -> np.ndarray:
        by_index = {g.index: g for g in groups}
        parts = [by_index[i].roots[idx] for i, idx in self.removed.items() if len(idx)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _cap(group: Group, min_keep: int) -> int:
    """Most units a group may lose (never the last ``min_keep``)."""
    return max(group.n_units - max(min_keep, 1), 0)


def group_multiple(n: int, round_to: int | None, halve: bool = True) -> int:
    """The multiple a group of ``n`` channels is kept at: ``round_to``, halved while the group
    is narrower than two of it (a 16-wide group with ``round_to=16`` keeps 8 or 16 channels,
    rather than never being pruned); 1 when not rounded. ``n`` is the widest layer the group
    lives in (:func:`_multiple`): a group that is part of wider layers (16 channels of a
    residual stream that later layers pad to 64) keeps the full multiple, so that those layers
    stay multiples too. ``halve=False`` keeps the full multiple (such a group stays whole, or
    loses whole multiples: the hardware-aware candidates of ``prune_structured``)."""
    m = round_to or 1
    while halve and m > 1 and n < 2 * m:
        m //= 2
    return max(m, 1)


def _multiple(group: Group, round_to: int | None, halve: bool = True) -> int:
    return group_multiple(max(group.n_units, group.layer_width), round_to, halve)


def _rounded_keep(kept: int, n: int, round_to: int | None, group: Group, halve: bool = True) -> int:
    if not round_to or group.kind != "channel" or round_to <= 1:
        return kept
    m = _multiple(group, round_to, halve)
    return min(n, int(math.ceil(kept / m) * m))


def _lowest(scores: np.ndarray, k: int) -> np.ndarray:
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(scores, kind="stable")
    return np.sort(order[:k])


def _uniform_per_parent(group: Group, scores: np.ndarray, k: int) -> np.ndarray:
    """GQA q-head mode: remove the same number of q heads from every kv group."""
    parents = group.parents
    kinds = np.unique(parents)
    per = min(k // len(kinds), min(int((parents == p).sum()) for p in kinds) - 1)
    chosen = []
    for p in kinds:
        idx = np.nonzero(parents == p)[0]
        chosen.extend(idx[np.argsort(scores[idx], kind="stable")[: max(per, 0)]])
    return np.sort(np.array(chosen, dtype=np.int64))


def select(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    ratio: float,
    *,
    scope: str = "local",
    overrides: dict[int, float] | None = None,
    round_to: int | None = None,
    min_keep: int = 1,
    normalize_how: str = "mean",
    halve: bool = True,
) -> Selection:
    """Remove ``ratio`` of the units of every scored group (local), or of all of them pooled
    (global), lowest scores first; groups in ``overrides`` get their own (local) ratio.
    ``halve``: see :func:`group_multiple`."""
    overrides = overrides or {}
    removed: dict[int, np.ndarray] = {}
    pool = []
    for g in groups:
        if g.index not in scores:
            continue
        if scope == "global" and g.index not in overrides and g.parents is None:
            pool.append(g)
            continue
        r = overrides.get(g.index, ratio)
        k = min(int(round(r * g.n_units)), _cap(g, min_keep))
        removed[g.index] = _trim(g, scores[g.index], k, round_to, min_keep, halve)
    if pool:
        normed = [normalize(scores[g.index], normalize_how) for g in pool]
        total = sum(g.n_units for g in pool)
        k = int(round(ratio * total))
        flat = np.concatenate(normed)
        owner = np.concatenate([np.full(g.n_units, i) for i, g in enumerate(pool)])
        unit = np.concatenate([np.arange(g.n_units) for g in pool])
        caps = [_cap(g, min_keep) for g in pool]
        taken = [[] for _ in pool]
        for j in np.argsort(flat, kind="stable"):
            if k <= 0:
                break
            i = owner[j]
            if len(taken[i]) < caps[i]:
                taken[i].append(unit[j])
                k -= 1
        for i, g in enumerate(pool):
            chosen = np.sort(np.array(taken[i], dtype=np.int64))
            kept = _rounded_keep(g.n_units - len(chosen), g.n_units, round_to, g, halve)
            drop = g.n_units - kept
            if drop < len(chosen):  # rounding keeps the best of the chosen ones
                chosen = np.sort(chosen[np.argsort(scores[g.index][chosen], kind="stable")[:drop]])
            removed[g.index] = chosen
    return Selection(removed)


def _trim(
    group: Group,
    scores: np.ndarray,
    k: int,
    round_to: int | None,
    min_keep: int,
    halve: bool = True,
) -> np.ndarray:
    kept = _rounded_keep(group.n_units - k, group.n_units, round_to, group, halve)
    k = group.n_units - kept
    if group.parents is not None:
        return _uniform_per_parent(group, scores, k)
    return _lowest(scores, min(k, _cap(group, min_keep)))


class CostModel:
    """Parameters and MACs of the traced model as a function of the removed units."""

    def __init__(self, graph: Graph, extra_params: int = 0) -> None:
        self.uf = graph.uf
        self.terms = [(t.const, [self.uf.find(lab) for lab in t.labels]) for t in graph.macs]
        self.params = []
        for key, (kind, shape) in graph.tensors.items():
            if kind != "param":
                continue
            dims = graph.param_labels.get(key, {})
            self.params.append(
                [self.uf.find(dims[d]) if d in dims else int(shape[d]) for d in range(len(shape))]
            )
        self.extra_params = extra_params

    def evaluate(self, removed_roots: np.ndarray) -> tuple[float, float]:
        removed = np.zeros(self.uf.size, dtype=bool)
        removed[np.asarray(removed_roots, dtype=np.int64)] = True

        def kept(roots: np.ndarray) -> int:
            return int((~removed[roots]).sum())

        macs = 0.0
        for const, labels in self.terms:
            value = const
            for roots in labels:
                value *= kept(roots)
            macs += value
        params = float(self.extra_params)
        for dims in self.params:
            value = 1.0
            for d in dims:
                value *= d if isinstance(d, int) else kept(d)
            params += value
        return macs, params


def resolve_target(value: float | None, dense: float) -> float | None:
    if value is None:
        return None
    return value * dense if value <= 1.0 else value


def allowed_keep(n: int, kept: int, round_to: int | None, group: Group, halve: bool = True) -> int:
    """The next width a group may grow to from ``kept``: the next multiple of its
    :func:`group_multiple`, or its full width ``n`` (which need not be a multiple); one unit
    more when not rounded."""
    if not round_to or round_to <= 1 or group.kind != "channel":
        return min(n, kept + 1)
    m = _multiple(group, round_to, halve)
    return min(n, (kept // m + 1) * m)


def restore(
    selection: Selection,
    groups: list[Group],
    ranked: dict[int, np.ndarray],
    ok,
    *,
    round_to: int | None = None,
    frozen: set[int] | frozenset[int] = frozenset(),
    halve: bool = True,
) -> Selection:
    """Put removed units back while ``ok(selection)`` holds: at each step the group whose next
    step (up to its next allowed width, best-scored removed units first) has the highest mean
    score. A group whose next step fails is done: every unit of a group costs the same, so a
    later step of that group would fail too. Groups in ``frozen`` and GQA q-head groups keep
    their selection. The result keeps every width a multiple of ``round_to`` (or full)."""
    by_index = {g.index: g for g in groups}
    removed = {i: np.asarray(r, dtype=np.int64) for i, r in selection.removed.items()}
    active = {
        i
        for i, r in removed.items()
        if len(r) and i in ranked and i not in frozen and by_index[i].parents is None
    }

    def step(i: int) -> tuple[float, np.ndarray]:
        g, r = by_index[i], removed[i]
        kept = g.n_units - len(r)
        grow = allowed_keep(g.n_units, kept, round_to, g, halve) - kept
        best = r[np.argsort(-ranked[i][r], kind="stable")[:grow]]
        return float(ranked[i][best].mean()), best

    while active:
        i = max(active, key=lambda j: (step(j)[0], -j))
        _, back = step(i)
        trial = dict(removed)
        trial[i] = np.setdiff1d(removed[i], back)
        candidate = Selection(trial)
        if ok(candidate):
            removed, selection = trial, candidate
            if not len(removed[i]):
                active.discard(i)
        else:
            active.discard(i)
    return selection
