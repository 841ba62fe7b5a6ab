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

from prunekit.compress.validate import SavedModelError

ALLOWED_CLASSES = ("prunekit.graph.modules.",)
STRUCTURE_ATTR = "_prunekit_structure"

# Class swaps surgery makes: (exact class being replaced, the class it becomes). Nothing else.
ALLOWED_SWAPS = {
    "prunekit.graph.modules.PrunableMultiheadAttention": (nn.MultiheadAttention,),
}

# Attributes surgery may change, by the class that owns them (``isinstance``), then those any
# module may have: head counts and heads x head-dim widths (see prunekit.graph.surgery).
CLASS_ATTRS: tuple[tuple[type | str, tuple[str, ...]], ...] = (
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.GroupNorm, ("num_channels", "num_groups")),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
    (nn.PReLU, ("num_parameters",)),
    (nn.RNNBase, ("hidden_size", "input_size")),
    (nn.MultiheadAttention, ("embed_dim", "kdim", "vdim", "num_heads")),
    ("transformers.Conv1D", ("nx", "nf")),
)
ANY_MODULE_ATTRS = (
    "num_heads",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "heads",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "n_kv_head",
    "num_key_value_heads_per_layer",
    "num_key_value_groups",
    "all_head_size",
    "split_size",
    "inner_dim",
    "inner_size",
    "normalized_shape",
)
SHAPE_ATTRS = ("normalized_shape",)  # lists of positive integers; the others are one integer


def _resolve_class(qualname: str) -> type:
    if not isinstance(qualname, str) or not qualname.startswith(ALLOWED_CLASSES):
        raise ValueError(
            f"refusing to load class {qualname!r}: only prunekit's module classes are allowed"
        )
    if qualname not in ALLOWED_SWAPS:
        raise ValueError(
            f"refusing to load class {qualname!r}: surgery only swaps in {', '.join(ALLOWED_SWAPS)}"
        )
    module_name, _, cls_name = qualname.rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def allowed_attrs(module: nn.Module) -> set[str]:
    """The attributes a structure record may set on ``module``."""
    allowed = set(ANY_MODULE_ATTRS)
    for cls, names in CLASS_ATTRS:
        if _is_hf_conv1d(module) if isinstance(cls, str) else isinstance(module, cls):
            allowed.update(names)
    return allowed


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_attr_value(name: str, value: Any) -> bool:
    if name in SHAPE_ATTRS:
        return isinstance(value, list) and len(value) >= 1 and all(_is_int(v, 1) for v in value)
    return _is_int(value, 1)


