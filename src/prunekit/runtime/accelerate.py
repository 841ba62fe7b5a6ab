"""Run sparse ``nn.Linear`` layers with kernels that touch only the non-zeros (CPU, fp32).

:func:`accelerate` swaps each sparse ``nn.Linear`` (finalized, or still masked: the effective
weight is used) for a :class:`SparseLinear`, which stores the weight in CSR form (float32
values, uint16 column indices when ``in_features <= 65536``, int64 row pointers) and runs
numba-compiled kernels: one for a single input row (memory-bound; parallel over output rows)
and one for several rows (parallel over chunks of output rows; each non-zero is multiplied into
a vector of the batch). A layer is swapped only where the sparse kernel is measurably faster on
*this* machine for the input shape the layer saw on ``example_inputs``; elsewhere the dense
module stays. The kernels need ``numba`` (``pip install 'prunekit[fast]'``); without it
:func:`accelerate` keeps every module dense and says why.

Example:
    >>> import torch, prunekit
    >>> from prunekit.runtime.accelerate import accelerate
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> pruned = prunekit.finalize(prunekit.prune(net, 0.9).model)
    >>> fast, report = accelerate(pruned, torch.randn(1, 64))
    >>> len(report.rows)
    2

Inference only: the sparse weights are buffers, not parameters, and when autograd needs a
gradient through a swapped layer it is computed with the dense weight rebuilt on the fly.
Timings, and so the swap decisions, hold for this machine, thread count and input shapes only.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NUMBA_AVAILABLE",
    "AccelerateReport",
    "AccelerateRow",
    "SparseLinear",
    "accelerate",
]

try:  # numba is an optional extra
    import numba
    from numba import njit, prange

    NUMBA_AVAILABLE = True
    NUMBA_ERROR = ""
except Exception as _exc:  # pragma: no cover - depends on the environment
    numba = None
    NUMBA_AVAILABLE = False
    NUMBA_ERROR = f"numba is not importable ({type(_exc).__name__}: {_exc}); install prunekit[fast]"

_BATCH_TILE = 64  # batch columns accumulated at once by the multi-row kernel

# ---------------------------------------------------------------- kernels

if NUMBA_AVAILABLE:

    @njit(parallel=True, fastmath=False, cache=False)
    def _spmv(values, cols, rowptr, x, bias, has_bias, y):  # pragma: no cover - compiled
        """y[r] = sum_k values[k] * x[cols[k]] (+ bias[r]) for one input row x."""
        n = rowptr.shape[0] - 1
        for r in prange(n):
            # one accumulator, non-zeros in column order: without fastmath the sum cannot be
            # reordered, and more accumulators measured no faster (the gather x[cols[k]] bounds it)
            acc = np.float32(0.0)
            for k in range(rowptr[r], rowptr[r + 1]):
                acc += values[k] * x[cols[k]]
            if has_bias:
                acc += bias[r]
            y[r] = acc

    @njit(parallel=True, fastmath=False, cache=False)
    def _spmm(values, cols, rowptr, xt, bias, has_bias, y, nchunks):  # pragma: no cover
        """y[b, r] = sum_k values[k] * xt[cols[k], b] (+ bias[r]); xt is the input transposed."""
        n = rowptr.shape[0] - 1
        batch = xt.shape[1]
        acc_len = min(batch, _BATCH_TILE)
        for chunk in prange(nchunks):
            lo = chunk * n // nchunks
            hi = (chunk + 1) * n // nchunks
            acc = np.empty(acc_len, dtype=np.float32)
            for b0 in range(0, batch, _BATCH_TILE):
                tb = min(_BATCH_TILE, batch - b0)
                for r in range(lo, hi):
                    for b in range(tb):
                        acc[b] = np.float32(0.0)
                    k = rowptr[r]
                    end = rowptr[r + 1]
                    # four non-zeros per pass: one load/store of acc for four multiply-adds,
                    # still added in order, so the result does not depend on the unrolling
                    while k + 4 <= end:
                        v0 = values[k]
                        v1 = values[k + 1]
                        v2 = values[k + 2]
                        v3 = values[k + 3]
                        x0 = xt[cols[k], b0 : b0 + tb]
                        x1 = xt[cols[k + 1], b0 : b0 + tb]
                        x2 = xt[cols[k + 2], b0 : b0 + tb]
                        x3 = xt[cols[k + 3], b0 : b0 + tb]
                        for b in range(tb):
                            acc[b] = (((acc[b] + v0 * x0[b]) + v1 * x1[b]) + v2 * x2[b]) + v3 * x3[
                                b
                            ]
                        k += 4
                    while k < end:
                        v = values[k]
                        xr = xt[cols[k], b0 : b0 + tb]
                        for b in range(tb):
                            acc[b] += v * xr[b]
                        k += 1
                    if has_bias:
                        for b in range(tb):
                            y[b0 + b, r] = acc[b] + bias[r]
                    else:
                        for b in range(tb):
                            y[b0 + b, r] = acc[b]


def _kernel_threads() -> int:
    """Follow torch's intra-op thread count, capped at numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def sparse_linear_numpy(
    values: np.ndarray,
    cols: np.ndarray,
    rowptr: np.ndarray,
    x2d: np.ndarray,
    bias: np.ndarray | None,
    out_features: int,
) -> np.ndarray:
    """``x2d @ W.T + bias`` with W in CSR form; ``x2d`` is a C-contiguous float32 (N, in) array."""
    if not NUMBA_AVAILABLE:
        raise RuntimeError(NUMBA_ERROR)
    numba.set_num_threads(_kernel_threads())
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(1, dtype=np.float32)
    n = x2d.shape[0]
    if n == 1:
        y = np.empty((1, out_features), dtype=np.float32)
        _spmv(values, cols, rowptr, x2d[0], b, has_bias, y[0])
        return y
    y = np.empty((n, out_features), dtype=np.float32)
    xt = np.ascontiguousarray(x2d.T)
    nchunks = max(1, min(out_features, 4 * numba.get_num_threads()))
    _spmm(values, cols, rowptr, xt, b, has_bias, y, nchunks)
    return y


