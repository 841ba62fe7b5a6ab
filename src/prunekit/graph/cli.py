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
    p = subparsers.add_parser(
        "prune-structured",
        help="remove channels, heads or layers of a Hugging Face model folder (smaller dense model)",
    )
    p.add_argument("path", help="a Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--ratio", type=float, default=0.3, help="fraction of units to remove, [0, 1) (default 0.3)"
    )
    p.add_argument(
        "--unit", default="channel", help="channel, head, channel,head or layer (default channel)"
    )
    p.add_argument(
        "--importance",
        default=None,
        help=f"channels/heads: {', '.join(WIDTH_IMPORTANCE)}; layers: {', '.join(LAYER_IMPORTANCE)}",
    )
    p.add_argument("--scope", default="local", choices=["local", "global"])
    p.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="keep channel counts a multiple of this (default: what this machine's kernels run "
        "fast, 16 with AVX-512, 8 otherwise; 1 = no rounding)",
    )
    p.add_argument(
        "--ignore", nargs="*", default=[], help="module name patterns whose outputs stay whole"
    )
    p.add_argument(
        "--target-macs",
        type=float,
        default=None,
        help="MACs to reach: fraction of dense (<= 1) or count",
    )
    p.add_argument(
        "--target-params",
        type=float,
        default=None,
        help="params to reach: fraction of dense (<= 1) or count",
    )
    p.add_argument(
        "--target-latency",
        type=float,
        default=None,
        help="measured latency to reach, as a fraction of dense in (0, 1) (times the model on "
        "--batch x --seq-len inputs)",
    )
    p.add_argument(
        "--no-latency", action="store_true", help="do not time dense and pruned (faster)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads for timing")
    p.add_argument(
        "--gqa",
        default="kv",
        choices=["kv", "q"],
        help="GQA heads: whole kv groups, or q heads within groups",
    )
    p.add_argument("--min-keep", type=int, default=1)
    p.add_argument(
        "--seq-len", type=int, default=16, help="tokens of the tracing / calibration inputs"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calib-text", default=None, help="a text file for data-driven criteria")
    p.add_argument(
        "--n-calib", type=int, default=8, help="calibration windows taken from --calib-text"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_prune_structured)

    c = subparsers.add_parser(
        "count", help="parameters and MACs per layer of a Hugging Face model folder"
    )
    c.add_argument("path", help="a Hugging Face model folder (pruned or not)")
    c.add_argument("--seq-len", type=int, default=16)
    c.add_argument("--batch", type=int, default=1)
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
    """Load a (possibly structurally pruned) Hugging Face folder in eval mode."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(
            "Hugging Face folders need transformers: pip install 'prunekit[hf]'"
        ) from exc
    from prunekit.graph.hf import from_pretrained

    return from_pretrained(folder).eval()


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
    if len(ids) < args.seq_len + 1:
        raise ValueError(f"--calib-text has {len(ids)} tokens; need at least {args.seq_len + 1}")
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


def cmd_prune_structured(args: argparse.Namespace) -> int:
    """``prunekit prune-structured``: prune a Hugging Face folder and write the smaller model."""
    from prunekit.graph.hf import save_pretrained
    from prunekit.graph.pruner import prune_structured

    source, out = hf_folder(args.path), Path(args.out)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ValueError(
            f"--out {out} would overwrite or nest inside the input {source}; choose another path"
        )
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    units = [u.strip() for u in args.unit.split(",") if u.strip()]
    model = load_hf_folder(source)
    inputs = example_inputs(model, args.batch, args.seq_len, args.seed)
    calib = _calibration(source, model, args)
    report = prune_structured(
        model,
        inputs,
        ratio=args.ratio,
        unit=units if len(units) > 1 else units[0],
        importance=args.importance,
        scope=args.scope,
        round_to=args.round_to,
        ignore=args.ignore or None,
        target_macs=args.target_macs,
        target_params=args.target_params,
        target_latency=args.target_latency,
        measure_latency=not args.no_latency,
        threads=args.threads,
        min_keep=args.min_keep,
        calib=calib,
        gqa=args.gqa,
        seed=args.seed,
        inplace=True,
    )
    save_pretrained(
        report.model,
        out,
        source=source,
        overwrite=args.overwrite,
        metadata={"report": report.to_dict()},
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    print(f"wrote {out}")
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    """``prunekit count``: parameters and MACs per layer of a Hugging Face folder."""
    from prunekit.graph.count import count

    folder = hf_folder(args.path)
    model = load_hf_folder(folder)
    report = count(model, example_inputs(model, args.batch, args.seq_len))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
