"""Hugging Face specifics: config updates after surgery, and structured save / load of folders.

After structured pruning the model keeps a JSON-able record of its surgery
(``model._prunekit_structure``). For Hugging Face models the config is updated too, where the
architecture's config can express the new shapes (uniform widths, head counts, layer count); then
plain ``AutoModel.from_pretrained`` loads the saved folder. Where it cannot (per-layer widths,
BERT / GPT-2 heads whose head size is derived from ``hidden_size / num_heads``),
:func:`from_pretrained` rebuilds the model from the original config and replays the record.

``save_pretrained(..., compressed=True)`` writes the weights in prunekit's compressed encoding
(non-zero values plus the smallest index per tensor, integer codes for quantized weights; see
:mod:`prunekit.compress.io`) to ``prunekit-compressed.safetensors`` instead of
``model.safetensors``, so plain ``AutoModel.from_pretrained`` finds no weights and refuses the
folder rather than loading encoded arrays; :func:`from_pretrained` decodes them exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from prunekit.compress.structured import STRUCTURE_ATTR

ORIGINAL_CONFIG_ATTR = "_prunekit_original_config"
META_FILE = "prunekit.json"
HF_FORMAT = "prunekit-structured-hf"
HF_FORMAT_VERSION = 2  # the newest version this prunekit reads; 2 = compressed weights
COMPRESSED_WEIGHTS_FILE = "prunekit-compressed.safetensors"
COMPRESSED_ENCODING = "prunekit-sparse"  # the per-tensor encoding of prunekit.save(compressed=True)
COMPRESSED_ENCODING_VERSION = 2  # the format_version prunekit.save(compressed=True) writes
WEIGHTS_KEY = "compressed_weights"  # in prunekit.json: file, encoding, encoding_version
# prunekit.json fields that decide what loads (covered by its integrity checksum), and the
# files besides the weights whose checksums it records
HF_LOAD_FIELDS = (
    "format",
    "format_version",
    "structure",
    "original_config",
    WEIGHTS_KEY,
    "aliases",
    "compressed",
    "quantization",
)
_CHECKED_CONFIGS = ("config.json", "generation_config.json", "model.safetensors.index.json")


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
    compressed: bool = False,
    bits: int | dict[str, int | tuple[int, str]] | None = None,
    granularity: str = "per_channel",
    index: str = "auto",
) -> Path:
    """Save a (pruned) Hugging Face model as a folder: ``config.json``, the weights and
    ``prunekit.json`` (the surgery record). Side files of ``source`` (tokenizer, ...) are copied.
    Reload with :func:`from_pretrained`.

    By default the weights are a plain ``model.safetensors``, and plain
    ``AutoModel.from_pretrained`` works when ``prunekit.json`` says ``plain_loadable``. Masks
    (``prunekit.prune`` without ``finalize``) are baked in there too: the file holds the masked
    weights under the architecture's own names, and no mask buffers.

    ``compressed=True`` stores every floating weight with two or more dimensions as in
    ``prunekit.save(compressed=True)``: its non-zero values plus the smallest index, as integer
    codes and scales for weights quantized with ``prunekit.quantize(mode="int")`` or when
    ``bits`` (8, 4, or a mapping of name patterns; with ``granularity``) is given; ``index``
    forces one index kind (``"bitmask"``, ``"rle"``, ``"csr"``, ``"dense"``). Those go to
    ``prunekit-compressed.safetensors`` (no ``model.safetensors``, so plain
    ``AutoModel.from_pretrained`` refuses the folder instead of loading encoded arrays);
    :func:`from_pretrained` restores the dense tensors exactly. Masks (``prunekit.prune``
    without ``finalize``) are baked in: the stored zeros are the mask.

    Layers swapped in by :func:`prunekit.runtime.accelerate.accelerate` are written as the
    dense ``weight`` / ``bias`` they encode, so the folder holds the architecture's own tensors
    (and ``plain_loadable`` stays true where it was).

    Example:
        >>> prunekit.save_pretrained(pruned, "out/pruned", source="path/to/original")  # doctest: +SKIP
        >>> prunekit.save_pretrained(pruned, "out/small", compressed=True, bits=8)  # doctest: +SKIP
        >>> model = prunekit.from_pretrained("out/small")  # doctest: +SKIP
    """
    from prunekit.compress.io import accelerated_as_dense

    if not is_hf(model):
        raise TypeError(
            f"save_pretrained needs a Hugging Face model (with .config and .save_pretrained), got "
            f"{type(model).__name__}; use prunekit.save(model, folder) for other models"
        )
    with accelerated_as_dense(model):  # accelerated layers are saved as their dense weights
        return _save_pretrained(
            model,
            Path(path),
            source=source,
            overwrite=overwrite,
            metadata=metadata,
            compressed=compressed,
            bits=bits,
            granularity=granularity,
            index=index,
        )


def _save_pretrained(
    model: nn.Module,
    path: Path,
    *,
    source: str | os.PathLike | None,
    overwrite: bool,
    metadata: dict[str, Any] | None,
    compressed: bool,
    bits: int | dict[str, int | tuple[int, str]] | None,
    granularity: str,
    index: str,
) -> Path:
    from prunekit._version import __version__
    from prunekit.compress.io import (
        _atomic_dir_write,
        check_compress_args,
        effective_state,
        write_text,
    )
    from prunekit.compress.validate import INTEGRITY_KEY, integrity_record
    from prunekit.masks import masked_parameters

    check_compress_args(compressed, bits, granularity, index)
    if source is not None and not Path(source).is_dir():
        raise ValueError(f"source={str(source)!r} is not a folder; pass the original model folder")
    plain = update_config(model) if structure_of(model) else True
    meta: dict[str, Any] = {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION if compressed else 1,
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
        "plain_loadable": plain and not compressed,
        "structure": structure_of(model),
        "original_config": getattr(model, ORIGINAL_CONFIG_ATTR, None),
    }
    meta.update(metadata or {})
    for key in (*HF_LOAD_FIELDS, INTEGRITY_KEY):  # the caller's metadata cannot hide these
        meta.pop(key, None)
    meta.update(
        {
            "format": HF_FORMAT,
            "format_version": HF_FORMAT_VERSION if compressed else 1,
            "structure": structure_of(model),
            "original_config": getattr(model, ORIGINAL_CONFIG_ATTR, None),
        }
    )
    tensors: dict[str, torch.Tensor] = {}
    if compressed:
        tensors, weights_meta = _encode_weights(model, bits, granularity, index)
        meta.update(weights_meta)
    # a plain folder of a masked model (prunekit.prune without finalize): effective weights, no
    # mask buffers, so that AutoModel and from_pretrained read the architecture's own tensors
    masked = None
    if not compressed and any(True for _ in masked_parameters(model)):
        masked = effective_state(model)[0]

    def write(folder: Path) -> None:
        if compressed:
            _save_configs(model, folder)
            save_file(tensors, str(folder / COMPRESSED_WEIGHTS_FILE), metadata={"format": "pt"})
        elif masked:  # the masks baked in, as in the compressed path: the architecture's keys
            model.save_pretrained(folder, safe_serialization=True, state_dict=masked)
        else:
            model.save_pretrained(folder, safe_serialization=True)
        if source is not None:  # tokenizer, README, sentence-transformers modules, ...
            from prunekit.graph.side_files import copy_side_files

            copy_side_files(source, folder)
        written = sorted(
            p.name
            for p in folder.iterdir()
            if p.is_file() and (p.suffix == ".safetensors" or p.name in _CHECKED_CONFIGS)
        )
        fields = [k for k in HF_LOAD_FIELDS if k in meta]
        meta[INTEGRITY_KEY] = integrity_record(folder, written, meta, fields)
        write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")

    _atomic_dir_write(path, overwrite, write)
    return path


def _encode_weights(
    model: nn.Module,
    bits: int | dict[str, int | tuple[int, str]] | None,
    granularity: str,
    index: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's weights (masks baked in, tied ones stored once) in prunekit's compressed
    encoding, and the ``prunekit.json`` entries that describe them."""
    from prunekit.compress.io import _dedupe_shared, effective_state, encode_state
    from prunekit.compress.quantize import QUANT_ATTR

    state, _ = effective_state(model)  # masked weights as their effective values
    kept, aliases = _dedupe_shared(state)
    tensors, encoded = encode_state(
        kept,
        quantization=getattr(model, QUANT_ATTR, None),
        bits=bits,
        granularity=granularity,
        index=index,
    )
    weights = {
        "file": COMPRESSED_WEIGHTS_FILE,
        "encoding": COMPRESSED_ENCODING,
        "encoding_version": COMPRESSED_ENCODING_VERSION,
    }
    return tensors, {WEIGHTS_KEY: weights, "aliases": aliases, **encoded}


