"""What a recipe stage's checkpoint depends on, as short hashes, so ``compress`` resumes only
from checkpoints that the same inputs would produce again.

A stage's chain hashes the previous stage's chain, the stage as written and the fingerprints of
the inputs that stage uses (``calib``, ``data``, ``example_inputs``); the first chain starts
from the input model's weights, the seed and the prunekit version (a new version may change a
verb's defaults). Inputs are hashed by value where that is cheap and certain: tensors, numpy
arrays, numbers and strings inside lists, tuples and mappings (tokenizer outputs included),
and a ``DataLoader`` over a ``TensorDataset``. Other iterables (a generator, a dataset class of
your own) are not iterated here, since that could consume them or be slow: they are
fingerprinted by type and length only, and after changing their contents you pass
``resume=False``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit._version import __version__

# What each needs-kind of a stage is called in messages.
INPUT_NAMES = {
    "calib": "calibration data (calib=)",
    "data": "training data (data=)",
    "example_inputs": "example inputs (example_inputs=)",
}


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor in the state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        _update_tensor(digest, tensor)
    return digest.hexdigest()[:16]


def input_fingerprint(value: Any) -> str:
    """A short hash of ``value`` (see the module docstring for what is hashed by value).

    Example:
        >>> a = input_fingerprint([torch.ones(2)])
        >>> a == input_fingerprint([torch.ones(2)]), a == input_fingerprint([torch.zeros(2)])
        (True, False)
    """
    digest = hashlib.sha256()
    _update(digest, value, depth=0)
    return digest.hexdigest()[:16]


def base_fingerprint_of(model_hash: str, seed: int) -> dict[str, str]:
    """The fingerprints every stage's chain includes: the input model's, the seed, the version."""
    return {"model": model_hash, "seed": str(seed), "prunekit": __version__}


def chain(previous: str, inputs: dict[str, str]) -> str:
    """The chain of one stage: the previous stage's chain and this stage's fingerprints."""
    text = "|".join(f"{k}={v}" for k, v in sorted(inputs.items()))
    return hashlib.sha256(f"{previous}|{text}".encode()).hexdigest()[:16]


def what_changed(saved: dict[str, str] | None, current: dict[str, str]) -> str:
    """Words for the inputs whose fingerprints differ from a checkpoint's record; the generic
    reason where the checkpoint has no record (written by an older prunekit)."""
    if saved is None:
        return "recipe, seed, input model or inputs changed"
    names = {
        "model": "input model",
        "seed": "seed",
        "prunekit": f"prunekit version (was {saved.get('prunekit', '?')})",
        "stage": "stage settings",
        **INPUT_NAMES,
    }
    changed = [names.get(k, k) for k in current if saved.get(k) != current[k]]
    changed += [names.get(k, k) for k in saved if k not in current]
    return (", ".join(changed) + " changed") if changed else "an earlier stage changed"


def _update_tensor(digest: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}|{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


_MAX_DEPTH = 8  # nested containers deeper than this are fingerprinted by type only


def _update(digest: Any, value: Any, depth: int) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(b"T")
        _update_tensor(digest, value)
    elif value is None or isinstance(value, bool | int | float | str | bytes):
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    elif depth >= _MAX_DEPTH:
        digest.update(f"deep:{type(value).__name__}".encode())
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _update(digest, item, depth + 1)
    elif isinstance(value, np.ndarray):
        digest.update(f"ndarray|{value.dtype}|{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):  # dicts, and tokenizer outputs (BatchEncoding)
        digest.update(f"dict[{len(value)}]".encode())
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update(digest, value[key], depth + 1)
    elif isinstance(value, torch.utils.data.DataLoader):
        _update_loader(digest, value, depth)
    elif isinstance(value, torch.utils.data.TensorDataset):
        digest.update(b"TensorDataset")
        for tensor in value.tensors:
            _update_tensor(digest, tensor)
    else:  # not iterated: it may be a one-shot generator or slow to read
        length = len(value) if hasattr(value, "__len__") else "?"
        digest.update(
            f"opaque:{type(value).__module__}.{type(value).__qualname__}[{length}]".encode()
        )


def _update_loader(digest: Any, loader: torch.utils.data.DataLoader, depth: int) -> None:
    shuffled = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    digest.update(f"DataLoader|{loader.batch_size}|{loader.drop_last}|{shuffled}".encode())
    _update(digest, loader.dataset, depth + 1)
