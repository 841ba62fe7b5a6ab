"""Latency harness: dense, pruned and accelerated models timed side by side in one process.

Example:
    >>> import torch, prunekit
    >>> from prunekit.runtime.bench import bench
    >>> dense = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> pruned = prunekit.finalize(prunekit.prune(dense, 0.5).model)
    >>> report = bench({"dense": dense, "pruned": pruned}, torch.randn(4, 64), repeats=5, rounds=1)
    >>> [row.model for row in report.rows]
    ['dense', 'pruned']
    >>> report.rows[0].ratio
    1.0

The figures are of *this* machine, this thread count and these input shapes. A latency ratio
measured here says little about another CPU, another batch size or another sequence length:
state all of them with any figure you publish (``report.to_dict()["settings"]`` records them).
"""

from __future__ import annotations

import gc
import math
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.runtime.memory import PeakMemory

__all__ = ["BenchReport", "BenchRow", "bench"]


@dataclass
class BenchRow:
    """One model at one batch size: latency percentiles (ms), throughput and memory growth."""

    model: str
    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    p25_ms: float
    p75_ms: float
    mean_ms: float
    samples: int
    throughput: float  # samples per second: batch / median
    peak_mb: float  # RSS growth of one cold call, MiB
    cuda_peak_mb: float | None = None
    ratio: float = 1.0  # median / median of the reference model at this batch size

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms


@dataclass
class BenchReport:
    """What :func:`bench` returns. ``print(report)`` shows a table; ``to_dict()`` is for code.

    ``reference`` is the first model: every ``ratio`` is a latency ratio to it at the same batch
    size (below 1 is faster). ``settings`` records the thread count, repetitions, input shapes,
    torch version and machine; the timings hold for that machine and those shapes only.
    """

    rows: list[BenchRow]
    reference: str
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, model: str, batch: int | None = None) -> BenchRow:
        """The row of one model (at ``batch``; the first batch size if None)."""
        for r in self.rows:
            if r.model == model and (batch is None or r.batch == batch):
                return r
        raise KeyError(
            f"no row for model {model!r}"
            + (f" at batch {batch}" if batch is not None else "")
            + f"; models: {', '.join(dict.fromkeys(r.model for r in self.rows))}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "settings": dict(self.settings),
            "rows": [{**asdict(r), "iqr_ms": r.iqr_ms} for r in self.rows],
        }

    def __str__(self) -> str:
        header = (
            "model",
            "batch",
            "median ms",
            "p10 ms",
            "p90 ms",
            "samples/s",
            "peak MiB",
            "ratio",
        )
        rows = [
            (
                r.model,
                str(r.batch),
                _ms(r.median_ms),
                _ms(r.p10_ms),
                _ms(r.p90_ms),
                f"{r.throughput:,.1f}",
                f"{r.peak_mb:.1f}" + (f" (cuda {r.cuda_peak_mb:.1f})" if r.cuda_peak_mb else ""),
                f"{r.ratio:.3f}",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )

        s = self.settings
        out = [
            f"prunekit bench: {s.get('threads')} thread(s), {s.get('repeats')} timed calls per "
            f"model in {s.get('rounds')} rotating round(s), {s.get('warmup')} warm-up calls; "
            f"device {s.get('device')}",
            line(header),
            "  ".join("-" * w for w in widths),
            *map(line, rows),
            f"ratio = median latency / median of {self.reference!r} at the same batch "
            "(below 1 is faster); peak MiB = RSS growth of one cold call.",
            f"Timings are of this machine ({s.get('machine')}) and these input shapes "
            f"({s.get('input_shapes')}); they do not carry over to others.",
        ]
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(models={len(dict.fromkeys(r.model for r in self.rows))}, "
            f"rows={len(self.rows)}, reference={self.reference!r})"
        )


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


# ---------------------------------------------------------------- arguments


def _models(models: Any) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {"model": models}
    if isinstance(models, Mapping):
        if not models:
            raise ValueError("bench: models is empty; pass a module or a dict name -> module")
        out: dict[str, nn.Module] = {}
        for name, model in models.items():
            if not isinstance(name, str):
                raise TypeError(f"bench: model names must be strings, got {name!r}")
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"bench: models[{name!r}] is a {type(model).__name__}, not an nn.Module"
                )
            out[name] = model
        return out
    raise TypeError(
        f"bench: models must be an nn.Module or a dict name -> nn.Module, got {type(models).__name__}"
    )


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for v in inputs.values() for t in _tensors(v)]
    if isinstance(inputs, (list, tuple)):
        return [t for v in inputs for t in _tensors(v)]
    return []


