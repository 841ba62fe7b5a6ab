"""Measure a model the way the pipeline reports it after every stage: parameters, non-zeros,
MACs, bytes on disk as saved, latency side by side with the dense model, and quality.

Every figure is measured here, on this machine, in this process; nothing is estimated. Latency
uses :func:`prunekit.bench` (warm-up, rotated rounds, median, fixed thread count) with the dense
model timed in the same call, so the ratio compares like with like.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from prunekit.compress.io import _dedupe_shared, effective_state, save
from prunekit.distributed.decide import decided_by_main
from prunekit.recipes import served

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass
class MeasureSettings:
    """What to measure after each stage (the recipe's ``measure:`` section)."""

    latency: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    repeats: int = 30
    threads: int | None = None
    every_stage: bool = True
    accelerate: bool | None = None  # None: auto (see prunekit.recipes.served)

    @classmethod
    def from_recipe(cls, section: dict[str, Any]) -> MeasureSettings:
        return cls(**section)


MODEL_FILES = ("config.json", "prunekit.json")


def folder_bytes(path: Path) -> int:
    """Bytes of a saved model: its weight files (``*.safetensors``) and the JSON it needs to
    load (``config.json``, ``prunekit.json``). Side files copied from a source folder
    (tokenizer, sentence-transformers modules) are not the model and are not counted."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size
        for p in path.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.name in MODEL_FILES)
    )


def _unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for module in model.modules():
        for name, _ in module.named_parameters(recurse=False):
            value = getattr(module, name)  # the masked value on a masked layer
            key = id(module._parameters[name])
            if key not in seen:
                seen.add(key)
                out.append(value.detach())
    return out


def count_nonzeros(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) over every parameter, masks applied, ties counted once."""
    params = _unique_parameters(model)
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def fp32_bytes(model: nn.Module) -> int:
    """Size of the model's state as one plain float32 safetensors file (the usual reference);
    tied weights are stored once, as ``prunekit.save`` stores them."""
    kept, _ = _dedupe_shared(effective_state(model)[0])
    plain = {n: t.float() if t.is_floating_point() else t for n, t in kept.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(plain, str(path))
        return path.stat().st_size


def compressed_bytes(model: nn.Module) -> int:
    """Bytes of ``prunekit.save(model, compressed=True)`` (weights + metadata)."""
    with tempfile.TemporaryDirectory() as tmp:
        return folder_bytes(save(model, Path(tmp) / "m", compressed=True))


def layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Per prunable layer: name, shape, parameters and non-zeros of its weight."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES) or type(module).__name__ == "Conv1D":
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            w = weight.detach()
            rows.append(
                {
                    "name": name,
                    "shape": list(w.shape),
                    "params": w.numel(),
                    "nonzeros": int(torch.count_nonzero(w)),
                }
            )
    return rows


@decided_by_main
def latency(
    model: nn.Module, dense: nn.Module, example_inputs: Any, settings: MeasureSettings
) -> dict[str, dict[str, Any]]:
    """Median latency of ``model`` and ``dense`` at each batch size, timed side by side, with
    the spread of each one's repeated calls (interquartile range / median: ``spread``,
    ``dense_spread``), which the report uses to flag a noisy measurement.

    A model with sparse layers is timed as served (:mod:`prunekit.recipes.served`): after
    ``prunekit.accelerate`` at each batch size, and its row says what was swapped
    (``accelerated``). Under ``torch.distributed`` rank 0 times and every rank gets its
    figures (:func:`prunekit.distributed.decide.main_decides`), so all take the same
    decisions."""
    if not served.serves_accelerated(model, settings.accelerate):
        return _timed(model, dense, example_inputs, settings)
    out = {}
    for batch in settings.batch_sizes:
        one = replace(settings, batch_sizes=[batch])
        try:
            fast, swapped = served.served_at(model, example_inputs, batch, settings.threads)
        except MemoryError as exc:  # the accelerated copy would not fit: time it as it is
            warnings.warn(f"prunekit compress: latency timed without accelerate: {exc}",
                          UserWarning, stacklevel=2)  # fmt: skip
            row = _timed(model, dense, example_inputs, one)[str(batch)]
            out[str(batch)] = {**row, "served_as_is": f"accelerate needs a copy: {exc}"}
            continue
        out[str(batch)] = {**_timed(fast, dense, example_inputs, one)[str(batch)],
                           "accelerated": swapped}  # fmt: skip
        del fast
    return out


def _timed(
    model: nn.Module, dense: nn.Module, example_inputs: Any, settings: MeasureSettings
) -> dict[str, dict[str, Any]]:
    """:func:`latency` of ``model`` as it is."""
    from prunekit.runtime.bench import bench

    report = bench(
        {"dense": dense, "model": model},
        example_inputs,
        threads=settings.threads,
        warmup=max(2, settings.repeats // 5),
        repeats=settings.repeats,
        rounds=min(5, settings.repeats),
        batch_sizes=settings.batch_sizes,
        progress=False,
    )
    out = {}
    for batch in settings.batch_sizes:
        row, ref = report.row("model", batch), report.row("dense", batch)
        out[str(batch)] = {
            "ms": row.median_ms,
            "dense_ms": ref.median_ms,
            "ratio": row.median_ms / ref.median_ms if ref.median_ms > 0 else float("nan"),
            "spread": _spread(row),
            "dense_spread": _spread(ref),
        }
    return out


RETIME_CALLS = 4
"""Side-by-side timings added when a search trial's latency verdict is re-timed: the verdict
then uses the median ratio of the first timing and these (five in all)."""


@decided_by_main
def retime(
    model: nn.Module,
    dense: nn.Module,
    example_inputs: Any,
    settings: MeasureSettings,
    batch: int,
    first: dict[str, Any],
    reason: str,
    calls: int = RETIME_CALLS,
) -> dict[str, Any]:
    """Time ``model`` beside ``dense`` ``calls`` more times at ``batch`` (each time as
    :func:`latency` does) and return the latency row that a verdict should use: the medians
    over the first timing ``first`` and these, with ``retimed`` recording why (``reason``),
    every ratio measured and the first row.

    Example:
        >>> row = retime(net, dense, x, settings, 32, first=lat["32"], reason="near the bound")  # doctest: +SKIP
        >>> row["ratio"], row["retimed"]["ratios"]  # doctest: +SKIP
        (0.78, [0.84, 0.71, 0.78, 0.8, 0.76])
    """
    # as the first timing was: served accelerated (accelerated once, here) or as it is
    one = replace(settings, batch_sizes=[batch], accelerate=False)
    timed, swapped = model, first.get("accelerated")
    if swapped is not None:
        timed, swapped = served.served_at(model, example_inputs, batch, settings.threads)
    rows = [first] + [latency(timed, dense, example_inputs, one)[str(batch)] for _ in range(calls)]

    def median(key: str) -> float:
        values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        return statistics.median(values) if values else float("nan")

    row = {
        "ms": median("ms"),
        "dense_ms": median("dense_ms"),
        "ratio": median("ratio"),
        "spread": median("spread"),
        "dense_spread": median("dense_spread"),
    }
    if swapped is not None:
        row["accelerated"] = swapped
    return row | {
        "retimed": {
            "reason": reason,
            "ratios": [r.get("ratio") for r in rows],
            "first": {k: v for k, v in first.items() if k != "retimed"},
        },
    }


def _spread(row: Any) -> float:
    """Interquartile range over the median of one model's timed calls."""
    iqr = row.p75_ms - row.p25_ms
    return iqr / row.median_ms if row.median_ms > 0 else float("inf")


def measure(
    model: nn.Module,
    *,
    dense: nn.Module | None,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float] | None,
    settings: MeasureSettings,
    saved: Path | None = None,
) -> dict[str, Any]:
    """All the figures of one row of the stage table (``dense=None`` measures the reference)."""
    from prunekit.graph.count import count

    params, nonzeros = count_nonzeros(model)
    row: dict[str, Any] = {"params": params, "nonzeros": nonzeros}
    if example_inputs is not None:
        row["macs"] = count(model, example_inputs).macs
    if dense is None:  # the reference: the plain fp32 safetensors file
        row["fp32_bytes"] = row["file_bytes"] = fp32_bytes(model)
        row["file_is"] = "fp32 safetensors"
    elif saved is not None:
        row["file_bytes"], row["file_is"] = folder_bytes(saved), "saved folder"
    else:
        row["file_bytes"], row["file_is"] = compressed_bytes(model), "save(compressed=True)"
    if settings.latency and example_inputs is not None and dense is not None:
        row["latency"] = latency(model, dense, example_inputs, settings)
    if evaluate is not None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                row["quality"] = float(evaluate(model))
        finally:
            model.train(was_training)
    row["layers"] = layer_rows(model)
    return row
