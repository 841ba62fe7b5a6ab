"""Weight quantization that never revives a pruned zero.

``quantize(model, bits=8)`` rounds every targeted weight to ``bits``-bit integers times a scale,
per output channel (``"per_channel"``) or per group of G consecutive input weights of one output
channel (``"group:128"``). The zero point is always an integer, so 0.0 maps to an integer code
and back to exactly 0.0: a pruned (or masked) weight stays exactly zero.

* symmetric (default): codes in [-(2^(b-1)-1), 2^(b-1)-1] (int8: +-127, int4: +-7), scale =
  absmax / qmax, zero point 0.
* asymmetric: codes in [-2^(b-1), 2^(b-1)-1]; the range [min, max] is widened to contain 0, and
  the zero point ``round(qmin - min / scale)`` is an integer, so 0.0 is exactly representable.

Modes:

* ``mode="fake"``: the weights are replaced (on a copy unless ``inplace=True``) by their
  dequantized values, still floats: evaluate the quantized model with plain PyTorch.
* ``mode="int"``: the same, and the integer codes and scales are kept on the model
  (``model._prunekit_quant``) so that ``prunekit.save(model, path, compressed=True)`` stores
  int8 codes (int4: two per byte) plus scales, and loading restores exactly these dequantized
  values.

Quantization-aware recovery uses :func:`fake_quantize`, a straight-through estimator (forward:
dequantized weight; backward: the gradient passes through unchanged), and
:func:`fake_quant_forward`, which runs a model with every targeted effective weight fake-quantized
(``torch.func.functional_call``; no hooks). On a masked module the mask multiplies after the
fake quantization, so masked entries stay zero and get zero gradient.

Quantization happens on the effective weight (mask applied), never on the raw parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.masks import MASK_SUFFIX, is_masked, raw_parameter
from prunekit.runtime.accelerated import refuse_accelerated
from prunekit.runtime.copies import copy_model
from prunekit.targets import Target, resolve_targets

QUANT_ATTR = "_prunekit_quant"
ACCEPTED_BITS = (4, 8)
ACCEPTED_MODES = ("fake", "int")


def parse_granularity(granularity: str) -> int | None:
    """``"per_channel"`` -> None, ``"group:G"`` -> G; anything else raises ValueError."""
    if granularity == "per_channel":
        return None
    if isinstance(granularity, str) and granularity.startswith("group:"):
        try:
            size = int(granularity[6:])
        except ValueError:
            size = 0
        if size > 0:
            return size
    raise ValueError(
        f"granularity {granularity!r} is not accepted: use 'per_channel' (one scale per output "
        "channel) or 'group:G' with a positive integer G (one scale per G input weights, e.g. "
        "'group:128')"
    )


def check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or bits not in ACCEPTED_BITS:
        raise ValueError(f"bits={bits!r} is not accepted: use 8 (int8) or 4 (int4)")
    return int(bits)


def nonfinite(tensor: torch.Tensor) -> str:
    """``""`` for a tensor whose values are all finite, else what it holds, e.g.
    ``"2 NaN and 1 inf of its 64 values"``.

    Example:
        >>> nonfinite(torch.tensor([1.0, float("nan"), float("-inf")]))
        '1 NaN and 1 inf of its 3 values'
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return ""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return f"{nan} NaN and {inf} inf of its {tensor.numel()} values"


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


