"""Resumable ``oneshot``: per-stage checkpoints (safetensors + JSON) and the interrupted marker.

``oneshot`` works in *stages*: each block of the sequential run in order (``"block-0000"``...),
then the targeted layers outside the blocks (``"rest"``); or every target at once (``"all"``)
when the model is calibrated whole. With ``checkpoint=DIR`` every finished stage is recorded in
``DIR``:

* ``block-0003.safetensors``: the stage's pruned weights (the stored parameters, zeros in place)
  as ``<parameter name>`` and their bit-packed keep-masks as ``<parameter name>:mask``;
* ``oneshot.json``: a format tag, the settings fingerprint (every argument that changes the
  result, the targets' names, shapes and dtypes, a SHA-256 of the calibration samples and one of
  the model's other tensors), the allocation (OWL's per-block or the sensitivity per-layer
  sparsities), and per finished stage: its file's SHA-256, the SHA-256 of its targets before and
  after pruning, and its report entries (allocated sparsity, SparseGPT fallbacks).

A stage file is written under a temporary name, flushed and renamed; then the JSON the same way,
so a stage counts only once its file is whole, and a kill at any moment leaves the folder at the
previous or the next stage. Called again with the same arguments and the same checkpoint,
``oneshot`` validates the whole folder (schema, checksums, every tensor's dtype and shape, the
model's weights against the recorded ones) before it changes anything, loads the finished
stages, runs the calibration data through them so that the next block sees the inputs it would
have seen, and continues with the first unfinished stage. Masks and weights end identical to an
uninterrupted run on the same device (SparseGPT is thread-count independent, see
:mod:`prunekit.calibrate.sparsegpt`). A folder whose run is complete is loaded without any
calibration pass. One process at a time may use a folder.

A model pruned in place that is interrupted (``KeyboardInterrupt``, an error) has the stage in
progress rolled back to how it was, so its stages are either finished or untouched, and carries
``model._prunekit_oneshot_progress`` (``{"done_blocks": k, "of": n, "done": [...], "next": ...,
"checkpoint": ...}``, stages counted) with a warning. ``oneshot`` refuses such a model unless it
is given the run's checkpoint (then it resumes); a finished run removes the attribute.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.compress.durable import fsync_path, sha256_file
from prunekit.compress.io import pack_mask, unpack_mask
from prunekit.masks import MASK_SUFFIX, apply_mask, get_mask, raw_parameter, remove_mask
from prunekit.targets import Target

FORMAT = "prunekit-oneshot-checkpoint"
VERSION = 1
META = "oneshot.json"
MARKER = "_prunekit_oneshot_progress"
MASK_KEY = ":mask"


@dataclass
class Stage:
    """One unit of oneshot's work and the targets it prunes."""

    key: str
    targets: list[Target]

    @property
    def file(self) -> str:
        return f"{self.key}.safetensors"


