"""The ``prunekit`` command.

    prunekit --version
    prunekit stats PATH [--json]
    prunekit prune PATH --sparsity 0.5 --pattern 2:4 --out OUT
    prunekit oneshot MODEL_DIR --method sparsegpt --pattern 2:4 --calib FILE --out OUT
    prunekit prune-structured MODEL_DIR --out OUT --ratio 0.3 --unit channel
    prunekit count MODEL_DIR
    prunekit bench MODEL_DIR [MODEL_DIR2 ...] --batch 1 32 --seq-len 128

For ``stats``, PATH is a Hugging Face model folder (``config.json`` + ``*.safetensors``), a
folder written by ``prunekit.save``, or a single ``.safetensors`` file; it reads the tensors
directly (compressed ones decoded) and needs no model code. Layers are listed in model order;
"whole model" counts each parameter once and no buffers, as ``count`` does (see
:mod:`prunekit.file_stats`). ``prune`` takes a Hugging Face folder or a safetensors file. ``prune`` on a Hugging Face folder loads the model with ``transformers``
(``pip install prunekit[hf]``) and writes a folder that ``from_pretrained`` loads; on a bare
safetensors file it prunes every weight matrix or conv kernel in PyTorch's (out, in, ...) layout
and writes a safetensors file with the same keys. Output goes to a temporary name and is renamed
into place at the end; the input is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit._version import __version__
from prunekit.compress.io import META_FILE, _atomic_dir_write
from prunekit.graph import StructuredPruningError, UnsupportedOperationError
from prunekit.masks import finalize
from prunekit.prune import prune
from prunekit.report import SparsityReport

# Tensors of a bare safetensors file that are not pruned unless named in --targets.
FILE_DEFAULT_IGNORE = r"(^|.*\.)(embed\w*|wte|wpe|lm_head|\w*norm\w*|ln_\w*|head|classifier)\..*"


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------- reading tensors


def _file_stats(path: Path) -> SparsityReport:
    from prunekit.file_stats import file_stats

    return file_stats(path)


# ---------------------------------------------------------------- pruning a bare file


def _module_for(tensor: torch.Tensor) -> nn.Module:
    """A bias-free Linear or ConvNd whose weight is ``tensor`` (PyTorch layout)."""
    if tensor.dim() == 2:
        module: nn.Module = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device="meta")
    else:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[tensor.dim()]
        module = conv(
            tensor.shape[1], tensor.shape[0], tuple(tensor.shape[2:]), bias=False, device="meta"
        )
    module.weight = nn.Parameter(tensor, requires_grad=False)
    return module


def _tree_from_tensors(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Modules nested by the tensors' dotted names, so name patterns work as on a real model."""
    root = nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        if leaf != "weight" or not tensor.is_floating_point() or not 2 <= tensor.dim() <= 5:
            continue
        parent = root
        for part in path[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(path[-1] if path else "weight_", _module_for(tensor))
    return root


def _prune_file(args: argparse.Namespace, source: Path, out: Path) -> SparsityReport:
    tensors = load_file(str(source))
    tree = _tree_from_tensors(tensors)
    layer_names = [
        n
        for n, m in tree.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    if not layer_names:
        raise CliError(
            f"{source}: no weight matrix or conv kernel (a '*.weight' tensor of 2-5 dims) to prune"
        )
    targets = args.targets or [
        n for n in layer_names if not re.fullmatch(FILE_DEFAULT_IGNORE, n + ".weight")
    ]
    if not targets:
        raise CliError(
            "every weight in the file matches the default ignore list; name layers with --targets"
        )
    report = prune(tree, **_prune_options(args), targets=targets, inplace=True)
    finalize(tree, inplace=True)
    for name, module in tree.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            tensors[f"{name}.weight" if name != "weight_" else "weight"] = module.weight.detach()
    meta = {
        "prunekit": json.dumps({"prunekit_version": __version__, **report.to_dict()["settings"]})
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


# ---------------------------------------------------------------- pruning a Hugging Face folder


def _load_hf(path: Path) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CliError(
            "pruning a Hugging Face folder needs transformers: pip install 'prunekit[hf]'"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls or transformers.AutoModel
    if not any(path.glob("*.safetensors")):
        raise CliError(
            f"{path}: no *.safetensors weights. prunekit never loads pickle (.bin/.pt); convert "
            "with transformers: Model.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    return cls.from_pretrained(path, local_files_only=True, use_safetensors=True)


def _write_hf(
    model: nn.Module, source: Path, out: Path, report: SparsityReport, overwrite: bool
) -> None:
    """Finalize the model and write it as a Hugging Face folder with the source's side files."""
    finalize(model, inplace=True)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        for item in source.iterdir():  # tokenizer and other side files
            if (
                item.is_file()
                and not (folder / item.name).exists()
                and item.suffix not in (".safetensors", ".bin")
            ):
                shutil.copy2(item, folder / item.name)
        meta = {"format": "prunekit-hf", "prunekit_version": __version__, **report.to_dict()}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    _atomic_dir_write(out, overwrite, write)


def _prune_hf(args: argparse.Namespace, source: Path, out: Path) -> SparsityReport:
    model = _load_hf(source)
    report = prune(model, **_prune_options(args), targets=args.targets or None, inplace=True)
    _write_hf(model, source, out, report, args.overwrite)
    return report


def _oneshot_hf(args: argparse.Namespace, source: Path, out: Path) -> SparsityReport:
    from prunekit.calibrate.oneshot import oneshot
    from prunekit.cli_hf import tokenizer_and_calibration

    _, calib = tokenizer_and_calibration(
        source,
        args.calib,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        command="oneshot",
    )
    model = _load_hf(source)  # once, after the cheap checks
    report = oneshot(
        model,
        calib,
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        allocation=args.allocation,
        per_layer=_per_layer(args),
        targets=args.targets or None,
        ignore=args.ignore or None,
        seed=args.seed,
        inplace=True,
        progress=True,
    )
    _write_hf(model, source, out, report, args.overwrite)
    return report


# ---------------------------------------------------------------- commands


def _prune_options(args: argparse.Namespace) -> dict:
    return {
        "sparsity": args.sparsity,
        "method": args.method,
        "pattern": args.pattern,
        "scope": args.scope,
        "ignore": args.ignore or None,
        "seed": args.seed,
        "per_layer": _per_layer(args),
    }


def _per_layer(args: argparse.Namespace) -> dict[str, float] | None:
    """``--per-layer FILE``: an allocation written by ``prunekit analyze`` (or {layer: s})."""
    from prunekit.analysis.allocate import load_per_layer

    return load_per_layer(args.per_layer) if getattr(args, "per_layer", None) else None


def _cmd_stats(args: argparse.Namespace) -> int:
    report = _file_stats(Path(args.path))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _check_out(source: Path, out: Path, overwrite: bool) -> None:
    if not source.exists():
        raise CliError(f"{source}: no such file or folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise CliError(
            f"--out {out} would overwrite or nest inside the input {source}; choose another path"
        )
    if out.exists() and not overwrite:
        raise CliError(f"{out} already exists; pass --overwrite to replace it")


def _print_written(report: SparsityReport, out: Path) -> None:
    for row in report.layers:
        row.masked = False  # the written model is finalized: zeros baked in, no masks
    print(report)
    print(f"wrote {out}")


def _cmd_prune(args: argparse.Namespace) -> int:
    source, out = Path(args.path), Path(args.out)
    _check_out(source, out, args.overwrite)
    if args.method not in ("magnitude", "random"):
        raise CliError(
            f"--method {args.method!r} is not available from the command line; accepted: magnitude, random"
        )
    if source.is_dir() and (source / "config.json").is_file():
        report = _prune_hf(args, source, out)
    elif source.is_file():
        from prunekit.file_stats import safetensors_files

        safetensors_files(source)  # a .safetensors file, or a clear error
        report = _prune_file(args, source, out)
    else:
        raise CliError(
            f"{source}: expected a Hugging Face model folder (with config.json) or a .safetensors file"
        )
    _print_written(report, out)
    return 0


def _cmd_oneshot(args: argparse.Namespace) -> int:
    source, out = Path(args.path), Path(args.out)
    _check_out(source, out, args.overwrite)
    if not (source.is_dir() and (source / "config.json").is_file()):
        raise CliError(f"{source}: oneshot needs a Hugging Face model folder (with config.json)")
    _print_written(_oneshot_hf(args, source, out), out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit",
        description="Prune PyTorch and Hugging Face models; inspect their sparsity.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    stats = commands.add_parser(
        "stats", help="per-layer sparsity of a safetensors file or model folder"
    )
    stats.add_argument(
        "path", help="a .safetensors file, a Hugging Face folder or a prunekit save folder"
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=_cmd_stats)

    p = commands.add_parser("prune", help="prune a Hugging Face folder or a safetensors file")
    p.add_argument("path", help="a Hugging Face model folder or a .safetensors file")
    p.add_argument("--out", required=True, help="output folder (HF input) or .safetensors file")
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction of zeros, [0, 1) (default 0.5; implied by N:M)",
    )
    p.add_argument(
        "--pattern", default="unstructured", help="unstructured, N:M (e.g. 2:4) or block:RxC"
    )
    p.add_argument("--method", default="magnitude", help="magnitude or random")
    p.add_argument("--scope", default="global", choices=["global", "local"])
    p.add_argument(
        "--targets", nargs="*", default=[], help="name patterns of layers to prune (glob or re:...)"
    )
    p.add_argument("--ignore", nargs="*", default=[], help="name patterns of layers to leave alone")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random")
    p.add_argument("--per-layer", default=None, help="per-layer sparsities (prunekit analyze)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_prune)

    o = commands.add_parser(
        "oneshot", help="calibrated one-shot pruning of a Hugging Face model (Wanda, SparseGPT)"
    )
    o.add_argument("path", help="a Hugging Face model folder with its tokenizer")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    o.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction of zeros per layer, [0, 1) (default 0.5; implied by N:M)",
    )
    o.add_argument("--pattern", default="unstructured", help="unstructured or N:M (e.g. 2:4)")
    o.add_argument("--allocation", default="uniform", choices=["uniform", "owl"])
    o.add_argument(
        "--calib", default=None, help="calibration text file (default: CPython's pydoc prose)"
    )
    o.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    o.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    o.add_argument("--targets", nargs="*", default=[], help="name patterns of layers to prune")
    o.add_argument("--ignore", nargs="*", default=[], help="name patterns of layers to leave alone")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--per-layer", default=None, help="per-layer sparsities (prunekit analyze)")
    o.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    o.set_defaults(func=_cmd_oneshot)

    from prunekit.analysis.cli import add_commands as add_analysis_commands
    from prunekit.graph.cli import add_commands as add_graph_commands
    from prunekit.recipes.cli import add_commands as add_recipe_commands
    from prunekit.runtime.cli import add_commands as add_runtime_commands

    add_graph_commands(commands)  # prune-structured, count
    add_analysis_commands(commands)  # analyze
    add_runtime_commands(commands)  # bench
    add_recipe_commands(commands)  # compress, recipes
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (
        CliError,
        ValueError,
        TypeError,
        OSError,
        SafetensorError,
        UnsupportedOperationError,
        StructuredPruningError,
    ) as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
