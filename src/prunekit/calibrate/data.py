"""Calibration data: a fixed, seeded set of model inputs for one-shot pruning.

``prunekit.calibration(source, tokenizer=None, n_samples=128, seq_len=512, seed=0)`` accepts

* text: a path to a text file, a string of text, or a list of strings, with a ``tokenizer``
  (a Hugging Face tokenizer, or any callable ``str -> list[int]``);
* ``"pydoc"`` (or ``None``): about 465 KB of English prose that ships with CPython
  (``pydoc_data.topics``), so calibration needs no download;
* a 1-D tensor of token ids;
* any iterable of ready model inputs (tensors or dicts of tensors), of which the first
  ``n_samples`` are taken as they are.

Token sources are cut into ``n_samples`` windows of ``seq_len`` tokens at seeded random offsets
(the protocol of the Wanda and SparseGPT papers). Each sample is a dict ``{"input_ids": (1,
seq_len)}`` so it can be passed as ``model(**sample)``.

Example:
    >>> import torch, prunekit
    >>> calib = prunekit.calibration(torch.arange(1000), n_samples=4, seq_len=16)
    >>> len(calib), calib[0]["input_ids"].shape
    (4, torch.Size([1, 16]))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Sample = Any  # a tensor, or a dict of model keyword arguments


@dataclass
class CalibrationSet(Sequence):
    """A fixed list of model inputs, with a description of where they came from."""

    samples: list[Sample]
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        return f"CalibrationSet({len(self)} samples: {self.description})"


def pydoc_text() -> str:
    """The English prose of CPython's language reference (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _encode(text: str, tokenizer: Any) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError(
            "text calibration data needs a tokenizer: a Hugging Face tokenizer or a callable "
            "str -> list[int]; or pass token ids as a 1-D tensor"
        )
    if hasattr(tokenizer, "encode"):  # a Hugging Face tokenizer
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(text)
    else:
        ids = tokenizer(text)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> list[Sample]:
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"calibration text has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=generator)
    return [{"input_ids": tokens[s : s + seq_len].unsqueeze(0).clone()} for s in starts.tolist()]


def _read_text(source: str | os.PathLike | list[str]) -> tuple[str, str]:
    if isinstance(source, list):
        return "\n\n".join(source), f"{len(source)} strings"
    if isinstance(source, os.PathLike) or (
        isinstance(source, str)
        and "\n" not in source
        and len(source) < 4096
        and Path(source).is_file()
    ):
        path = Path(source)
        return path.read_text(encoding="utf-8", errors="replace"), f"text file {path}"
    if source == "pydoc":
        return pydoc_text(), "CPython pydoc_data prose"
    if "\n" not in source and len(source) < 4096 and _looks_like_path(source):
        raise ValueError(f"calibration file {source!r} does not exist")
    return str(source), f"a string of {len(source)} characters"


def _looks_like_path(text: str) -> bool:
    """A short single-line string with a path separator or a text-file suffix: a missing file,
    not calibration text."""
    return (
        "/" in text
        or os.sep in text
        or Path(text).suffix.lower()
        in (".txt", ".text", ".md", ".tokens", ".raw", ".csv", ".json", ".jsonl")
    )


def calibration(
    source: Any = None,
    tokenizer: Any = None,
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> CalibrationSet:
    """Build a fixed set of calibration samples from text, token ids or ready inputs.

    See the module docstring for the accepted sources. Raises ValueError for a source it
    cannot read, naming what it accepts.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(source, CalibrationSet):
        return source
    if source is None:
        source = "pydoc"
    if isinstance(source, torch.Tensor) and source.dim() == 1:
        samples = _windows(source.long(), n_samples, seq_len, seed)
        return CalibrationSet(
            samples,
            f"{n_samples} x {seq_len} tokens from a tensor",
            {"n_samples": n_samples, "seq_len": seq_len, "seed": seed},
        )
    if isinstance(source, (str, os.PathLike)) or (
        isinstance(source, list) and source and all(isinstance(s, str) for s in source)
    ):
        text, origin = _read_text(source)
        samples = _windows(_encode(text, tokenizer), n_samples, seq_len, seed)
        return CalibrationSet(
            samples,
            f"{n_samples} x {seq_len} tokens of {origin}",
            {"n_samples": n_samples, "seq_len": seq_len, "seed": seed, "source": origin},
        )
    if isinstance(source, Iterable):
        samples = []
        for sample in source:
            samples.append(sample)
            if len(samples) == n_samples:
                break
        if not samples:
            raise ValueError("the calibration iterable yielded no sample")
        return CalibrationSet(samples, f"{len(samples)} samples from an iterable")
    raise ValueError(
        f"cannot build calibration data from {type(source).__name__}; accepted: a text file "
        "path, a string, a list of strings (with a tokenizer), 'pydoc', a 1-D tensor of token "
        "ids, or an iterable of model inputs"
    )