def _save_configs(model: nn.Module, folder: Path) -> None:
    """Write config.json (and generation_config.json) as ``model.save_pretrained`` does, without
    its weights file."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    can_generate = getattr(model, "can_generate", None)
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(folder)


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return None


def read_hf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``prunekit.json`` of a folder written by :func:`save_pretrained` (``{}`` for a plain
    Hugging Face folder), checked to be a version this prunekit reads, with a valid schema and
    the checksums recorded at save time. Problems raise
    :class:`prunekit.compress.validate.SavedModelError` naming the file and the field.

    Example:
        >>> read_hf_metadata("out/small")["compressed_weights"]["file"]  # doctest: +SKIP
        'prunekit-compressed.safetensors'
    """
    from prunekit.compress.io import check_weights_meta
    from prunekit.compress.validate import check_integrity, fail, read_json

    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        return {}
    meta = read_json(meta_path)
    if meta.get("format") != HF_FORMAT:
        return meta  # e.g. the CLI's "prunekit-hf": a plain folder
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > HF_FORMAT_VERSION:
        raise fail(
            meta_path,
            "format_version",
            f"format {HF_FORMAT!r} version {version!r}; this prunekit reads it up to version "
            f"{HF_FORMAT_VERSION}: upgrade prunekit",
        )
    weights = meta.get(WEIGHTS_KEY)
    if WEIGHTS_KEY in meta and (
        not isinstance(weights, dict)
        or weights.get("encoding") != COMPRESSED_ENCODING
        or not isinstance(weights.get("encoding_version", 0), int)
        or weights.get("encoding_version", 0) > COMPRESSED_ENCODING_VERSION
        or not isinstance(weights.get("file", COMPRESSED_WEIGHTS_FILE), str)
    ):
        raise fail(
            meta_path,
            WEIGHTS_KEY,
            f"{weights!r}; this prunekit reads weights encoded as "
            f"{COMPRESSED_ENCODING!r} up to version {COMPRESSED_ENCODING_VERSION}",
        )
    original = meta.get("original_config")
    if original is not None and not isinstance(original, dict):
        raise fail(meta_path, "original_config", f"expected an object, got {original!r}"[:200])
    if not isinstance(meta.get("structure", []), list):
        raise fail(meta_path, "structure", "expected a list of steps")
    check_weights_meta(meta, meta_path)
    check_integrity(Path(path), meta, meta_path)
    return meta


