"""Shared pieces of the commands that read a Hugging Face folder's tokenizer and calibration
text (``oneshot``, ``analyze``, ``compress``), checked before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.calibrate.data import CalibrationSet, calibration
from prunekit.cli_commands.common import quiet


def tokenizer_and_calibration(
    folder: Path,
    calib: str | None,
    *,
    n_samples: int,
    seq_len: int,
    seed: int,
    command: str,
) -> tuple[Any, CalibrationSet]:
    """The folder's tokenizer and the calibration samples (``calib`` text file, or pydoc prose).

    Raises ``ValueError`` naming the flag or file: transformers missing, no tokenizer, a
    ``--calib`` file that does not exist, ``--seq-len`` above the model's positions, a text
    shorter than ``n_samples x seq_len`` tokens (the windows would repeat it).
    """
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(f"{command} needs transformers: pip install 'prunekit[hf]'") from exc
    if calib is not None and not Path(calib).is_file():
        raise ValueError(f"--calib {calib}: no such file")
    quiet()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{folder}: no tokenizer found to tokenize the calibration text ({exc})"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"--seq-len {seq_len} is above the model's {max_pos} positions")
    from prunekit.calibrate.data import _encode, _read_text

    text, origin = _read_text(calib or "pydoc")
    ids = _encode(text, tokenizer)
    need = n_samples * seq_len
    if ids.numel() < need:
        where = f"--calib {calib}" if calib else "the default calibration text (pydoc prose)"
        raise ValueError(
            f"{where} has {ids.numel():,} tokens, fewer than --n-samples x --seq-len = "
            f"{n_samples} x {seq_len} = {need:,}: the windows would repeat the same text. "
            f"Give a longer --calib file or lower --n-samples / --seq-len (e.g. --n-samples "
            f"{max(1, ids.numel() // seq_len)})"
        )
    samples = calibration(ids, n_samples=n_samples, seq_len=seq_len, seed=seed)
    samples.description = f"{n_samples} x {seq_len} tokens of {origin}"
    samples.meta["source"] = origin
    return tokenizer, samples
