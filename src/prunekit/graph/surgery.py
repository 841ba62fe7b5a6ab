"""Surgery: cut the removed units out of every parameter and buffer, and fix module attributes.

:func:`apply_removal` works on a model that has the same names as the traced one (a deep copy).
It returns a JSON-able record of every changed module (new tensor shapes, changed attributes,
swapped classes) that :mod:`prunekit.compress.structured` can replay on a fresh instance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.graph.modules import PrunableMultiheadAttention
from prunekit.graph.trace import Graph, _plain, call_model, iter_tensors

# attributes that hold a head count or a heads x head_dim width, updated after head pruning
COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
KV_COUNT_ATTRS = (
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "n_kv_head",
    "num_key_value_heads_per_layer",
)
WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim", "inner_size")
SIMPLE = (int, float, bool, str, tuple, type(None))


def keep_indices(
    graph: Graph, removed_roots: np.ndarray
) -> tuple[dict[str, dict[int, np.ndarray]], np.ndarray]:
    """For every parameter / buffer dim that loses indices: the indices it keeps."""
    removed = np.zeros(graph.uf.size, dtype=bool)
    removed[np.asarray(removed_roots, dtype=np.int64)] = True
    keep: dict[str, dict[int, np.ndarray]] = {}
    for key, dims in graph.param_labels.items():
        for dim, labels in dims.items():
            gone = removed[graph.uf.find(labels)]
            if gone.any():
                if gone.all():
                    raise RuntimeError(f"internal: every index of {key} dim {dim} would be removed")
                keep.setdefault(key, {})[dim] = np.nonzero(~gone)[0]
    return keep, removed


def _simple_attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, SIMPLE)
    }


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def apply_removal(
    model: nn.Module, graph: Graph, removed_roots: np.ndarray
) -> list[dict[str, Any]]:
    """Remove the units ``removed_roots`` from ``model`` in place; return the change record."""
    keep, removed = keep_indices(graph, removed_roots)

    def kept(labels: np.ndarray) -> int:
        return int((~removed[graph.uf.find(labels)]).sum())

    named = dict(model.named_parameters())
    named.update({k: v for k, v in model.named_buffers() if k not in named})
    modules = dict(model.named_modules())
    locations: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for module in model.modules():
        for pname, p in module._parameters.items():
            if p is not None:
                locations.setdefault(id(p), []).append((module, pname, True))
        for bname, b in module._buffers.items():
            if b is not None:
                locations.setdefault(id(b), []).append((module, bname, False))

    touched: set[str] = {key.rpartition(".")[0] for key in keep}
    touched.update(h.module for h in graph.head_splits if h.module in modules)
    touched.update(m for m, _, _ in graph.attr_follow if m in modules)
    touched.update(m for m, _, _ in graph.group_norms if m in modules)
    before = {name: (_simple_attrs(modules[name]), type(modules[name])) for name in touched}

    module_names = {id(m): n for n, m in reversed(list(modules.items()))}
    new_shapes: dict[str, dict[str, list[int]]] = {}
    for key, dims in keep.items():
        tensor = named[key]
        value = tensor.detach()
        for dim, idx in sorted(dims.items()):
            value = value.index_select(dim, torch.as_tensor(idx, device=value.device))
        value = value.contiguous()
        places = locations[id(tensor)]
        if places[0][2]:
            value = nn.Parameter(value, requires_grad=tensor.requires_grad)
        for module, local, is_param in places:  # tied tensors keep sharing one object
            (module._parameters if is_param else module._buffers)[local] = value
            owner = module_names[id(module)]
            new_shapes.setdefault(owner, {})[local] = list(value.shape)
            if owner not in before:
                before[owner] = (_simple_attrs(module), type(module))
            touched.add(owner)

    follow = {(m, a): kept(lab) for m, a, lab in graph.attr_follow}
    gn = {m: (kept(lab), per) for m, lab, per in graph.group_norms}
    for name in touched:
        _fix_module(
            modules[name], before[name][0], follow.get((name, "normalized_shape")), gn.get(name)
        )
    _fix_heads(modules, graph, kept)

    record = []
    for name in sorted(touched):
        module = modules[name]
        old_attrs, old_cls = before[name]
        attrs = {k: v for k, v in _simple_attrs(module).items() if old_attrs.get(k, object()) != v}
        entry: dict[str, Any] = {
            "module": name,
            "attrs": _jsonable(attrs),
            "tensors": new_shapes.get(name, {}),
        }
        if type(module) is not old_cls:
            entry["class"] = _qualname(type(module))
        if attrs or entry["tensors"] or "class" in entry:
            record.append(entry)
    return record


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


def _fix_module(
    module: nn.Module, old: dict[str, Any], normalized: int | None, gn: tuple[int, int] | None
) -> None:
    """Make a module's size attributes match its new tensors."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        if old["groups"] > 1:
            module.groups = w.shape[0] // (old["in_channels"] // old["groups"])
        module.in_channels = w.shape[0]
        module.out_channels = module.groups * w.shape[1]
    elif isinstance(module, nn.modules.conv._ConvNd):
        if old["groups"] > 1:
            module.groups = w.shape[0] // (old["out_channels"] // old["groups"])
        module.out_channels = w.shape[0]
        module.in_channels = module.groups * w.shape[1]
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else getattr(module, "running_mean", None)
        if ref is not None:
            module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm):
        channels = w.shape[0] if w is not None else (gn[0] if gn else module.num_channels)
        per = old["num_channels"] // old["num_groups"]
        module.num_channels, module.num_groups = channels, channels // per
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        size = w.shape[0] if w is not None else normalized
        if size is not None:
            module.normalized_shape = (size,)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = w.shape
    elif isinstance(module, nn.PReLU):
        module.num_parameters = w.numel()
    elif isinstance(module, nn.RNNBase):
        module.hidden_size = module.weight_hh_l0.shape[1]
        module.input_size = module.weight_ih_l0.shape[1]
        module._init_flat_weights()
    elif isinstance(module, nn.MultiheadAttention):
        _fix_mha(module)
    elif _is_hf_conv1d(module):
        module.nx, module.nf = w.shape
    elif normalized is not None and hasattr(module, "normalized_shape"):
        module.normalized_shape = (normalized,)


