"""Layers swapped in by :func:`prunekit.accelerate`: find them, decode them to dense modules,
and refuse them in the verbs that need dense weights.

An accelerated layer (``SparseLinear``, ``SparseConv2d``) stores its weight as packed sparse
buffers, not as an ``nn.Parameter``: nothing can prune, quantize or train it. Verbs that change
weights call :func:`refuse_accelerated` first, so they stop with an error that says what to do
(``prunekit.deaccelerate(model)``) instead of finding "nothing to prune" or silently skipping
those layers; read-only verbs (``stats``, ``count``, ``save``) and ``finalize`` look through
:func:`accelerated_as_dense` / :func:`decode_accelerated` instead.

This module imports nothing from prunekit, so any verb may use it.

Example:
    >>> import torch
    >>> accelerated_layers(torch.nn.Linear(4, 4))
    []
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

ACCELERATED_ATTR = "_prunekit_accelerated"
"""Class attribute (True) that marks the modules :func:`prunekit.accelerate` swaps in."""


class AcceleratedModelError(TypeError):
    """A verb that needs dense weights was given a model with accelerated (sparse-kernel)
    layers; ``prunekit.deaccelerate(model)`` gives the dense model back."""


def is_accelerated(module: nn.Module) -> bool:
    """Whether ``module`` is a layer swapped in by :func:`prunekit.accelerate`."""
    return bool(getattr(type(module), ACCELERATED_ATTR, False))


def _top_level(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(name, parent, child name, layer)`` of every accelerated layer not inside another one
    (a ``SparseConv2d`` holds a ``SparseLinear``: only the convolution is listed)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or not is_accelerated(module):
            continue
        if any(name.startswith(p + ".") for p in inside):
            continue
        inside.append(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        yield name, parent, child, module


def accelerated_layers(model: nn.Module) -> list[str]:
    """Names of the accelerated layers of ``model`` (outermost only); ``[""]`` when ``model``
    is itself one."""
    if is_accelerated(model):
        return [""]
    return [name for name, *_ in _top_level(model)]


def refuse_accelerated(model: nn.Module, verb: str) -> None:
    """Raise :class:`AcceleratedModelError` when ``model`` holds accelerated layers.

    ``verb`` names the caller in the message (``"prune"``, ``"quantize"``, ...).
    """
    names = accelerated_layers(model)
    if not names:
        return
    shown = ", ".join(repr(n or "<root>") for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    kinds = sorted({type(m).__name__ for m in model.modules() if is_accelerated(m)})
    raise AcceleratedModelError(
        f"{verb}: this model was accelerated: layer(s) {shown}{more} are {'/'.join(kinds)} "
        "modules whose weights are packed sparse buffers that only prunekit's CPU kernels read; "
        f"{verb} needs ordinary weights (nn.Linear / nn.Conv2d). Call "
        "prunekit.deaccelerate(model) first: it gives those layers back with the same weights "
        "(zeros included); accelerate again afterwards."
    )


def decode_accelerated(model: nn.Module) -> nn.Module:
    """Replace every accelerated layer of ``model`` by the dense module it encodes, in place.

    Returns ``model`` (or the dense module when ``model`` is itself an accelerated layer).
    """
    if is_accelerated(model):
        dense = model.to_dense()
        dense.train(model.training)
        return dense
    for _, parent, child, module in list(_top_level(model)):
        dense = module.to_dense()
        dense.train(module.training)
        parent._modules[child] = dense
    return model


@contextlib.contextmanager
def accelerated_as_dense(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every accelerated layer of ``model`` is replaced by the dense
    ``nn.Linear`` / ``nn.Conv2d`` it encodes, so ``state_dict``, counting and tracing see the
    original architecture; the accelerated layers are put back afterwards.

    Example:
        >>> with accelerated_as_dense(model):  # doctest: +SKIP
        ...     model.save_pretrained(folder)
    """
    if is_accelerated(model):
        raise TypeError(
            f"{type(model).__name__} is itself an accelerated layer; pass the model that holds "
            "it, or call its to_dense()"
        )
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for _, parent, child, module in list(_top_level(model)):
        dense = module.to_dense()
        dense.train(module.training)
        parent._modules[child] = dense
        swapped.append((parent, child, module))
    try:
        yield model
    finally:
        for parent, child, module in reversed(swapped):
            parent._modules[child] = module
