"""Per-layer sparsity of saved weights, read from the files without the model's code.

What ``prunekit stats PATH`` prints. PATH is a single ``.safetensors`` file, a Hugging Face
folder (``config.json`` + ``*.safetensors``, sharded or not, including the structured and
compressed folders of ``prunekit.save_pretrained``) or a ``prunekit.save`` folder (plain or
``compressed=True``). Compressed tensors are decoded (quantized ones to their dequantized
values), so the zeros counted are those of the weights the model will run with.

What is counted, so that the totals agree with ``prunekit count`` and ``prunekit.stats(model)``:

* the rows are the floating-point parameters with two or more dimensions (weight matrices, conv
  kernels, embeddings), in model order;
* "whole model" counts every parameter once: buffers are left out (integer ones such as BERT's
  ``embeddings.position_ids`` and BatchNorm's ``num_batches_tracked``, BatchNorm's running
  statistics, and, for a Hugging Face folder, every buffer the model class declares), and a
  tied weight stored once is counted once.

Model order: for a Hugging Face folder, model order and which tensors are buffers come from the
model class named in ``config.json``, built on the ``meta`` device (no weights are allocated)
when ``transformers`` can build it. A compressed ``prunekit.save`` folder lists every weight in
model order in its ``prunekit.json``; a plain one lists its prunable layers, which then appear in
model order while the others (embeddings) keep their natural place. Anything else is in natural
order (``layer.2`` before ``layer.10``): safetensors files themselves store names sorted.

Example:
    >>> import torch, prunekit, tempfile
    >>> folder = prunekit.save(torch.nn.Linear(4, 2), tempfile.mkdtemp() + "/net")
    >>> report = file_stats(folder)
    >>> [(r.name, r.params) for r in report.layers], report.model_params
    ([('weight', 8)], 10)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from prunekit.compress.io import MASK_PREFIX, META_FILE, SPARSE_PREFIX, decode_state
from prunekit.report import LayerStats, SparsityReport

__all__ = ["file_stats", "natural_key"]

# Buffers of the common layers, known by name when the model class is not available.
_BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def looks_like_buffer(name: str, tensor: torch.Tensor) -> bool:
    """A saved tensor that is not a parameter, judged from the file alone: not floating point,
    or a BatchNorm statistic (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    return not tensor.is_floating_point() or name.rpartition(".")[2] in _BUFFER_LEAVES


def natural_key(name: str) -> tuple:
    """Sort key that compares the numbers in a name as numbers: ``layer.2`` < ``layer.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a file or folder argument; a clear error for anything else."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: not a .safetensors file. prunekit reads safetensors only (never "
                "pickle); convert .bin/.pt checkpoints with transformers' "
                "save_pretrained(safe_serialization=True)"
            )
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise FileNotFoundError(f"{path}: no *.safetensors file in this folder")
    raise FileNotFoundError(f"{path}: no such file or folder")


def _reference(folder: Path) -> tuple[list[str], set[str], set[str]] | None:
    """(state-dict names in model order, parameter names, buffer names) of the model class of a
    Hugging Face folder, built on the meta device; None when transformers cannot build it."""
    if not (folder / "config.json").is_file():
        return None
    try:
        import transformers

        from prunekit.graph.hf import _model_class

        config = transformers.AutoConfig.from_pretrained(folder)
        cls = _model_class(config) or transformers.AutoModel
        with torch.device("meta"):
            model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except Exception:  # no transformers, remote code, an unknown architecture: natural order
        return None
    order = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    order += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    state_order = list(model.state_dict())
    order = state_order + [n for n in order if n not in set(state_order)]
    return order, params, buffers


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META_FILE
    if not (path.is_dir() and file.is_file()):
        return {}
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _tensors(file: Path, meta: dict[str, Any]):
    """(name, dense tensor) for every tensor of ``file``: plain ones as stored, compressed ones
    decoded one at a time; packed masks are skipped."""
    entries = meta.get("compressed", {}) if isinstance(meta.get("compressed"), dict) else {}
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
        arrays: dict[str, list[str]] = {}
        for key in keys:
            if key.startswith(SPARSE_PREFIX):
                owner = key[len(SPARSE_PREFIX) :].rpartition(".")[0]
                if owner not in entries:
                    raise ValueError(
                        f"{file}: {key}: an encoded array of no tensor listed in "
                        f"{META_FILE}; stats cannot decode it"
                    )
                arrays.setdefault(owner, []).append(key)
        for key in keys:
            if not key.startswith((MASK_PREFIX, SPARSE_PREFIX)):
                yield key, f.get_tensor(key)
        for name, owned in arrays.items():
            state, _ = decode_state(
                {k: f.get_tensor(k) for k in owned},
                {"compressed": {name: entries[name]}},
                source=str(file),
            )
            yield name, state[name]


def file_stats(path: str | os.PathLike) -> SparsityReport:
    """Per-layer sparsity of the weights saved at ``path`` (a ``.safetensors`` file, a Hugging
    Face folder or a ``prunekit.save`` folder), compressed tensors decoded, in model order.

    ``model_params`` / ``model_zeros`` count the model's parameters once each (no buffers, tied
    weights once), as ``prunekit count`` does. Layers that a ``prunekit.save`` folder records as
    masked are flagged ``masked``.

    Example:
        >>> report = file_stats("out/pruned")  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    path = Path(path)
    files = safetensors_files(path)
    meta = _read_meta(path)
    masks = meta.get("masks", {}) if isinstance(meta.get("masks"), dict) else {}
    reference = _reference(path) if path.is_dir() else None
    # names in model order: the model class's, else those a prunekit record lists in order
    # ("compressed" lists every weight of two or more dimensions, the others a subset)
    order: list[str] = list(reference[0]) if reference else []
    for field in ("compressed", "sparsity", "masks"):
        if isinstance(meta.get(field), dict):
            order += [n for n in meta[field] if isinstance(n, str)]
    rank: dict[str, int] = {}
    for name in order:
        rank.setdefault(name, len(rank))

    def is_buffer(name: str, tensor: torch.Tensor) -> bool:
        if reference and name in reference[1]:
            return False
        if reference and name in reference[2]:
            return True
        return looks_like_buffer(name, tensor)

    rows: list[tuple[tuple, LayerStats]] = []
    total = zeros = 0
    for file in files:
        for name, tensor in _tensors(file, meta):
            if is_buffer(name, tensor):
                continue
            count = tensor.numel() - int(torch.count_nonzero(tensor))
            total += tensor.numel()
            zeros += count
            if tensor.dim() >= 2:
                rows.append(
                    LayerStats(name, tuple(tensor.shape), tensor.numel(), count, name in masks)
                )
    return SparsityReport(_model_order(rows, rank), total, zeros)


def _model_order(rows: list[LayerStats], rank: dict[str, int]) -> list[LayerStats]:
    """Rows in natural name order, except that the slots of the names ``rank`` knows are
    refilled in ``rank`` order: with a complete ranking that is model order, with a partial
    one (a plain ``prunekit.save`` folder lists only its pruned layers in order) the known
    layers are in model order and the others keep their natural place among them."""
    rows = sorted(rows, key=lambda r: natural_key(r.name))
    known = iter(sorted((r for r in rows if r.name in rank), key=lambda r: rank[r.name]))
    return [next(known) if r.name in rank else r for r in rows]
