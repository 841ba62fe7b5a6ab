"""Command-line commands for structured pruning: ``prunekit prune-structured`` and ``prunekit count``.

The main ``prunekit`` parser wires them in with :func:`add_commands`::

    prunekit prune-structured hf-folder --out pruned --ratio 0.3 --unit channel
    prunekit prune-structured hf-folder --out pruned --unit head --gqa q --target-macs 0.5
    prunekit prune-structured hf-folder --out pruned --unit layer --ratio 0.25 --calib-text text.txt
    prunekit count hf-folder --seq-len 128

Inputs are Hugging Face model folders (``config.json`` + ``*.safetensors``), including folders
written by ``prune-structured`` itself. Tracing runs the model on ``--batch`` x ``--seq-len``
seeded random token ids; ``--calib-text`` (tokenized with the folder's tokenizer) gives the
data-driven criteria real text. Output goes to a temporary folder renamed into place.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

import torch

WIDTH_IMPORTANCE = ("l2", "l1", "random", "taylor", "activation", "apoz", "bn_scale")
LAYER_IMPORTANCE = ("influence", "loss", "random")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prune-structured`` and ``count`` to the ``prunekit`` command's subparsers."""
    from prunekit.cli_commands.common import (
        add_parser,
        fraction,
        positive_float,
        positive_int,
    )

    p = add_parser(
        subparsers,
        "prune-structured",
        "remove channels, heads or layers of a Hugging Face model folder (smaller dense model)",
        "prunekit prune-structured ./bert --out small --unit channel --ratio 0.3",
        "prunekit prune-structured ./llama --out small --unit channel,head --target-macs 0.6",
        "prunekit prune-structured ./llama --out shallow --unit layer --ratio 0.25",
    )
    p.add_argument("path", help="a Hugging Face model folder (any prunekit output too)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--ratio", type=fraction, default=0.3, help="fraction of units to remove, [0, 1)"
    )
    p.add_argument(
        "--unit",
        default=None,
        help="channel (the default; with --target-latency, whole layers where no widths reach "
        "it; with --target-macs and --no-uniform, whole layers where the widths run under 0.85 "
        "of their MAC ratio and the layers measure faster with outputs as close to dense; "
        "either with a warning), head, channel,head or layer",
    )
    p.add_argument(
        "--importance",
        default=None,
        help=f"channels/heads: {', '.join(WIDTH_IMPORTANCE)} (None: l2); layers: "
        f"{', '.join(LAYER_IMPORTANCE)} (None: influence)",
    )
    p.add_argument(
        "--scope",
        default=None,
        choices=["local", "global"],
        help="rank units per group or over all groups (None: local; global with --reconstruct)",
    )
    p.add_argument(
        "--reconstruct",
        choices=["lstsq", "bias"],
        default=None,
        help="repair without training on the --calib-text windows: refit the layers that read "
        "removed units by least squares (lstsq), or move the removed units' mean into their "
        "bias (bias); importance then defaults to fluctuation and --scope to global",
    )
    p.add_argument(
        "--allocation",
        choices=["sensitivity"],
        default=None,
        help="per-group widths from damage measured on --calib-text, under --target-macs or "
        "--target-latency (implies --no-uniform)",
    )
    p.add_argument(
        "--uniform",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the same width in every layer, so config.json can hold it and transformers' "
        "from_pretrained loads the folder (None: on with --scope local; --target-macs / "
        "--target-params then reach the target with one ratio for all layers)",
    )
    p.add_argument(
        "--round-to",
        type=positive_int,
        default=None,
        help="keep channel counts a multiple of this (None: what this machine's kernels run "
        "fast, 16 with AVX-512, 8 otherwise; 1 = no rounding)",
    )
    p.add_argument(
        "--ignore", nargs="*", default=[], help="module name patterns whose outputs stay whole"
    )
    p.add_argument(
        "--target-macs",
        type=positive_float,
        default=None,
        help="MACs to reach: fraction of dense (<= 1) or count",
    )
    p.add_argument(
        "--target-params",
        type=positive_float,
        default=None,
        help="params to reach: fraction of dense (<= 1) or count",
    )
    p.add_argument(
        "--target-latency",
        type=fraction,
        default=None,
        help="measured latency to reach, as a fraction of dense in (0, 1) (times the model on "
        "--batch x --seq-len inputs; implies --no-uniform)",
    )
    p.add_argument(
        "--no-latency", action="store_true", help="do not time dense and pruned (faster)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads for timing")
    p.add_argument(
        "--gqa",
        default="kv",
        choices=["kv", "q"],
        help="GQA heads: whole kv groups, or q heads within groups",
    )
    p.add_argument("--min-keep", type=positive_int, default=1, help="units every group keeps")
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=16,
        help="tokens of the tracing / calibration inputs",
    )
    p.add_argument("--batch", type=positive_int, default=1, help="batch of the tracing inputs")
    p.add_argument("--calib-text", default=None, help="a text file for data-driven criteria")
    p.add_argument(
        "--n-calib", type=positive_int, default=8, help="calibration windows from --calib-text"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and windows")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_prune_structured)

    c = add_parser(
        subparsers,
        "count",
        "parameters and MACs per layer of a Hugging Face model folder",
        "prunekit count small --seq-len 128 --json",
    )
    c.add_argument("path", help="a Hugging Face model folder (pruned or not)")
    c.add_argument("--seq-len", type=positive_int, default=16, help="tokens of the input")
    c.add_argument("--batch", type=positive_int, default=1, help="batch of the input")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_count)