def check_structure(steps: Any) -> None:
    """Check a structure record's form before anything is applied: known step kinds, module
    names, block indices, tensor shapes as lists of integers, only attributes that surgery
    changes (with positive integer values) and only the class swaps surgery makes. Raises
    ``ValueError`` naming the step and field.

    Example:
        >>> check_structure([{"kind": "width", "changes": [{"module": "fc", "attrs": {"forward": 1}}]}])
        Traceback (most recent call last):
        ...
        ValueError: step 0 changes[0] (fc) attrs: 'forward' is not an attribute surgery changes
    """
    if not isinstance(steps, list):
        raise ValueError(f"expected a list of steps, got {type(steps).__name__}")
    for i, step in enumerate(steps):
        where = f"step {i}"
        if not isinstance(step, dict):
            raise ValueError(f"{where}: expected an object, got {type(step).__name__}")
        kind = step.get("kind")
        if kind == "depth":
            removed = step.get("removed")
            if not isinstance(removed, list):
                raise ValueError(f"{where} removed: expected a list, got {removed!r}")
            for j, entry in enumerate(removed):
                here = f"{where} removed[{j}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("container"), str):
                    raise ValueError(f"{here}: expected {{'container': name, ...}}, got {entry!r}")
                before, indices = entry.get("before"), entry.get("indices")
                if not _is_int(before, 1):
                    raise ValueError(f"{here} before: expected a block count >= 1, got {before!r}")
                if (
                    not isinstance(indices, list)
                    or not all(_is_int(k) and k < before for k in indices)
                    or len(set(indices)) != len(indices)
                    or len(indices) >= before
                ):
                    raise ValueError(
                        f"{here} indices: expected distinct block numbers below {before}, "
                        f"not all of them, got {indices!r}"
                    )
        elif kind == "width":
            changes = step.get("changes")
            if not isinstance(changes, list):
                raise ValueError(f"{where} changes: expected a list, got {changes!r}")
            for j, entry in enumerate(changes):
                here = f"{where} changes[{j}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("module"), str):
                    raise ValueError(f"{here}: expected {{'module': name, ...}}, got {entry!r}")
                here = f"{here} ({entry['module']})"
                extra = sorted(set(entry) - {"module", "tensors", "attrs", "class"})
                if extra:
                    raise ValueError(f"{here}: unknown keys {extra}")
                tensors = entry.get("tensors", {})
                if not isinstance(tensors, dict) or not all(
                    isinstance(k, str) and isinstance(v, list) and all(_is_int(d) for d in v)
                    for k, v in tensors.items()
                ):
                    raise ValueError(
                        f"{here} tensors: expected {{name: [sizes]}}, got {tensors!r}"[:300]
                    )
                attrs = entry.get("attrs", {})
                if not isinstance(attrs, dict):
                    raise ValueError(f"{here} attrs: expected an object, got {attrs!r}")
                for attr, value in attrs.items():
                    if attr not in ANY_MODULE_ATTRS and not any(
                        attr in names for _, names in CLASS_ATTRS
                    ):
                        raise ValueError(
                            f"{here} attrs: {attr!r} is not an attribute surgery changes"
                        )
                    if not _check_attr_value(attr, value):
                        raise ValueError(
                            f"{here} attrs: {attr}={value!r}; expected a positive integer"
                            + (" list" if attr in SHAPE_ATTRS else "")
                        )
                if "class" in entry:
                    _resolve_class(entry["class"])
        else:
            raise ValueError(f"{where}: unknown structure step {kind!r} (accepted: width, depth)")


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


def apply_structure(
    model: nn.Module, steps: list[dict[str, Any]], *, source: Any = None
) -> nn.Module:
    """Give a fresh ``model`` the shapes recorded by structured pruning (in place).

    The record is checked first (:func:`check_structure`), then each change against the module
    it names: the module exists, the attributes are ones its class may change, a class swap is
    one surgery makes for that class, every tensor keeps its number of dimensions and only
    shrinks, and afterwards the module's size attributes agree with its tensors. A problem
    raises ``ValueError`` (prefixed with ``source``, the file, when given); the model may then
    be half changed, so replay on a copy when that matters (:func:`prunekit.load` does).
    """
    prefix = f"{source}: structure: " if source is not None else ""
    try:
        check_structure(steps)
        for i, step in enumerate(steps):
            if step["kind"] == "depth":
                for entry in step["removed"]:
                    container = _submodule(model, entry["container"], f"step {i} removed")
                    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
                        raise ValueError(
                            f"step {i}: {entry['container']} is a {type(container).__name__}, "
                            "not a ModuleList / Sequential"
                        )
                    n = len(container)
                    if n == entry["before"]:
                        remove_blocks(model, entry["container"], entry["indices"])
                    elif n != entry["before"] - len(entry["indices"]):
                        raise ValueError(
                            f"{entry['container']} has {n} blocks; the saved model removed "
                            f"{len(entry['indices'])} of {entry['before']}"
                        )
            else:
                _apply_width(model, step["changes"], f"step {i}")
    except ValueError as exc:
        raise SavedModelError(prefix + str(exc)) from exc
    return model


def _submodule(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"{where}: the model has no module {name!r}") from exc


