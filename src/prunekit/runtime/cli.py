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
    from prunekit.cli_commands.common import HelpFormatter, examples, positive_int

    b = subparsers.add_parser(
        "bench",
        help="time Hugging Face model folders side by side (latency, throughput, memory)",
        description=(
            "Time Hugging Face model folders on the same seeded random token ids, in rotating "
            "rounds. The first PATH is the reference for the ratio column. Timings are of this "
            "machine, thread count and input shape."
        ),
        formatter_class=HelpFormatter,
        epilog=examples(
            "prunekit bench ./bert small sparse --batch 1 32 --seq-len 128 --threads 2",
            "prunekit bench ./llama sparse --accelerate",
        ),
    )
    b.add_argument("paths", nargs="+", metavar="PATH", help="Hugging Face model folders")
    b.add_argument(
        "--batch",
        type=positive_int,
        nargs="+",
        default=[1],
        help="batch size(s) to time (default 1)",
    )
    b.add_argument(
        "--seq-len", type=positive_int, default=128, help="tokens per sequence (default 128)"
    )
    b.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads (default: torch's current)",
    )
    b.add_argument(
        "--warmup", type=positive_int, default=10, help="untimed calls per model (default 10)"
    )
    b.add_argument(
        "--repeats",
        type=positive_int,
        default=50,
        help="timed calls per model and batch (default 50)",
    )
    b.add_argument(
        "--rounds", type=positive_int, default=5, help="rotating rounds the repeats are split over"
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
    for folder, model in zip(folders, models, strict=True):
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and args.seq_len > max_pos:
            raise ValueError(
                f"--seq-len {args.seq_len} is above the {max_pos} positions of {folder}"
            )
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
        print(f"{name}: {_swap_summary(r)}")
    for name in named:
        if args.accelerate and name not in accelerated:
            print(f"{name}: not accelerated (no zero weights in any Linear or Conv2d: dense)")
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


def _swap_summary(report: Any) -> str:
    """``accelerate swapped 3/37 layer(s) (kernels); kept dense: 30 not faster, 4 ...``."""
    from collections import Counter

    line = (
        f"accelerate swapped {len(report.swapped)}/{len(report.rows)} layer(s) "
        f"({report.settings.get('kernels')})"
    )
    kept = Counter(r.reason or "unknown" for r in report.rows if not r.swapped)
    if kept:
        line += "; kept dense: " + ", ".join(f"{n} {why}" for why, n in kept.most_common())
    why = report.settings.get("why")
    return line + (f" (kernels unavailable: {why})" if why else "")
