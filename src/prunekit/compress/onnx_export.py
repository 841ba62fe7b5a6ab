"""Export finalized or structurally pruned models to ONNX, checked in onnxruntime.

Needs the ``onnx`` extra: ``pip install 'prunekit[onnx]'`` (onnx and onnxruntime).

Example:
    >>> import torch, prunekit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pruned = prunekit.finalize(prunekit.prune(net, 0.5).model)
    >>> result = export_onnx(pruned, torch.randn(3, 8), "pruned.onnx")  # doctest: +SKIP
    >>> result.max_abs_diff < 1e-4  # doctest: +SKIP
    True

Masked models (straight out of ``prunekit.prune``) are refused: call ``prunekit.finalize`` first,
so that what is exported is the plain architecture with its zeros baked in. The export first
tries PyTorch's TorchScript-based exporter (``dynamo=False``), which needs no extra package and
handles plain CNNs and MLPs; where it fails (Hugging Face transformers models: unsupported
operators such as ``aten::diff`` in their attention masks) or the PyTorch version no longer
offers it, the torch.export-based exporter is used, which needs ``onnxscript``. ONNX stores
the zeros of an unstructured-pruned model as dense weights: the file compresses well, but runs
no faster; structured pruning gives a smaller, faster graph.

Keyword inputs (a tokenizer's ``dict``, in any key order) become graph inputs named after their
keys, ordered as ``model.forward`` lists them; the file is written to a temporary name and moved
to ``path`` only after the onnxruntime check passed, so a failed export leaves nothing there.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.masks import masked_parameters
from prunekit.runtime.accelerated import refuse_accelerated

__all__ = ["OnnxCheckError", "OnnxExport", "export_onnx"]

EXTRA_HINT = "pip install 'prunekit[onnx]' (or: pip install onnx onnxruntime)"


class OnnxCheckError(RuntimeError):
    """The exported ONNX model's outputs differ from PyTorch's by more than the tolerance."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` returns: where the file is and how well it matched PyTorch."""

    path: Path
    opset: int | None
    exporter: str
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float | None  # None when check=False
    atol: float
    dynamic_batch: bool = False  # whether the file's inputs have a symbolic leading dimension

    def __str__(self) -> str:
        check = (
            "not checked"
            if self.max_abs_diff is None
            else f"onnxruntime max abs diff {self.max_abs_diff:.3g} (tolerance {self.atol:g})"
        )
        return (
            f"wrote {self.path} (opset {self.opset}, {self.exporter} exporter, "
            f"{'dynamic' if self.dynamic_batch else 'fixed'} batch); "
            f"inputs {', '.join(self.input_names)}; outputs {', '.join(self.output_names)}; {check}"
        )


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"export_onnx needs {module}: {EXTRA_HINT}") from exc


