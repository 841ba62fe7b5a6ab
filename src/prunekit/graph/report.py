"""What a structured prune returns: sizes before / after, per-group rows, settings, notes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunekit.graph.count import CountReport
from prunekit.graph.latency import Latency


@dataclass
class GroupRow:
    """One dependency group in a report: what it spans and how many units it kept."""

    name: str
    kind: str
    units: int
    kept: int
    modules: list[str]
    exact: bool = True

    @property
    def removed(self) -> int:
        return self.units - self.kept


@dataclass
class StructuredReport:
    """What :func:`prune_structured` returns: sizes before / after, measured latency, per-group
    and per-layer tables, the settings and the pruned model (``report.model``; ``model, report =
    ...`` also works). ``latency`` is None when ``measure_latency=False``."""

    model: nn.Module | None
    before: CountReport
    after: CountReport
    groups: list[GroupRow] = field(default_factory=list)
    removed_layers: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    latency: Latency | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self))

    @property
    def params_before(self) -> int:
        return self.before.params

    @property
    def params_after(self) -> int:
        return self.after.params

    @property
    def macs_before(self) -> int:
        return self.before.macs

    @property
    def macs_after(self) -> int:
        return self.after.macs

    @property
    def macs_ratio(self) -> float:
        """MACs of the pruned model / MACs of the dense one (what a ``target_macs`` reached)."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def layers(self) -> list[dict[str, Any]]:
        """Per-layer params and MACs before and after (layers removed entirely show 0 after)."""
        after = {r.name: r for r in self.after.layers}
        rows = []
        for r in self.before.layers:
            a = after.get(r.name)
            rows.append(
                {
                    "name": r.name,
                    "type": r.type,
                    "params_before": r.params,
                    "params_after": a.params if a else 0,
                    "macs_before": r.macs,
                    "macs_after": a.macs if a else 0,
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_ratio": self.params_ratio,
            "latency": self.latency.to_dict() if self.latency is not None else None,
            "groups": [{**vars(g), "removed": g.removed} for g in self.groups],
            "removed_layers": list(self.removed_layers),
            "layers": self.layers(),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        # nested measurements (hardware candidates, the widths-or-blocks choice) are in the notes
        shown = ", ".join(f"{k}={v}" for k, v in self.settings.items() if not isinstance(v, dict))
        lines = [f"prunekit prune_structured ({shown})"]

        def pct(a: int, b: int) -> str:
            return f"{100 * a / b:.1f} %" if b else "-"

        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,} ({pct(self.params_after, self.params_before)}); "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({pct(self.macs_after, self.macs_before)})"
        )
        if self.latency is not None:
            lines.append(str(self.latency))
        if self.groups:
            header = ("group", "kind", "units", "kept", "removed")
            rows = [
                (g.name, g.kind, str(g.units), str(g.kept), str(g.removed)) for g in self.groups
            ]
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
            for row in [header, tuple("-" * w for w in widths), *rows]:
                lines.append(
                    "  ".join(
                        c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))
                    )
                )
        if self.removed_layers:
            lines.append("removed layers: " + ", ".join(self.removed_layers))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"StructuredReport(params {self.params_before} -> {self.params_after}, "
            f"MACs {self.macs_before} -> {self.macs_after})"
        )