def from_pretrained(
    path: str | os.PathLike, model_class: type | None = None, **kwargs: Any
) -> nn.Module:
    """Load a Hugging Face folder written by :func:`save_pretrained` (or any plain one), with its
    pruned per-layer widths, head counts and layer count, and its compressed weights decoded
    exactly. Nothing is unpickled.

    ``kwargs`` go to ``model_class.from_pretrained`` for a plain folder. A model that is rebuilt
    from its config (pruned per layer, or with compressed weights) accepts ``attn_implementation``
    and ``dtype`` (or ``torch_dtype``; the weights are cast after loading). A quantized model
    (``prunekit.quantize(mode="int")``) keeps its integer codes, so saving it compressed again
    stores the same values.

    Example:
        >>> model = prunekit.from_pretrained("out/pruned")  # doctest: +SKIP
    """
    import transformers

    from prunekit.compress.io import _recover_quietly

    path = Path(path)
    if not os.path.lexists(path):
        _recover_quietly(path)  # an overwrite killed between its renames left the old version
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: expected a Hugging Face model folder with config.json (as written by "
            "prunekit.save_pretrained or model.save_pretrained)"
        )
    from prunekit.compress.validate import read_header, read_json

    meta = read_hf_metadata(path)
    read_json(path / "config.json")  # a clear error for a damaged config
    structure = meta.get("structure") or []
    compressed = meta.get(WEIGHTS_KEY) is not None
    headers = {} if compressed else {p: read_header(p) for p in sorted(path.glob("*.safetensors"))}
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise _fail(path / "config.json", "config", f"transformers cannot read it ({exc})") from exc
    cls = model_class or _model_class(config) or transformers.AutoModel
    if not structure and not compressed:
        if (path / COMPRESSED_WEIGHTS_FILE).is_file() and not meta:
            raise FileNotFoundError(
                f"{path / META_FILE}: missing; the folder holds prunekit-compressed weights "
                f"({COMPRESSED_WEIGHTS_FILE}) that cannot be decoded without it"
            )
        if not headers:
            raise FileNotFoundError(
                f"{path}: no *.safetensors weights (prunekit never loads pickle checkpoints)"
            )
        kwargs.setdefault("use_safetensors", True)  # never unpickle a .bin checkpoint
        try:
            return cls.from_pretrained(path, local_files_only=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise _fail(path, "weights", f"transformers cannot load them ({exc})") from exc
    attn = kwargs.pop("attn_implementation", kwargs.pop("_attn_implementation", None))
    dtype = kwargs.pop("dtype", None)
    dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
    if kwargs:
        raise TypeError(
            f"{path}: from_pretrained rebuilds this pruned or compressed model from its config "
            f"and does not take {sorted(kwargs)}; accepted: attn_implementation, dtype "
            "(or torch_dtype)"
        )
    if structure:
        original = meta.get("original_config")
        if original is None:
            raise _fail(
                path / META_FILE,
                "original_config",
                "the record holds a surgery but not the original config; cannot rebuild",
            )
        try:
            base_config = type(config).from_dict(original)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise _fail(path / META_FILE, "original_config", f"not a valid config ({exc})") from exc
    else:
        base_config = config
    if attn is not None:
        base_config._attn_implementation = attn
    try:
        model = cls.from_config(base_config) if cls is transformers.AutoModel else cls(base_config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise _fail(path, "config", f"the model cannot be built from it ({exc})") from exc
    if structure:
        from prunekit.compress.structured import apply_structure

        apply_structure(model, structure, source=path / META_FILE)
        object.__setattr__(model, STRUCTURE_ATTR, structure)
        object.__setattr__(model, ORIGINAL_CONFIG_ATTR, original)
        update_config(model)
    if compressed:
        state, quantized = _read_weights(path, meta, model)
    else:
        _check_layout(
            path, model, {n: (i.dtype, i.shape) for h in headers.values() for n, i in h.items()}
        )
        state, quantized = _read_plain(path), {}
    _load_state(model, state, path)
    if quantized:  # keep the codes, so that saving again stores exactly the same values
        from prunekit.compress.quantize import QUANT_ATTR

        record = {**meta.get("quantization", {"mode": "int"}), "layers": quantized}
        object.__setattr__(model, QUANT_ATTR, record)
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    return model


def _fail(source: Any, field: str, problem: str) -> Exception:
    from prunekit.compress.validate import fail

    return fail(source, field, problem)


def _check_layout(path: Path, model: nn.Module, layout: dict[str, tuple[str, tuple]]) -> None:
    """Shapes (and, where the file's floating dtype is uniform, dtypes) of the tensors a folder
    will give, from headers and records before any tensor is read, against the rebuilt model."""
    expected = model.state_dict()
    problems = [
        f"{k}: model {tuple(expected[k].shape)}, file {tuple(shape)}"
        for k, (_, shape) in layout.items()
        if k in expected and tuple(expected[k].shape) != tuple(shape)
    ]
    for k, (dtype, _) in layout.items():
        want = expected.get(k)
        if want is None:
            continue
        file_float = dtype.startswith(("float", "bfloat"))
        # floating weights take the file's dtype (the model is cast); others must match
        if want.is_floating_point() != file_float or (
            not file_float and str(want.dtype)[6:] != dtype
        ):
            problems.append(f"{k}: model dtype {str(want.dtype)[6:]}, file {dtype}")
    if problems:
        raise _fail(
            path, "weights", "do not fit the rebuilt model:\n  " + "\n  ".join(problems[:20])
        )


def _read_plain(path: Path) -> dict[str, torch.Tensor]:
    from prunekit.compress.validate import load_tensors

    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_tensors(file)[0])
    return state


def _read_weights(
    path: Path, meta: dict[str, Any], model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode the compressed weights file of a folder: dense state dict and quantized codes.
    The header and the record are checked against ``model`` before any tensor is read."""
    from prunekit.compress.io import MASK_PREFIX, SPARSE_PREFIX, check_encoded_layout, decode_state
    from prunekit.compress.validate import load_tensors, read_header

    name = meta[WEIGHTS_KEY].get("file", COMPRESSED_WEIGHTS_FILE)
    file = path / name
    if Path(name).name != name or not file.is_file():
        raise FileNotFoundError(
            f"{path}: prunekit.json says the weights are compressed in {name}, which is "
            "missing from the folder"
        )
    header = read_header(file)
    check_encoded_layout(meta, header, path / META_FILE, file)
    layout = {
        k: (i.dtype, i.shape)
        for k, i in header.items()
        if not k.startswith((MASK_PREFIX, SPARSE_PREFIX))
    }
    for k, entry in meta.get("compressed", {}).items():
        layout[k] = (entry["dtype"], tuple(entry["shape"]))
    _check_layout(path, model, layout)
    state, quantized = decode_state(load_tensors(file)[0], meta, source=str(file))
    for alias, target in meta.get("aliases", {}).items():
        state[alias] = state[target]
    return state, quantized


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` (made the stored floating dtype if it is uniform), with
    shapes checked first and tied weights allowed to be missing."""
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
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        stored = dtypes.pop()
        if any(p.is_floating_point() and p.dtype != stored for p in model.parameters()):
            model.to(stored)
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


def _is_tied(model: nn.Module, key: str, state: dict) -> bool:
    try:
        tensor = model.get_parameter(key)
    except AttributeError:
        return False
    for name, p in model.named_parameters(remove_duplicate=False):
        if name != key and p is tensor and name in state:
            return True
    return False
