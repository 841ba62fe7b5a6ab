"""The compute dtype of one-shot calibration: block forwards under ``torch.autocast``, statistics
in full precision.

``oneshot(..., calibration_dtype="bfloat16")`` runs the matrix products of the calibration
forward passes in bfloat16 (``torch.autocast`` on the device the blocks run on) while

* the hidden states passed from block to block keep the model's dtype (each block's output is
  cast back to the dtype of its input);
* every statistic (Wanda's input norms, SparseGPT's Hessians) is computed with autocast
  disabled, from the layer inputs cast up to float32, exactly as on the float32 path (float32
  products summed in float64, :mod:`prunekit.calibrate.stats`).

The default, ``"auto"`` (or ``None``), takes bfloat16 where it is fast and harmless: a float32
model whose blocks run on a CPU with native bfloat16 dot products (AVX512-BF16, AMX, Arm BF16)
or on a CUDA GPU that supports bfloat16; everywhere else no autocast (the model's own dtype).
The result then depends on the hardware as float32 rounding already does (the masks of
near-tied weights may differ, the quality does not: see the one-shot speed table in the
README). A checkpoint of one dtype is not resumed in another: the error names the
``calibration_dtype`` that resumes it. ``"float32"`` runs no autocast
at all: bit for bit the same as before this option existed. ``"float16"`` is accepted where the
blocks run on CUDA only (CPU float16 products are emulated and slow).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch

CALIBRATION_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The names ``calibration_dtype`` accepts (or the ``torch.dtype`` of the same name; None is
``"auto"``)."""

_REDUCED = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_warned_slow_bf16 = False


def calibration_dtype_name(value: str | torch.dtype | None) -> str:
    """The canonical name of a ``calibration_dtype`` value (``"auto"`` for None).

    Example:
        >>> calibration_dtype_name(torch.bfloat16), calibration_dtype_name(None)
        ('bfloat16', 'auto')
    """
    if value is None:
        return "auto"
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(
            name, name
        )
    else:
        name = None
    if name not in CALIBRATION_DTYPES:
        raise ValueError(
            f"calibration_dtype={value!r} is not accepted; accepted: None, "
            + ", ".join(repr(n) for n in CALIBRATION_DTYPES)
            + " (or the torch dtype of that name; 'float16' on CUDA only; None is 'auto')"
        )
    return name


def resolve_calibration_dtype(
    value: str | torch.dtype | None,
    device: torch.device | str | None,
    model_dtype: torch.dtype | None = torch.float32,
) -> torch.dtype | None:
    """The autocast dtype of the calibration forwards on ``device`` (where the blocks run; None:
    the CPU) for a model of ``model_dtype``, or None for the path without autocast.

    ``"auto"`` gives bfloat16 for a float32 model on a device where bfloat16 products are
    native (:func:`fast_bf16`), else None. Raises ``ValueError`` for a value that is not
    accepted, or float16 off CUDA; warns once when bfloat16 is asked explicitly of a CPU without
    native bfloat16 dot products (then slower than float32, still done).

    Example:
        >>> resolve_calibration_dtype("float32", "cpu") is None
        True
        >>> resolve_calibration_dtype("bfloat16", "cuda")
        torch.bfloat16
        >>> resolve_calibration_dtype("auto", "cpu", torch.float64) is None
        True
    """
    name = calibration_dtype_name(value)
    if name == "float32":
        return None
    kind = torch.device(device).type if device is not None else "cpu"
    if name == "auto":
        return torch.bfloat16 if model_dtype == torch.float32 and fast_bf16(kind) else None
    if name == "float16" and kind != "cuda":
        raise ValueError(
            f"calibration_dtype='float16' runs on CUDA only (the blocks run on {kind!r}); "
            "use 'bfloat16', 'float32' or 'auto' (the default)"
        )
    if kind == "cpu" and not native_bf16_cpu():
        _warn_slow_bf16()
    return _REDUCED[name]


def resolved_name(dtype: torch.dtype | None) -> str:
    """The name of a dtype :func:`resolve_calibration_dtype` chose (``"float32"`` for None, no
    autocast: what checkpoint fingerprints record); reports name ``compute or model dtype``.

    Example:
        >>> resolved_name(None), resolved_name(torch.bfloat16)
        ('float32', 'bfloat16')
    """
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def floating_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (None: it has none).

    Example:
        >>> floating_dtype(torch.nn.Linear(2, 2).double())
        torch.float64
    """
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def fast_bf16(device_type: str) -> bool:
    """Whether bfloat16 matrix products are native, hence faster than float32 ones, on this
    kind of device: a CPU with :func:`native_bf16_cpu`, a CUDA GPU that supports bfloat16.

    Example:
        >>> fast_bf16("cpu") == native_bf16_cpu()
        True
    """
    if device_type == "cpu":
        return native_bf16_cpu()
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def _warn_slow_bf16() -> None:
    global _warned_slow_bf16
    if _warned_slow_bf16:
        return
    _warned_slow_bf16 = True
    warnings.warn(
        "prunekit: calibration_dtype='bfloat16' on a CPU without native bfloat16 dot products "
        "(no AVX512-BF16 / AMX): the calibration forwards will be slower than in float32, not "
        "faster; running them in bfloat16 as asked",
        stacklevel=4,
    )


@lru_cache(maxsize=1)
def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (x86 AVX512-BF16 or AMX-BF16,
    Arm BF16), where bfloat16 matrix products are faster than float32 ones.

    Example:
        >>> isinstance(native_bf16_cpu(), bool)
        True
    """
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except Exception:  # noqa: BLE001, S112 - a probe this torch build cannot run
                continue
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def compute_autocast(
    dtype: torch.dtype | None, device: torch.device | str | None
) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context for None.

    Example:
        >>> with compute_autocast(torch.bfloat16, "cpu"):
        ...     (torch.ones(2, 3) @ torch.ones(3, 2)).dtype
        torch.bfloat16
    """
    if dtype is None:
        return nullcontext()
    kind = torch.device(device).type if device is not None else "cpu"
    return torch.autocast(kind, dtype=dtype)


def no_autocast(device: torch.device | str) -> AbstractContextManager:
    """Autocast switched off on ``device``'s type where it is on (statistics stay in the dtype
    they are computed in); a no-op context otherwise, and for device types without autocast.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast("cpu"):
        ...     (torch.ones(2, 3) @ torch.ones(3, 2)).dtype
        torch.float32
    """
    kind = torch.device(device).type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4: no device argument
        old = {"cpu": "is_autocast_cpu_enabled", "cuda": "is_autocast_enabled"}.get(kind)
        enabled = bool(old and getattr(torch, old)())
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return nullcontext()
    return torch.autocast(kind, enabled=False) if enabled else nullcontext()
