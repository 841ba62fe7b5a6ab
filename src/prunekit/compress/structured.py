"""Replay recorded structured surgery on a fresh model, so saved pruned weights fit it.

The record (``model._prunekit_structure``, written to ``prunekit.json`` as ``"structure"``) is a
list of steps:

* ``{"kind": "width", "changes": [{"module": name, "tensors": {local: shape}, "attrs": {...},
  "class": qualname?}, ...]}``: tensors are replaced by empty ones of the new shape (the weights
  are loaded afterwards), attributes are set, and a class is swapped where surgery swapped it
  (only prunekit's own classes are accepted);
* ``{"kind": "depth", "removed": [{"container": name, "indices": [...], "before": n}]}``: blocks
  are deleted from an ``nn.ModuleList`` / ``nn.Sequential``, and Hugging Face ``layer_idx``
  attributes renumbered.

Nothing is unpickled and no code named in the file is imported beyond prunekit's classes.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

ALLOWED_CLASSES = ("prunekit.graph.modules.",)
STRUCTURE_ATTR = "_prunekit_structure"


def _resolve_class(qualname: str) -> type:
    if not qualname.startswith(ALLOWED_CLASSES):
        raise ValueError(
            f"refusing to load class {qualname!r}: only prunekit's module classes are allowed"
        )
    module_name, _, cls_name = qualname.rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)


def remove_blocks(model: nn.Module, container_name: str, indices: list[int]) -> None:
    """Delete blocks ``indices`` of a ModuleList / Sequential and renumber ``layer_idx``."""
    container = model.get_submodule(container_name)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"{container_name} is a {type(container).__name__}, not a ModuleList / Sequential"
        )
    gone = set(indices)
    before = len(container)
    kept = [m for i, m in enumerate(container) if i not in gone]
    names = list(container._modules)
    if isinstance(container, nn.Sequential) and not all(n.isdigit() for n in names):
        new = {n: m for i, (n, m) in enumerate(container._modules.items()) if i not in gone}
        container._modules.clear()
        container._modules.update(new)
    else:
        container._modules.clear()
        for i, m in enumerate(kept):
            container._modules[str(i)] = m
    for new_index, block in enumerate(kept):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_index
    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == before:  # Hugging Face per-layer attention kinds
        config.layer_types = [t for i, t in enumerate(types) if i not in gone]


def apply_structure(model: nn.Module, steps: list[dict[str, Any]]) -> nn.Module:
    """Give a fresh ``model`` the shapes recorded by structured pruning (in place)."""
    for step in steps:
        kind = step.get("kind")
        if kind == "depth":
            for entry in step["removed"]:
                container = model.get_submodule(entry["container"])
                n = len(container)
                if n == entry["before"]:
                    remove_blocks(model, entry["container"], entry["indices"])
                elif n != entry["before"] - len(entry["indices"]):
                    raise ValueError(
                        f"{entry['container']} has {n} blocks; the saved model removed "
                        f"{len(entry['indices'])} of {entry['before']}"
                    )
        elif kind == "width":
            _apply_width(model, step["changes"])
        else:
            raise ValueError(f"unknown structure step {kind!r}")
    return model


def _apply_width(model: nn.Module, changes: list[dict[str, Any]]) -> None:
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, new)
    for entry in changes:
        module = model.get_submodule(entry["module"])
        if "class" in entry and type(module).__qualname__ != entry["class"].rpartition(".")[2]:
            module.__class__ = _resolve_class(entry["class"])
        for local, shape in entry.get("tensors", {}).items():
            is_param = local in module._parameters
            old = module._parameters.get(local) if is_param else module._buffers.get(local)
            if old is None:
                raise ValueError(f"{entry['module']} has no tensor {local!r}")
            if id(old) in replaced:
                new = replaced[id(old)][1]
            elif tuple(old.shape) == tuple(shape):
                new = old
            else:
                new = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
                if is_param:
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                replaced[id(old)] = (old, new)
            (module._parameters if is_param else module._buffers)[local] = new
        for attr, value in entry.get("attrs", {}).items():
            current = getattr(module, attr, None)
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(module, attr, value)
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
    # tied tensors: every other place that held a replaced tensor gets the new one
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for local, t in list(store.items()):
                if t is not None and id(t) in replaced and replaced[id(t)][0] is t:
                    store[local] = replaced[id(t)][1]