# ---------------------------------------------------------------- the module


class SparseLinear(nn.Module):
    """A drop-in for an fp32 ``nn.Linear`` whose weight is stored and multiplied as CSR.

    Buffers: ``values`` (float32, the non-zeros row by row), ``col_indices`` (int16 holding
    uint16 column numbers when ``in_features <= 65536``, else int32), ``row_ptr`` (int64,
    ``out_features + 1``) and ``bias`` (or None). Pickles, deep-copies and round-trips through
    ``state_dict`` like any module; :meth:`to_dense` gives the ``nn.Linear`` back.

    Inputs of any leading shape ``(..., in_features)`` in float32 on CPU run the numba kernels;
    other dtypes or devices, inputs that need a gradient, or a missing numba fall back to
    ``F.linear`` with the dense weight rebuilt (slow, but correct).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        values: torch.Tensor,
        col_indices: torch.Tensor,
        row_ptr: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.register_buffer("values", values.detach().to(torch.float32).contiguous())
        self.register_buffer("col_indices", col_indices.contiguous())
        self.register_buffer("row_ptr", row_ptr.to(torch.int64).contiguous())
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).contiguous()
        )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseLinear:
        """Build from a dense ``(out_features, in_features)`` weight (zeros are dropped)."""
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        w = weight.detach().to("cpu", torch.float32)
        out_f, in_f = w.shape
        keep = w != 0
        counts = keep.sum(dim=1)
        row_ptr = torch.zeros(out_f + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(counts, 0)
        rows_cols = keep.nonzero()  # row-major order
        values = w[keep]
        cols = rows_cols[:, 1]
        if in_f <= 65536:
            col_indices = torch.from_numpy(cols.numpy().astype(np.uint16).view(np.int16))
        else:
            col_indices = cols.to(torch.int32)
        b = None if bias is None else bias.detach().to("cpu", torch.float32)
        return cls(in_f, out_f, values, col_indices, row_ptr, b)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """Build from an ``nn.Linear``, masked or not (its effective weight)."""
        return cls.from_dense(linear.weight, linear.bias)

    # -- numpy views of the buffers, cached while the buffer tensors stay the same objects
    def _np(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        buffers = self._buffers
        key = (buffers["values"], buffers["col_indices"], buffers["row_ptr"], buffers["bias"])
        cached = self.__dict__.get("_np_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
            return cached[1]
        cols = self.col_indices.numpy()
        if cols.dtype == np.int16:
            cols = cols.view(np.uint16)
        bias = None if self.bias is None else self.bias.numpy()
        arrays = (self.values.numpy(), cols, self.row_ptr.numpy(), bias)
        self.__dict__["_np_cache"] = (key, arrays)
        return arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_np_cache", None)
        return state

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` dense weight."""
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=self.values.device),
            self.row_ptr[1:] - self.row_ptr[:-1],
        )
        cols = self.col_indices.to(torch.int64)
        if self.col_indices.dtype == torch.int16:
            cols = cols & 0xFFFF  # stored as uint16
        w = torch.zeros(
            self.out_features, self.in_features, dtype=torch.float32, device=self.values.device
        )
        w[rows, cols] = self.values
        return w

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight (zeros included) and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            NUMBA_AVAILABLE
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.dim() >= 1
            and x.shape[-1] == self.in_features
            and self.values.device.type == "cpu"
        ):
            lead = x.shape[:-1]
            x2d = x.detach().reshape(-1, self.in_features)
            if x2d.shape[0]:
                if not x2d.is_contiguous():
                    x2d = x2d.contiguous()
                values, cols, rowptr, bias = self._np()
                y = sparse_linear_numpy(values, cols, rowptr, x2d.numpy(), bias, self.out_features)
                return torch.from_numpy(y).view(*lead, self.out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        idx = "uint16" if self.col_indices.dtype == torch.int16 else "int32"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.3f}, "
            f"format=CSR(float32 values, {idx} columns), kernel=numba"
        )


