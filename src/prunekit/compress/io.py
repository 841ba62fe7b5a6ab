"""Save and load pruned models: safetensors for tensors, JSON for metadata, never pickle.

A saved model is a folder:

* ``model.safetensors``: the model's ``state_dict`` (masked weights as stored, zeros in place)
  with every mask bit-packed (8 per byte) under ``__prunekit_mask__.<parameter name>``.
* ``prunekit.json``: prunekit and format versions, the masked parameters with their shapes, and
  per-layer sparsity, plus whatever ``metadata`` the caller adds (the pruning settings). For a
  structurally pruned model (``prunekit.prune_structured``) it also holds ``"structure"``: every
  changed shape, attribute and removed block, which :func:`load` replays on a fresh instance built
  by a factory (see :mod:`prunekit.compress.structured`).

With ``save(..., compressed=True)`` (format version 2) every floating weight of two or more
dimensions is stored as its non-zero values plus the smallest index (bitmask, run-length or CSR;
see :mod:`prunekit.compress.sparse_format`), the values as int8 / int4 codes with scales when the
model was quantized with ``prunekit.quantize`` (any mode: with ``mode="fake"`` the codes are
recovered from the values, which lie on the grid) or when ``bits`` is given. The
JSON gains ``"compressed"`` (per tensor: shape, dtype, index kind, quantization) and
``"derived_masks"`` (masks equal to the non-zero pattern of the stored values, so not stored),
with ``"kept_zeros"`` listing the few kept positions whose value is zero (a weight int8 rounded
to zero) so that those masks need no bitmask either.
Loading restores the dense tensors exactly (bit for bit for float values, the exact dequantized
values for quantized ones). :func:`encode_state` / :func:`decode_state` are this encoding for a
whole state dict, shared with the compressed Hugging Face folders of
:func:`prunekit.save_pretrained`.

``prunekit.json`` also records ``"integrity"``: the sha256 of the weights file and of the record
fields that decide what loads. Loading checks the whole folder before touching the model (the
record's schema, the safetensors header, the checksums, every tensor's dtype and shape against
the model, packed mask lengths, compressed encodings, the structure record against an allow-list;
see :mod:`prunekit.compress.validate`); any problem is a ``SavedModelError`` naming the file and
the field, and the model is left as it was.

Writes go to a temporary folder beside the destination (created with the process's umask), are
flushed to disk, and the folder is then renamed into place, so an interrupted save never leaves
a half-written model under the final name; an overwrite killed between moving the old version
aside and moving the new one in is repaired by the next save or load of that path.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from prunekit._version import __version__
from prunekit.compress.durable import fsync_path
from prunekit.compress.quantize import (
    ACCEPTED_BITS,
    QUANT_ATTR,
    QuantizedTensor,
    check_bits,
    dequantize_codes,
    parse_granularity,
    quantize_tensor,
)
from prunekit.compress.sparse_format import (
    VALUE_DTYPES,
    _check_index,
    decode,
    encode,
    nonzero_bits,
)
from prunekit.compress.structured import STRUCTURE_ATTR, apply_structure, check_structure
from prunekit.compress.validate import (
    INTEGRITY_KEY,
    SavedModelError,
    TensorInfo,
    check_integrity,
    check_size,
    fail,
    integrity_record,
    is_shape,
    load_tensors,
    numel,
    read_header,
    read_json,
)
from prunekit.masks import MASK_SUFFIX, apply_mask, get_mask, masked_parameters, remove_mask
from prunekit.report import stats
from prunekit.runtime.accelerated import accelerated_as_dense, refuse_accelerated
from prunekit.targets import matches

FORMAT_VERSION = 2  # the newest version this prunekit reads; plain saves still write 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "prunekit.json"
MASK_PREFIX = "__prunekit_mask__."
SPARSE_PREFIX = "__prunekit_sparse__."
# the prunekit.json fields that decide what loads: covered by the integrity checksum
LOAD_FIELDS = (
    "format",
    "format_version",
    "masks",
    "aliases",
    "compressed",
    "derived_masks",
    "kept_zeros",
    "quantization",
    "structure",
)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask into uint8 (8 entries per byte, row-major)."""
    bits = np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1))
    return torch.from_numpy(bits)