def _fix_mha(m: nn.MultiheadAttention) -> None:
    if m._qkv_same_embed_dim:
        rows, cols = m.in_proj_weight.shape
        inner, m.embed_dim = rows // 3, cols
        m.kdim = m.vdim = cols
    else:
        inner = m.q_proj_weight.shape[0]
        m.embed_dim = m.q_proj_weight.shape[1]
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    m.num_heads = inner // m.head_dim
    m.out_proj.in_features = inner
    m.out_proj.out_features = m.out_proj.weight.shape[0]
    if type(m) is nn.MultiheadAttention:
        m.__class__ = PrunableMultiheadAttention


def _fix_heads(modules: dict[str, nn.Module], graph: Graph, kept) -> None:
    """Update head-count / width attributes of modules that split channels into heads."""
    per_module: dict[str, list[tuple[int, int, int]]] = {}
    for split in graph.head_splits:
        per_module.setdefault(split.module, []).append(
            (len(split.labels), kept(split.labels), split.head_dim)
        )
    for name, splits in per_module.items():
        module = modules.get(name)
        if module is None:
            continue
        counts = {old: new for old, new, _ in splits}
        widths = {old * hd: new * hd for old, new, hd in splits}
        q_old = max(old for old, _, _ in splits)
        kv_old = min(old for old, _, _ in splits)
        for attr in COUNT_ATTRS + KV_COUNT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in counts:
                if attr in KV_COUNT_ATTRS:
                    setattr(
                        module,
                        attr,
                        counts.get(kv_old, value) if value == kv_old else counts[value],
                    )
                else:
                    setattr(
                        module, attr, counts.get(q_old, value) if value == q_old else counts[value]
                    )
        for attr in WIDTH_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in widths:
                setattr(module, attr, widths[value])
        groups = getattr(module, "num_key_value_groups", None)
        if isinstance(groups, int) and counts.get(kv_old):
            module.num_key_value_groups = counts[q_old] // counts[kv_old]


class StructuredPruningError(RuntimeError):
    """Surgery produced a model that does not run; nothing of the caller's model was changed."""


def _output_shapes(outputs: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in iter_tensors(_plain(outputs))]


def verify(
    pruned: nn.Module,
    original: nn.Module,
    example_inputs: Any,
    *,
    graph: Graph | None = None,
    removed_roots=None,
    same_shapes: bool = True,
) -> None:
    """Run the pruned model; raise :class:`StructuredPruningError` if it fails or its outputs
    changed shape."""
    training = pruned.training
    pruned.eval()
    try:
        with torch.no_grad():
            got = _output_shapes(call_model(pruned, example_inputs))
    except Exception as exc:
        hint = ""
        if graph is not None and removed_roots is not None and len(removed_roots):
            removed = np.zeros(graph.uf.size, dtype=bool)
            removed[removed_roots] = True
            culprits = [lit for lit in graph.literals if removed[graph.uf.find(lit.labels)].any()]
            if culprits:
                hint = (
                    " Hard-coded sizes of pruned dims: "
                    + "; ".join(f"{lit.op} in module {lit.module!r}" for lit in culprits[:5])
                    + ". Use -1 / computed sizes there, or ignore=[...] those modules."
                )
        raise StructuredPruningError(
            f"the pruned model does not run ({type(exc).__name__}: {exc}).{hint} The model you "
            "passed was not changed."
        ) from exc
    finally:
        pruned.train(training)
    if not same_shapes:
        return
    was = original.training
    original.eval()
    try:
        with torch.no_grad():
            want = _output_shapes(call_model(original, example_inputs))
    finally:
        original.train(was)
    if got != want:
        raise StructuredPruningError(
            f"the pruned model's outputs have shapes {got}, the original's {want}. The model you "
            "passed was not changed."
        )