def _batch_of(inputs: Any) -> int:
    for t in _tensors(inputs):
        if t.dim() >= 1:
            return int(t.shape[0])
    raise ValueError(
        "bench: example_inputs hold no tensor with a batch dimension; pass a tensor, a tuple of "
        "positional inputs or a dict of keyword inputs whose first tensor is batched"
    )


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, (torch.Tensor, tuple, Mapping)):
        raise TypeError(
            "bench: example_inputs must be a tensor, a tuple of positional inputs or a dict of "
            f"keyword inputs, got {type(inputs).__name__}"
        )
    if isinstance(inputs, Mapping) and not all(isinstance(k, str) for k in inputs):
        raise TypeError("bench: keyword inputs need string keys")


def _rebatch(inputs: Any, base: int, batch: int) -> Any:
    """Tensors whose leading dim is ``base`` get ``batch`` rows (the first rows, cycled)."""
    if batch == base:
        return inputs
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() >= 1 and inputs.shape[0] == base:
            index = torch.arange(batch, device=inputs.device) % base
            return inputs.index_select(0, index).contiguous()
        return inputs
    if isinstance(inputs, Mapping):
        return {k: _rebatch(v, base, batch) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_rebatch(v, base, batch) for v in inputs)
    return inputs


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _shapes(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape)
    if isinstance(inputs, Mapping):
        return {k: _shapes(v) for k, v in inputs.items() if _tensors(v)}
    if isinstance(inputs, (list, tuple)):
        return [_shapes(v) for v in inputs if _tensors(v)]
    return None


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"bench: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _uses_cuda(models: Iterable[nn.Module], inputs: Any) -> bool:
    if any(t.is_cuda for t in _tensors(inputs)):
        return True
    return any(p.is_cuda for m in models for p in m.parameters())


# ---------------------------------------------------------------- the harness