# ---------------------------------------------------------------- the report


@dataclass
class AccelerateRow:
    """One ``nn.Linear``: its density, the timed latencies (ms) and whether it was swapped."""

    name: str
    in_features: int
    out_features: int
    input_shape: list[int] | None
    density: float
    dense_ms: float | None
    sparse_ms: float | None
    swapped: bool
    reason: str

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or self.sparse_ms is None or self.sparse_ms <= 0:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class AccelerateReport:
    """What :func:`accelerate` returns beside the model. ``print(report)`` shows a table."""

    rows: list[AccelerateRow]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def swapped(self) -> list[str]:
        return [r.name for r in self.rows if r.swapped]

    def row(self, name: str) -> AccelerateRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no Linear named {name!r}; layers: {', '.join(r.name for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "rows": [{**asdict(r), "speedup": r.speedup} for r in self.rows],
        }

    def __str__(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        header = ("layer", "shape", "input", "density", "dense ms", "sparse ms", "speedup", "swap")
        rows = [
            (
                r.name or "(root)",
                f"{r.out_features}x{r.in_features}",
                "-" if r.input_shape is None else "x".join(map(str, r.input_shape)),
                f"{r.density:.3f}",
                ms(r.dense_ms),
                ms(r.sparse_ms),
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                "yes" if r.swapped else f"no ({r.reason})",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        s = self.settings
        out = [
            f"prunekit accelerate: {len(self.swapped)}/{len(self.rows)} Linear layer(s) swapped; "
            f"{s.get('threads')} thread(s), min_speedup {s.get('min_speedup')}, "
            f"JIT compile {s.get('compile_s', 0.0):.2f} s",
        ]
        if not s.get("numba", False):
            out.append(f"kernels unavailable: {s.get('why')}; every layer kept dense")
        out += [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]
        out.append(
            "dense/sparse ms = median latency of F.linear / the CSR kernel on a random input of "
            "the recorded shape; timings are of this machine and these shapes only."
        )
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.rows)}, swapped={len(self.swapped)}, "
            f"numba={self.settings.get('numba')})"
        )


# ---------------------------------------------------------------- accelerate


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _time_pair(dense: Any, sparse: Any, budget_s: float = 0.3) -> tuple[float, float]:
    """Median latencies (ms) of two callables, warmed up, timed call by call in alternation.

    Alternating single calls (rather than blocks of one then the other) is what a model does:
    each sparse call follows a torch op, whose OpenMP workers may still be spinning, and that
    contention is part of the cost to measure.
    """
    start = time.perf_counter()
    for _ in range(3):
        dense()
        sparse()
    one = max((time.perf_counter() - start) / 3, 1e-6)
    reps = int(min(200, max(10, budget_s / one)))
    d: list[float] = []
    s: list[float] = []
    for i in range(reps):
        pair = ((dense, d), (sparse, s)) if i % 2 == 0 else ((sparse, s), (dense, d))
        for fn, out in pair:
            t0 = time.perf_counter_ns()
            fn()
            out.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(d), statistics.median(s)


def _warm_up() -> float:
    """Compile every kernel variant (JIT); returns the seconds it took."""
    start = time.perf_counter()
    layer = SparseLinear.from_dense(torch.eye(4, 8), torch.ones(4))
    nobias = SparseLinear.from_dense(torch.eye(4, 8))
    wide = SparseLinear.from_dense(torch.eye(4, 70000))  # int32 columns
    with torch.no_grad():
        for m in (layer, nobias):
            m(torch.ones(1, 8))
            m(torch.ones(3, 8))
        wide(torch.ones(1, 70000))
        wide(torch.ones(3, 70000))
    return time.perf_counter() - start


def _set_child(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    return model


def accelerate(
    model: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    min_speedup: float = 1.05,
    inplace: bool = False,
) -> tuple[nn.Module, AccelerateReport]:
    """Swap sparse fp32 ``nn.Linear`` layers for :class:`SparseLinear` where that is faster here.

    Args:
        model: any module; every ``nn.Linear`` in it (masked by prunekit or finalized) is a
            candidate. Its effective weight (mask applied) is what gets stored.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. The
            model runs once on them (no grad) with forward hooks recording each Linear's input
            shape; layers not called are left alone.
        threads: torch and numba threads while timing (restored after); None keeps the current
            torch count. The swapped layers follow ``torch.get_num_threads()`` when they run.
        min_speedup: swap a layer only if dense ms / sparse ms is at least this.
        inplace: modify ``model`` itself; otherwise a deep copy is modified and returned.

    Returns:
        ``(model, report)``: ``print(report)`` shows per layer the density, dense and sparse
        median latency, the speedup and whether (or why not) it was swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)):
        raise TypeError(f"accelerate: min_speedup must be a number, got {min_speedup!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise TypeError(f"accelerate: threads must be an integer or None, got {threads!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"accelerate: threads must be >= 1, got {threads}")
    if not inplace:
        model = copy.deepcopy(model)

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    shapes: dict[str, list[int]] = {}
    handles = []
    for name, module in linears:

        def hook(mod: nn.Module, args: tuple, _name: str = name) -> None:
            if _name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[_name] = list(args[0].shape)

        handles.append(module.register_forward_pre_hook(hook))
    previous = torch.get_num_threads()
    training = [(m, m.training) for m in model.modules()]
    rows: list[AccelerateRow] = []
    compile_s = 0.0
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.no_grad():
            _call(model, example_inputs)
        for h in handles:
            h.remove()
        handles = []
        if NUMBA_AVAILABLE:
            compile_s = _warm_up()
        for name, module in linears:
            with torch.no_grad():
                weight = module.weight.detach()
                bias = None if module.bias is None else module.bias.detach()
            density = float((weight != 0).sum()) / max(weight.numel(), 1)
            row = AccelerateRow(
                name,
                module.in_features,
                module.out_features,
                shapes.get(name),
                density,
                None,
                None,
                False,
                "",
            )
            rows.append(row)
            if not NUMBA_AVAILABLE:
                row.reason = "numba unavailable"
            elif name not in shapes:
                row.reason = "not called on example_inputs"
            elif weight.dtype != torch.float32 or (bias is not None and bias.dtype != weight.dtype):
                row.reason = f"dtype {weight.dtype}"
            elif weight.device.type != "cpu":
                row.reason = f"device {weight.device.type}"
            elif density >= 1.0:
                row.reason = "dense"
            else:
                sparse = SparseLinear.from_dense(weight, bias)
                x = torch.randn(shapes[name], dtype=torch.float32)
                with torch.inference_mode():
                    row.dense_ms, row.sparse_ms = _time_pair(
                        lambda x=x, w=weight, b=bias: F.linear(x, w, b),
                        lambda x=x, s=sparse: s(x),
                    )
                    err = float((sparse(x) - F.linear(x, weight, bias)).abs().max())
                scale = float(F.linear(x, weight, bias).abs().max()) + 1.0
                if not err <= 1e-3 * scale:
                    row.reason = f"kernel mismatch {err:.2e}"
                elif row.speedup is not None and row.speedup >= min_speedup:
                    row.swapped = True
                    row.reason = "faster"
                    model = _set_child(model, name, sparse)
                else:
                    row.reason = "not faster"
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(previous)
        for m, mode in training:
            m.train(mode)
    settings = {
        "threads": threads if threads is not None else previous,
        "min_speedup": float(min_speedup),
        "numba": NUMBA_AVAILABLE,
        "numba_version": getattr(numba, "__version__", None),
        "why": "" if NUMBA_AVAILABLE else NUMBA_ERROR,
        "compile_s": compile_s,
        "torch": torch.__version__,
        "note": "timings are of this machine and these input shapes",
    }
    return model, AccelerateReport(rows, settings)
