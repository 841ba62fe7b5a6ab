"""Dependency groups: the removable units found by a trace, gathered by the layers they touch.

A *unit* is one class of atoms: every parameter slice labelled with one of its atoms is removed
together (a conv's output channel with the next layer's input column, its BatchNorm entries, the
matching channel of every layer on the same residual stream, ...). Units that touch the same set
of (parameter, dim) pairs form a *group*: the output channels of one layer, one MLP's hidden
neurons, one attention layer's heads. Groups are what importance scores and pruning ratios apply
to.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from prunekit.graph.trace import HEAD, INEXACT, KV, Graph
from prunekit.graph.unionfind import PIN

Member = tuple[str, int]  # (parameter or buffer name, dim)


@dataclass
class Group:
    """Units that touch the same parameter dims; ``slices[member][u]`` are unit u's indices."""

    index: int
    kind: str  # "channel" or "head"
    roots: np.ndarray  # the root atom of each unit
    slices: dict[Member, list[np.ndarray]]
    producers: list[Member]
    exact: bool = True
    kv: bool = False
    parents: np.ndarray | None = None  # GQA "q" mode: the kv unit (root) of each q-head unit
    name: str = ""
    modules: list[str] = field(default_factory=list)
    layer_width: int = 0  # the widest parameter dim the group's units live in

    @property
    def n_units(self) -> int:
        return len(self.roots)

    @property
    def members(self) -> list[Member]:
        return list(self.slices)

    def width(self, member: Member) -> int:
        """How many indices of ``member`` one unit spans (e.g. head_dim for a head)."""
        return len(self.slices[member][0])

    def __repr__(self) -> str:
        return f"Group({self.name!r}, kind={self.kind}, units={self.n_units})"


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def build_groups(graph: Graph) -> list[Group]:
    """Every group of removable units in a traced model (pinned units are left out)."""
    uf = graph.uf
    roots_all = uf.roots()
    class_flags = np.zeros(uf.size, dtype=np.int64)
    np.bitwise_or.at(class_flags, roots_all, graph.flags[: uf.size])
    params = {k for k, (kind, _) in graph.tensors.items() if kind == "param"}
    per_class: dict[int, dict[Member, np.ndarray]] = defaultdict(dict)
    for key in sorted(graph.param_labels):
        for dim, labels in sorted(graph.param_labels[key].items()):
            roots = uf.find(labels)
            uniq, inverse = np.unique(roots, return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
            for i, root in enumerate(uniq):
                if root == PIN:
                    continue
                per_class[int(root)][(key, dim)] = order[bounds[i] : bounds[i + 1]]
    producers = graph.producers
    by_signature: dict[tuple[Member, ...], list[int]] = defaultdict(list)
    for root, members in per_class.items():
        if not any(m in producers for m in members):
            continue  # only read, never produced here: cannot be removed
        by_signature[tuple(sorted(members))].append(root)
    kv_parent = _gqa_parents(graph) if graph.gqa == "q" else {}
    order = {key: i for i, key in enumerate(graph.tensors)}
    groups = []
    for signature, roots in by_signature.items():
        prod = [m for m in signature if m in producers and m[0] in params] or [
            m for m in signature if m in producers
        ]
        prod.sort(key=lambda m: order.get(m[0], len(order)))
        first = prod[0]
        roots.sort(key=lambda r: int(per_class[r][first][0]))
        ordered = prod + [m for m in signature if m not in prod]
        slices = {m: [per_class[r][m] for r in roots] for m in ordered}
        flags = np.bitwise_or.reduce(class_flags[np.array(roots)])
        group = Group(
            index=len(groups),
            kind="head" if flags & HEAD else "channel",
            roots=np.array(roots, dtype=np.int64),
            slices=slices,
            producers=prod,
            exact=not bool(flags & INEXACT),
            kv=bool(flags & KV),
            layer_width=max(int(graph.tensors[k][1][d]) for k, d in signature),
        )
        if kv_parent and not group.kv and group.kind == "head":
            parents = [kv_parent.get(r) for r in roots]
            if all(p is not None for p in parents):
                group.parents = np.array(parents, dtype=np.int64)
        group.modules = list(dict.fromkeys(_module(k) for k, _ in ordered))
        group.name = _name(group)
        groups.append(group)
    groups.sort(key=lambda g: _first_position(graph, g))
    for i, g in enumerate(groups):
        g.index = i
    return groups


def _first_position(graph: Graph, group: Group) -> int:
    order = list(graph.tensors)
    key = group.producers[0][0]
    return order.index(key) if key in order else len(order)


def _gqa_parents(graph: Graph) -> dict[int, int]:
    parents: dict[int, int] = {}
    for q, kv in graph.gqa_links:
        for a, b in zip(graph.uf.find(q), graph.uf.find(kv), strict=True):
            parents[int(a)] = int(b)
    return parents


def _name(group: Group) -> str:
    mods = list(dict.fromkeys(_module(k) for k, _ in group.producers))
    if group.kind == "head" and len(mods) > 1:
        prefix = os.path.commonprefix([m + "." for m in mods]).rpartition(".")[0]
        if prefix:
            return prefix
    return mods[0] + (f" (+{len(mods) - 1})" if len(mods) > 1 else "")
