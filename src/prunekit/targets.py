"""Which weights a pruning call touches: default targets, name patterns, the output head.

Name patterns are globs (``"encoder.*.fc1"``, ``"*attn*"``) or, with a ``re:`` prefix, regular
expressions matched against the whole name (``"re:layers\\.[0-3]\\..*"``). A pattern is tried
against the module name (``"fc1"``) and the parameter name (``"fc1.weight"``).

By default prunekit targets the ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
Hugging Face ``Conv1D`` (GPT-2) layer, except the model's output head: a Hugging Face model's
output embeddings (``get_output_embeddings()``), or otherwise the last ``nn.Linear`` registered in
the model (the classifier of a typical network). Embeddings, norms and biases are never targeted
by default. Naming a layer in ``targets`` includes it, head or not.

``nn.Embedding`` tables are pruned only on request: :func:`prunekit.prune` (data-free criteria)
accepts them when a ``targets`` pattern names them, e.g. ``targets=["encoder.*",
"embeddings.word_embeddings"]``; entries of a table are ranked like a Linear's, one row per
token (``scope="row"`` keeps the same share of every token's vector).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.runtime.accelerated import refuse_accelerated

PRUNABLE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Target:
    """One prunable weight: ``module.<param_name>`` found at ``module_name`` in the model."""

    module_name: str
    module: nn.Module
    param_name: str = "weight"

    @property
    def name(self) -> str:
        """Full parameter name, as in ``model.state_dict()``."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def transposed(self) -> bool:
        """True for layers that store their weight as (in, out), like Hugging Face ``Conv1D``."""
        return _is_hf_conv1d(self.module)

    def weight(self) -> torch.Tensor:
        """The effective (masked) weight, detached."""
        return getattr(self.module, self.param_name).detach()

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a weight-shaped tensor as (out, in): conv kernels as out x (in*kh*kw)."""
        if self.transposed:
            return tensor.t()
        return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))  # -1 fails on 0 rows

    def from_matrix(self, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`as_matrix`."""
        if self.transposed:
            return matrix.t().contiguous()
        return matrix.reshape(shape)


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    base = getattr(module, "_prunekit_base", cls)
    return base.__name__ == "Conv1D" and base.__module__.startswith("transformers")


def is_prunable(module: nn.Module) -> bool:
    """Whether prunekit knows how to prune ``module.weight`` (Linear, Conv, HF Conv1D)."""
    return isinstance(module, PRUNABLE_TYPES) or _is_hf_conv1d(module)


def matches(pattern: str, name: str) -> bool:
    """Match one name pattern (glob, or ``re:`` regex over the whole name)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _target_matches(pattern: str, target: Target) -> bool:
    return matches(pattern, target.module_name) or matches(pattern, target.name)


def output_head_name(model: nn.Module) -> str | None:
    """Best guess at the model's output head: HF output embeddings, else the last Linear."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            for name, module in model.named_modules():
                if module is head:
                    return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def all_prunable(model: nn.Module, embeddings: bool = False) -> list[Target]:
    """Every prunable weight in the model, head included, in registration order; with
    ``embeddings=True`` also every ``nn.Embedding`` table."""
    found = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        wanted = is_prunable(module) or (embeddings and isinstance(module, nn.Embedding))
        if wanted and getattr(module, "weight", None) is not None:
            if id(module._parameters["weight"]) in seen:
                continue  # tied weights: prune once
            seen.add(id(module._parameters["weight"]))
            found.append(Target(name, module))
    return found


def _check_patterns(kind: str, patterns: Sequence[str], candidates: list[Target]) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{kind} patterns must be strings, got {pattern!r}")
        if not any(_target_matches(pattern, t) for t in candidates):
            names = ", ".join(t.module_name or "<root>" for t in candidates) or "(none)"
            raise ValueError(
                f"{kind} pattern {pattern!r} matches no prunable layer. Prunable layers: {names}. "
                "Patterns are globs, or regular expressions with a 're:' prefix."
            )


def _as_patterns(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def resolve_targets(
    model: nn.Module,
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    *,
    embeddings: bool = False,
) -> list[Target]:
    """The weights a call prunes, after ``targets`` and ``ignore`` patterns.

    With ``embeddings=True``, ``nn.Embedding`` tables that a ``targets`` pattern matches are
    included too (never by default). Raises ValueError when a pattern matches nothing (listing
    the prunable names) or when nothing is left to prune; raises
    :class:`prunekit.AcceleratedModelError` for a model with accelerated layers.
    """
    refuse_accelerated(model, "pruning")  # their weights are buffers: never "nothing to prune"
    candidates = all_prunable(model, embeddings=embeddings and bool(_as_patterns(targets)))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer: prunekit prunes the weights of "
            "nn.Linear, nn.Conv1d/2d/3d and Hugging Face Conv1D modules."
        )
    target_patterns = _as_patterns(targets)
    ignore_patterns = _as_patterns(ignore)
    _check_patterns("targets", target_patterns, candidates)
    _check_patterns("ignore", ignore_patterns, candidates)
    if target_patterns:
        chosen = [t for t in candidates if any(_target_matches(p, t) for p in target_patterns)]
    else:
        head = output_head_name(model)
        chosen = [t for t in candidates if t.module_name != head]
    chosen = [t for t in chosen if not any(_target_matches(p, t) for p in ignore_patterns)]
    if not chosen:
        names = ", ".join(t.module_name for t in candidates)
        raise ValueError(
            "nothing to prune: every prunable layer was excluded (the output head is excluded by "
            f"default; name it in `targets` to include it). Prunable layers: {names}."
        )
    return chosen


def per_layer_overrides(
    chosen: list[Target], per_layer: dict[str, float] | None
) -> dict[str, float]:
    """Map target names to their own sparsity; the first matching pattern wins."""
    if not per_layer:
        return {}
    _check_patterns("per_layer", list(per_layer), chosen)
    overrides: dict[str, float] = {}
    for target in chosen:
        for pattern, value in per_layer.items():
            if _target_matches(pattern, target):
                overrides[target.name] = value
                break
    return overrides
