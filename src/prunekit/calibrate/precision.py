"""The compute dtype of one-shot calibration: block forwards under ``torch.autocast``, statistics
in full precision.

``oneshot(..., calibration_dtype="bfloat16")`` runs the matrix products of the calibration
forward passes in bfloat16 (``torch.autocast`` on the device the blocks run on) while

* the hidden states passed from block to block keep the model's dtype (each block's output is
  cast back to the dtype of its input);
* every statistic (Wanda's input norms, SparseGPT's Hessians) is computed with autocast
  disabled, from the layer inputs cast up to float32, exactly as on the float32 path (float32
  products summed in float64, :mod:`prunekit.calibrate.stats`).

The default (``None`` or ``"float32"``) runs no autocast at all: results bit for bit those of
a prunekit without this option, and independent of the CPU's bfloat16 support. ``"float16"``
is accepted where the blocks run on CUDA only (CPU float16 products are emulated and slow).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch

CALIBRATION_DTYPES = ("float32", "bfloat16", "float16")
"""The names ``calibration_dtype`` accepts (or the ``torch.dtype`` of the same name, or None)."""

_REDUCED = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_warned_slow_bf16 = False


def calibration_dtype_name(value: str | torch.dtype | None) -> str:
    """The canonical name of a ``calibration_dtype`` value (``"float32"`` for None).

    Example:
        >>> calibration_dtype_name(torch.bfloat16), calibration_dtype_name(None)
        ('bfloat16', 'float32')
    """
    if value is None:
        return "float32"
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
            + " (or the torch dtype of that name; 'float16' on CUDA only)"
        )
    return name


def resolve_calibration_dtype(
    value: str | torch.dtype | None, device: torch.device | str | None
) -> torch.dtype | None:
    """The autocast dtype of the calibration forwards on ``device`` (where the blocks run; None:
    the CPU), or None for the float32 path (no autocast). Raises ``ValueError`` for a value
    that is not accepted, or float16 off CUDA; warns once when bfloat16 is asked of a CPU
    without native bfloat16 dot products (then slower than float32, still done).

    Example:
        >>> resolve_calibration_dtype("float32", "cpu") is None
        True
        >>> resolve_calibration_dtype("bfloat16", "cuda")
        torch.bfloat16
    """
    name = calibration_dtype_name(value)
    if name == "float32":
        return None
    kind = torch.device(device).type if device is not None else "cpu"
    if name == "float16" and kind != "cuda":
        raise ValueError(
            f"calibration_dtype='float16' runs on CUDA only (the blocks run on {kind!r}); "
            "use 'bfloat16', or 'float32' (the default)"
        )
    if kind == "cpu" and not native_bf16_cpu():
        _warn_slow_bf16()
    return _REDUCED[name]


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
