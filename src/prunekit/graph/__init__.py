"""Structured pruning: dependency graph, group importance, surgery, depth pruning, counting.

Public names (re-exported by ``prunekit``): :func:`prune_structured`, :func:`count`,
:func:`save_pretrained`, :func:`from_pretrained`.
"""

from prunekit.graph.count import CountReport, LayerCount, count
from prunekit.graph.groups import Group, build_groups
from prunekit.graph.hf import from_pretrained, save_pretrained
from prunekit.graph.importance import GroupImportance, register
from prunekit.graph.latency import Latency, default_round_to
from prunekit.graph.pruner import (
    LatencyOutOfReach,
    StructuredPruningError,
    StructuredReport,
    prune_structured,
)
from prunekit.graph.trace import Graph, UnsupportedOperationError, trace

__all__ = [
    "CountReport",
    "Graph",
    "Group",
    "GroupImportance",
    "LayerCount",
    "Latency",
    "LatencyOutOfReach",
    "StructuredPruningError",
    "StructuredReport",
    "UnsupportedOperationError",
    "build_groups",
    "count",
    "default_round_to",
    "from_pretrained",
    "prune_structured",
    "register",
    "save_pretrained",
    "trace",
]
