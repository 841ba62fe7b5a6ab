"""The default unit's choice between channel widths and whole blocks for a MAC target.

Per-layer costs (operator overhead, memory-bound normalisations, activations and adds at small
batches) do not shrink with channel widths: at 2x fewer MACs a CIFAR MobileNetV2 at batch 1 runs
about 1.3x faster with every width cut. When ``prune_structured``'s default ``unit`` prunes
widths to ``target_macs`` and the measured speedup falls short of :data:`SPEED_SHORTFALL` of the
MAC ratio, whole blocks meeting the same target are removed from a copy too (``unit="layer"``),
the two models are timed beside the dense one, and the blocks are kept only when they measure
faster by :data:`prunekit.graph.hardware.MIN_GAIN` *and* their outputs on the example inputs are
as close to the dense model's as the widths' (:func:`prunekit.graph.hardware.choose`). Otherwise
the widths stay, with the measurement in a note.

The verb itself lives in :mod:`prunekit.graph.pruner`, which passes itself in (no import cycle).
"""

from __future__ import annotations

import contextvars
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.graph import latency as _latency
from prunekit.graph.hardware import MAX_ERROR_RISE, MIN_GAIN, choose, output_error
from prunekit.graph.latency import Latency
from prunekit.graph.report import StructuredReport

SPEED_SHORTFALL = 0.85  # a measured speedup below this share of the MAC ratio: blocks are tried

# set while the default unit prunes widths it will compare with whole blocks itself: the widths'
# own "unit='layer' would remove fixed costs" hint is then replaced by the measurement
MEASURING_BLOCKS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "measuring_blocks", default=False
)


def falls_short(report: StructuredReport) -> bool:
    """The widths' measured speedup is below :data:`SPEED_SHORTFALL` of their MAC ratio."""
    latency = report.latency
    if latency is None or report.macs_after <= 0:
        return False
    return latency.speedup < SPEED_SHORTFALL * report.macs_before / report.macs_after


def blocks_if_faster(
    call: dict[str, Any],
    widths: StructuredReport,
    prune: Callable[..., StructuredReport],
    depth_call: dict[str, Any],
) -> StructuredReport:
    """``widths`` (pruned from a copy, short of the speed their MACs promise: :func:`falls_short`),
    or whole blocks to the same MAC target when they measure faster with outputs as close to
    dense; ``call["inplace"]`` is honoured at the end.

    ``call`` holds the user's ``prune_structured`` arguments, ``depth_call`` those a
    ``unit="layer"`` call takes; ``prune`` is ``prune_structured``."""
    model, inputs = call["model"], call["example_inputs"]
    fewer = widths.macs_before / max(widths.macs_after, 1)  # the widths' MAC ratio
    try:
        blocks = prune(**{**depth_call, "inplace": False, "measure_latency": False}, unit="layer")
    except (ValueError, MemoryError) as exc:  # no blocks fit the bound, or no room for a copy
        widths.notes.append(f"whole blocks to the same MAC target were not an option: {exc}")
        return handed_back(model, widths, call["inplace"])
    got = _latency.measure(
        {"dense": model, "widths": widths.model, "blocks": blocks.model},
        inputs,
        threads=call["threads"],
        budget_s=2.25,
        min_repeats=5,
    )
    ms = {name: float(got["ms"][name]) for name in ("widths", "blocks")}
    error = {
        "widths": output_error(model, widths.model, inputs),
        "blocks": output_error(model, blocks.model, inputs),
    }
    chosen = choose(ms, error, first="widths")
    dense_ms = float(got["ms"]["dense"])
    measured = {
        "dense_ms": dense_ms,
        "chosen": chosen,
        "candidates": {
            name: {"ms": ms[name], "macs_ratio": report.macs_ratio, "output_error": error[name]}
            for name, report in (("widths", widths), ("blocks", blocks))
        },
    }
    shown = (
        f"dense {dense_ms:.3g} ms; channel widths {ms['widths']:.3g} ms at "
        f"{100 * widths.macs_ratio:.1f} % MACs (output error {error['widths']:.3g}); whole "
        f"blocks ({len(blocks.removed_layers)} removed) {ms['blocks']:.3g} ms at "
        f"{100 * blocks.macs_ratio:.1f} % MACs (output error {error['blocks']:.3g})"
    )
    kept = widths if chosen == "widths" else blocks
    kept.latency = Latency.of(got, chosen)
    kept.settings["unit_choice"] = measured
    if chosen == "widths":
        why = (
            "their outputs are further from the dense model's"
            if error["blocks"] > error["widths"] * (1 + MAX_ERROR_RISE)
            else f"they are not {100 * MIN_GAIN:.0f} % faster"
        )
        widths.notes.append(
            f"the widths run {kept.latency.speedup:.2f}x faster at {fewer:.2f}x fewer MACs, "
            f"so whole blocks were measured too: {shown}. Kept the widths: {why}"
        )
        return handed_back(model, widths, call["inplace"])
    reason = (
        f"target_macs={call['target_macs']}: channel widths ran only "
        f"{dense_ms / ms['widths']:.2f}x faster at {fewer:.2f}x fewer MACs (per-layer costs do "
        f"not shrink with widths), so whole blocks were removed instead ({shown}). Pass "
        "unit='channel' to prune widths only"
    )
    warnings.warn(f"prunekit: {reason}", UserWarning, stacklevel=3)
    blocks.notes.insert(0, reason)
    blocks.settings["unit_switched_from"] = "channel"
    return handed_back(model, blocks, call["inplace"])


def handed_back(model: nn.Module, report: StructuredReport, inplace: bool) -> StructuredReport:
    """With ``inplace``, ``model`` becomes the pruned copy (its modules, tensors, hooks and
    structure record); the report then names ``model``."""
    if inplace and report.model is not model:
        pruned = report.model
        model.__class__ = type(pruned)
        model.__dict__.clear()
        model.__dict__.update(pruned.__dict__)
        report.model = model
    return report
