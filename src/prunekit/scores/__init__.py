"""Importance criteria: one file a criterion, each registered under its name.

A criterion maps one layer's weight (and any statistics it collected on data) to a score tensor
of the same shape; higher means more important, and the lowest scores are pruned first. Adding a
criterion is one small file that calls :func:`register`.

Example:
    >>> import torch
    >>> from prunekit.scores import Criterion, register
    >>> register(Criterion("square", lambda layer: layer.weight.float() ** 2))  # doctest: +SKIP
"""

from prunekit.scores import magnitude, random, taylor  # noqa: F401,E402  (registration)
from prunekit.scores.base import Criterion, LayerContext, get_criterion, list_criteria, register

__all__ = ["Criterion", "LayerContext", "get_criterion", "list_criteria", "register"]
