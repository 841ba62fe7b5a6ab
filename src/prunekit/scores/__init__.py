"""Importance criteria: one file a criterion, each registered under its name.

A criterion maps one layer's weight (and any statistics it collected on data) to a score tensor
of the same shape; higher means more important, and the lowest scores are pruned first. Adding a
criterion is one small file in this folder that calls :func:`register`; every module here is
imported (and so registered) when ``prunekit.scores`` is.

Example:
    >>> import torch
    >>> from prunekit.scores import Criterion, register
    >>> register(Criterion("square", lambda layer: layer.weight.float() ** 2))  # doctest: +SKIP
"""

import importlib
import pkgutil

from prunekit.scores.base import Criterion, LayerContext, get_criterion, list_criteria, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Criterion", "LayerContext", "get_criterion", "list_criteria", "register"]