def _flatten(outputs: Any) -> list[torch.Tensor]:
    """Output tensors in the order the exporter flattens them (tensors, tuples, dicts)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if hasattr(outputs, "to_tuple"):  # Hugging Face ModelOutput
        outputs = outputs.to_tuple()
    if isinstance(outputs, Mapping):
        return [t for v in outputs.values() for t in _flatten(v)]
    if isinstance(outputs, (list, tuple)):
        return [t for v in outputs for t in _flatten(v)]
    return []


class _Inputs(nn.Module):
    """Calls ``model`` with exactly the example's tensors: positionally, or by keyword when
    ``keywords`` names them (plus the ``fixed`` non-tensor values, such as ``use_cache=False``).

    The exported graph then takes those tensors positionally in one known order whatever order
    an exporter would flatten a keyword dict in, and the TorchScript exporter does not fill in
    the model's other defaults itself (which breaks Hugging Face models).
    """

    def __init__(
        self,
        model: nn.Module,
        keywords: list[str] | None = None,
        fixed: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.keywords = keywords
        self.fixed = dict(fixed or {})
        self.training = False  # the wrapped model's own flags are left as they are

    def forward(self, *tensors: torch.Tensor) -> Any:
        if self.keywords is None:
            return self.model(*tensors)
        return self.model(**dict(zip(self.keywords, tensors, strict=True)), **self.fixed)


def _split(
    example_inputs: Any, model: nn.Module
) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    """(module to export, its positional tensor inputs, the names of those inputs in order).

    Keyword (dict) inputs are ordered as ``model.forward``'s signature lists them (keys it does
    not name follow in the dict's order) and bound by name through :class:`_Inputs`, so any key
    order gives the same graph with correctly named inputs.
    """
    if isinstance(example_inputs, torch.Tensor):
        return _Inputs(model), (example_inputs,), ["input"]
    if isinstance(example_inputs, tuple):
        if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError(
                "export_onnx: positional example inputs must be a non-empty tuple of tensors"
            )
        names = (
            ["input"]
            if len(example_inputs) == 1
            else [f"input_{i}" for i in range(len(example_inputs))]
        )
        return _Inputs(model), example_inputs, names
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("export_onnx: keyword example inputs need string keys")
        names = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
        if not names:
            raise ValueError("export_onnx: the keyword example inputs hold no tensor")
        order = list(inspect.signature(model.forward).parameters)
        names.sort(key=lambda k: order.index(k) if k in order else len(order))  # stable
        fixed = {k: v for k, v in example_inputs.items() if k not in names}
        target = _Inputs(model, names, fixed)
        return target, tuple(example_inputs[k] for k in names), names
    raise TypeError(
        "export_onnx: example_inputs must be a tensor, a tuple of tensors or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _export(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_batch: bool,
    exporter: str,
) -> str:
    params = inspect.signature(torch.onnx.export).parameters
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    options: dict[str, Any] = {
        "input_names": input_names,
        "output_names": output_names,
        "dynamic_axes": axes,
    }
    if opset is not None:
        options["opset_version"] = opset
    has_dynamo = "dynamo" in params
    if exporter in ("auto", "torchscript"):
        try:
            with warnings.catch_warnings():
                # the TorchScript exporter announces its own deprecation; its files are valid
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX.*")
                extra = {"dynamo": False} if has_dynamo else {}
                torch.onnx.export(
                    model, args, str(path), do_constant_folding=True, **options, **extra
                )
            return "torchscript"
        except Exception as exc:
            if exporter == "torchscript" or not has_dynamo:
                raise
            if not _has_onnxscript():
                raise RuntimeError(
                    f"export_onnx: the TorchScript exporter failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300]}); the torch.export-based exporter may "
                    "succeed but needs onnxscript: pip install onnxscript"
                ) from exc
    if not has_dynamo:
        raise ValueError("export_onnx: this PyTorch has no torch.export-based ONNX exporter")
    if not _has_onnxscript():
        raise ImportError("export_onnx(exporter='dynamo') needs onnxscript: pip install onnxscript")
    options.pop("dynamic_axes")
    if dynamic_batch:
        batch = torch.export.Dim.AUTO
        # one entry, for _Inputs.forward's *tensors, holding one entry a tensor
        shapes: Any = (tuple({0: batch} if a.dim() else None for a in args),)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
                torch.onnx.export(
                    model, args, str(path), dynamo=True, dynamic_shapes=shapes, **options
                )
            return "dynamo"
        except Exception as exc:
            warnings.warn(
                f"export_onnx: a dynamic batch dimension failed ({type(exc).__name__}); "
                "exported with the example's fixed batch size",
                stacklevel=3,
            )
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, args, str(path), dynamo=True, **options)
    return "dynamo"


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    check: bool = True,
    opset: int | None = None,
    atol: float = 1e-4,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> OnnxExport:
    """Write ``model`` to ``path`` as ONNX and (``check=True``) verify it in onnxruntime.

    Args:
        model: a plain model: finalized (``prunekit.finalize``) or structurally pruned
            (``prunekit.prune_structured``), or never pruned. A model that still carries
            prunekit masks is refused with a ``ValueError``: call ``prunekit.finalize`` first.
        example_inputs: a tensor (graph input ``input``), a tuple of tensors (positional
            inputs ``input_0``, ``input_1``, ...) or a dict of keyword inputs in any key order,
            such as ``dict(tokenizer(texts, return_tensors="pt"))``: each tensor becomes a graph
            input named after its key, in ``model.forward``'s order; non-tensor values, like
            ``use_cache=False``, are fixed into the graph.
        path: the ``.onnx`` file to write (parent folders are created).
        check: run the file in onnxruntime (CPU) on ``example_inputs`` and compare with
            PyTorch's outputs; raise :class:`OnnxCheckError` if the largest absolute
            difference exceeds ``atol`` (then nothing is written at ``path``).
        opset: ONNX opset version; None lets PyTorch choose.
        atol: tolerance of the check.
        dynamic_batch: make the leading dimension of every input and output symbolic, so the
            file serves any batch size.
        exporter: ``"torchscript"`` (PyTorch's TorchScript-based exporter, ``dynamo=False``:
            needs no extra package), ``"dynamo"`` (the torch.export-based one: needs
            ``onnxscript``; Hugging Face transformers models need it) or ``"auto"``: TorchScript
            first, then torch.export's if that fails and onnxscript is installed.

    Returns:
        An :class:`OnnxExport` with the path, opset, exporter and the max abs difference.

    The model is exported in eval mode (its train/eval flags are restored afterwards) on the
    device it is on; the check runs on CPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    refuse_accelerated(model, "export_onnx")  # the C kernels do not export
    masked = [f"{m}.{p}" if m else p for m, _, p in masked_parameters(model)]
    if masked:
        shown = ", ".join(masked[:3]) + (", ..." if len(masked) > 3 else "")
        raise ValueError(
            f"export_onnx: the model still carries prunekit masks ({shown}); call "
            "model = prunekit.finalize(model) first to bake the zeros into plain weights"
        )
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(
            f"export_onnx: exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}"
        )
    if not (isinstance(atol, (int, float)) and atol >= 0):
        raise ValueError(f"export_onnx: atol must be a number >= 0, got {atol!r}")
    target, args, input_names = _split(example_inputs, model)
    onnx = _require("onnx")
    ort = _require("onnxruntime") if check else None
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"export_onnx: {path} is a folder; give a file name like model.onnx"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written in a temporary folder next to the target (with the target's file name, so any
    # external-data file it references keeps its name) and moved into place only once checked:
    # a file that fails the check is never left at ``path``.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        result = _export_and_check(
            model,
            target,
            args,
            tmp / path.name,
            path,
            input_names,
            onnx,
            ort,
            opset,
            atol,
            dynamic_batch,
            exporter,
        )
        for extra in sorted(tmp.iterdir()):  # external data first, the .onnx file last
            if extra.name != path.name:
                os.replace(extra, path.parent / extra.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.path = path
    return result


def _export_and_check(
    model: nn.Module,
    target: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    final: Path,
    input_names: list[str],
    onnx: Any,
    ort: Any,
    opset: int | None,
    atol: float,
    dynamic_batch: bool,
    exporter: str,
) -> OnnxExport:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            expected = _flatten(target(*args))
        if not expected:
            raise TypeError("export_onnx: the model returned no tensor")
        output_names = (
            ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
        )
        exporter = _export(
            target, args, path, input_names, output_names, opset, dynamic_batch, exporter
        )
    finally:
        for module, training in modes:
            module.train(training)

    proto = onnx.load(str(path), load_external_data=False)
    used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    graph_outputs = [o.name for o in proto.graph.output]
    graph_inputs = [i.name for i in proto.graph.input]
    dims = [i.type.tensor_type.shape.dim for i in proto.graph.input]
    dynamic = bool(dims) and all(len(d) > 0 and d[0].dim_param for d in dims if len(d))
    unknown = [n for n in graph_inputs if n not in input_names]
    if unknown or graph_inputs != [n for n in input_names if n in graph_inputs]:
        raise OnnxCheckError(
            f"export_onnx: the ONNX graph's inputs {graph_inputs} do not match the example "
            f"inputs {input_names}; {final} was not written"
        )
    result = OnnxExport(
        path, used_opset, exporter, graph_inputs, graph_outputs, None, float(atol), dynamic
    )
    if ort is None:
        return result

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = dict(zip(input_names, args, strict=True))
    feed = {i.name: tensors[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    got = session.run(None, feed)
    if len(got) != len(expected):
        raise OnnxCheckError(f"export_onnx: ONNX gives {len(got)} outputs, PyTorch {len(expected)}")
    diff = 0.0
    for want, have in zip(expected, got, strict=True):
        want_np = want.detach().cpu().float().numpy()
        if tuple(want_np.shape) != tuple(have.shape):
            raise OnnxCheckError(
                f"export_onnx: ONNX output shape {tuple(have.shape)} != PyTorch {tuple(want_np.shape)}"
            )
        if want_np.size:
            diff = max(diff, float(abs(want_np - have.astype(want_np.dtype)).max()))
    result.max_abs_diff = diff
    if not diff <= atol:
        raise OnnxCheckError(
            f"export_onnx: the exported model differs from PyTorch by up to {diff:.3g} "
            f"(tolerance {atol:g}); {final} was not written"
        )
    return result