def _update(digest: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _update_data(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        digest.update(b"T")
        _update(digest, obj)
    elif isinstance(obj, dict) or hasattr(obj, "items"):
        digest.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=str):
            digest.update(repr(key).encode())
            _update_data(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for item in obj:
            _update_data(digest, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        digest.update(repr(obj).encode())
    else:  # an object we cannot read reproducibly: its type only
        digest.update(type(obj).__qualname__.encode())


def data_digest(samples: Iterable[Any]) -> str:
    """SHA-256 of calibration samples (tensors, dicts, tuples, numbers, strings)."""
    digest = hashlib.sha256()
    for sample in samples:
        _update_data(digest, sample)
    return digest.hexdigest()


def state_digest(targets: list[Target]) -> str:
    """SHA-256 of the targets' stored parameters and keep-masks (None: unmasked)."""
    digest = hashlib.sha256()
    for t in targets:
        digest.update(t.name.encode())
        _update(digest, raw_parameter(t.module, t.param_name))
        mask = get_mask(t.module, t.param_name)
        digest.update(b"masked" if mask is not None else b"unmasked")
        if mask is not None:
            _update(digest, mask)
    return digest.hexdigest()


def model_digest(model: nn.Module, targets: list[Target]) -> str:
    """SHA-256 of every parameter and buffer of ``model`` except the targets and their masks."""
    skip = {t.name for t in targets} | {t.name + MASK_SUFFIX for t in targets}
    digest = hashlib.sha256()
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if name not in skip:
            digest.update(name.encode())
            _update(digest, tensor)
    return digest.hexdigest()


def _replace(tmp: Path, final: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def check_marker(model: nn.Module, checkpoint: str | os.PathLike | None, propagate: str) -> None:
    """Refuse a model left half pruned by an interrupted in-place ``oneshot`` unless the call
    resumes it (same checkpoint, pruned propagation)."""
    marker = getattr(model, MARKER, None)
    if marker is None:
        return
    where = f"{marker.get('done_blocks')} of {marker.get('of')} stages"
    saved = marker.get("checkpoint")
    if saved is None or checkpoint is None or Path(saved).resolve() != Path(checkpoint).resolve():
        how = (
            f"call oneshot with the same arguments and checkpoint={saved!r} to resume, or "
            if saved is not None
            else ""
        )
        raise ValueError(
            f"this model was pruned in place by an interrupted oneshot ({where} done, see "
            f"model.{MARKER}): {how}reload the dense model (delete model.{MARKER} to prune the "
            "model as it is)"
        )
    if propagate == "dense":
        raise ValueError(
            f"this model was pruned in place by an interrupted oneshot ({where} done): with "
            "propagate='dense' the dense outputs of its finished blocks are needed, which it "
            "no longer has; reload the dense model and call again with the same checkpoint"
        )


class OneshotProgress:
    """Tracks oneshot's stages: the checkpoint folder (optional), the rollback of an
    interrupted stage and the marker of an interrupted in-place run."""

    def __init__(
        self,
        model: nn.Module,
        stages: list[Stage],
        folder: str | os.PathLike | None,
        settings: dict[str, Any],
        inplace: bool,
    ) -> None:
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a folder path, got {type(folder).__name__}")
        self.model = model
        self.stages = {s.key: s for s in stages}
        self.order = [s.key for s in stages]
        self.folder = Path(folder) if folder is not None else None
        self.settings = _plain(settings)
        self.inplace = inplace
        self.meta: dict[str, Any] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.applied: set[str] = set()
        self.resumed = 0
        self.writer = True
        """False on torch.distributed ranks other than 0: they read the folder, never write it."""
        self.saved_settings: dict[str, Any] | None = None  # an existing checkpoint's, once read
        self._current: tuple[str, str | None, list | None] | None = None

    # -- the folder ---------------------------------------------------------------------------

    def open(self) -> None:
        """Read and validate an existing checkpoint (model included), or start a new one."""
        if self.folder is None:
            return
        meta_path = self.folder / META
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint {os.fspath(self.folder)!r} is a file, not a folder")
        if meta_path.exists():
            self.meta = self._read(meta_path)
            self.done = self.meta["done"]
            self._check_files()
            self._check_model()
            self.resumed = len(self.done)
        else:
            if self.writer:
                self.folder.mkdir(parents=True, exist_ok=True)
            self.meta = {
                "format": FORMAT,
                "version": VERSION,
                "settings": self.settings,
                "allocation": {},
                "done": {},
            }
            self._write_meta()
        if not self.writer:
            return
        for path in self.folder.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name and path.is_file():
                path.unlink(missing_ok=True)

    def _read(self, meta_path: Path) -> dict[str, Any]:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{meta_path}: not a readable oneshot checkpoint ({exc})") from exc

        def bad(field: str, expected: str, got: Any) -> ValueError:
            return ValueError(f"{meta_path}: field {field!r}: expected {expected}, got {got!r}")

        if not isinstance(meta, dict):
            raise bad("(top level)", "an object", type(meta).__name__)
        if meta.get("format") != FORMAT:
            raise bad("format", repr(FORMAT), meta.get("format"))
        if meta.get("version") != VERSION:
            raise bad("version", str(VERSION), meta.get("version"))
        for field in ("settings", "allocation", "done"):
            if not isinstance(meta.get(field), dict):
                raise bad(field, "an object", meta.get(field))
        saved = self.saved_settings = meta["settings"]
        diffs = [
            f"{key}: checkpoint {_short(saved.get(key))}, this call {_short(self.settings.get(key))}"
            for key in sorted(set(saved) | set(self.settings))
            if saved.get(key) != self.settings.get(key)
        ]
        if diffs:
            raise ValueError(
                f"checkpoint {os.fspath(self.folder)!r} is of another oneshot run ("
                + "; ".join(diffs[:6])
                + "): call oneshot with the same model, data and arguments to resume, or pass "
                "another checkpoint folder (or delete this one) to start afresh"
            )
        done = meta["done"]
        if list(done) != self.order[: len(done)]:
            raise bad("done", f"the first stages in order {self.order[: len(done)]}", list(done))
        for key, entry in done.items():
            where = f"done.{key}"
            if not isinstance(entry, dict):
                raise bad(where, "an object", entry)
            if entry.get("file") != self.stages[key].file:
                raise bad(f"{where}.file", repr(self.stages[key].file), entry.get("file"))
            for field in ("sha256", "before", "after"):
                value = entry.get(field)
                if not (isinstance(value, str) and len(value) == 64):
                    raise bad(f"{where}.{field}", "a SHA-256 hex digest", value)
            names = {t.name for t in self.stages[key].targets}
            allocated = entry.get("allocated")
            if not isinstance(allocated, dict) or not all(
                k in names and isinstance(v, (int, float)) for k, v in allocated.items()
            ):
                raise bad(f"{where}.allocated", "{target name: sparsity} of this stage", allocated)
            fallbacks = entry.get("fallbacks")
            if not isinstance(fallbacks, dict) or not all(
                k in names and isinstance(v, str) for k, v in fallbacks.items()
            ):
                raise bad(f"{where}.fallbacks", "{target name: reason} of this stage", fallbacks)
        return meta

    def _check_files(self) -> None:
        """Every finished stage's file: present, checksum, names, dtypes and shapes."""
        for key, entry in self.done.items():
            path = self.folder / entry["file"]
            if not path.is_file():
                raise ValueError(f"{path}: missing (recorded as finished in {META})")
            if sha256_file(path) != entry["sha256"]:
                raise ValueError(f"{path}: checksum differs from {META} (a damaged file)")
            try:
                with safe_open(str(path), framework="pt") as f:
                    header = {name: f.get_slice(name) for name in f.keys()}
                    layout = {n: (s.get_dtype(), tuple(s.get_shape())) for n, s in header.items()}
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
            expected: dict[str, tuple[str, tuple[int, ...]]] = {}
            for t in self.stages[key].targets:
                param = raw_parameter(t.module, t.param_name)
                expected[t.name] = (_st_dtype(param.dtype), tuple(param.shape))
                expected[t.name + MASK_KEY] = ("U8", (-(-param.numel() // 8),))
            for name, got in layout.items():
                if name not in expected:
                    raise ValueError(f"{path}: tensor {name!r} is not a target of stage {key}")
                if got != expected[name]:
                    raise ValueError(
                        f"{path}: tensor {name!r} is {got[0]} {list(got[1])}, expected "
                        f"{expected[name][0]} {list(expected[name][1])}"
                    )
            missing = [n for n in expected if not n.endswith(MASK_KEY) and n not in layout]
            if missing:
                raise ValueError(f"{path}: lacks the weights of {', '.join(missing)}")

    def _check_model(self) -> None:
        """Each finished stage of the model must be as before pruning (a fresh model) or as
        after (a model pruned in place by the interrupted run)."""
        for key, entry in self.done.items():
            if state_digest(self.stages[key].targets) not in (entry["before"], entry["after"]):
                raise ValueError(
                    f"checkpoint {os.fspath(self.folder)!r}: the model's weights in stage {key} "
                    "are neither those the checkpointed run started from nor those it wrote; "
                    "resume with the model that run started from"
                )

    def _write_meta(self) -> None:
        self.meta["done"] = self.done
        if not self.writer:
            return
        path = self.folder / META
        tmp = path.with_name(f".{META}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.meta, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)

    # -- allocation -----------------------------------------------------------------------------

    def allocation(self, kind: str) -> Any:
        """A stored allocation (``"per_block"`` or ``"per_layer"``), or None."""
        return self.meta.get("allocation", {}).get(kind) if self.folder else None

    def save_allocation(self, kind: str, value: Any) -> None:
        if self.folder is not None:
            self.meta["allocation"][kind] = _plain(value)
            self._write_meta()

    # -- stages ---------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.order)

    def is_done(self, key: str) -> bool:
        return key in self.done

    def restore(self, key: str, pruner: Any) -> None:
        """Put a finished stage's pruned weights and masks into the model."""
        entry, stage = self.done[key], self.stages[key]
        if state_digest(stage.targets) != entry["after"]:  # not already pruned in place
            tensors = load_file(str(self.folder / entry["file"]))
            with torch.no_grad():
                for t in stage.targets:
                    raw = raw_parameter(t.module, t.param_name)
                    raw.copy_(tensors[t.name].to(raw.device))
                    if t.name + MASK_KEY in tensors:
                        keep = unpack_mask(tensors[t.name + MASK_KEY], tuple(raw.shape))
                        apply_mask(t.module, t.param_name, keep)
        pruner.allocated.update(entry["allocated"])
        pruner.fallbacks.update(entry["fallbacks"])
        self.applied.add(key)

    def begin(self, key: str) -> None:
        """Before pruning a stage: its digest, and (in place) a copy to roll back to."""
        targets = self.stages[key].targets
        before = state_digest(targets) if self.folder is not None else None
        snapshot = None
        if self.inplace:
            snapshot = [
                (
                    t,
                    raw_parameter(t.module, t.param_name).detach().clone(),
                    get_mask(t.module, t.param_name),
                )
                for t in targets
            ]
        self._current = (key, before, snapshot)

    def finish(self, key: str, pruner: Any) -> None:
        """After pruning a stage: record it in the checkpoint (atomically)."""
        if self._current is None or self._current[0] != key:
            raise RuntimeError(f"stage {key} finished without begin()")
        targets = self.stages[key].targets
        if self.folder is not None and self.writer:
            tensors: dict[str, torch.Tensor] = {}
            for t in targets:
                tensors[t.name] = raw_parameter(t.module, t.param_name).detach().cpu().contiguous()
                mask = get_mask(t.module, t.param_name)
                if mask is not None:
                    tensors[t.name + MASK_KEY] = pack_mask(mask)
            path = self.folder / self.stages[key].file
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file(tensors, str(tmp))
            sha = sha256_file(tmp)
            _replace(tmp, path)
            names = {t.name for t in targets}
            self.done[key] = {
                "file": path.name,
                "sha256": sha,
                "before": self._current[1],
                "after": state_digest(targets),
                "allocated": {k: v for k, v in pruner.allocated.items() if k in names},
                "fallbacks": {k: v for k, v in pruner.fallbacks.items() if k in names},
            }
            self._write_meta()
        self.applied.add(key)
        self._current = None

    # -- interruption -----------------------------------------------------------------------

    def rollback(self) -> None:
        """Restore the stage in progress to how it was before (in place only)."""
        current, self._current = self._current, None
        if current is None or current[2] is None:
            return
        with torch.no_grad():
            for t, weight, mask in current[2]:
                remove_mask(t.module, t.param_name)
                raw_parameter(t.module, t.param_name).copy_(weight)
                if mask is not None:
                    apply_mask(t.module, t.param_name, mask)

    def interrupted(self) -> None:
        """The run stopped with an exception: roll back, then mark an in-place model."""
        self.rollback()
        if not self.inplace:
            return
        done = [k for k in self.order if k in self.applied]
        if not done:  # nothing of this run is in the model
            if hasattr(self.model, MARKER):
                delattr(self.model, MARKER)
            return
        following = [k for k in self.order if k not in self.applied]
        info = {
            "done_blocks": len(done),
            "of": len(self.order),
            "done": done,
            "next": following[0] if following else None,
            "checkpoint": os.fspath(self.folder) if self.folder is not None else None,
        }
        setattr(self.model, MARKER, info)
        resume = (
            f"call oneshot again with the same arguments and checkpoint={info['checkpoint']!r} "
            "to resume, or reload the dense model"
            if self.folder is not None
            else "reload the dense model (no checkpoint was given, so it cannot resume)"
        )
        warnings.warn(
            f"prunekit: oneshot was interrupted with {len(done)} of {len(self.order)} stages "
            f"pruned in place ({info['next']} onwards untouched); model.{MARKER} records it; "
            + resume,
            stacklevel=3,
        )

    def completed(self) -> None:
        if hasattr(self.model, MARKER):
            delattr(self.model, MARKER)


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
}


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPES.get(dtype, str(dtype))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