def _check_sizes(module: nn.Module, where: str) -> None:
    """A changed module's size attributes agree with its tensors (as surgery leaves them)."""
    w = module._parameters.get("weight")
    checks: list[tuple[str, Any, Any]] = []
    if isinstance(module, nn.Linear) and w is not None:
        checks.append(
            (
                "(out_features, in_features)",
                tuple(w.shape),
                (module.out_features, module.in_features),
            )
        )
    elif isinstance(module, nn.modules.conv._ConvTransposeNd) and w is not None:
        checks.append(("in_channels", w.shape[0], module.in_channels))
        checks.append(("out_channels", w.shape[1] * module.groups, module.out_channels))
    elif isinstance(module, nn.modules.conv._ConvNd) and w is not None:
        checks.append(("out_channels", w.shape[0], module.out_channels))
        checks.append(("in_channels", w.shape[1] * module.groups, module.in_channels))
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else module._buffers.get("running_mean")
        if ref is not None:
            checks.append(("num_features", ref.shape[0], module.num_features))
    elif isinstance(module, nn.GroupNorm):
        if w is not None:
            checks.append(("num_channels", w.shape[0], module.num_channels))
        if module.num_channels % module.num_groups:
            checks.append(("num_channels % num_groups", module.num_channels % module.num_groups, 0))
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
        checks.append(("normalized_shape", tuple(w.shape), tuple(module.normalized_shape)))
    elif isinstance(module, nn.Embedding) and w is not None:
        checks.append(
            (
                "(num_embeddings, embedding_dim)",
                tuple(w.shape),
                (module.num_embeddings, module.embedding_dim),
            )
        )
    elif _is_hf_conv1d(module) and w is not None:
        checks.append(("(nx, nf)", tuple(w.shape), (module.nx, module.nf)))
    for what, tensors_say, attrs_say in checks:
        if tensors_say != attrs_say:
            raise ValueError(f"{where}: {what} is {attrs_say} but the tensors say {tensors_say}")


def _apply_width(model: nn.Module, changes: list[dict[str, Any]], where: str = "step") -> None:
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, new)
    for j, entry in enumerate(changes):
        here = f"{where} changes[{j}] ({entry['module']})"
        module = _submodule(model, entry["module"], here)
        if "class" in entry and type(module).__qualname__ != entry["class"].rpartition(".")[2]:
            target = _resolve_class(entry["class"])
            sources = ALLOWED_SWAPS[entry["class"]]
            if not isinstance(module, sources) or isinstance(module, target):
                raise ValueError(
                    f"{here} class: surgery swaps {entry['class']} in only for "
                    f"{', '.join(c.__module__ + '.' + c.__qualname__ for c in sources)}, not "
                    f"{type(module).__module__}.{type(module).__qualname__}"
                )
            module.__class__ = target
        attrs = entry.get("attrs", {})
        refused = sorted(set(attrs) - allowed_attrs(module))
        if refused:
            raise ValueError(
                f"{here} attrs: {refused} may not be changed on a {type(module).__name__}"
            )
        for local, shape in entry.get("tensors", {}).items():
            is_param = local in module._parameters
            old = module._parameters.get(local) if is_param else module._buffers.get(local)
            if old is None:
                raise ValueError(f"{here}: {entry['module']} has no tensor {local!r}")
            if len(shape) != old.dim() or any(
                new > was for new, was in zip(shape, old.shape, strict=True)
            ):
                raise ValueError(
                    f"{here} tensors: {local} {list(shape)} from {list(old.shape)}; surgery "
                    "keeps the number of dimensions and only shrinks them"
                )
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
        for attr, value in attrs.items():
            current = getattr(module, attr, None)
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(module, attr, value)
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
        _check_sizes(module, here)
    # tied tensors: every other place that held a replaced tensor gets the new one
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for local, t in list(store.items()):
                if t is not None and id(t) in replaced and replaced[id(t)][0] is t:
                    store[local] = replaced[id(t)][1]
