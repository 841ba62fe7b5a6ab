"""``prunekit export``: write a model folder as an ONNX file, checked in onnxruntime.

    prunekit export int8 --out int8.onnx
    prunekit export small --out small.onnx --seq-len 32 --atol 1e-3

The graph takes ``input_ids`` and ``attention_mask`` of ``--seq-len`` tokens (the batch
dimension is symbolic); the file is
compared with PyTorch on seeded random token ids and written only when the largest difference
is within ``--atol`` (``--no-check`` skips the comparison).
"""

from __future__ import annotations

import argparse
import inspect
import warnings
from pathlib import Path

import torch

from prunekit.cli_commands.common import (
    CliError,
    add_parser,
    check_output,
    hf_source,
    load_hf,
    positive_float,
    positive_int,
    print_json,
    run_record,
    seq_len_for,
)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    e = add_parser(
        subparsers,
        "export",
        "export a Hugging Face folder (any prunekit output) to ONNX, checked in onnxruntime",
        "prunekit export int8 --out int8.onnx",
        "prunekit export small --out small.onnx --seq-len 32 --atol 1e-3",
    )
    e.add_argument("path", help="a Hugging Face model folder")
    e.add_argument("--out", required=True, help="the .onnx file to write")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument(
        "--seq-len",
        type=positive_int,
        default=16,
        help="tokens of the example input (fixed in the graph)",
    )
    e.add_argument("--batch", type=positive_int, default=2, help="batch of the example input")
    e.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (None: torch's)")
    e.add_argument("--atol", type=positive_float, default=1e-4, help="largest difference accepted")
    e.add_argument("--no-check", action="store_true", help="do not compare in onnxruntime")
    e.add_argument(
        "--exporter",
        default="auto",
        choices=["auto", "torchscript", "dynamo"],
        help="PyTorch's ONNX exporter",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the example token ids")
    e.set_defaults(func=cmd_export)


def example_inputs(model: torch.nn.Module, batch: int, seq_len: int, seed: int) -> dict:
    """Seeded random ``input_ids`` and an all-ones ``attention_mask`` (``use_cache=False``
    where the model takes it, so no cache is exported)."""
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    inputs: dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


def cmd_export(args: argparse.Namespace) -> int:
    """``prunekit export``: load, export, check, write."""
    from prunekit.compress.onnx_export import export_onnx

    source = hf_source(args.path, "export")
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise CliError(f"--out {out}: expected a file name ending in .onnx")
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file name like model.onnx")
    check_output(out, sources=[source], overwrite=args.overwrite)
    seq_len_for(args, source)
    model = load_hf(source)
    with warnings.catch_warnings():  # the exporter's advisories about traced operators
        warnings.simplefilter("ignore")
        result = export_onnx(
            model,
            example_inputs(model, args.batch, args.seq_len, args.seed),
            out,
            check=not args.no_check,
            opset=args.opset,
            atol=args.atol,
            exporter=args.exporter,
        )
    _record_run(out, args)
    if args.json:
        print_json({**vars(result), "run": run_record(args)})
        return 0
    print(result)
    return 0


def _record_run(path: Path, args: argparse.Namespace) -> None:
    """Write the run record (command line, seed, versions) into the ONNX file's
    ``metadata_props`` as ``prunekit_run`` (JSON); the weights are not touched."""
    import json
    import os

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = "prunekit_run", json.dumps(run_record(args))
    tmp = path.with_name(f".{path.name}.run-{os.getpid()}")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