def bench(
    models: nn.Module | dict[str, nn.Module],
    example_inputs: Any,
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    rounds: int = 5,
    batch_sizes: Sequence[int] | None = None,
    progress: bool = True,
) -> BenchReport:
    """Time models side by side on the same inputs: median and spread of latency, throughput,
    peak memory growth, and the latency ratio of each model to the first.

    Args:
        models: one ``nn.Module``, or a dict ``name -> module`` (e.g. ``{"dense": d, "pruned": p,
            "accelerated": a}``). The first is the reference for the ``ratio`` column.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs. The
            leading dimension of the first tensor is the batch size.
        threads: torch intra-op threads for the run (the previous setting is restored after);
            None keeps the current count, which is still recorded in ``settings``.
        warmup: untimed calls per model (and batch size) before timing.
        repeats: timed calls per model (and batch size) in all, split evenly over ``rounds``.
        rounds: rounds of timing; each round runs every model in turn, and the order rotates
            from round to round so slow drift (thermal, other processes) hits all models alike.
        batch_sizes: batch sizes to time; inputs are re-batched by repeating their rows (every
            tensor whose leading dimension equals the batch of ``example_inputs``). None times
            ``example_inputs`` as given.
        progress: a tqdm bar, shown only once the run has lasted more than a second.

    Every call runs under ``torch.inference_mode`` with the models in eval mode (their
    train/eval flags are restored after). Peak memory is the growth of resident memory (and of
    CUDA's allocated memory, on GPU) over one cold call made before the warm-up, outside the
    timed loops; models measured later in the same process can reuse memory freed by earlier
    ones, so compare peaks from separate processes where it matters. On CUDA each call is
    synchronised before the clock is read.

    Timings hold for this machine, this thread count and these input shapes only.
    """
    named = _models(models)
    _check_inputs(example_inputs)
    warmup = _int(warmup, "warmup", 0)
    repeats = _int(repeats, "repeats", 1)
    rounds = _int(rounds, "rounds", 1)
    if threads is not None:
        threads = _int(threads, "threads", 1)
    base = _batch_of(example_inputs)
    if batch_sizes is None:
        sizes = [base]
    else:
        if isinstance(batch_sizes, (int, str)) or not isinstance(batch_sizes, Iterable):
            raise TypeError(f"bench: batch_sizes must be a list of integers, got {batch_sizes!r}")
        sizes = [_int(b, "each batch size", 1) for b in batch_sizes]
        if not sizes:
            raise ValueError("bench: batch_sizes is empty")
        sizes = list(dict.fromkeys(sizes))
    rounds = min(rounds, repeats)
    per_round = [repeats // rounds + (1 if i < repeats % rounds else 0) for i in range(rounds)]
    cuda = _uses_cuda(named.values(), example_inputs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    previous_threads = torch.get_num_threads()
    modes = {name: [(m, m.training) for m in model.modules()] for name, model in named.items()}
    names = list(named)
    total = len(sizes) * len(names) * (1 + warmup + repeats)
    bar = _progress(total, progress)
    rows: list[BenchRow] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        for model in named.values():
            model.eval()
        with torch.inference_mode():
            for batch in sizes:
                inputs = _rebatch(example_inputs, base, batch)
                peaks: dict[str, PeakMemory] = {}
                for name in names:
                    gc.collect()
                    with PeakMemory() as mem:
                        _checked_call(named[name], inputs, name)
                        sync()
                    peaks[name] = mem
                    for _ in range(warmup):
                        _call(named[name], inputs)
                    sync()
                    bar.update(1 + warmup)
                times: dict[str, list[float]] = {name: [] for name in names}
                for r, count in enumerate(per_round):
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        model, out = named[name], times[name]
                        for _ in range(count):
                            start = time.perf_counter_ns()
                            _call(model, inputs)
                            sync()
                            out.append((time.perf_counter_ns() - start) / 1e6)
                        bar.update(count)
                rows.extend(_row(name, batch, times[name], peaks[name]) for name in names)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
        for pairs in modes.values():
            for module, training in pairs:
                module.train(training)

    for batch in sizes:
        ref = next(r for r in rows if r.batch == batch and r.model == names[0])
        for r in rows:
            if r.batch == batch:
                r.ratio = r.median_ms / ref.median_ms if ref.median_ms > 0 else math.nan
    settings = {
        "threads": used_threads,
        "warmup": warmup,
        "repeats": repeats,
        "rounds": rounds,
        "batch_sizes": sizes,
        "input_shapes": _shapes(example_inputs),
        "device": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        "note": "timings are of this machine and these input shapes",
    }
    if cuda:
        settings["cuda_device"] = torch.cuda.get_device_name()
    return BenchReport(rows, names[0], settings)


def _checked_call(model: nn.Module, inputs: Any, name: str) -> Any:
    try:
        return _call(model, inputs)
    except Exception as exc:
        raise RuntimeError(
            f"bench: model {name!r} failed on the example inputs ({type(exc).__name__}: {exc})"
        ) from exc


def _row(name: str, batch: int, times: list[float], mem: PeakMemory) -> BenchRow:
    a = np.asarray(times, dtype=np.float64)
    p10, p25, median, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90]).tolist()
    return BenchRow(
        model=name,
        batch=batch,
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        p25_ms=p25,
        p75_ms=p75,
        mean_ms=float(a.mean()),
        samples=len(times),
        throughput=batch / (median / 1000) if median > 0 else math.inf,
        peak_mb=max(mem.peak_mb, 0.0),
        cuda_peak_mb=mem.cuda_peak_mb,
    )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prunekit bench", unit="call", delay=1.0, leave=False)
