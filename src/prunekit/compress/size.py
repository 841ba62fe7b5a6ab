"""How much smaller a compressed save is: dense fp32 bytes against compressed file bytes.

:func:`size_report` saves a model compressed (with :func:`prunekit.compress.io.save`) to a
temporary folder, or reads a folder already saved, and compares it with the dense fp32
safetensors file of the same weights, raw and gzip -9'd. It sits apart from the encoding
(:mod:`prunekit.compress.sparse_format`) and the folder format (:mod:`prunekit.compress.io`),
which it both uses, so that neither of those imports the other's caller.

Example:
    >>> import torch, prunekit
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    >>> report = size_report(prunekit.prune(net, 0.9).model, bits=8)
    >>> report.ratio < 0.3
    True
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save as st_save

from prunekit.compress.io import load_state, save

PROGRESS_BYTES = 8 << 20  # gzip -9 runs at roughly 3-10 MB/s: say what is happening above this


def _gzip_size(data: bytes, what: str, progress: bool) -> int:
    loud = progress and len(data) >= PROGRESS_BYTES
    if loud:
        print(f"size_report: gzip -9 of the {what} ({len(data) / 1e6:.1f} MB) ...", file=sys.stderr,
              end="", flush=True)  # fmt: skip
    started = time.perf_counter()
    size = len(gzip.compress(data, compresslevel=9))
    if loud:
        print(f" {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return size


@dataclass
class SizeReport:
    """Dense fp32 bytes vs compressed file bytes, each also gzip -9'd.

    The dense file holds the same (pruned, possibly dequantized) weights as float32 with their
    zeros in place, so ``gzip_ratio`` shows what the format gains over plain gzip of that file.
    """

    dense_fp32_bytes: int
    dense_fp32_gzip_bytes: int | None
    compressed_bytes: int
    compressed_gzip_bytes: int | None

    @property
    def ratio(self) -> float:
        """Compressed file size as a fraction of the dense fp32 file."""
        return self.compressed_bytes / self.dense_fp32_bytes

    @property
    def gzip_ratio(self) -> float | None:
        """The same ratio after gzip -9 of both (None when measured with ``gzip=False``)."""
        if self.compressed_gzip_bytes is None or not self.dense_fp32_gzip_bytes:
            return None
        return self.compressed_gzip_bytes / self.dense_fp32_gzip_bytes

    def __str__(self) -> str:
        def num(n: int | None) -> str:
            return f"{n:>12,}" if n is not None else f"{'-':>12}"

        gz = self.gzip_ratio
        return "\n".join(
            [
                "prunekit size         bytes       gzip -9",
                f"dense fp32   {self.dense_fp32_bytes:>12,}  {num(self.dense_fp32_gzip_bytes)}",
                f"compressed   {self.compressed_bytes:>12,}  {num(self.compressed_gzip_bytes)}",
                f"ratio        {100 * self.ratio:>11.2f}%  "
                + (f"{100 * gz:>11.2f}%" if gz is not None else f"{'-':>12}"),
            ]
        )


def size_report(
    model_or_path: Any, *, gzip: bool = True, progress: bool = True, **save_kwargs: Any
) -> SizeReport:
    """Sizes of a model (saved compressed to a temporary folder with ``save_kwargs``) or of a
    folder written by ``prunekit.save``: the dense fp32 safetensors file (every floating tensor
    as float32) and the compressed save folder, raw and gzip -9 of their bytes.

    ``gzip=False`` skips the gzip columns (gzip -9 of a 90 MB model takes tens of seconds);
    with ``progress`` each gzip of 8 MB or more says so on stderr, with its time.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_path, (str, os.PathLike)):
            folder = Path(model_or_path)
        else:
            folder = save(model_or_path, Path(tmp) / "model", compressed=True, **save_kwargs)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        data = b"".join(p.read_bytes() for p in files)
        state = {
            k: (v.float() if v.is_floating_point() else v).contiguous()
            for k, v in load_state(folder).items()
        }
        dense = st_save(state)
        if not gzip:
            return SizeReport(len(dense), None, len(data), None)
        return SizeReport(
            len(dense),
            _gzip_size(dense, "dense fp32 file", progress),
            len(data),
            _gzip_size(data, "compressed folder", progress),
        )