@dataclass
class QuantizedTensor:
    """Integer codes of a weight viewed as a matrix (rows = output channels), with scales.

    ``codes`` is int8 of shape (rows, cols); ``scale`` (float32) and ``zero_point`` (int8) have
    shape (rows, groups), groups = ceil(cols / group) (1 per channel). ``shape`` / ``dtype`` are
    the original weight's; ``transposed`` marks Hugging Face Conv1D (stored as in x out).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    transposed: bool = False

    def dequantize(self) -> torch.Tensor:
        """The dense weight, in its original shape and dtype."""
        return dequantize_codes(
            self.codes,
            self.scale,
            self.zero_point,
            self.group,
            self.shape,
            self.dtype,
            self.transposed,
        )


def _as_matrix(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    if transposed:
        return tensor.t()
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))  # -1 fails on 0 rows


def _expand(per_group: torch.Tensor, group: int | None, cols: int) -> torch.Tensor:
    if group is None:
        return per_group.expand(-1, cols) if per_group.shape[1] == 1 else per_group
    return per_group.repeat_interleave(group, dim=1)[:, :cols]


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group: int | None,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    transposed: bool = False,
) -> torch.Tensor:
    """(codes - zero_point) * scale in float32, cast to ``dtype``, back in ``shape``."""
    cols = codes.shape[1]
    values = (codes.float() - _expand(zero_point.float(), group, cols)) * _expand(
        scale.float(), group, cols
    )
    values = values.to(dtype)
    if transposed:
        return values.t().contiguous()
    return values.reshape(tuple(shape))


def quantize_tensor(
    weight: torch.Tensor,
    bits: int = 8,
    granularity: str = "per_channel",
    symmetric: bool = True,
    transposed: bool = False,
    name: str | None = None,
) -> QuantizedTensor:
    """Quantize one weight (its first dimension = output channels) to integer codes and scales.

    ``name`` names the weight in errors. A weight holding NaN or inf is refused (ValueError):
    its scale would be NaN or inf and every value sharing that scale would be lost.
    """
    bits = check_bits(bits)
    group = parse_granularity(granularity)
    problem = nonfinite(weight)
    if problem:
        raise ValueError(
            f"cannot quantize {name or 'a weight'}: it holds {problem}; a non-finite value has "
            "no integer code and would turn its whole row or group to zero or NaN"
        )
    w = _as_matrix(weight.detach(), transposed).float()
    rows, cols = w.shape
    size = max(cols, 1) if group is None else group  # an empty weight: no group at all
    ngroups = max(-(-cols // size), 1 if group is None else 0)  # per channel: one scale a row
    padded = torch.zeros(rows, ngroups * size, dtype=torch.float32, device=w.device)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, ngroups, size)
    qmin, qmax = qrange(bits, symmetric)
    # A group of tiny (subnormal) values whose scale underflows to 0 gets the smallest positive
    # scale instead of 1, which would round every value to zero; an all-zero group gets 1.
    nonzero = blocks.abs().amax(-1) > 0
    smallest = torch.tensor(torch.finfo(torch.float32).tiny * 2.0**-23, device=w.device)
    if symmetric:
        scale = blocks.abs().amax(-1) / qmax
        zero = torch.zeros_like(scale)
    else:
        lo = blocks.amin(-1).clamp(max=0)
        hi = blocks.amax(-1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        if bool(torch.isinf(scale).any()):  # hi - lo beyond float32 (values near its max)
            wide = ((hi.double() - lo.double()) / (qmax - qmin)).float()
            scale = torch.where(torch.isinf(scale), wide, scale)
        scale = torch.where(scale > 0, scale, torch.where(nonzero, smallest, 1.0))
        zero = (qmin - lo / scale).round().clamp(qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.where(nonzero, smallest, 1.0))
    scale_full = _expand(scale, group, cols)
    zero_full = _expand(zero, group, cols)
    codes = (w / scale_full).round() + zero_full
    codes = codes.clamp(qmin, qmax)
    # Zeros stay zeros: a zero weight maps to exactly the zero point (already true by rounding,
    # enforced here against -0.0 / NaN corner cases).
    codes = torch.where(w == 0, zero_full, codes)
    return QuantizedTensor(
        codes=codes.to(torch.int8).cpu(),
        scale=scale.cpu(),
        zero_point=zero.to(torch.int8).cpu(),
        bits=bits,
        group=group,
        shape=tuple(weight.shape),
        dtype=weight.dtype,
        transposed=transposed,
    )


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bits, granularity, symmetric, name):  # noqa: D102
        q = quantize_tensor(weight, bits, granularity, symmetric, name=name)
        return q.dequantize().to(weight.device)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None, None, None, None


def fake_quantize(
    weight: torch.Tensor,
    bits: int = 8,
    granularity: str = "per_channel",
    symmetric: bool = True,
    name: str | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``weight`` with a straight-through gradient (identity backward).

    A weight holding NaN or inf raises ``ValueError`` (naming ``name``).
    """
    check_bits(bits)
    parse_granularity(granularity)
    return _FakeQuant.apply(weight, bits, granularity, symmetric, name)