def hf_folder(path: str) -> Path:
    """A Hugging Face model folder holding safetensors weights (prunekit never loads pickle)."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such file or folder")
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise ValueError(f"{folder}: expected a Hugging Face model folder (with config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"{folder}: no *.safetensors file; prunekit loads safetensors only (never pickle)"
        )
    return folder


def load_hf_folder(folder: Path) -> torch.nn.Module:
    """Load a (possibly structurally pruned or compressed) Hugging Face folder in eval mode."""
    from prunekit.cli_commands.common import load_hf

    return load_hf(folder)


def example_inputs(
    model: torch.nn.Module, batch: int, seq_len: int, seed: int = 0
) -> dict[str, Any]:
    """Seeded random token ids (and ``use_cache=False`` where the model takes it)."""
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    inputs: dict[str, Any] = {"input_ids": ids}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _calibration(folder: Path, model, args: argparse.Namespace) -> list[dict[str, Any]] | None:
    if not args.calib_text:
        return None
    from transformers import AutoTokenizer

    text = Path(args.calib_text).read_text(encoding="utf-8", errors="replace")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    need = max(args.n_calib * args.seq_len, args.seq_len + 1)
    if len(ids) < need:
        raise ValueError(
            f"--calib-text {args.calib_text} has {len(ids)} tokens, fewer than --n-calib x "
            f"--seq-len = {args.n_calib} x {args.seq_len} = {need}: the windows would repeat "
            "the same text; give more text or lower --n-calib / --seq-len"
        )
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(ids) - args.seq_len, (args.n_calib,), generator=g)
    extra = (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )
    batches = []
    for s in starts.tolist():
        window = ids[s : s + args.seq_len].unsqueeze(0)
        batch = {"input_ids": window, **extra}
        if "labels" in inspect.signature(model.forward).parameters and hasattr(
            model, "get_output_embeddings"
        ):
            if model.get_output_embeddings() is not None:
                batch["labels"] = window
        batches.append(batch)
    return batches


def _uniform(args: argparse.Namespace) -> bool:
    """Whether every layer keeps the same width (so config.json can hold it)."""
    from prunekit.cli_commands.common import CliError

    if args.scope is None:
        args.scope = "global" if args.reconstruct else "local"
    if args.uniform and args.allocation:
        raise CliError("--uniform does not combine with --allocation (it sets widths per group)")
    if args.uniform and args.scope == "global":
        raise CliError(
            "--uniform needs --scope local: a global ranking gives each layer its own width"
        )
    if args.uniform and args.target_latency is not None:
        raise CliError(
            "--uniform does not combine with --target-latency (its search sets widths per "
            "layer); use --target-macs for a uniform model, or --no-uniform"
        )
    if args.uniform is None:
        return args.scope == "local" and args.target_latency is None and not args.allocation
    return bool(args.uniform)


def cmd_prune_structured(args: argparse.Namespace) -> int:
    """``prunekit prune-structured``: prune a Hugging Face folder and write the smaller model."""
    import copy

    from prunekit.cli_commands.common import (
        CliError,
        check_output,
        input_file,
        loading_note,
        seq_len_for,
        write_hf,
    )
    from prunekit.graph.pruner import prune_structured

    source = hf_folder(args.path)
    input_file(args.calib_text, "--calib-text")
    for flag, value in (("--reconstruct", args.reconstruct), ("--allocation", args.allocation)):
        if value and not args.calib_text:
            raise CliError(f"{flag} {value} measures on calibration text: give --calib-text FILE")
    uniform = _uniform(args)
    out = check_output(args.out, sources=[source], overwrite=args.overwrite)
    units = [u.strip() for u in (args.unit or "").split(",") if u.strip()]
    seq_len_for(args, source)
    model = load_hf_folder(source)
    inputs = example_inputs(model, args.batch, args.seq_len, args.seed)
    calib = _calibration(source, model, args)
    options = dict(
        unit=(units if len(units) > 1 else units[0]) if units else None,
        importance=args.importance,
        scope=args.scope,
        round_to=args.round_to,
        ignore=args.ignore or None,
        threads=args.threads,
        min_keep=args.min_keep,
        calib=calib,
        gqa=args.gqa,
        seed=args.seed,
        reconstruct=args.reconstruct,
        allocation=args.allocation,
    )
    ratio, targets = (
        args.ratio,
        {"target_macs": args.target_macs, "target_params": args.target_params},
    )
    if uniform and units != ["layer"] and any(v is not None for v in targets.values()):
        # the target's search ends by giving units back where they cost least, layer by layer;
        # a uniform model takes the ratio the search found before that step, for every layer
        probe = prune_structured(
            copy.deepcopy(model),
            inputs,
            **options,
            **targets,
            measure_latency=False,
            progress=False,
            inplace=True,
        )
        ratio, targets = min(0.999, probe.settings["ratio"] + 5e-5), {}
    report = prune_structured(
        model,
        inputs,
        ratio=ratio,
        **options,
        **targets,
        target_latency=args.target_latency,
        measure_latency=not args.no_latency,
        inplace=True,
    )
    if uniform:
        report.settings["uniform"] = True
        for key, value in (
            ("target_macs", args.target_macs),
            ("target_params", args.target_params),
        ):
            if value is not None:
                report.settings[key] = value
    meta = write_hf(
        report.model, out, source=source, args=args, metadata={"report": report.to_dict()}
    )
    if args.json:
        print(
            json.dumps(
                {**report.to_dict(), "out": str(out), "plain_loadable": meta["plain_loadable"]},
                indent=2,
            )
        )
        return 0
    print(report)
    print(loading_note(out, meta))
    if not meta["plain_loadable"] and not uniform:
        print("(prune-structured --uniform keeps one width for all layers)")
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    """``prunekit count``: parameters and MACs per layer of a Hugging Face folder."""
    from prunekit.cli_commands.common import seq_len_for
    from prunekit.graph.count import count

    folder = hf_folder(args.path)
    seq_len_for(args, folder)
    model = load_hf_folder(folder)
    report = count(model, example_inputs(model, args.batch, args.seq_len))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
