"""``trace``: run a model on example inputs and return its channel dependency :class:`Graph`.

This module wires the tracing machinery (:mod:`prunekit.graph.tracer`) to its rule books (the
torch operations in :mod:`prunekit.graph.ops`, the opaque leaf modules in
:mod:`prunekit.graph.leaves`); the names most callers need are re-exported here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.graph.leaves import handle_leaf, leaf_kind
from prunekit.graph.ops import lookup
from prunekit.graph.tracer import (
    HEAD,
    INEXACT,
    KV,
    Graph,
    HeadSplit,
    Info,
    LiteralUse,
    MacTerm,
    Tracer,
    UnsupportedOperationError,
    call_model,
    iter_tensors,
    op_name,
)
from prunekit.graph.tracer import (
    _plain as _plain,
)

__all__ = [
    "HEAD",
    "INEXACT",
    "KV",
    "Graph",
    "HeadSplit",
    "Info",
    "LiteralUse",
    "MacTerm",
    "Tracer",
    "UnsupportedOperationError",
    "call_model",
    "iter_tensors",
    "op_name",
    "trace",
]


def trace(
    model: nn.Module, example_inputs: Any, *, gqa: str = "kv", pin_outputs: bool = True
) -> Graph:
    """Trace ``model`` on ``example_inputs`` (tensor, tuple of args or dict of kwargs).

    Example:
        >>> import torch
        >>> from prunekit.graph.trace import trace
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> graph = trace(net, torch.randn(1, 4))
        >>> sorted(graph.param_labels)
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    tracer = Tracer(model, gqa=gqa, lookup=lookup, leaf_kind=leaf_kind, handle_leaf=handle_leaf)
    return tracer.run(example_inputs, pin_outputs=pin_outputs)
