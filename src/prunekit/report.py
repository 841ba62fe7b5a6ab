"""Per-layer sparsity tables: what ``prunekit.stats`` and ``prunekit.prune`` return."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.masks import is_masked, masked_parameters
from prunekit.runtime.accelerated import accelerated_as_dense, accelerated_layers
from prunekit.targets import Target, all_prunable


@dataclass
class LayerStats:
    """One weight: its shape, how many entries, how many are zero, whether a mask holds them."""

    name: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    masked: bool = False

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    @property
    def nonzeros(self) -> int:
        return self.params - self.zeros


@dataclass
class SparsityReport:
    """A per-layer table plus totals. ``print(report)`` shows it; ``to_dict()`` is for code.

    ``params`` / ``zeros`` / ``sparsity`` total the listed layers; ``model_params`` /
    ``model_zeros`` count every parameter of the model (biases, norms, embeddings included).
    """

    layers: list[LayerStats]
    model_params: int
    model_zeros: int
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def layer(self, name: str) -> LayerStats:
        """The row of one parameter (``"fc1.weight"``) or module (``"fc1"``)."""
        for row in self.layers:
            if row.name in (name, f"{name}.weight"):
                return row
        raise KeyError(f"no layer {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {**asdict(r), "shape": list(r.shape), "sparsity": r.sparsity} for r in self.layers
            ],
            "params": self.params,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "model_params": self.model_params,
            "model_zeros": self.model_zeros,
            "skipped": dict(self.skipped),
        }

    def _title(self) -> str:
        return "prunekit stats"

    def __str__(self) -> str:
        header = ("layer", "shape", "params", "nonzeros", "sparsity")
        rows = [
            (
                r.name
                + (" *" if r.masked else "")
                + (" (skipped)" if r.name in self.skipped else ""),
                "x".join(map(str, r.shape)),
                f"{r.params:,}",
                f"{r.nonzeros:,}",
                f"{100 * r.sparsity:6.2f} %",
            )
            for r in self.layers
        ]
        rows.append(
            (
                "total (listed layers)",
                "",
                f"{self.params:,}",
                f"{self.params - self.zeros:,}",
                f"{100 * self.sparsity:6.2f} %",
            )
        )
        model_sparsity = self.model_zeros / self.model_params if self.model_params else 0.0
        rows.append(
            (
                "whole model",
                "",
                f"{self.model_params:,}",
                f"{self.model_params - self.model_zeros:,}",
                f"{100 * model_sparsity:6.2f} %",
            )
        )
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        rule = "  ".join("-" * w for w in widths)

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )

        out = [
            self._title(),
            line(header),
            rule,
            *map(line, rows[:-2]),
            rule,
            *map(line, rows[-2:]),
        ]
        if any(r.masked for r in self.layers):
            out.append("* masked (call prunekit.finalize to bake the zeros in)")
        out.extend(f"skipped {name}: {why}" for name, why in self.skipped.items())
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, params={self.params}, "
            f"sparsity={self.sparsity:.4f})"
        )


@dataclass(repr=False)
class PruneReport(SparsityReport):
    """What ``prunekit.prune`` (and ``oneshot``, ``prune_at_init``) returns: the table, the
    settings, and the pruned model."""

    model: nn.Module | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    """Method-specific detail not shown in the table (e.g. ``oneshot``'s per-layer allocation)."""
    verb: str = "prune"
    """The verb that made the report (``"prune"``, ``"oneshot"``, ...): the table's title."""

    _TITLE_KEYS = ("method", "pattern", "sparsity", "scope", "allocation")

    def __iter__(self):
        """Unpack as ``model, report = prunekit.prune(...)``, like ``prune_structured``."""
        return iter((self.model, self))

    def named(self, verb: str) -> PruneReport:
        """Set the verb the table's title names (a verb built on ``prune``); return self."""
        self.verb = verb
        return self

    def _title(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.settings.items() if k in self._TITLE_KEYS)
        return f"prunekit {self.verb} ({shown})"

    def __str__(self) -> str:
        extra = [f"{k}: {v}" for k, v in self.settings.items() if k not in self._TITLE_KEYS]
        return "\n".join([super().__str__(), *extra])

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "verb": self.verb,
            "settings": dict(self.settings),
            "details": dict(self.details),
        }


def _count_zeros(tensor: torch.Tensor) -> int:
    return int(tensor.numel() - torch.count_nonzero(tensor))


def layer_stats(target: Target) -> LayerStats:
    weight = target.weight()
    return LayerStats(
        name=target.name,
        shape=tuple(weight.shape),
        params=weight.numel(),
        zeros=_count_zeros(weight),
        masked=is_masked(target.module, target.param_name),
    )


def model_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, zeros) over every distinct parameter, masks applied."""
    params = zeros = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            value = getattr(module, name) if is_masked(module, name) else p
            params += p.numel()
            zeros += _count_zeros(value.detach())
    return params, zeros


def stats(model: nn.Module) -> SparsityReport:
    """Per-layer table (shape, params, non-zeros, sparsity) of every prunable or masked weight.

    Works on any model, masked, finalized or accelerated (sparse-kernel layers are listed as
    the dense weights they encode).

    Example:
        >>> import torch, prunekit
        >>> print(prunekit.stats(torch.nn.Linear(4, 2)).params)
        8
    """
    if accelerated_layers(model):  # sparse-kernel layers: counted as the dense ones they encode
        with accelerated_as_dense(model):
            return stats(model)
    targets = all_prunable(model)
    listed = {t.name for t in targets}
    for module_name, module, name in masked_parameters(model):
        target = Target(module_name, module, name)
        if target.name not in listed:
            targets.append(target)
    params, zeros = model_counts(model)
    return SparsityReport([layer_stats(t) for t in targets], params, zeros)
