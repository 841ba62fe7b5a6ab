"""Run sparse ``nn.Linear`` and ``nn.Conv2d`` layers with kernels that touch only the non-zeros
(CPU, float32 or int8 weights).

:func:`accelerate` swaps each sparse ``nn.Linear`` (finalized, or still masked: the effective
weight is used) for a :class:`SparseLinear`, and each sparse ``nn.Conv2d`` (groups 1) for a
:class:`SparseConv2d` (patches unfolded, then the same kernels), where that is measurably
faster on *this* machine for the input shape the layer saw on ``example_inputs``; elsewhere the
dense module stays. Each weight layout of :mod:`prunekit.runtime.sparse_formats` is timed per
layer and the fastest kept:

* ``"tiles"``: 16 output rows at a time; per block of 32 columns the inputs sit in two vector
  registers and each stored vector of 16 non-zeros (one per row) picks its inputs with a single
  permute. No gather and no horizontal sum: the fastest at batch 1 on AVX-512 CPUs.
* ``"csr"``: the non-zeros row by row with their column numbers (uint16 when
  ``in_features <= 65536``, else int32); the kernel gathers the matching inputs. The fewest
  bytes at high sparsity, and the portable one (plain C without AVX-512).
* ``"bitmap"``: per row and per block of 16 columns a 16-bit mask of the non-zero positions
  and the non-zeros packed; the kernel expands each block into place (AVX-512 with VBMI2).
* ``"nm"``: N:M-sparse weights (2:4, ...): N values per group of M columns and their 2- or
  4-bit positions, no column numbers. Tried only where the weight fits an N:M with N/M <= 1/2.

With more than one input row (tokens of a sentence, a batch), csr and nm pack a block of up
to 32 (AVX2) or 64 (AVX-512) input rows transposed and stream the weights once per block,
each non-zero feeding that many outputs from registers: a sparse matrix-matrix product.

Values are float32, or the int8 codes of a layer quantized per channel and symmetrically by
``prunekit.quantize(..., mode="int")`` (one float32 scale per output row): a quarter of the
bytes. The kernels are C compiled on first use for this CPU (:mod:`prunekit.runtime.kernels`)
and run in torch's OpenMP thread pool; without a C compiler :func:`accelerate` keeps every
module dense and says why.

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

import ctypes
import operator
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.runtime import kernels, sparse_formats
from prunekit.runtime.accelerated import (
    AcceleratedModelError,
    decode_accelerated,
)
from prunekit.runtime.bench import _tensors as tensors_in
from prunekit.runtime.copies import copy_model
from prunekit.runtime.fused import SharedInputProduct, SparseLinearSlice, shared_input_groups
from prunekit.runtime.sparse_formats import FORMATS

__all__ = [
    "FORMATS",
    "AccelerateReport",
    "AcceleratedModelError",
    "AccelerateRow",
    "FusedGroup",
    "SparseConv2d",
    "SparseLinear",
    "accelerate",
    "deaccelerate",
]


class SparseLinear(nn.Module):
    """A drop-in for an ``nn.Linear`` whose weight is stored and multiplied sparse (CPU).

    The weight lives in one of the layouts of :mod:`prunekit.runtime.sparse_formats`
    (``"csr"``, ``"bitmap"``, ``"tiles"``) as buffers: ``values`` (float32, or int8 codes with
    a float32 ``scale`` per output row) and the format's index tensors, plus ``bias``. Pickles,
    deep-copies and round-trips through ``state_dict``; :meth:`to_dense` gives the
    ``nn.Linear`` back.

    Float32 inputs of any leading shape ``(..., in_features)`` on CPU run the compiled kernels;
    other dtypes or devices, inputs that need a gradient, or missing kernels fall back to
    ``F.linear`` with the dense weight rebuilt (slow, but correct).

    Example:
        >>> w = torch.randn(8, 32) * (torch.rand(8, 32) > 0.8)
        >>> layer = SparseLinear.from_dense(w, format="tiles")
        >>> torch.allclose(layer(torch.ones(2, 32)), torch.ones(2, 32) @ w.T, atol=1e-5)
        True
    """

    _prunekit_accelerated = True  # see prunekit.runtime.accelerated

    def __init__(
        self,
        in_features: int,
        out_features: int,
        parts: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        *,
        format: str = "csr",
        scale: torch.Tensor | None = None,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in kernels.ACTIVATION_CODES:
            known = [a for a in kernels.ACTIVATION_CODES if a]
            raise ValueError(f"SparseLinear: activation must be None or one of {known}")
        self.activation = activation
        names = sparse_formats.index_names(format)
        missing = [k for k in ("values", *names) if k not in parts]
        if missing:
            raise ValueError(f"SparseLinear: format {format!r} needs tensors {missing}")
        values = parts["values"]
        if values.dtype not in (torch.float32, torch.int8):
            raise TypeError(f"SparseLinear: values must be float32 or int8, got {values.dtype}")
        if (values.dtype == torch.int8) != (scale is not None):
            raise ValueError("SparseLinear: int8 values need a per-row scale, float32 ones none")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.format = format
        self._index_names = names
        self.register_buffer("values", values.detach().contiguous())
        for name in names:
            self.register_buffer(name, parts[name].detach().contiguous())
        self.register_buffer(
            "scale", None if scale is None else scale.detach().to(torch.float32).contiguous()
        )
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).contiguous()
        )

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        format: str = "csr",
        scale: torch.Tensor | None = None,
        nm: tuple[int, int] | None = None,
        activation: str | None = None,
    ) -> SparseLinear:
        """Build from a dense ``(out_features, in_features)`` weight (zeros are dropped).

        With ``scale`` (float32, one per output row) the weight must hold int8 codes: the layer
        computes ``scale[r] * (codes[r] @ x)``. ``nm`` is the ``(N, M)`` of the ``"nm"`` format
        (None: the tightest that fits). ``activation`` (``"relu"``, ``"gelu"``,
        ``"gelu_tanh"``) is applied to the output, inside the kernel after the bias.
        """
        sparse_formats.check_format(format)
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        if scale is not None and tuple(scale.shape) != (weight.shape[0],):
            raise ValueError(
                f"SparseLinear: scale must have one entry per output row ({weight.shape[0]}), "
                f"got shape {tuple(scale.shape)}"
            )
        if scale is not None and weight.dtype != torch.int8:
            raise TypeError(
                f"SparseLinear: with a scale the weight must be int8 codes, got {weight.dtype}"
            )
        w = weight.detach().cpu()
        if scale is None:
            w = w.to(torch.float32)
        out_f, in_f = w.shape
        parts = sparse_formats.encode(w, format, nm=nm)
        b = None if bias is None else bias.detach().to("cpu", torch.float32)
        return cls(in_f, out_f, parts, b, format=format, scale=scale, activation=activation)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, format: str = "csr") -> SparseLinear:
        """Build from an ``nn.Linear``, masked or not (its effective weight)."""
        return cls.from_dense(linear.weight, linear.bias, format=format)

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the weight: ``values`` and the format's index."""
        return {"values": self.values, **{k: self._buffers[k] for k in self._index_names}}

    @property
    def nnz(self) -> int:
        return int((self.values != 0).sum())

    @property
    def density(self) -> float:
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    def nbytes(self) -> int:
        """Bytes of the weight as stored: values and index."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` dense float32 weight (int8 codes times scales)."""
        w = sparse_formats.decode(self.parts, self.format, self.out_features, self.in_features)
        w = w.to(torch.float32)
        if self.scale is not None:
            w *= self.scale.cpu().unsqueeze(1)
        return w.to(self.values.device)

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` with the same weight (zeros included) and bias; with an
        ``activation``, ``nn.Sequential(linear, activation module)``."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        if self.activation is None:
            return linear
        act = {
            "relu": nn.ReLU(),
            "gelu": nn.GELU(),
            "gelu_tanh": nn.GELU(approximate="tanh"),
        }[self.activation]
        return nn.Sequential(linear, act)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation is None:
            return y
        if self.activation == "relu":
            return torch.relu(y)
        return F.gelu(y, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_plan", None)
        return state

    def _kernel_plan(self) -> tuple[Any, int] | None:
        """(the C entry point, address of this weight's plan), cached while the buffers are the
        same tensors; None where no kernel runs these buffers."""
        key = tuple(self._buffers.values())
        cached = self.__dict__.get("_plan")
        if cached is not None and all(map(operator.is_, cached[0], key)):
            return cached[1]
        lib = kernels.load()
        plan = None
        struct = None
        if lib is not None and all(t is None or t.device.type == "cpu" for t in key):
            struct = self._make_plan()
            plan = (lib.lib.pk_run, ctypes.addressof(struct))
        self.__dict__["_plan"] = (key, plan, struct)  # the struct lives as long as the plan
        return plan

    def _make_plan(self) -> kernels.Plan:
        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        index = [self._buffers[k] for k in self._index_names]
        lgn = lgm = 0
        if self.format == "tiles":  # slice_ptr first, as the kernel takes them
            index = [self.slice_ptr, self.tile_steps, self.tile_cols]
        elif self.format == "nm":
            index = [self.nm_indices, None, None]
            n, m = (int(v) for v in self.nm_shape.tolist())
            lgn, lgm = n.bit_length() - 1, m.bit_length() - 1
        else:
            index = [self.row_ptr, index[0], None]
        return kernels.Plan(
            kernels.FORMAT_CODES[self.format], self.out_features, self.in_features,
            int(self.values.dtype == torch.int8),
            int(self.format == "csr" and self.col_indices.dtype == torch.int32),
            *map(ptr, index), ptr(self.values), ptr(self.scale), ptr(self.bias),
            lgn, lgm, kernels.ACTIVATION_CODES[self.activation],
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel path runs once per layer and token batch: kept to a few tensor calls
        shape = x.shape
        if (
            x.dtype == torch.float32
            and x.is_cpu
            and not (x.requires_grad and torch.is_grad_enabled())
            and shape
            and shape[-1] == self.in_features
        ):
            plan = self._kernel_plan()
            n = x.numel() // self.in_features if self.in_features else 0
            if plan is not None and n:
                run, address = plan
                x = x.contiguous()  # rows of in_features, whatever the leading shape
                y = torch.empty((*shape[:-1], self.out_features), dtype=torch.float32)
                if run(address, n, x.data_ptr(), None, y.data_ptr(), torch.get_num_threads()) == 0:
                    return y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._activate(F.linear(x, self.dense_weight().to(x.dtype), bias))

    def extra_repr(self) -> str:
        if self.format == "csr":
            idx = "uint16" if self.col_indices.dtype == torch.int16 else "int32"
            fmt = f"CSR({idx} columns)"
        elif self.format == "bitmap":
            fmt = "bitmap(16-column blocks)"
        elif self.format == "nm":
            n, m = (int(v) for v in self.nm_shape.tolist())
            fmt = f"N:M({n}:{m}, {2 if m <= 4 else 4}-bit positions)"
        else:
            fmt = "tiles(16 rows x 32 columns)"
        values = "int8 x per-row scale" if self.scale is not None else "float32"
        act = "" if self.activation is None else f", activation={self.activation}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.3f}, "
            f"format={fmt}, values={values}{act}"
        )


class SparseConv2d(nn.Module):
    """A drop-in for an ``nn.Conv2d`` (groups 1, zero padding) whose weight is sparse (CPU).

    The input is unfolded into patches (``F.unfold``; 1x1 convolutions need only a permute)
    and multiplied by the ``(out_channels, in_channels * kh * kw)`` weight held by a
    :class:`SparseLinear` (``self.linear``, any format, float32 or int8 codes). The output is
    contiguous NCHW, like ``nn.Conv2d``'s.

    Example:
        >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(torch.rand_like(conv.weight) > 0.8)
        >>> sparse = SparseConv2d.from_conv(conv, format="tiles")
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(sparse(x), conv(x), atol=1e-5)
        True
    """

    _prunekit_accelerated = True  # see prunekit.runtime.accelerated

    def __init__(
        self,
        linear: SparseLinear,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        kh, kw = kernel_size
        if linear.in_features != in_channels * kh * kw:
            raise ValueError(
                f"SparseConv2d: the weight has {linear.in_features} columns, expected "
                f"in_channels * kh * kw = {in_channels * kh * kw}"
            )
        self.linear = linear
        self.in_channels = int(in_channels)
        self.out_channels = linear.out_features
        self.kernel_size = (int(kh), int(kw))
        self.stride = tuple(int(v) for v in stride)
        self.padding = tuple(int(v) for v in padding)
        self.dilation = tuple(int(v) for v in dilation)

    @staticmethod
    def unsupported(conv: nn.Conv2d) -> str:
        """Why ``conv`` cannot become a SparseConv2d ("" when it can)."""
        if conv.groups != 1:
            return f"groups={conv.groups}"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}"
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                return ""
            if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)):
                return "asymmetric 'same' padding"
        return ""

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        format: str = "csr",
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SparseConv2d:
        """Build from an ``nn.Conv2d`` (masked or not: its effective weight), or from the int8
        ``(codes, per-channel scales)`` of its weight as a matrix."""
        why = cls.unsupported(conv)
        if why:
            raise ValueError(f"SparseConv2d: cannot run this Conv2d sparse ({why})")
        out_c = conv.out_channels
        if codes is not None:
            linear = SparseLinear.from_dense(
                codes[0].reshape(out_c, -1), conv.bias, format=format, scale=codes[1]
            )
        else:
            linear = SparseLinear.from_dense(
                conv.weight.reshape(out_c, -1), conv.bias, format=format
            )
        padding = conv.padding
        if isinstance(padding, str):
            pairs = zip(conv.dilation, conv.kernel_size, strict=True)
            padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in pairs)
        return cls(linear, conv.in_channels, conv.kernel_size, conv.stride, padding, conv.dilation)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same weight (zeros included) and bias."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=self.linear.bias is not None,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(self.linear.dense_weight().reshape(conv.weight.shape))
            if self.linear.bias is not None:
                conv.bias.copy_(self.linear.bias)
        return conv

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        sizes = []
        for n, k, s, p, d in zip(
            (h, w), self.kernel_size, self.stride, self.padding, self.dilation, strict=True
        ):
            sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        n, c, h, w = x.shape
        ho, wo = self._out_size(h, w)
        pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        if pointwise:
            patches = x.permute(0, 2, 3, 1).reshape(-1, c)
        else:
            patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
            patches = patches.transpose(1, 2).reshape(n * ho * wo, -1)
        y = self.linear(patches).view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        y = y.contiguous()
        return y if batched else y.squeeze(0)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


# ---------------------------------------------------------------- the report


@dataclass
class AccelerateRow:
    """One ``nn.Linear`` or ``nn.Conv2d`` (``kind``): its density, the timed latencies (ms) and
    whether it was swapped. ``in_features`` is the width of the weight as a matrix
    (``in_channels * kh * kw`` for a convolution).

    ``sparse_ms`` and ``format`` are those of the fastest sparse candidate; ``candidates_ms``
    holds every candidate's median (``"csr-f32"``, ``"bitmap-i8"``, ...).
    """

    name: str
    in_features: int
    out_features: int
    input_shape: list[int] | None
    density: float
    dense_ms: float | None
    sparse_ms: float | None
    swapped: bool
    reason: str
    format: str | None = None
    candidates_ms: dict[str, float] = field(default_factory=dict)
    kind: str = "Linear"

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or self.sparse_ms is None or self.sparse_ms <= 0:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class FusedGroup:
    """Swapped layers that read the same input, timed as one stacked sparse product
    (``fused_ms``, fastest format ``format``) against their separate calls (``separate_ms``);
    ``kept``: the stacked product replaced them."""

    layers: list[str]
    separate_ms: float
    fused_ms: float
    format: str
    kept: bool
    reason: str = ""  # why a faster product was not kept

    @property
    def speedup(self) -> float:
        return self.separate_ms / self.fused_ms if self.fused_ms > 0 else float("nan")


@dataclass
class AccelerateReport:
    """What :func:`accelerate` returns beside the model. ``print(report)`` shows a table."""

    rows: list[AccelerateRow]
    settings: dict[str, Any] = field(default_factory=dict)
    fused: list[FusedGroup] = field(default_factory=list)

    @property
    def swapped(self) -> list[str]:
        return [r.name for r in self.rows if r.swapped]

    def row(self, name: str) -> AccelerateRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r}; layers: {', '.join(r.name for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "rows": [{**asdict(r), "speedup": r.speedup} for r in self.rows],
            "fused": [{**asdict(f), "speedup": f.speedup} for f in self.fused],
        }

    def __str__(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        header = (
            "layer", "shape", "input", "density", "dense ms", "sparse ms", "format", "speedup",
            "swap",
        )  # fmt: skip
        rows = [
            (
                f"{r.name or '(root)'} ({r.kind})",
                f"{r.out_features}x{r.in_features}",
                "-" if r.input_shape is None else "x".join(map(str, r.input_shape)),
                f"{r.density:.3f}",
                ms(r.dense_ms),
                ms(r.sparse_ms),
                r.format or "-",
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                "yes" if r.swapped else f"no ({r.reason})",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i in (0, 6, len(row) - 1) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        s = self.settings
        out = [
            f"prunekit accelerate: {len(self.swapped)}/{len(self.rows)} layer(s) swapped; "
            f"{s.get('threads')} thread(s), min_speedup {s.get('min_speedup')}, "
            f"{s.get('kernels') or 'no kernels'}",
        ]
        if not s.get("kernels"):
            out.append(f"kernels unavailable: {s.get('why')}; every layer kept dense")
        out += [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]
        for f in self.fused:
            why = f" ({f.reason})" if f.reason else ""
            verdict = "stacked" if f.kept else f"kept separate{why}"
            out.append(
                f"same input: {' + '.join(f.layers)}: {f.separate_ms:.3f} ms separate, "
                f"{f.fused_ms:.3f} ms as one product ({f.format}, {f.speedup:.2f}x): {verdict}"
            )
        out.append(
            "dense/sparse ms = median latency of the dense layer / the fastest sparse kernel on a "
            "random input of the recorded shape (shape = out x in of the weight as a matrix); "
            "timings are of this machine and these shapes only."
        )
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.rows)}, swapped={len(self.swapped)}, "
            f"kernels={self.settings.get('kernels')!r})"
        )


# ---------------------------------------------------------------- accelerate


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _time_calls(fns: dict[str, Callable[[], Any]], budget_s: float = 0.3) -> dict[str, float]:
    """Median latency (ms) of each callable, warmed up, timed call by call in rotation.

    Rotating single calls (rather than blocks of one then the other) is what a model does: each
    sparse call follows a torch op, whose OpenMP workers may still be spinning, and that
    contention is part of the cost to measure.
    """
    names = list(fns)
    start = time.perf_counter()
    for _ in range(3):
        for fn in fns.values():
            fn()
    one = max((time.perf_counter() - start) / (3 * len(names)), 1e-6)
    reps = int(min(200, max(10, budget_s / (one * len(names)) * 2)))
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(reps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter_ns()
            fns[name]()
            times[name].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def _set_child(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    return model


def _int8_codes(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 codes and per-row scales ``prunekit.quantize(mode="int")`` kept for this
    Linear, when they fit the int8 kernel (per channel, symmetric, not transposed)."""
    from prunekit.compress.quantize import QUANT_ATTR

    record = getattr(model, QUANT_ATTR, None) or {}
    q = record.get("layers", {}).get(f"{name}.weight" if name else "weight")
    if q is None or q.group is not None or q.transposed or bool((q.zero_point != 0).any()):
        return None
    return q.codes, q.scale.reshape(-1).to(torch.float32)


def _candidates(
    module: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    codes: tuple[torch.Tensor, torch.Tensor] | None,
    formats: tuple[str, ...],
) -> dict[str, nn.Module]:
    suffix = "i8" if codes is not None else "f32"
    if "nm" in formats:  # only where the weight is N:M sparse: else it stores padding slots
        n, m = sparse_formats.nm_fit(weight.reshape(weight.shape[0], -1))
        if 2 * n > m:
            formats = tuple(f for f in formats if f != "nm")
    if isinstance(module, nn.Conv2d):
        return {
            f"{f}-{suffix}": SparseConv2d.from_conv(module, format=f, codes=codes) for f in formats
        }
    if codes is not None:
        return {
            f"{f}-i8": SparseLinear.from_dense(codes[0], bias, format=f, scale=codes[1])
            for f in formats
        }
    return {f"{f}-f32": SparseLinear.from_dense(weight, bias, format=f) for f in formats}


def _dense_call(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    """The layer's dense computation with its effective weight (a masked module's property would
    multiply by the mask at every call, which is not what a finalized model pays)."""
    if isinstance(module, nn.Conv2d):
        return lambda x: module._conv_forward(x, weight, bias)
    return lambda x: F.linear(x, weight, bias)


def _decide(
    row: AccelerateRow,
    dense: Callable[[torch.Tensor], torch.Tensor],
    candidates: dict[str, nn.Module],
    min_speedup: float,
) -> nn.Module | None:
    """Time dense against each sparse candidate on a random input; the winner, if fast enough."""
    if not candidates:
        row.reason = "no format fits (nm needs an N:M-sparse weight with N/M <= 1/2)"
        return None
    x = torch.randn(row.input_shape, dtype=torch.float32)
    with torch.inference_mode():
        reference = dense(x)
        scale = float(reference.abs().max()) + 1.0
        for key, module in list(candidates.items()):
            err = float((module(x) - reference).abs().max())
            if not err <= 1e-3 * scale:
                row.reason = f"kernel mismatch {err:.2e} ({key})"
                return None
        fns: dict[str, Callable[[], Any]] = {"dense": lambda: dense(x)}
        fns.update({k: (lambda m=m: m(x)) for k, m in candidates.items()})
        times = _time_calls(fns)
    row.dense_ms = times.pop("dense")
    row.candidates_ms = times
    row.format = min(times, key=times.__getitem__)
    row.sparse_ms = times[row.format]
    if row.speedup is not None and row.speedup >= min_speedup:
        row.swapped = True
        row.reason = "faster"
        return candidates[row.format]
    row.reason = "not faster"  # the row shows the best format and its speedup
    return None


FUSE_MIN_GAIN = 1.05
"""Siblings are stacked into one product only when that is at least this much faster."""


def _stacked_weight(
    members: list[SparseLinear],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The members' weights stacked row-wise (int8 codes when every member runs on codes,
    else float32), their biases (zeros for a member without one) and the per-row scales."""
    codes = all(m.scale is not None for m in members)
    weights, scales = [], []
    for m in members:
        if codes:
            weights.append(sparse_formats.decode(m.parts, m.format, m.out_features, m.in_features))
            scales.append(m.scale)
        else:
            weights.append(m.dense_weight())
    bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features)
                      for m in members])  # fmt: skip
    return torch.cat(weights), bias, torch.cat(scales) if codes else None


def _fuse_siblings(
    model: nn.Module, rows: dict[str, AccelerateRow], names: list[str], formats: tuple[str, ...]
) -> tuple[FusedGroup, list[nn.Module], SharedInputProduct] | None:
    """Time ``names`` (layers that read the same input) as one stacked product against their
    separate calls: the group (``kept`` where the product is :data:`FUSE_MIN_GAIN` faster),
    the separate layers and the fastest product. None when they cannot be stacked (not every
    one swapped to a plain SparseLinear). Changes nothing in ``model``."""
    members = [model.get_submodule(n) for n in names]
    if not all(type(m) is SparseLinear and m.activation is None for m in members):
        return None
    if len({m.in_features for m in members}) != 1:
        return None
    weight, bias, scale = _stacked_weight(members)
    if "nm" in formats:  # as in _candidates: only where the stacked weight is N:M sparse
        n, m = sparse_formats.nm_fit(weight)
        if 2 * n > m:
            formats = tuple(f for f in formats if f != "nm")
    if not formats:
        return None
    products = {
        f: SharedInputProduct(
            SparseLinear.from_dense(weight, bias, format=f, scale=scale),
            [m.out_features for m in members],
            [m.bias is not None for m in members],
        )
        for f in formats
    }
    x = torch.randn(rows[names[0]].input_shape, dtype=torch.float32)
    calls: dict[str, Callable[[], Any]] = {"separate": lambda: [m(x) for m in members]}
    with torch.inference_mode():
        reference = [m(x) for m in members]
        for f, product in products.items():
            slices = [SparseLinearSlice(product, i) for i in range(len(members))]
            got = [s(x) for s in slices]
            if not all(
                torch.allclose(g, r, atol=1e-4, rtol=1e-4)
                for g, r in zip(got, reference, strict=True)
            ):
                return None  # pragma: no cover - the stacked layer computes the same rows
            calls[f] = lambda slices=slices: [s(x) for s in slices]
        times = _time_calls(calls)
    separate = times.pop("separate")
    best = min(times, key=times.__getitem__)
    group = FusedGroup(
        list(names), separate, times[best], best, separate >= FUSE_MIN_GAIN * times[best]
    )
    return group, members, products[best]


def _fuse_all(
    model: nn.Module,
    rows: list[AccelerateRow],
    groups: list[list[str]],
    formats: tuple[str, ...],
    example_inputs: Any,
) -> list[FusedGroup]:
    """:func:`_fuse_siblings` for every group; the faster products then replace their
    siblings and the model runs on ``example_inputs`` once more: the siblings' outputs are now
    views of one product, and code that needs them contiguous (``.view(-1)``) would fail, so
    if the run raises or its outputs differ from the separate layers', every group is put back
    (and says why)."""
    by_name = {r.name: r for r in rows}
    done = [r for r in (_fuse_siblings(model, by_name, g, formats) for g in groups) if r]
    kept = [(group, members, product) for group, members, product in done if group.kept]
    if kept:
        with torch.inference_mode():
            reference = _call(model, example_inputs)  # the separate layers
        for group, _, product in kept:
            for i, name in enumerate(group.layers):
                _set_child(model, name, SparseLinearSlice(product, i))
        try:
            with torch.inference_mode():
                problem = _outputs_differ(reference, _call(model, example_inputs))
        except Exception as exc:  # noqa: BLE001 - any failure of the user's model means: put back
            problem = f"the model failed with them: {type(exc).__name__}: {exc}"
        for group, members, _ in kept:
            if problem:
                group.kept, group.reason = False, problem
            for name, member in zip(group.layers, members, strict=True):
                if problem:
                    _set_child(model, name, member)
                else:
                    others = " + ".join(n for n in group.layers if n != name)
                    by_name[name].reason = f"faster; one product with {others}"
    return [group for group, _, _ in done]


def _outputs_differ(reference: Any, got: Any) -> str:
    """Why two runs' outputs differ beyond float rounding ("" when they agree)."""
    expected, actual = tensors_in(reference), tensors_in(got)
    if len(expected) != len(actual):
        return f"the model returned {len(actual)} tensors, not {len(expected)}"
    for e, a in zip(expected, actual, strict=True):
        if e.shape != a.shape:
            return f"an output changed shape from {tuple(e.shape)} to {tuple(a.shape)}"
        if e.is_floating_point():
            err = float((e - a).abs().max()) if e.numel() else 0.0
            if not err <= 1e-3 * (float(e.abs().max()) + 1.0):
                return f"the outputs differ by {err:.2e}"
        elif not torch.equal(e, a):
            return "an integer output changed"
    return ""


@dataclass
class _ExampleRun:
    """What the example run recorded per layer: the input shape of its first call, that input
    tensor itself (siblings share it: see :mod:`prunekit.runtime.fused`) and its call count."""

    shapes: dict[str, list[int]] = field(default_factory=dict)
    first_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


def _record_inputs(model: nn.Module, example_inputs: Any, names: list[str]) -> _ExampleRun:
    run = _ExampleRun()
    handles = []
    for name in names:

        def hook(mod: nn.Module, args: tuple, _name: str = name) -> None:
            run.calls[_name] = run.calls.get(_name, 0) + 1
            if _name not in run.shapes and args and isinstance(args[0], torch.Tensor):
                run.shapes[_name] = list(args[0].shape)
                run.first_inputs[_name] = args[0]

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return run


def _usable_formats(formats: Any, lib: kernels.KernelLibrary | None) -> tuple[str, ...]:
    if formats is None:
        return FORMATS if lib is None else lib.vector_formats
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(
            f"accelerate: formats must be a non-empty subset of {FORMATS}, got {formats}"
        )
    if lib is not None and not lib.has_bitmap:
        formats = tuple(f for f in formats if f != "bitmap")  # needs AVX-512 with VBMI2
    return formats


def _check_arguments(model: Any, threads: Any, min_speedup: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)):
        raise TypeError(f"accelerate: min_speedup must be a number, got {min_speedup!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise TypeError(f"accelerate: threads must be an integer or None, got {threads!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"accelerate: threads must be >= 1, got {threads}")


def _skip_reason(
    name: str,
    module: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    density: float,
    shapes: dict,
) -> str:
    if name not in shapes:
        return "not called on example_inputs"
    if weight.numel() == 0:
        return f"empty weight {tuple(weight.shape)}"
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        nan, inf = int(weight.isnan().sum()), int(weight.isinf().sum())
        return f"weight holds {nan} NaN and {inf} inf"
    if isinstance(module, nn.Conv2d) and SparseConv2d.unsupported(module):
        return SparseConv2d.unsupported(module)
    if isinstance(module, nn.Conv2d) and len(shapes[name]) not in (3, 4):
        return f"input shape {shapes[name]}"
    if weight.dtype != torch.float32 or (bias is not None and bias.dtype != weight.dtype):
        return f"dtype {weight.dtype}"
    if weight.device.type != "cpu":
        return f"device {weight.device.type}"
    if density >= 1.0:
        return "dense"
    return ""


def accelerate(
    model: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    min_speedup: float = 1.1,
    int8: bool = True,
    formats: str | Sequence[str] | None = None,
    fuse: bool = True,
    inplace: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, AccelerateReport]:
    """Swap sparse ``nn.Linear`` / ``nn.Conv2d`` layers for :class:`SparseLinear` /
    :class:`SparseConv2d` where that is faster here.

    Args:
        model: any module; every ``nn.Linear`` and ``nn.Conv2d`` in it (masked by prunekit or
            finalized) is a candidate. Its effective weight (mask applied) is what gets stored.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. The
            model runs once on them (no grad) with forward hooks recording each Linear's input
            shape; layers not called are left alone.
        threads: torch threads while timing (restored after); None keeps the current count. The
            swapped layers follow ``torch.get_num_threads()`` when they run.
        min_speedup: swap a layer only if dense ms / sparse ms is at least this.
        int8: for layers quantized by ``prunekit.quantize(..., mode="int")`` per channel and
            symmetric, run on the int8 codes (same outputs as the dequantized weight, up to
            float rounding); False uses their float32 values.
        formats: the sparse formats to try (``"csr"``, ``"bitmap"``, ``"tiles"``); None tries
            those whose kernels are vectorised on this CPU (bitmap and tiles need AVX-512) and
            keeps the fastest per layer.
        fuse: where swapped layers read the very same input tensor (query, key and value; gate
            and up projections), also time them stacked into one sparse product
            (:mod:`prunekit.runtime.fused`) and keep that where it is at least
            ``FUSE_MIN_GAIN`` times faster than the separate calls.
        inplace: modify ``model`` itself; otherwise a deep copy is modified and returned.
        progress: a per-layer progress bar, shown once the run has lasted more than a second
            (each sparse layer is encoded in every format and timed: 0.1-2 s a layer).

    Returns:
        ``(model, report)``: ``print(report)`` shows per layer the density, dense and sparse
        median latency, the chosen format, the speedup and whether (or why not) it was swapped.

    Example:
        >>> fast, report = accelerate(pruned_model, torch.randn(1, 512))  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    _check_arguments(model, threads, min_speedup)
    if not inplace:
        model = copy_model(model, "accelerate")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    lib = kernels.load()
    usable = _usable_formats(formats, lib)
    previous = torch.get_num_threads()
    training = [(m, m.training) for m in model.modules()]
    rows: list[AccelerateRow] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        example = _record_inputs(model, example_inputs, [n for n, _ in layers])
        shapes = example.shapes
        for name, module in tqdm(
            layers, desc="prunekit accelerate", unit="layer", delay=1.0, leave=False,
            disable=not progress,
        ):  # fmt: skip
            with torch.no_grad():
                weight = module.weight.detach()
                bias = None if module.bias is None else module.bias.detach()
            density = float((weight != 0).sum()) / max(weight.numel(), 1)
            out_f = weight.shape[0]
            row = AccelerateRow(
                name, weight.numel() // max(out_f, 1), out_f, shapes.get(name), density,
                None, None, False, "", kind=type(module).__name__,
            )  # fmt: skip
            rows.append(row)
            row.reason = "kernels unavailable" if lib is None else ""
            row.reason = row.reason or _skip_reason(name, module, weight, bias, density, shapes)
            if not row.reason and not usable:
                row.reason = f"no usable format among {formats} on this CPU"
            if row.reason:
                continue
            codes = _int8_codes(model, name) if int8 else None
            candidates = _candidates(module, weight, bias, codes, usable)
            dense = _dense_call(module, weight, bias)
            sparse = _decide(row, dense, candidates, float(min_speedup))
            if sparse is not None:
                model = _set_child(model, name, sparse)
        groups = shared_input_groups(example.first_inputs, example.calls) if fuse else []
        del example  # the recorded inputs
        fused = _fuse_all(model, rows, groups, usable, example_inputs) if groups else []
    finally:
        torch.set_num_threads(previous)
        for m, mode in training:
            m.train(mode)
    settings = {
        "threads": threads if threads is not None else previous,
        "min_speedup": float(min_speedup),
        "int8": bool(int8),
        "formats": list(usable),
        "kernels": None if lib is None else lib.describe(),
        "build_s": None if lib is None else lib.build_s,
        "why": kernels.why_unavailable(),
        "torch": torch.__version__,
        "note": "timings are of this machine and these input shapes",
    }
    return model, AccelerateReport(rows, settings, fused)


def deaccelerate(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo :func:`accelerate`: every :class:`SparseLinear` / :class:`SparseConv2d` becomes the
    ``nn.Linear`` / ``nn.Conv2d`` it encodes (same weight, zeros included, same bias).

    The result is a plain dense model again, which every verb accepts (``prune``, ``quantize``,
    ``finetune``, ``prune_structured``, ...); those verbs refuse an accelerated model with an
    :class:`AcceleratedModelError` that points here. Layers that ran on int8 codes come back
    with their dequantized float32 weights (codes times per-row scale); a ``quantize`` record
    on the model is kept, so ``save(compressed=True)`` still stores the codes. The masks the
    layers may have had before :func:`accelerate` are not restored: their zeros are.
    (``prunekit.finetune`` keeps zeros at zero by default.)

    Args:
        model: a model returned by :func:`accelerate` (a model with no accelerated layer is
            returned as it is, copied unless ``inplace``), or a single accelerated layer.
        inplace: swap the layers in ``model`` itself; otherwise a deep copy is changed and
            returned.

    Returns:
        The dense model (``model`` itself when ``inplace``, except for a single accelerated
        layer, whose dense module is returned).

    Example:
        >>> import torch, prunekit
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> fast, _ = accelerate(prunekit.finalize(prunekit.prune(net, 0.9).model),
        ...                      torch.randn(1, 64), min_speedup=0.0, progress=False)
        >>> dense = deaccelerate(fast)
        >>> type(dense[0]).__name__
        'Linear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deaccelerate: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy_model(model, "deaccelerate")
    return decode_accelerated(model)
