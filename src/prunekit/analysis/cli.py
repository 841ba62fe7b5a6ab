"""The ``prunekit analyze`` command: sensitivity curves, their plot and a per-layer allocation.

The main ``prunekit`` parser wires it in with :func:`add_commands`::

    prunekit analyze hf-folder --out analysis --method wanda --sparsity 0.7
    prunekit oneshot hf-folder --out pruned --method wanda --per-layer analysis/allocation.json

``MODEL`` is a Hugging Face model folder with its tokenizer; the calibration text (``--calib``,
default CPython's pydoc prose) is cut into ``--n-samples`` windows of ``--seq-len`` tokens. The
command writes, into ``--out``: ``sensitivity.csv``, ``sensitivity.json``, ``sensitivity.png``
(when matplotlib is installed) and ``allocation.json``, the per-layer sparsities that meet the
budget (``--sparsity``, or ``--keep`` of the ``--cost``) with the least predicted damage, which
``prunekit prune`` and ``prunekit oneshot`` accept with ``--per-layer``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.analysis.sensitivity import DEFAULT_SPARSITIES


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``analyze`` to the ``prunekit`` command's subparsers."""
    a = subparsers.add_parser(
        "analyze",
        help="per-layer sensitivity curves, their plot and a per-layer allocation file",
    )
    a.add_argument("path", help="a Hugging Face model folder with its tokenizer")
    a.add_argument("--out", required=True, help="output folder (created if missing)")
    a.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    a.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=list(DEFAULT_SPARSITIES),
        help="sparsities measured for every layer",
    )
    a.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "output", "proxy"],
        help="output: divergence of the model's outputs; proxy: per-layer reconstruction error, "
        "block by block (auto: proxy when the model has repeated blocks)",
    )
    a.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="budget of the allocation: global sparsity of the analysed layers (default 0.5)",
    )
    a.add_argument("--cost", default="params", choices=["params", "macs", "bytes"])
    a.add_argument("--keep", type=float, default=None, help="fraction of --cost kept (macs, bytes)")
    a.add_argument(
        "--calib", default=None, help="calibration text file (default: CPython's pydoc prose)"
    )
    a.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    a.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    a.add_argument("--targets", nargs="*", default=[], help="name patterns of layers to analyse")
    a.add_argument("--ignore", nargs="*", default=[], help="name patterns of layers to leave out")
    a.add_argument("--no-monotone", action="store_true", help="keep the raw (non-monotone) curves")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=_cmd_analyze)


def _write_run(args: argparse.Namespace, path: Path) -> Path:
    """What produced the analysis: command line, seed, versions, time."""
    import json

    from prunekit.cli_commands.common import run_record
    from prunekit.compress.durable import write_text_atomic

    return write_text_atomic(path, json.dumps(run_record(args), indent=2) + "\n")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from prunekit.analysis.sensitivity import sensitivity
    from prunekit.cli_hf import tokenizer_and_calibration
    from prunekit.graph.cli import load_hf_folder

    source, out = Path(args.path), Path(args.out)
    if not (source.is_dir() and (source / "config.json").is_file()):
        raise ValueError(f"{source}: analyze needs a Hugging Face model folder (with config.json)")
    if args.calib and not Path(args.calib).is_file():
        raise ValueError(f"--calib {args.calib}: no such file")
    if args.keep is not None and args.sparsity is not None:
        raise ValueError("give --sparsity (params) or --keep (of --cost), not both")
    if args.cost != "params" and args.keep is None:
        raise ValueError(f"--cost {args.cost} needs --keep <fraction of the {args.cost} kept>")
    _, calib = tokenizer_and_calibration(
        source,
        args.calib,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        command="analyze",
    )
    model = load_hf_folder(source)
    result = sensitivity(
        model,
        calib,
        sparsities=args.sparsities,
        method=args.method,
        mode=args.mode,
        targets=args.targets or None,
        ignore=args.ignore or None,
        monotone=not args.no_monotone,
        seed=args.seed,
        progress=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    written = [result.to_csv(out / "sensitivity.csv"), result.to_json(out / "sensitivity.json")]
    try:
        written.append(result.plot(out / "sensitivity.png"))
    except ImportError:
        print("prunekit: matplotlib is not installed; no plot written")
    if args.keep is not None:
        allocation = result.allocate(cost=args.cost, keep=args.keep)
    else:
        allocation = result.allocate(0.5 if args.sparsity is None else args.sparsity)
    written.append(allocation.to_json(out / "allocation.json"))
    written.append(_write_run(args, out / "run.json"))
    print(result)
    print()
    print(allocation)
    for path in written:
        print(f"wrote {path}")
    return 0
