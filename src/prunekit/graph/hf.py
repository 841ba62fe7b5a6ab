"""Hugging Face specifics: config updates after surgery, and structured save / load of folders.

After structured pruning the model keeps a JSON-able record of its surgery
(``model._prunekit_structure``). For Hugging Face models the config is updated too, where the
architecture's config can express the new shapes (uniform widths, head counts, layer count); then
plain ``AutoModel.from_pretrained`` loads the saved folder. Where it cannot (per-layer widths,
BERT / GPT-2 heads whose head size is derived from ``hidden_size / num_heads``),
:func:`from_pretrained` rebuilds the model from the original config and replays the record.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.compress.structured import STRUCTURE_ATTR

ORIGINAL_CONFIG_ATTR = "_prunekit_original_config"
META_FILE = "prunekit.json"


def is_hf(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict") and hasattr(model, "save_pretrained")


def remember_original_config(model: nn.Module) -> None:
    """Keep the config a Hugging Face model had before its first surgery (call before surgery)."""
    if is_hf(model) and getattr(model, ORIGINAL_CONFIG_ATTR, None) is None:
        object.__setattr__(model, ORIGINAL_CONFIG_ATTR, model.config.to_dict())


def note_structure(model: nn.Module, step: dict[str, Any]) -> None:
    """Append a surgery step to the model's record (and update a Hugging Face config)."""
    steps = list(getattr(model, STRUCTURE_ATTR, []))
    steps.append(step)
    remember_original_config(model)
    object.__setattr__(model, STRUCTURE_ATTR, steps)
    if is_hf(model):
        update_config(model)


def structure_of(model: nn.Module) -> list[dict[str, Any]]:
    return list(getattr(model, STRUCTURE_ATTR, []))