def fake_quant_forward(
    model: nn.Module,
    *args: Any,
    bits: int = 8,
    granularity: str = "per_channel",
    symmetric: bool = True,
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``model(*args, **kwargs)`` with every targeted weight fake-quantized (STE).

    Use it as the forward of a quantization-aware recovery loop: gradients reach the float
    parameters through the straight-through estimator; masks still hold (masked entries get zero
    gradient). No hook is installed; the model is not changed.
    """
    replaced = {}
    for t in resolve_targets(model, targets, ignore):
        raw = raw_parameter(t.module, t.param_name)
        if is_masked(t.module, t.param_name):
            mask = t.module._buffers[t.param_name + MASK_SUFFIX]
            # the masked property multiplies by the mask again: zeros stay zero
            replaced[t.name] = fake_quantize(raw * mask, bits, granularity, symmetric, t.name)
        else:
            replaced[t.name] = fake_quantize(raw, bits, granularity, symmetric, t.name)
    return torch.func.functional_call(model, replaced, args, kwargs, strict=False)


@dataclass
class QuantLayer:
    """One quantized weight: its error, and its zeros as it is after quantization.

    Attributes:
        zeros: zeros of the quantized (effective) weight, the layer as the model now holds it:
            those it had before plus the weights the grid rounded to 0.
        rounded_to_zero: weights that were non-zero and rounded to 0 (counted in ``zeros``).
        zeros_kept: every weight that was zero before is still exactly zero.
    """

    name: str
    shape: tuple[int, ...]
    rel_error: float
    max_abs_error: float
    zeros: int
    zeros_kept: bool
    rounded_to_zero: int = 0


@dataclass
class QuantizeReport:
    """Per-layer quantization error. ``print(report)`` shows a table; unpacks as (model, report)."""

    layers: list[QuantLayer]
    settings: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None

    def __iter__(self):
        return iter((self.model, self))

    def layer(self, name: str) -> QuantLayer:
        for row in self.layers:
            if row.name in (name, f"{name}.weight"):
                return row
        raise KeyError(f"no layer {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "layers": [{**r.__dict__, "shape": list(r.shape)} for r in self.layers],
        }

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        header = (
            "layer",
            "shape",
            "rel. error",
            "max abs error",
            "zeros",
            "rounded to 0",
            "zeros kept",
        )
        rows = [
            (
                r.name,
                "x".join(map(str, r.shape)),
                f"{100 * r.rel_error:.3f} %",
                f"{r.max_abs_error:.3g}",
                f"{r.zeros:,}",
                f"{r.rounded_to_zero:,}",
                "yes" if r.zeros_kept else "NO",
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([f"prunekit quantize ({shown})", line(header), rule, *map(line, rows)])


def quantize(
    model: nn.Module,
    bits: int = 8,
    granularity: str = "per_channel",
    symmetric: bool = True,
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    mode: str = "fake",
    inplace: bool = False,
) -> QuantizeReport:
    """Quantize the targeted weights to ``bits``-bit integers; zeros (and masks) stay exactly zero.

    Targets default to those of ``prunekit.prune`` (every Linear / Conv weight except the output
    head). Returns a :class:`QuantizeReport` (relative Frobenius and max absolute error per
    layer) whose ``model`` is the quantized model (a copy unless ``inplace=True``). A targeted
    weight holding NaN or inf is refused with a ``ValueError`` naming the layer, before any
    layer is changed. A model sped up by ``prunekit.accelerate`` is refused
    (:class:`prunekit.AcceleratedModelError`): quantize before accelerating (``accelerate`` then
    runs ``mode="int"`` layers on their int8 codes), or ``prunekit.deaccelerate`` first.

    Example:
        >>> import torch, prunekit
        >>> from prunekit.compress.quantize import quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
        >>> report = quantize(net, bits=8)
        >>> report.max_rel_error < 0.01
        True
    """
    refuse_accelerated(model, "quantize")  # quantize before accelerate, or deaccelerate first
    bits = check_bits(bits)
    parse_granularity(granularity)
    if mode not in ACCEPTED_MODES:
        raise ValueError(f"mode={mode!r} is not accepted: use 'fake' or 'int'")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    chosen = resolve_targets(model, targets, ignore)  # raises before anything is changed
    for t in chosen:  # every layer checked before any is changed
        problem = nonfinite(t.weight())
        if problem:
            raise ValueError(
                f"quantize: {t.name} holds {problem}; quantizing it would zero or NaN whole "
                "rows. Fix the weights (reload the checkpoint, check the training run) or leave "
                f"the layer out with ignore=[{t.module_name!r}]; nothing was changed"
            )
    if not inplace:
        model = copy_model(model, "quantize")
        chosen = resolve_targets(model, targets, ignore)
    record = dict(getattr(model, QUANT_ATTR, None) or {})
    layers: dict[str, QuantizedTensor] = dict(record.get("layers", {}))
    rows = []
    for t in chosen:
        rows.append(_quantize_target(t, bits, granularity, symmetric, mode, layers))
    record.update({"bits": bits, "granularity": granularity, "symmetric": symmetric, "mode": mode})
    record["layers"] = layers
    object.__setattr__(model, QUANT_ATTR, record)
    settings = {"bits": bits, "granularity": granularity, "symmetric": symmetric, "mode": mode}
    return QuantizeReport(rows, settings, model)


def _quantize_target(
    t: Target,
    bits: int,
    granularity: str,
    symmetric: bool,
    mode: str,
    layers: dict[str, QuantizedTensor],
) -> QuantLayer:
    weight = t.weight()
    q = quantize_tensor(weight, bits, granularity, symmetric, transposed=t.transposed, name=t.name)
    deq = q.dequantize().to(weight.device)
    zero = weight == 0
    kept = bool((deq[zero] == 0).all())
    diff = (deq.float() - weight.float()).abs()
    norm = weight.double().norm()  # float64: the norm of subnormal weights is not 0
    rel = float(diff.double().norm() / norm) if norm > 0 else 0.0
    with torch.no_grad():
        raw_parameter(t.module, t.param_name).copy_(deq)  # masked entries: deq is already 0
    if mode == "int":
        layers[t.name] = q
    else:
        layers.pop(t.name, None)
    after = int((t.weight() == 0).sum())  # as the model holds it now: rounded weights too
    return QuantLayer(
        t.name,
        tuple(weight.shape),
        rel,
        float(diff.max()) if diff.numel() else 0.0,
        after,
        kept,
        rounded_to_zero=int(((deq == 0) & ~zero).sum()),
    )