def unpack_mask(packed: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`; ``packed`` must be uint8 of exactly ceil(numel / 8) bytes."""
    count = int(np.prod(shape)) if len(shape) else 1
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (-(-count // 8),):
        raise ValueError(
            f"a packed mask of shape {list(shape)} is uint8 of shape [{-(-count // 8)}], got "
            f"{str(packed.dtype)[6:]} of shape {list(packed.shape)}"
        )
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


def write_text(path: Path, text: str) -> None:
    """Write a text file and flush it to disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (and ``root``) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_path(Path(folder))


def _umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - systems without /proc
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the permissions a plain ``open`` / ``mkdir`` would
    (libraries may write through temporary files created 0600)."""
    mask = _umask()
    for folder, dirs, files in os.walk(root):
        for name in files:
            file = os.path.join(folder, name)
            if os.path.islink(file):
                continue
            execute = os.stat(file).st_mode & 0o111
            os.chmod(file, (0o666 | execute) & ~mask)
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
    os.chmod(root, 0o777 & ~mask)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process
    return True


def _leftovers(path: Path, kind: str) -> list[tuple[Path, int | None]]:
    """``.NAME.<kind>-PID-...`` folders beside ``path``, with the writer's process id (None for
    names written by older prunekit versions)."""
    found = []
    prefix = f".{path.name}.{kind}-"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(prefix):
            head = entry.name[len(prefix) :].split("-", 1)[0]
            found.append((entry, int(head) if head.isdigit() else None))
    return found


def recover_interrupted(path: str | os.PathLike) -> bool:
    """Finish what an interrupted overwrite of ``path`` left behind: if the process died
    between moving the old version aside and moving the new one in, the old version is put back;
    a leftover old version beside a complete new one, and temporary folders of writers that are
    no longer running, are removed. Returns whether an old version was restored.

    Called by every save before writing, and by load when ``path`` is missing.

    Example:
        >>> recover_interrupted("out/net")  # doctest: +SKIP
        False
    """
    path = Path(path)
    restored = False
    olds = [(p, pid) for p, pid in _leftovers(path, "old") if pid is None or not _pid_alive(pid)]
    for old, _ in sorted(olds, key=lambda item: item[0].stat().st_mtime, reverse=True):
        if not os.path.lexists(path):
            os.replace(old, path)  # the newest old version is the one that was replaced
            restored = True
        elif old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    for tmp, pid in _leftovers(path, "tmp"):
        if pid is None or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
    if restored:
        fsync_path(path.parent)
    return restored


def _recover_quietly(path: Path) -> None:
    """Put back a version an interrupted overwrite left aside, if the folder allows it."""
    try:
        recover_interrupted(path)
    except OSError:  # read-only folder: the error about the missing model follows
        pass


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _atomic_dir_write(path: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run ``write(folder)`` on a fresh temporary folder beside ``path``, flush it to disk and
    rename it to ``path``.

    ``path`` may be absent or an empty folder; anything else needs ``overwrite=True``, and then
    the old version is moved aside, the new one moved in, and the old one deleted. A run killed
    between those two renames is repaired by the next call (:func:`recover_interrupted`). The
    folder and its files are created with the process's umask, like any other output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(path)
    if os.path.lexists(path) and not overwrite and not _is_empty_dir(path):
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    os.mkdir(tmp, 0o777)  # the umask decides the permissions, not mkdtemp's 0700
    try:
        write(tmp)
        _apply_umask(tmp)
        _fsync_tree(tmp)
        if os.path.lexists(path) and not _is_empty_dir(path):
            old = path.with_name(f".{path.name}.old-{tag}")
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_path(path.parent)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)  # an empty folder is replaced atomically
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def effective_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model.state_dict()`` with every masked weight replaced by its effective (masked) value
    and the mask buffers dropped, plus those masks by parameter name."""
    state = model.state_dict()
    masks = {}
    for module_name, module, name in masked_parameters(model):
        full = f"{module_name}.{name}" if module_name else name
        masks[full] = get_mask(module, name)
        state.pop(full + MASK_SUFFIX, None)
        # Optimiser momentum from before the mask can move raw values: store the masked weight.
        state[full] = getattr(module, name).detach()
    return state, masks


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    compressed: bool = False,
    bits: int | dict[str, int | tuple[int, str]] | None = None,
    granularity: str = "per_channel",
    index: str = "auto",
) -> Path:
    """Save a (pruned) model's weights and masks to the folder ``path``, without pickle.

    ``compressed=True`` stores each floating weight with two or more dimensions as non-zero
    values plus an index (``index``: ``"auto"`` picks the smallest of bitmask / rle / csr /
    dense per tensor, or force one). Weights quantized by ``prunekit.quantize`` (in any mode)
    are stored as their integer codes and scales, as long as they still lie on the grid; ``bits=8`` or ``4`` quantizes the other ones too
    (symmetric, ``granularity`` ``"per_channel"`` or ``"group:G"``), so loading gives the
    dequantized values. ``bits`` may also map name patterns (globs, ``re:`` regexes; the first
    match wins) to ``bits`` or ``(bits, granularity)``, e.g. ``{"*embeddings*": (4, "group:64"),
    "*": 8}``; weights no pattern matches keep their float values.

    A model sped up by :func:`prunekit.runtime.accelerate.accelerate` is saved with ordinary
    ``weight`` / ``bias`` tensors (each accelerated layer decoded to the dense weight it
    holds), so it loads into the original architecture.

    Example:
        >>> import torch, prunekit, tempfile
        >>> net = prunekit.prune(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), 0.5).model
        >>> folder = prunekit.save(net, tempfile.mkdtemp() + "/net")
        >>> sorted(p.name for p in folder.iterdir())
        ['model.safetensors', 'prunekit.json']
    """
    path = Path(path)
    check_compress_args(compressed, bits, granularity, index)
    with accelerated_as_dense(model):  # accelerated layers are saved as their dense weights
        state, masks = effective_state(model)
        report = stats(model)
    tensors, aliases = _dedupe_shared(state)
    extra: dict[str, Any] = {}
    mask_shapes = {name: list(mask.shape) for name, mask in masks.items()}
    if compressed:
        tensors, extra = encode_state(
            tensors,
            quantization=getattr(model, QUANT_ATTR, None),
            bits=bits,
            granularity=granularity,
            index=index,
        )
        masks = _stored_masks(tensors, extra, masks)
    for name, mask in masks.items():
        tensors[MASK_PREFIX + name] = pack_mask(mask)
    meta = {
        "format": "prunekit",
        "format_version": 2 if compressed else 1,
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sparsity": {row.name: round(row.sparsity, 6) for row in report.layers},
        "total_sparsity": round(report.sparsity, 6),
        **(metadata or {}),
    }
    # what decides how the file loads comes after the caller's metadata, which cannot hide it
    for key in (*LOAD_FIELDS, INTEGRITY_KEY):
        meta.pop(key, None)
    meta.update({"format": "prunekit", "format_version": 2 if compressed else 1})
    meta.update({"masks": mask_shapes, "aliases": aliases, **extra})
    structure = getattr(model, STRUCTURE_ATTR, None)
    if structure:
        meta["structure"] = structure

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        fields = [k for k in LOAD_FIELDS if k in meta]
        meta[INTEGRITY_KEY] = integrity_record(folder, [WEIGHTS_FILE], meta, fields)
        write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")

    _atomic_dir_write(path, overwrite, write)
    return path


def check_compress_args(
    compressed: bool,
    bits: int | dict[str, int | tuple[int, str]] | None,
    granularity: str,
    index: str,
) -> list[tuple[str, int, str]]:
    """Validate the compression arguments of a save; return ``bits`` as (pattern, bits,
    granularity) rules. ``bits`` and ``index`` need ``compressed=True``.

    Example:
        >>> check_compress_args(True, 8, "per_channel", "auto")
        [('*', 8, 'per_channel')]
    """
    if not compressed and (bits is not None or index != "auto"):
        raise ValueError(
            f"bits={bits!r} and index={index!r} apply to compressed saves only: pass "
            "compressed=True, or leave bits=None and index='auto' for a plain save"
        )
    parse_granularity(granularity)
    rules = _bit_rules(bits, granularity)
    _check_index(index)
    return rules


def encode_state(
    tensors: dict[str, torch.Tensor],
    *,
    quantization: dict[str, Any] | None = None,
    bits: int | dict[str, int | tuple[int, str]] | None = None,
    granularity: str = "per_channel",
    index: str = "auto",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode a state dict for a compressed safetensors file; the inverse is :func:`decode_state`.

    Every floating tensor of two or more dimensions becomes its non-zero values plus an index
    (see :func:`prunekit.compress.sparse_format.encode`), stored under
    ``__prunekit_sparse__.<name>.<array>``; the other tensors are kept as they are. ``tensors``
    must not hold two views of one storage (tied weights: keep one, record the other as an
    alias). ``quantization`` is a model's ``prunekit.quantize(mode="int")`` record
    (``model._prunekit_quant``): its weights are stored as their integer codes, as long as they
    still equal their dequantized codes. ``bits`` / ``granularity`` / ``index`` are those of
    :func:`save`.

    Returns the tensors to write and the JSON-able metadata: ``"compressed"`` (per tensor:
    shape, dtype, index kind, quantization) and, for a quantized model, ``"quantization"``.

    Example:
        >>> state = {"w": torch.tensor([[0.0, 1.5], [0.0, 0.0]])}
        >>> tensors, meta = encode_state(state, index="csr")
        >>> sorted(tensors), meta["compressed"]["w"]["nnz"]
        (['__prunekit_sparse__.w.col', '__prunekit_sparse__.w.rowptr', '__prunekit_sparse__.w.values'], 1)
        >>> torch.equal(decode_state(tensors, meta)[0]["w"], state["w"])
        True
    """
    rules = check_compress_args(True, bits, granularity, index)
    if isinstance(bits, dict):
        _check_bit_patterns(rules, tensors)
    record = quantization or {}
    quantized: dict[str, QuantizedTensor] = record.get("layers", {})
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.dim() < 2:
            out[name] = tensor
            continue
        q = quantized.get(name)
        if q is not None and not torch.equal(q.dequantize(), tensor.cpu()):
            q = None  # changed since quantize(): quantize again below if asked
            if not rules:
                q = quantize_tensor(
                    tensor,
                    record["bits"],
                    record["granularity"],
                    record.get("symmetric", True),
                    name=name,
                )
        if q is None and record.get("bits") in ACCEPTED_BITS:
            # quantized without its codes kept (mode="fake"): values still on the grid are
            # stored as codes, exactly
            q = codes_on_grid(
                tensor, record["bits"], record["granularity"], record.get("symmetric", True)
            )
        rule = next((r for r in rules if matches(r[0], name)), None)
        if q is None and rule is not None:
            q = quantize_tensor(tensor, rule[1], rule[2], symmetric=True, name=name)
        arrays, entry = encode(tensor, index, q)
        for key, value in arrays.items():
            out[f"{SPARSE_PREFIX}{name}.{key}"] = value
        entries[name] = entry
    meta: dict[str, Any] = {"compressed": entries}
    if record:
        meta["quantization"] = {k: v for k, v in record.items() if k != "layers"}
    return out, meta


def codes_on_grid(
    tensor: torch.Tensor, bits: int, granularity: str, symmetric: bool = True
) -> QuantizedTensor | None:
    """Integer codes and scales that give back exactly ``tensor`` (bit for bit), when its
    values lie on the grid ``prunekit.quantize`` with these settings produces (as after
    ``quantize(..., mode="fake")``); None when they do not.

    Quantizing the dequantized values again finds the same codes; a scale may come out one or
    two units in the last place off, so the scales of groups that do not reproduce exactly are
    nudged to the neighbouring float32 values that do. Hugging Face ``Conv1D`` weights
    (quantized transposed) are tried both ways.

    Example:
        >>> from prunekit.compress.quantize import quantize_tensor
        >>> w = quantize_tensor(torch.randn(4, 8), 8).dequantize()
        >>> torch.equal(codes_on_grid(w, 8, "per_channel").dequantize(), w)
        True
        >>> codes_on_grid(torch.randn(4, 8), 8, "per_channel") is None
        True
    """
    if not tensor.is_floating_point() or tensor.dim() < 2 or not bool(tensor.isfinite().all()):
        return None
    tensor = tensor.detach().cpu()
    for transposed in (False, True) if tensor.dim() == 2 else (False,):
        q = quantize_tensor(tensor, bits, granularity, symmetric, transposed=transposed)
        q = _nudge_scales(q, tensor)
        if q is not None:
            return q
    return None


def _nudge_scales(q: QuantizedTensor, tensor: torch.Tensor) -> QuantizedTensor | None:
    """``q`` with the scales of groups that miss ``tensor`` moved by up to 3 float32 steps,
    when that makes every group exact; else None."""
    target = tensor.t() if q.transposed else tensor.reshape(tensor.shape[0], -1)
    rows, cols = q.codes.shape
    size = cols if q.group is None else q.group
    groups = q.scale.shape[1]

    def exact_groups(scale: torch.Tensor) -> torch.Tensor:
        values = dequantize_codes(q.codes, scale, q.zero_point, q.group, (rows, cols), tensor.dtype)
        equal = values == target
        padded = torch.ones(rows, groups * size, dtype=torch.bool)
        padded[:, :cols] = equal
        return padded.reshape(rows, groups, size).all(-1)

    ok = exact_groups(q.scale)
    if bool(ok.all()):
        return q
    if float(ok.float().mean()) < 0.5:  # not quantized values: do not search
        return None
    scale = q.scale.clone()
    for direction in (float("inf"), float("-inf")):
        candidate = q.scale.clone()
        for _ in range(3):
            candidate = torch.nextafter(candidate, torch.full_like(candidate, direction))
            better = exact_groups(candidate) & ~ok
            scale = torch.where(better, candidate, scale)
            ok = ok | better
    if not bool(ok.all()):
        return None
    return QuantizedTensor(
        codes=q.codes,
        scale=scale,
        zero_point=q.zero_point,
        bits=q.bits,
        group=q.group,
        shape=q.shape,
        dtype=q.dtype,
        transposed=q.transposed,
    )


def decode_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, source: str = "the file"
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """Inverse of :func:`encode_state`: the dense state dict (float values bit for bit,
    quantized ones as exactly their dequantized values) and the integer codes of the quantized
    tensors. ``tensors`` (read from the safetensors file) is not changed; ``source`` names it in
    errors.

    Example:
        >>> tensors, meta = encode_state({"w": torch.eye(3)})
        >>> state, codes = decode_state(tensors, meta)
        >>> torch.equal(state["w"], torch.eye(3)), codes
        (True, {})
    """
    state = dict(tensors)
    quantized: dict[str, QuantizedTensor] = {}
    entries = meta.get("compressed", {})
    if not isinstance(entries, dict):
        raise fail(source, "compressed", f"expected an object, got {type(entries).__name__}")
    for name, entry in entries.items():
        prefix = f"{SPARSE_PREFIX}{name}."
        arrays = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        if not arrays:
            raise fail(source, name, "no stored arrays for this compressed tensor")
        try:
            state[name], q = decode(arrays, entry)
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            raise fail(source, f"compressed tensor {name!r}", f"cannot be decoded: {exc}") from exc
        if q is not None:
            quantized[name] = q
    unknown = [k for k in state if k.startswith(SPARSE_PREFIX)]
    if unknown:
        raise fail(source, unknown[0], f"encoded arrays without metadata: {unknown[:5]}")
    return state, quantized


def _stored_masks(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The masks that a compressed save must store: those not equal to the non-zero pattern of
    their decoded values (the others are derived on load, listed in ``meta["derived_masks"]``)."""
    kept, derived, kept_zeros = {}, [], {}
    entries = meta["compressed"]
    for name, mask in masks.items():
        if name in entries:
            prefix = f"{SPARSE_PREFIX}{name}."
            arrays = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            nonzero = nonzero_bits(decode(arrays, entries[name])[0])
            mask = mask.cpu()
            if torch.equal(nonzero, mask):
                derived.append(name)
                continue
            # Kept weights that are zero (e.g. rounded to zero by int8): list their positions
            # instead of storing a whole second bitmask, when they are few.
            extra = (mask & ~nonzero).reshape(-1)
            if not bool((nonzero & ~mask).any()) and int(extra.sum()) * 64 < mask.numel():
                derived.append(name)
                kept_zeros[name] = torch.nonzero(extra).reshape(-1).tolist()
                continue
        kept[name] = mask
    meta["derived_masks"] = sorted(derived)
    if kept_zeros:
        meta["kept_zeros"] = kept_zeros
    return kept


def _check_bit_patterns(rules: list[tuple[str, int, str]], tensors: dict[str, Any]) -> None:
    """Every pattern of a ``bits`` mapping must decide some weight's bits: one that matches
    nothing (a typo, another model's names) or whose weights an earlier pattern already takes
    (the first matching pattern wins) would silently leave weights in float32."""
    names = [n for n, t in tensors.items() if t.is_floating_point() and t.dim() >= 2]
    used = {next((r[0] for r in rules if matches(r[0], n)), None) for n in names}
    problems = []
    for pattern, _, _ in rules:
        if pattern in used:
            continue
        if any(matches(pattern, n) for n in names):
            problems.append(
                f"{pattern!r} decides no weight: an earlier pattern matches every weight it "
                "matches (the first matching pattern wins; put it before the broader one)"
            )
        else:
            problems.append(f"{pattern!r} matches no weight")
    if problems:
        raise ValueError(
            f"bits pattern {'; '.join(problems)}. The weights bits applies to (floating, two or "
            f"more dimensions): {', '.join(names) or '(none)'}. Patterns are globs, or regular "
            "expressions with a 're:' prefix."
        )


def _bit_rules(bits: Any, granularity: str) -> list[tuple[str, int, str]]:
    """``bits`` as a list of (pattern, bits, granularity), validated."""
    if bits is None:
        return []
    if not isinstance(bits, dict):
        return [("*", check_bits(bits), granularity)]
    rules = []
    for pattern, value in bits.items():
        if not isinstance(pattern, str):
            raise TypeError(f"bits patterns must be strings, got {pattern!r}")
        if isinstance(value, (tuple, list)):  # a list where the rule came from JSON / YAML
            if len(value) != 2:
                raise ValueError(
                    f"bits[{pattern!r}] must be bits or (bits, granularity), got {value!r}"
                )
            b, g = value
        else:
            b, g = value, granularity
        parse_granularity(g)
        rules.append((pattern, check_bits(b), g))
    return rules


def load_state(path: str | os.PathLike, aliases: bool = True) -> dict[str, torch.Tensor]:
    """The saved weights as a plain dense state dict (compressed tensors decoded, masks applied
    and left out), without needing the model class. The folder is checked whole first; any
    problem is a :class:`SavedModelError` naming the file and the field.

    Example:
        >>> state = prunekit.load_state("out/net")  # doctest: +SKIP
    """
    saved = _open_folder(Path(path))
    return _decode_folder(saved, aliases)[0]


class _Saved:
    """A save folder whose JSON record, safetensors header and checksums were checked."""

    def __init__(self, path: Path, meta: dict[str, Any], header: dict[str, TensorInfo]) -> None:
        self.path = path
        self.meta = meta
        self.header = header
        self.weights = path / WEIGHTS_FILE
        self.meta_path = path / META_FILE

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """dtype name and shape of every tensor of the dense state the folder decodes to
        (aliases included), known before a tensor is read."""
        compressed = self.meta.get("compressed", {})
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, info in self.header.items():
            if not name.startswith((MASK_PREFIX, SPARSE_PREFIX)):
                out[name] = (info.dtype, info.shape)
        for name, entry in compressed.items():
            out[name] = (entry["dtype"], tuple(entry["shape"]))
        for alias, target in self.meta.get("aliases", {}).items():
            out[alias] = out[target]
        return out


def _open_folder(path: Path) -> _Saved:
    """Read and check a save folder without reading its tensors: the JSON record's schema, the
    safetensors header, the checksums, and that the two agree (a mask tensor for every masked
    layer, with its exact packed length; the arrays of every compressed tensor)."""
    if not os.path.lexists(path):
        _recover_quietly(path)
    meta = read_metadata(path)
    meta_path = path / META_FILE
    weights = path / WEIGHTS_FILE
    header = read_header(weights)
    saved = _Saved(path, meta, header)
    compressed = meta.get("compressed", {})
    derived = set(meta.get("derived_masks", []))
    stored_masks = {k[len(MASK_PREFIX) :] for k in header if k.startswith(MASK_PREFIX)}
    for name, shape in meta["masks"].items():
        key = MASK_PREFIX + name
        if name in derived:
            if name not in compressed:
                raise fail(
                    meta_path,
                    f"derived_masks[{name!r}]",
                    "a derived mask needs a compressed tensor of that name",
                )
            if key in header:
                raise fail(weights, key, "stored although prunekit.json derives this mask")
            if list(compressed[name]["shape"]) != list(shape):
                raise fail(
                    meta_path,
                    f"masks[{name!r}]",
                    f"shape {shape} differs from the compressed tensor's {compressed[name]['shape']}",
                )
            continue
        if key not in header:
            raise fail(
                weights,
                key,
                f"missing: prunekit.json lists a mask for {name!r} (shape {shape}); the file "
                "holds no packed mask for it",
            )
        info = header[key]
        want = -(-numel(shape) // 8)
        if info.dtype != "uint8" or info.shape != (want,):
            raise fail(
                weights,
                key,
                f"expected the packed mask as uint8 of shape [{want}] ({numel(shape)} bits of "
                f"shape {shape}), got {info.dtype} of shape {list(info.shape)}",
            )
    for name in sorted(stored_masks - set(meta["masks"])):
        raise fail(weights, MASK_PREFIX + name, "a mask that prunekit.json does not list")
    for name in sorted(derived - set(meta["masks"])):
        raise fail(meta_path, "derived_masks", f"{name!r} is not listed in masks")
    check_encoded_layout(meta, header, meta_path, weights)
    check_integrity(path, meta, meta_path)
    return saved


def check_encoded_layout(
    meta: dict[str, Any], header: dict[str, TensorInfo], meta_path: Path, weights: Path
) -> None:
    """The compressed tensors and aliases a record lists against a safetensors header: every
    compressed tensor has arrays and no plain copy, every encoded array belongs to a listed
    tensor, every alias names a stored tensor."""
    compressed = meta.get("compressed", {})
    for name in compressed:
        prefix = f"{SPARSE_PREFIX}{name}."
        if not any(k.startswith(prefix) for k in header):
            raise fail(weights, name, "prunekit.json lists it as compressed; no arrays are stored")
        if name in header:
            raise fail(weights, name, "stored both plain and compressed")
    names = set(compressed)
    for key in header:
        if key.startswith(SPARSE_PREFIX):
            owner = key[len(SPARSE_PREFIX) :].rpartition(".")[0]
            if owner not in names:
                raise fail(weights, key, "an encoded array of no tensor listed in prunekit.json")
    known = {k for k in header if not k.startswith((MASK_PREFIX, SPARSE_PREFIX))} | names
    for alias, target in meta.get("aliases", {}).items():
        if target not in known:
            raise fail(meta_path, f"aliases[{alias!r}]", f"names {target!r}, which is not stored")
        if alias in known:
            raise fail(meta_path, f"aliases[{alias!r}]", "names a tensor that is also stored")


def _decode_folder(
    saved: _Saved, aliases: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """Read the tensors of a checked folder: dense state, bool masks, quantized codes."""
    tensors, _ = load_tensors(saved.weights)
    meta = saved.meta
    packed = {
        name[len(MASK_PREFIX) :]: tensors.pop(name)
        for name in list(tensors)
        if name.startswith(MASK_PREFIX)
    }
    tensors, quantized = decode_state(tensors, meta, source=str(saved.weights))
    masks = {name: unpack_mask(p, meta["masks"][name]) for name, p in packed.items()}
    for name in meta.get("derived_masks", []):
        masks[name] = nonzero_bits(tensors[name])
    for name, positions in meta.get("kept_zeros", {}).items():
        flat = masks[name].reshape(-1)  # a fresh tensor: nonzero_bits made it
        where = torch.tensor(positions, dtype=torch.long)
        if bool((tensors[name].reshape(-1)[where] != 0).any()):
            raise fail(
                saved.meta_path, f"kept_zeros[{name!r}]", "lists positions whose value is not zero"
            )
        flat[where] = True
    if aliases:
        for alias, source in meta.get("aliases", {}).items():
            tensors[alias] = tensors[source]
    return tensors, masks, quantized


def _check_kept_zeros(meta: dict[str, Any], derived: list[str], meta_path: Path) -> None:
    """``kept_zeros``: {derived mask name: sorted flat positions inside its tensor}."""
    kept = meta.get("kept_zeros", {})
    if not isinstance(kept, dict):
        raise fail(meta_path, "kept_zeros", f"expected an object, got {type(kept).__name__}")
    for name, positions in kept.items():
        if name not in derived:
            raise fail(meta_path, f"kept_zeros[{name!r}]", "names no derived mask")
        size = numel(meta["masks"].get(name, [])) if isinstance(meta.get("masks"), dict) else 0
        if (
            not isinstance(positions, list)
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions)
            or any(not 0 <= p < size for p in positions)
            or positions != sorted(set(positions))
        ):
            raise fail(
                meta_path,
                f"kept_zeros[{name!r}]",
                f"expected sorted distinct positions in [0, {size}), got {str(positions)[:80]}",
            )


def _check_meta(meta: dict[str, Any], meta_path: Path) -> None:
    """The schema of a prunekit.json record (format already checked)."""

    def names_to(field: str, check, expected: str, required: bool = False) -> None:
        value = meta.get(field)
        if value is None and not required:
            return
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and check(v) for k, v in value.items()
        ):
            what = "missing" if value is None else f"got {json.dumps(value)[:120]}"
            raise fail(meta_path, field, f"expected an object of {expected}; {what}")

    version = meta.get("format_version")
    if version not in (1, 2) or isinstance(version, bool):
        raise fail(meta_path, "format_version", f"expected 1 or 2, got {version!r}")
    names_to("masks", is_shape, "parameter name -> shape (a list of integers)", required=True)
    for name, shape in meta["masks"].items():
        check_size(meta_path, f"masks[{name!r}]", numel(shape) // 8)
    check_weights_meta(meta, meta_path)


def check_weights_meta(meta: dict[str, Any], meta_path: Path) -> None:
    """The schema of the record's fields that say how the weights are stored (shared with the
    Hugging Face folders): aliases, compressed entries, derived masks, quantization, structure."""

    def names_to(field: str, check, expected: str) -> None:
        if field not in meta:
            return
        value = meta[field]
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and check(v) for k, v in value.items()
        ):
            raise fail(
                meta_path, field, f"expected an object of {expected}; got {json.dumps(value)[:120]}"
            )

    names_to("aliases", lambda v: isinstance(v, str), "tensor name -> stored tensor name")
    names_to("compressed", lambda v: isinstance(v, dict), "tensor name -> encoding entry")
    for name, entry in meta.get("compressed", {}).items():
        if not is_shape(entry.get("shape")) or entry.get("dtype") not in VALUE_DTYPES:
            raise fail(
                meta_path,
                f"compressed[{name!r}]",
                f"expected 'shape' (a list of integers) and 'dtype' (one of "
                f"{', '.join(VALUE_DTYPES)}), got shape {entry.get('shape')!r} and dtype "
                f"{entry.get('dtype')!r}",
            )
        itemsize = torch.empty(0, dtype=getattr(torch, entry["dtype"])).element_size()
        check_size(meta_path, f"compressed[{name!r}].shape", numel(entry["shape"]) * itemsize)
    derived = meta.get("derived_masks", [])
    if not isinstance(derived, list) or not all(isinstance(n, str) for n in derived):
        raise fail(meta_path, "derived_masks", f"expected a list of names, got {derived!r}")
    _check_kept_zeros(meta, derived, meta_path)
    quant = meta.get("quantization")
    if "quantization" in meta:
        ok = (
            isinstance(quant, dict)
            and quant.get("bits") in ACCEPTED_BITS
            and not isinstance(quant.get("bits"), bool)
            and isinstance(quant.get("granularity"), str)
            and isinstance(quant.get("symmetric", True), bool)
            and quant.get("mode", "int") in ("fake", "int")
        )
        if ok:
            try:
                parse_granularity(quant["granularity"])
            except ValueError:
                ok = False
        if not ok:
            raise fail(
                meta_path,
                "quantization",
                "expected {'bits': 4 or 8, 'granularity': 'per_channel' or 'group:G', "
                f"'symmetric': true/false, 'mode': 'fake' or 'int'}}, got {json.dumps(quant)[:200]}",
            )
    if "structure" in meta:
        try:
            check_structure(meta["structure"])
        except ValueError as exc:
            raise fail(meta_path, "structure", str(exc)) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``prunekit.json`` of a saved model folder, its schema checked.

    Example:
        >>> prunekit.compress.io.read_metadata("out/net")["masks"]  # doctest: +SKIP
        {'fc1.weight': [32, 256]}
    """
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a prunekit save folder (no {META_FILE})")
    meta = read_json(meta_path)
    version = meta.get("format_version", 0)
    if meta.get("format") != "prunekit" or not isinstance(version, int) or version > FORMAT_VERSION:
        raise SavedModelError(
            f"{meta_path} has format {meta.get('format')!r} version {version!r}; "
            f"this prunekit ({__version__}) reads prunekit format up to version {FORMAT_VERSION}"
        )
    _check_meta(meta, meta_path)
    return meta


def load(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Load weights and masks saved by :func:`save` into ``model``, in place.

    ``model`` is an instance of the saved architecture (fresh, or carrying masks of its own,
    which the saved ones replace), or a zero-argument factory that builds one. The weights are
    restored bit for bit and every mask is re-attached, so pruning or training can go on.

    The folder is checked whole before the model is touched: the JSON record's schema, the
    safetensors header, the checksums written at save time, every tensor's dtype and shape
    against the model, packed mask lengths, the compressed encodings and the structure record.
    Any problem raises :class:`SavedModelError` (a ``ValueError`` naming the file, the field and
    what was expected) or ``FileNotFoundError``, and the model is left as it was.

    A structurally pruned model (``prunekit.prune_structured``) has smaller layers than a fresh
    instance: its saved record of changed shapes is first replayed on the fresh model (checked
    on a copy first when you pass an instance), then the weights are loaded.

    Example:
        >>> restored = prunekit.load("out/net", MyNet())  # doctest: +SKIP
        >>> restored = prunekit.load("out/pruned", MyNet)  # a factory works too  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(
            f"model must be an nn.Module or a callable returning one, got {type(model).__name__}"
        )
    saved = _open_folder(Path(path))
    if not isinstance(model, nn.Module):
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory returned {type(built).__name__}, not an nn.Module")
        model, fresh = built, True
    else:
        fresh = False
    refuse_accelerated(model, "load")  # its layers hold packed buffers, not weight / bias
    structure = saved.meta.get("structure")
    if (
        structure and not fresh
    ):  # replay on a copy first: the caller's model changes only if all fits
        probe = copy.deepcopy(model)
        _drop_masks(probe)
        apply_structure(probe, structure, source=saved.meta_path)
        _check_compatible(saved, probe)
        tensors, masks, quantized = _decode_folder(saved)
        _check_decoded(saved, tensors, probe)
        del probe
        _drop_masks(model)
        apply_structure(model, structure, source=saved.meta_path)
    else:
        if structure:  # a model built here by the factory: nobody else holds it
            _drop_masks(model)
            apply_structure(model, structure, source=saved.meta_path)
        _check_compatible(saved, model)
        tensors, masks, quantized = _decode_folder(saved)
        _check_decoded(saved, tensors, model)
        _drop_masks(model)  # the file's masks replace any the model carries
    if structure:
        object.__setattr__(model, STRUCTURE_ATTR, structure)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module_name, _, param_name = name.rpartition(".")
        apply_mask(modules[module_name], param_name, mask)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith(MASK_SUFFIX)]
    if missing or unexpected:  # pragma: no cover - _check_compatible catches these first
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if quantized:  # keep the codes, so that saving again stores exactly the same values
        record = {**saved.meta.get("quantization", {"mode": "int"}), "layers": quantized}
        object.__setattr__(model, QUANT_ATTR, record)
    elif QUANT_ATTR in model.__dict__:  # the model's own record described other weights
        object.__delattr__(model, QUANT_ATTR)
    return model


def _drop_masks(model: nn.Module) -> None:
    for _, module, name in list(masked_parameters(model)):
        remove_mask(module, name)


def _expected_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Parameter]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if not k.endswith(MASK_SUFFIX) or k[: -len(MASK_SUFFIX)] not in params
    }
    return expected, params


def _check_compatible(saved: _Saved, model: nn.Module) -> None:
    """Names, dtypes and shapes of the file (read from its header and record, before any tensor
    is read) against the model's; every problem at once."""
    expected, params = _expected_state(model)
    layout = saved.layout()
    problems = []
    for name in sorted(set(expected) - set(layout)):
        problems.append(f"{name}: in the model but not in the file")
    for name in sorted(set(layout) - set(expected)):
        problems.append(f"{name}: in the file but not in the model")
    for name in sorted(set(expected) & set(layout)):
        dtype, shape = layout[name]
        want = expected[name]
        if tuple(want.shape) != tuple(shape):
            problems.append(f"{name}: model has shape {tuple(want.shape)}, file has {tuple(shape)}")
        elif str(want.dtype).replace("torch.", "") != dtype:
            problems.append(
                f"{name}: model has dtype {str(want.dtype)[6:]}, file has {dtype} (convert the "
                "model with .to(dtype) first, or the file is damaged)"
            )
    for name, shape in saved.meta["masks"].items():
        if name not in params:
            problems.append(f"mask for {name}: the model has no such parameter")
        elif tuple(params[name].shape) != tuple(shape):
            problems.append(
                f"mask for {name}: model has shape {tuple(params[name].shape)}, "
                f"file has {tuple(shape)}"
            )
    if problems:
        raise SavedModelError(
            f"{saved.path}: the saved model does not fit this architecture:\n  "
            + "\n  ".join(problems)
        )


def _check_decoded(saved: _Saved, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The decoded tensors against the model (what the header promised, checked again)."""
    expected, _ = _expected_state(model)
    for name, want in expected.items():
        got = tensors.get(name)
        if got is None or got.dtype != want.dtype or got.shape != want.shape:
            raise fail(
                saved.weights,
                name,
                f"decodes to {None if got is None else (got.dtype, tuple(got.shape))}, the "
                f"model needs {(want.dtype, tuple(want.shape))}",
            )