def _layers(model: nn.Module) -> nn.ModuleList | None:
    for path in (
        "model.layers",
        "layers",
        "encoder.layer",
        "bert.encoder.layer",
        "transformer.h",
        "h",
        "model.decoder.layers",
        "decoder.layers",
        "roberta.encoder.layer",
    ):
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    return None


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def update_config(model: nn.Module) -> bool:
    """Write the new shapes into ``model.config`` where it can hold them; return whether plain
    ``from_pretrained`` will rebuild exactly this architecture."""
    config = model.config
    layers = _layers(model)
    original = getattr(model, ORIGINAL_CONFIG_ATTR, None) or config.to_dict()
    plain = True
    if layers is not None:
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(config, key) and getattr(config, key) != len(layers):
                setattr(config, key, len(layers))
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) != len(layers):
            kept = getattr(model, "_prunekit_kept_layers", None)
            config.layer_types = (
                [types[i] for i in kept]
                if kept and len(kept) == len(layers)
                else types[: len(layers)]
            )
    if layers is None or len(layers) == 0:
        return _unchanged_width(model, original)
    first = layers[0]
    get = _getter(first)
    if hasattr(config, "num_key_value_heads") and get("self_attn.q_proj") is not None:
        attn = [layer.self_attn for layer in layers]
        hd = attn[0].head_dim
        heads = _uniform([a.q_proj.weight.shape[0] // hd for a in attn])
        kv = _uniform([a.k_proj.weight.shape[0] // hd for a in attn])
        mlp = [getattr(layer, "mlp", None) for layer in layers]
        inter = (
            _uniform(
                [
                    m.gate_proj.weight.shape[0]
                    if hasattr(m, "gate_proj")
                    else m.up_proj.weight.shape[0]
                    for m in mlp
                ]
            )
            if all(m is not None and hasattr(m, "up_proj") for m in mlp)
            else None
        )
        hidden = attn[0].q_proj.weight.shape[1]
        if None in (heads, kv) or (inter is None and hasattr(config, "intermediate_size")):
            return False
        updates = {"num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": hidden}
        if hasattr(config, "head_dim") or hidden // heads != hd:
            updates["head_dim"] = hd
        if inter is not None:
            updates["intermediate_size"] = inter
        return _set_config(config, updates)
    if (
        get("attention.self.query") is not None and get("intermediate.dense") is not None
    ):  # BERT family
        inter = _uniform([layer.intermediate.dense.weight.shape[0] for layer in layers])
        heads = _uniform([layer.attention.self.num_attention_heads for layer in layers])
        hidden = layers[0].attention.self.query.weight.shape[1]
        if inter is not None and not _set_config(config, {"intermediate_size": inter}):
            return False
        plain = (
            inter is not None
            and heads == original.get("num_attention_heads")
            and hidden == original.get("hidden_size")
        )
        return plain
    if get("attn.c_attn") is not None and get("mlp.c_fc") is not None:  # GPT-2 family
        inter = _uniform([layer.mlp.c_fc.weight.shape[1] for layer in layers])
        heads = _uniform([layer.attn.num_heads for layer in layers])
        hidden = layers[0].attn.c_attn.weight.shape[0]
        if inter is not None and not _set_config(config, {"n_inner": inter}):
            return False
        return (
            inter is not None
            and heads == original.get("n_head")
            and hidden == original.get("n_embd")
        )
    return _unchanged_width(model, original)


def _set_config(config, updates: dict[str, Any]) -> bool:
    """Apply ``updates`` if the config class accepts them (it may validate); else change nothing."""
    if all(getattr(config, k, None) == v for k, v in updates.items()):
        return True
    try:
        type(config).from_dict({**config.to_dict(), **updates})
    except Exception:  # the architecture's config cannot express these shapes
        return False
    old = {k: getattr(config, k, None) for k in updates}
    try:
        for key, value in updates.items():
            setattr(config, key, value)
    except Exception:
        for key, value in old.items():
            setattr(config, key, value)
        return False
    return True


def _getter(module: nn.Module):
    def get(path: str) -> nn.Module | None:
        try:
            return module.get_submodule(path)
        except AttributeError:
            return None

    return get


def _unchanged_width(model: nn.Module, original: dict) -> bool:
    return not any(step.get("kind") == "width" for step in structure_of(model))


# --------------------------------------------------------------------------- save / load


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a (structurally pruned) Hugging Face model as a folder: ``config.json``,
    ``model.safetensors`` and ``prunekit.json`` (the surgery record). Side files of ``source``
    (tokenizer, ...) are copied. Reload with :func:`from_pretrained`; plain
    ``AutoModel.from_pretrained`` works when ``prunekit.json`` says ``plain_loadable``.

    Example:
        >>> prunekit.save_pretrained(pruned, "out/pruned", source="path/to/original")  # doctest: +SKIP
    """
    from prunekit._version import __version__
    from prunekit.compress.io import _atomic_dir_write

    if not is_hf(model):
        raise TypeError(
            f"save_pretrained needs a Hugging Face model (with .config and .save_pretrained), got "
            f"{type(model).__name__}; use prunekit.save(model, folder) for other models"
        )
    path = Path(path)
    plain = update_config(model) if structure_of(model) else True
    meta = {
        "format": "prunekit-structured-hf",
        "format_version": 1,
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
        "plain_loadable": plain,
        "structure": structure_of(model),
        "original_config": getattr(model, ORIGINAL_CONFIG_ATTR, None),
        **(metadata or {}),
    }

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if source is not None:
            for item in Path(source).iterdir():
                if (
                    item.is_file()
                    and not (folder / item.name).exists()
                    and item.suffix not in (".safetensors", ".bin", ".pt", ".pth")
                ):
                    shutil.copy2(item, folder / item.name)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    _atomic_dir_write(path, overwrite, write)
    return path


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return None


def from_pretrained(
    path: str | os.PathLike, model_class: type | None = None, **kwargs: Any
) -> nn.Module:
    """Load a Hugging Face folder written by :func:`save_pretrained` (or any plain one), with its
    pruned per-layer widths, head counts and layer count. Nothing is unpickled.

    Example:
        >>> model = prunekit.from_pretrained("out/pruned")  # doctest: +SKIP
    """
    import transformers
    from safetensors.torch import load_file

    from prunekit.compress.structured import apply_structure

    path = Path(path)
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    cls = model_class or _model_class(config) or transformers.AutoModel
    structure = meta.get("structure") or []
    if not structure:
        kwargs.setdefault("use_safetensors", True)  # never unpickle a .bin checkpoint
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    original = meta.get("original_config")
    if original is None:
        raise ValueError(
            f"{meta_path} records a surgery but not the original config; cannot rebuild"
        )
    base_config = type(config).from_dict(original)
    for key in ("_attn_implementation", "attn_implementation"):
        if key in kwargs:
            base_config._attn_implementation = kwargs.pop(key)
    model = cls.from_config(base_config) if cls is transformers.AutoModel else cls(base_config)
    apply_structure(model, structure)
    object.__setattr__(model, STRUCTURE_ATTR, structure)
    object.__setattr__(model, ORIGINAL_CONFIG_ATTR, original)
    update_config(model)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    expected = model.state_dict()
    problems = [
        f"{k}: model {tuple(expected[k].shape)}, file {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and tuple(expected[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise ValueError(
            f"{path}: weights do not fit the rebuilt model:\n  " + "\n  ".join(problems[:20])
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        tied = {k for k in missing if _is_tied(model, k, state)}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{path}: state dict mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    model.eval()
    return model


def _is_tied(model: nn.Module, key: str, state: dict) -> bool:
    try:
        tensor = model.get_parameter(key)
    except AttributeError:
        return False
    for name, p in model.named_parameters(remove_duplicate=False):
        if name != key and p is tensor and name in state:
            return True
    return False
