"""Command-line command for latency: ``prunekit bench``.

The main ``prunekit`` parser wires it in with :func:`add_commands`::

    prunekit bench dense-folder pruned-folder --batch 1 32 --seq-len 128 --threads 2 --repeats 50
    prunekit bench dense-folder pruned-folder --accelerate      # + pruned-folder (accelerated)

Each PATH is a Hugging Face model folder (``config.json`` + ``*.safetensors``), including folders
written by ``prunekit prune``, ``oneshot`` and ``prune-structured``. Models load from safetensors
only (never pickle), with no network access. Every model runs on the same seeded random
``input_ids`` of shape ``batch x seq-len``; the first PATH is the reference for the ratio column.
The timings are of this machine, this thread count and these shapes.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from prunekit.graph.cli import hf_folder, load_hf_folder


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``prunekit`` command's subparsers."""
    b = subparsers.add_parser(
        "bench",
        help="time Hugging Face model folders side by side (latency, throughput, memory)",
        description=(
            "Time Hugging Face model folders on the same seeded random token ids, in rotating "
            "rounds. The first PATH is the reference for the ratio column. Timings are of this "
            "machine, thread count and input shape."
        ),
    )
    b.add_argument("paths", nargs="+", metavar="PATH", help="Hugging Face model folders")
    b.add_argument(
        "--batch", type=int, nargs="+", default=[1], help="batch size(s) to time (default 1)"
    )
    b.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    b.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's current)"
    )
    b.add_argument("--warmup", type=int, default=10, help="untimed calls per model (default 10)")
    b.add_argument(
        "--repeats", type=int, default=50, help="timed calls per model and batch (default 50)"
    )
    b.add_argument(
        "--rounds", type=int, default=5, help="rotating rounds the repeats are split over"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    b.add_argument(
        "--accelerate",
        action="store_true",
        help=(
            "also time each sparse model after prunekit.accelerate (sparse kernels swapped in "
            "where they measure faster at the first --batch size), side by side"
        ),
    )
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=cmd_bench)


def _names(paths: list[str]) -> list[str]:
    """Short unique labels: folder names, disambiguated with their parents when they clash."""
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(Path(p)) for p in paths]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _inputs(models: list[torch.nn.Module], batch: int, seq_len: int, seed: int) -> dict[str, Any]:
    vocab = min(int(getattr(m.config, "vocab_size", 2) or 2) for m in models)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    inputs: dict[str, Any] = {"input_ids": ids}
    if all("use_cache" in inspect.signature(m.forward).parameters for m in models):
        inputs["use_cache"] = False
    return inputs


def cmd_bench(args: argparse.Namespace) -> int:
    """``prunekit bench``: load each folder, time them side by side, print the table."""
    from prunekit.runtime.bench import bench

    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    if any(b < 1 for b in args.batch):
        raise ValueError(f"--batch sizes must be >= 1, got {args.batch}")
    folders = [hf_folder(p) for p in args.paths]
    models = [load_hf_folder(f) for f in folders]
    inputs = _inputs(models, max(args.batch), args.seq_len, args.seed)
    named = dict(zip(_names(args.paths), models, strict=True))
    accelerated = _accelerated(named, models, args) if args.accelerate else {}
    report = bench(
        {**named, **{f"{name} (accelerated)": m for name, (m, _) in accelerated.items()}},
        inputs,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        rounds=args.rounds,
        batch_sizes=args.batch,
    )
    report.settings["paths"] = [str(f) for f in folders]
    report.settings["seq_len"] = args.seq_len
    report.settings["seed"] = args.seed
    if args.json:
        out = report.to_dict()
        out["accelerate"] = {name: r.to_dict() for name, (_, r) in accelerated.items()}
        print(json.dumps(out, indent=2))
        return 0
    for name, (_, r) in accelerated.items():
        swapped = len(r.swapped)
        print(
            f"{name}: accelerate swapped {swapped}/{len(r.rows)} layer(s) ({r.settings['kernels']})"
        )
    print(report)
    return 0


def _accelerated(named: dict, models: list, args: argparse.Namespace) -> dict[str, tuple]:
    """name -> (accelerated model, report) for every model with a sparse Linear or Conv2d."""
    from prunekit.runtime.accelerate import accelerate

    example = _inputs(models, args.batch[0], args.seq_len, args.seed)
    out = {}
    for name, model in named.items():
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        if not any(bool((m.weight == 0).any()) for m in layers):
            continue  # dense: nothing to accelerate
        out[name] = accelerate(model, example, threads=args.threads)
    return out
