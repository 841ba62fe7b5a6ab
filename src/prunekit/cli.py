"""The ``prunekit`` command.

    prunekit --version
    prunekit stats PATH [--json]
    prunekit prune PATH --sparsity 0.5 --pattern 2:4 --out OUT
    prunekit oneshot MODEL_DIR --method sparsegpt --pattern 2:4 --calib FILE --out OUT
    prunekit prune-structured MODEL_DIR --out OUT --ratio 0.3 --unit channel
    prunekit count MODEL_DIR
    prunekit quantize MODEL_DIR --out OUT --bits 8
    prunekit finetune MODEL_DIR --out OUT --data FILE [--teacher DENSE_DIR]
    prunekit export MODEL_DIR --out model.onnx
    prunekit eval MODEL_DIR --reference DENSE_DIR
    prunekit bench MODEL_DIR [MODEL_DIR2 ...] --batch 1 32 --seq-len 128

Every command's output folder is a valid input of every other command: folders are loaded with
:func:`prunekit.from_pretrained` (pruned per-layer shapes rebuilt, compressed weights decoded)
and written with :func:`prunekit.save_pretrained` (surgery record, the source folder's side
files, the run record: command line and seed). Arguments, inputs and ``--out`` are checked
before any model is loaded; a bad input is one line on stderr and exit status 2. This module
holds ``stats``, ``prune`` and ``oneshot``; the others live in :mod:`prunekit.cli_commands`,
:mod:`prunekit.graph.cli`, :mod:`prunekit.analysis.cli`, :mod:`prunekit.runtime.cli` and
:mod:`prunekit.recipes.cli`. See docs/cli.md.

For ``stats``, PATH is a Hugging Face model folder (``config.json`` + ``*.safetensors``), a
folder written by ``prunekit.save``, or a single ``.safetensors`` file; it reads the tensors
directly (compressed ones decoded) and needs no model code. Layers are listed in model order;
"whole model" counts each parameter once and no buffers, as ``count`` does (see
:mod:`prunekit.file_stats`). ``prune`` on a bare safetensors file prunes every weight matrix or
conv kernel in PyTorch's (out, in, ...) layout (not embeddings, norms, heads or poolers unless
named in ``--targets``) and writes a safetensors file with the same keys. Output goes to a
temporary name and is renamed into place at the end; the input is never overwritten.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit._version import __version__
from prunekit.cli_commands.common import (
    CliError,
    HelpFormatter,
    Parser,
    check_not_inside,
    check_output,
    check_text_file,
    check_writable,
    examples,
    fraction,
    hf_source,
    input_file,
    load_hf,
    loading_note,
    positive_int,
    quiet,
    run_record,
    write_hf,
)
from prunekit.distributed import launched
from prunekit.graph import StructuredPruningError, UnsupportedOperationError
from prunekit.masks import finalize
from prunekit.prune import prune
from prunekit.report import SparsityReport

# Tensors of a bare safetensors file that are not pruned unless named in --targets.
# Poolers are left whole in both modes (as in folder mode, where they count as output heads).
FILE_DEFAULT_IGNORE = (
    r"(^|.*\.)(embed\w*|wte|wpe|lm_head|\w*norm\w*|ln_\w*|head|classifier|\w*pooler\w*)\..*"
)

__all__ = ["CliError", "build_parser", "main"]


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


def _file_counts(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(parameters, zeros) of a bare file's tensors, counted as :func:`prunekit.file_stats`
    counts them: floating tensors only, BatchNorm statistics left out."""
    from prunekit.file_stats import looks_like_buffer

    params = zeros = 0
    for name, tensor in tensors.items():
        if not looks_like_buffer(name, tensor):
            params += tensor.numel()
            zeros += tensor.numel() - int(torch.count_nonzero(tensor))
    return params, zeros


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
    # "whole model" is the file's, as `prunekit stats FILE` counts it (biases, norms and
    # embeddings included, buffers left out), not only the matrices that were candidates
    report.model_params, report.model_zeros = _file_counts(tensors)
    settings = {"prunekit_version": __version__, **report.to_dict()["settings"]}
    meta = {"prunekit": json.dumps({**settings, "run": run_record(args)})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


# ---------------------------------------------------------------- pruning a Hugging Face folder

# Sentence-embedding poolers ([CLS] dense + tanh) are left whole like output heads, in folder
# and file mode alike; name them in --targets to prune them.
POOLER = r"re:(.*\.)?pooler(\..*)?"


def _hf_ignore(model: nn.Module, args: argparse.Namespace) -> list[str] | None:
    ignore = list(args.ignore or [])
    if not args.targets and any(
        re.fullmatch(POOLER[3:], n) and isinstance(m, nn.Linear) for n, m in model.named_modules()
    ):
        ignore.append(POOLER)
    return ignore or None


def _prune_hf(args: argparse.Namespace, source: Path, out: Path) -> tuple[SparsityReport, dict]:
    model = load_hf(source)  # plain, structurally pruned or compressed folders
    report = prune(
        model,
        **_prune_options(args),
        ignore=_hf_ignore(model, args),
        targets=args.targets or None,
        inplace=True,
    )
    finalize(model, inplace=True)
    return report, _write(model, source, out, report, args)


def _write(model, source: Path, out: Path, report: SparsityReport, args) -> dict:
    return write_hf(model, out, source=source, args=args, metadata=report.to_dict())


def _oneshot_hf(args: argparse.Namespace, source: Path, out: Path) -> tuple[SparsityReport, dict]:
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
    model = load_hf(source)  # once, after the cheap checks
    report = oneshot(
        model,
        calib,
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        allocation=args.allocation,
        per_layer=_per_layer(args),
        targets=args.targets or None,
        ignore=_hf_ignore(model, args),
        calibration_dtype=args.calibration_dtype,
        seed=args.seed,
        inplace=True,
        progress=True,
    )
    finalize(model, inplace=True)
    return report, _write(model, source, out, report, args)


# ---------------------------------------------------------------- commands


def _prune_options(args: argparse.Namespace) -> dict:
    return {
        "sparsity": args.sparsity,
        "method": args.method,
        "pattern": args.pattern,
        "scope": args.scope,
        "seed": args.seed,
        "per_layer": _per_layer(args),
    }


def _per_layer(args: argparse.Namespace) -> dict[str, float] | None:
    """``--per-layer FILE``: an allocation written by ``prunekit analyze`` (or {layer: s})."""
    from prunekit.analysis.allocate import load_per_layer

    return load_per_layer(args.per_layer) if getattr(args, "per_layer", None) else None


def _cmd_stats(args: argparse.Namespace) -> int:
    source = Path(args.path)
    if not source.exists():
        raise CliError(f"{source}: no such file or folder")
    report = _file_stats(source)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _check_pattern(args: argparse.Namespace) -> None:
    """--pattern and --sparsity together, before any model is loaded."""
    from prunekit.patterns import NM, parse_pattern

    pattern = parse_pattern(args.pattern)  # ValueError naming what is accepted
    if isinstance(pattern, NM) and args.sparsity is not None:
        if abs(args.sparsity - pattern.sparsity) > 1e-9:
            raise CliError(
                f"--pattern {args.pattern} implies sparsity {pattern.sparsity:g}; drop --sparsity "
                f"or give {pattern.sparsity:g}"
            )
    if getattr(args, "allocation", "uniform") == "owl" and isinstance(pattern, NM):
        from prunekit.calibrate.oneshot import oneshot

        lam = inspect.signature(oneshot).parameters["owl_lambda"].default
        if 2 * lam < 1 / pattern.m:
            print(
                f"prunekit: warning: --allocation owl moves each layer's sparsity by at most "
                f"+-{lam:g}, but with --pattern {args.pattern} a layer's sparsity moves in steps "
                f"of 1/{pattern.m}: (nearly) every layer stays {args.pattern}. OWL needs "
                "--pattern unstructured (or N:M with a larger M, e.g. 8:16)",
                file=sys.stderr,
            )


def _print_written(args, report: SparsityReport, out: Path, meta: dict | None) -> None:
    for row in report.layers:
        row.masked = False  # the written model is finalized: zeros baked in, no masks
    if args.json:
        extra = {k: meta[k] for k in ("plain_loadable", "run") if k in meta} if meta else {}
        print(json.dumps({**report.to_dict(), "out": str(out), **extra}, indent=2))
        return
    print(report)
    print(loading_note(out, meta) if meta is not None else f"wrote {out}")


def _cmd_prune(args: argparse.Namespace) -> int:
    source = Path(args.path)
    if not source.exists():
        raise CliError(f"{source}: no such file or folder")
    if args.method not in ("magnitude", "random"):
        raise CliError(
            f"--method {args.method!r} is not available from the command line; accepted: "
            "magnitude, random (calibrated methods: prunekit oneshot)"
        )
    _check_pattern(args)
    if source.is_dir():
        source = hf_source(source, "prune")
        out = check_output(args.out, sources=[source], overwrite=args.overwrite)
        report, meta = _prune_hf(args, source, out)
    else:
        from prunekit.file_stats import safetensors_files

        safetensors_files(source)  # a .safetensors file, or a clear error
        out = check_output(args.out, sources=[source], overwrite=args.overwrite)
        if out.is_dir():
            raise CliError(f"--out {out} is a folder; a safetensors input writes a file")
        report, meta = _prune_file(args, source, out), None
    _print_written(args, report, out, meta)
    return 0


def _cmd_oneshot(args: argparse.Namespace) -> int:
    source = hf_source(args.path, "oneshot")
    input_file(args.calib, "--calib")
    check_text_file(args.calib, "--calib")
    _check_pattern(args)
    out = check_output(args.out, sources=[source], overwrite=args.overwrite)
    report, meta = _oneshot_hf(args, source, out)
    _print_written(args, report, out, meta)
    return 0


def _calib_default(kind: str) -> int:
    """Calibration defaults sized for this machine: the papers' 128 x 512 on a GPU, 32 x 256
    on CPU (Wanda on MiniLM with 128 x 512 took over 5 minutes on 2 cores)."""
    gpu = torch.cuda.is_available()
    return {"n_samples": 128 if gpu else 32, "seq_len": 512 if gpu else 256}[kind]


def build_parser() -> argparse.ArgumentParser:
    """The ``prunekit`` argument parser with every command (usage errors: one line, exit 2)."""
    parser = Parser(
        prog="prunekit",
        description="Prune, quantize, fine-tune, export and measure PyTorch and Hugging Face "
        "models. Every command's output folder is a valid input of every other command.",
        formatter_class=HelpFormatter,
        epilog=examples(
            "prunekit prune-structured ./bert --out small --unit channel --ratio 0.3",
            "prunekit oneshot small --out sparse --method wanda --sparsity 0.5",
            "prunekit quantize sparse --out int8 --bits 8",
            "prunekit eval int8 --reference ./bert",
            "prunekit export int8 --out int8.onnx",
        ),
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, *example_lines: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            formatter_class=HelpFormatter,
            epilog=examples(*example_lines),
        )

    stats = command(
        "stats",
        "per-layer sparsity of a safetensors file or model folder (no model code needed)",
        "prunekit stats pruned-folder --json",
    )
    stats.add_argument(
        "path", help="a .safetensors file, a Hugging Face folder or a prunekit save folder"
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=_cmd_stats)

    p = command(
        "prune",
        "data-free pruning (magnitude, random) of a Hugging Face folder or a safetensors file",
        "prunekit prune ./bert --sparsity 0.5 --out pruned",
        "prunekit prune weights.safetensors --pattern 2:4 --out pruned.safetensors",
    )
    p.add_argument("path", help="a Hugging Face model folder or a .safetensors file")
    p.add_argument("--out", required=True, help="output folder (HF input) or .safetensors file")
    p.add_argument(
        "--sparsity",
        type=fraction,
        default=None,
        help="fraction of zeros, [0, 1); None: 0.5, or what an N:M pattern implies",
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_prune)

    o = command(
        "oneshot",
        "calibrated one-shot pruning of a Hugging Face model (Wanda, SparseGPT)",
        "prunekit oneshot ./llama --out sparse --method sparsegpt --pattern 2:4 --calib text.txt",
    )
    o.add_argument("path", help="a Hugging Face model folder with its tokenizer")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    o.add_argument(
        "--sparsity",
        type=fraction,
        default=None,
        help="fraction of zeros per layer, [0, 1); None: 0.5, or what an N:M pattern implies",
    )
    o.add_argument("--pattern", default="unstructured", help="unstructured or N:M (e.g. 2:4)")
    o.add_argument(
        "--allocation",
        default="uniform",
        choices=["uniform", "owl"],
        help="owl: outlier-weighted per-layer sparsities (unstructured patterns)",
    )
    o.add_argument(
        "--calib", default=None, help="calibration text file (None: CPython's pydoc prose)"
    )
    o.add_argument(
        "--n-samples",
        type=positive_int,
        default=_calib_default("n_samples"),
        help="calibration windows (sized for this machine: 128 on a GPU, 32 on CPU)",
    )
    o.add_argument(
        "--seq-len",
        type=positive_int,
        default=_calib_default("seq_len"),
        help="tokens per calibration window (512 on a GPU, 256 on CPU; at most the model's "
        "positions)",
    )
    o.add_argument("--targets", nargs="*", default=[], help="name patterns of layers to prune")
    o.add_argument("--ignore", nargs="*", default=[], help="name patterns of layers to leave alone")
    o.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    o.add_argument(
        "--calibration-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="dtype of the calibration forwards' matrix products (autocast; the statistics stay "
        "float32): auto (default) takes bfloat16 for a float32 model where it is native (CPUs "
        "with AVX512-BF16 / AMX, GPUs), else no autocast; float32 gives results independent of "
        "the hardware's bfloat16",
    )
    o.add_argument("--per-layer", default=None, help="per-layer sparsities (prunekit analyze)")
    o.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    o.set_defaults(func=_cmd_oneshot)

    from prunekit.analysis.cli import add_commands as add_analysis_commands
    from prunekit.cli_commands import add_commands as add_more_commands
    from prunekit.graph.cli import add_commands as add_graph_commands
    from prunekit.recipes.cli import add_commands as add_recipe_commands
    from prunekit.runtime.cli import add_commands as add_runtime_commands

    add_graph_commands(commands)  # prune-structured, count
    add_more_commands(commands)  # quantize, finetune, export, eval
    add_analysis_commands(commands)  # analyze
    add_runtime_commands(commands)  # bench
    add_recipe_commands(commands)  # compress, recipes
    for name, sub in commands.choices.items():  # defaults and examples in every --help
        if sub.formatter_class is argparse.HelpFormatter:
            sub.formatter_class = HelpFormatter
        if sub.epilog is None and name in EXAMPLES:
            sub.epilog = examples(*EXAMPLES[name])
    return parser


# Examples for the commands whose modules do not set their own.
EXAMPLES = {
    "analyze": [
        "prunekit analyze ./llama --out analysis --method wanda --sparsity 0.7",
        "prunekit oneshot ./llama --out sparse --per-layer analysis/allocation.json",
    ],
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` console command.

    Example:
        >>> main(["stats", "pruned-folder"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (one line, status 2)
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.argv = argv
    try:
        if isinstance(getattr(args, "out", None), (str, Path)):  # before any work, every command
            inputs = [getattr(args, k, None) for k in ("path", "model")] + getattr(
                args, "paths", []
            )
            check_not_inside(args.out, [p for p in inputs if p is not None])
            check_writable(args.out)
        with warnings.catch_warnings(), launched(args):  # torchrun: join its process group
            warnings.filterwarnings("ignore", module=r"transformers(\..*)?")
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
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = "; ".join(lines) or type(exc).__name__
        print(f"prunekit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
