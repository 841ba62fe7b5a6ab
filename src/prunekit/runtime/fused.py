"""Sibling sparse layers that read the same input, run as one product.

A transformer block feeds one hidden state to several Linear layers: query, key and value; a
Llama MLP's gate and up projections. Each of those, accelerated on its own, pays a kernel call
(thread start, input packing, Python dispatch) for a small product. :func:`prunekit.accelerate`
finds such siblings on the example run (layers called with the very same tensor object) and,
where timing says it is faster, stacks their weights into one :class:`SparseLinear` held by a
:class:`SharedInputProduct`. Each sibling becomes a :class:`SparseLinearSlice` that returns its
own rows of that product.

The product is computed on the first sibling's call and kept until every sibling has read its
part. A sibling called with another tensor, or with the same tensor changed in place (its
version counter moved), computes the product again for that input, so results never depend
on the call order; only tensors made under ``torch.inference_mode``, which have no version
counter, are taken as unchanged while they are the same object.

This module imports nothing from the rest of prunekit: :mod:`prunekit.runtime.accelerate`
builds the stacked layer and decides by timing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shared_input_groups(first_inputs: dict[str, Any], calls: dict[str, int]) -> list[list[str]]:
    """Names of layers that were each called once, all with the same tensor object, in the
    order they were called; groups of two or more.

    ``first_inputs`` maps a layer name to the input tensor of its first call (the objects are
    compared by identity, so the caller keeps them alive), ``calls`` to its number of calls.

    Example:
        >>> x, y = torch.ones(1), torch.ones(1)
        >>> shared_input_groups({"q": x, "k": x, "v": x, "o": y}, {"q": 1, "k": 1, "v": 1, "o": 1})
        [['q', 'k', 'v']]
    """
    by_input: dict[int, list[str]] = {}
    for name, tensor in first_inputs.items():
        if calls.get(name) == 1 and isinstance(tensor, torch.Tensor):
            by_input.setdefault(id(tensor), []).append(name)
    return [names for names in by_input.values() if len(names) > 1]


def _version(x: torch.Tensor) -> int | None:
    # inference tensors have no version counter (asking raises, and a raise costs a backtrace)
    return None if x.is_inference() else x._version


class SharedInputProduct(nn.Module):
    """One sparse layer whose output rows are the outputs of several sibling layers
    (``widths`` rows each, in order; ``biased``: which of them had a bias), and its latest
    result for the siblings to share."""

    def __init__(self, layer: nn.Module, widths: list[int], biased: list[bool]) -> None:
        super().__init__()
        if sum(widths) != layer.out_features:
            raise ValueError(
                f"SharedInputProduct: widths {widths} do not add up to the layer's "
                f"{layer.out_features} outputs"
            )
        self.layer = layer
        self.widths = [int(w) for w in widths]
        self.biased = [bool(b) for b in biased]  # which siblings had a bias (zeros stand in)
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self._latest: tuple | None = None  # see part()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling ``index``'s output for ``x``: its rows of the product (a view)."""
        version = _version(x)
        latest = self._latest  # (x, version, product, bit mask of the parts not yet read)
        if (
            latest is None
            or latest[0] is not x
            or latest[1] != version
            or not latest[3] >> index & 1
        ):
            latest = (x, version, self.layer(x), (1 << len(self.widths)) - 1)
        unread = latest[3] & ~(1 << index)
        self._latest = (x, version, latest[2], unread) if unread else None
        return latest[2].narrow(-1, self.offsets[index], self.widths[index])

    def __getstate__(self) -> dict[str, Any]:  # pickle and deepcopy
        state = self.__dict__.copy()
        state["_latest"] = None  # a cached activation is not part of the model
        return state

    def extra_repr(self) -> str:
        return f"widths={self.widths}"


class SparseLinearSlice(nn.Module):
    """Stands where one of the fused sibling layers was: its output is its rows of the shared
    product (:class:`SharedInputProduct`). ``to_dense()`` gives that layer back."""

    _prunekit_accelerated = True  # see prunekit.runtime.accelerated

    def __init__(self, product: SharedInputProduct, index: int) -> None:
        super().__init__()
        self.product = product
        self.index = int(index)
        self.in_features = product.layer.in_features
        self.out_features = product.widths[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product.part(x, self.index)

    def dense_weight(self) -> torch.Tensor:
        """This layer's ``(out_features, in_features)`` float32 weight."""
        start = self.product.offsets[self.index]
        return self.product.layer.dense_weight()[start : start + self.out_features]

    def to_dense(self) -> nn.Linear:
        """The ``nn.Linear`` with this layer's weight, and its bias if it had one."""
        start = self.product.offsets[self.index]
        bias = self.product.layer.bias
        has_bias = self.product.biased[self.index] and bias is not None
        part = bias[start : start + self.out_features] if has_bias else None
        linear = nn.Linear(self.in_features, self.out_features, bias=has_bias)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if has_bias:
                linear.bias.copy_(part)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"part {self.index + 1} of {len(self.product.widths)} of a shared sparse product"
        )
