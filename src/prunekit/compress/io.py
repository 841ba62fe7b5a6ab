"""Save and load pruned models: safetensors for tensors, JSON for metadata, never pickle.

A saved model is a folder:

* ``model.safetensors``: the model's ``state_dict`` (masked weights as stored, zeros in place)
  with every mask bit-packed (8 per byte) under ``__prunekit_mask__.<parameter name>``.
* ``prunekit.json``: prunekit and format versions, the masked parameters with their shapes, and
  per-layer sparsity, plus whatever ``metadata`` the caller adds (the pruning settings). For a
  structurally pruned model (``prunekit.prune_structured``) it also holds ``"structure"``: every
  changed shape, attribute and removed block, which :func:`load` replays on a fresh instance built
  by a factory (see :mod:`prunekit.compress.structured`).

Writes go to a temporary folder beside the destination, which is then renamed into place, so an
interrupted save never leaves a half-written model under the final name.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit._version import __version__
from prunekit.compress.structured import STRUCTURE_ATTR, apply_structure
from prunekit.masks import MASK_SUFFIX, apply_mask, get_mask, masked_parameters, remove_mask
from prunekit.report import stats

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "prunekit.json"
MASK_PREFIX = "__prunekit_mask__."


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask into uint8 (8 entries per byte, row-major)."""
    bits = np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1))
    return torch.from_numpy(bits)


def unpack_mask(packed: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    count = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.numpy(), count=count).astype(bool)
    return torch.from_numpy(bits.reshape(tuple(shape)))


def _dedupe_shared(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return the aliases."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor.detach().contiguous().cpu()
    return kept, aliases


def _atomic_dir_write(path: Path, overwrite: bool, write) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a (pruned) model's weights and masks to the folder ``path``, without pickle.

    Example:
        >>> import torch, prunekit, tempfile
        >>> net = prunekit.prune(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), 0.5).model
        >>> folder = prunekit.save(net, tempfile.mkdtemp() + "/net")
        >>> sorted(p.name for p in folder.iterdir())
        ['model.safetensors', 'prunekit.json']
    """
    path = Path(path)
    state = model.state_dict()
    masks = {}
    for module_name, module, name in masked_parameters(model):
        full = f"{module_name}.{name}" if module_name else name
        masks[full] = get_mask(module, name)
        state.pop(full + MASK_SUFFIX, None)
        # Optimiser momentum from before the mask can move raw values: store the masked weight.
        state[full] = getattr(module, name).detach()
    tensors, aliases = _dedupe_shared(state)
    for name, mask in masks.items():
        tensors[MASK_PREFIX + name] = pack_mask(mask)
    report = stats(model)
    meta = {
        "format": "prunekit",
        "format_version": FORMAT_VERSION,
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "masks": {name: list(mask.shape) for name, mask in masks.items()},
        "aliases": aliases,
        "sparsity": {row.name: round(row.sparsity, 6) for row in report.layers},
        "total_sparsity": round(report.sparsity, 6),
        **(metadata or {}),
    }
    structure = getattr(model, STRUCTURE_ATTR, None)
    if structure:
        meta["structure"] = structure

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    _atomic_dir_write(path, overwrite, write)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``prunekit.json`` of a saved model folder."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a prunekit save folder (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "prunekit" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this prunekit ({__version__}) reads prunekit format up to version {FORMAT_VERSION}"
        )
    return meta


def load(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Load weights and masks saved by :func:`save` into ``model``, in place.

    ``model`` is an instance of the saved architecture (fresh, or carrying masks of its own,
    which the saved ones replace), or a zero-argument factory that builds one. The weights are
    restored bit for bit and every mask is re-attached, so pruning or training can go on. Shapes
    must match exactly; a mismatch raises before any weight is changed.

    A structurally pruned model (``prunekit.prune_structured``) has smaller layers than a fresh
    instance: its saved record of changed shapes is first replayed on the fresh model (checked
    on a copy first when you pass an instance), then the weights are loaded.

    Example:
        >>> restored = prunekit.load("out/net", MyNet())  # doctest: +SKIP
        >>> restored = prunekit.load("out/pruned", MyNet)  # a factory works too  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(
                f"model must be an nn.Module or a callable returning one, got {type(model).__name__}"
            )
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory returned {type(built).__name__}, not an nn.Module")
        model, fresh = built, True
    else:
        fresh = False
    structure = read_metadata(path).get("structure")
    if structure:
        if not fresh:
            _load_into(path, apply_structure(copy.deepcopy(model), structure))  # check first
        apply_structure(model, structure)
        object.__setattr__(model, STRUCTURE_ATTR, structure)
    return _load_into(path, model)


def _load_into(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    path = Path(path)
    meta = read_metadata(path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    masks = {
        name[len(MASK_PREFIX) :]: tensors.pop(name)
        for name in list(tensors)
        if name.startswith(MASK_PREFIX)
    }
    for alias, source in meta.get("aliases", {}).items():
        tensors[alias] = tensors[source]
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not k.endswith(MASK_SUFFIX) or k[: -len(MASK_SUFFIX)] not in params
    }
    _check_compatible(expected, tensors, meta, params)

    for _, module, name in list(masked_parameters(model)):
        remove_mask(module, name)  # the file's masks replace any the model carries
    modules = dict(model.named_modules())
    for name, packed in masks.items():
        module_name, _, param_name = name.rpartition(".")
        apply_mask(modules[module_name], param_name, unpack_mask(packed, meta["masks"][name]))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith(MASK_SUFFIX)]
    if missing or unexpected:  # pragma: no cover - _check_compatible catches these first
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


def _check_compatible(expected: dict, tensors: dict, meta: dict, params: dict) -> None:
    problems = []
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"{name}: in the model but not in the file")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"{name}: in the file but not in the model")
    for name in sorted(set(expected) & set(tensors)):
        if tuple(expected[name].shape) != tuple(tensors[name].shape):
            problems.append(
                f"{name}: model has shape {tuple(expected[name].shape)}, "
                f"file has {tuple(tensors[name].shape)}"
            )
    for name, shape in meta.get("masks", {}).items():
        if name not in params:
            problems.append(f"mask for {name}: the model has no such parameter")
        elif tuple(params[name].shape) != tuple(shape):
            problems.append(
                f"mask for {name}: model has shape {tuple(params[name].shape)}, "
                f"file has {tuple(shape)}"
            )
    if problems:
        raise ValueError(
            "the saved model does not fit this architecture:\n  " + "\n  ".join(problems)
        )
