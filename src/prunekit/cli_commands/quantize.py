"""``prunekit quantize``: round a model folder's weights to 8- or 4-bit integers; pruned zeros
stay exactly zero.

    prunekit quantize sparse --out int8 --bits 8
    prunekit quantize sparse --out int4 --bits 4 --granularity group:32 --compressed

By default the folder holds the dequantized values as ordinary weights (transformers loads it;
the values are on the integer grid). ``--compressed`` stores the integer codes and scales
(int4: two per byte) plus the sparse index: a much smaller folder that
``prunekit.from_pretrained`` (and every prunekit command) loads exactly.
"""

from __future__ import annotations

import argparse

from prunekit.cli_commands.common import (
    add_output_flags,
    add_parser,
    check_output,
    hf_source,
    load_hf,
    loading_note,
    print_json,
    write_hf,
)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    q = add_parser(
        subparsers,
        "quantize",
        "quantize the weights of a Hugging Face folder to 8 or 4 bits (zeros stay zero)",
        "prunekit quantize sparse --out int8 --bits 8",
        "prunekit quantize sparse --out int4 --bits 4 --granularity group:32 --compressed",
    )
    q.add_argument("path", help="a Hugging Face model folder (any prunekit output too)")
    add_output_flags(q)
    q.add_argument("--bits", type=int, default=8, choices=[8, 4], help="bits per weight")
    q.add_argument(
        "--granularity",
        default="per_channel",
        help="one scale per output channel (per_channel) or per group of G inputs (group:G)",
    )
    q.add_argument(
        "--asymmetric", action="store_true", help="a zero point per scale (default: symmetric)"
    )
    q.add_argument(
        "--compressed",
        action="store_true",
        help="store integer codes and the sparse index (smaller; prunekit.from_pretrained only)",
    )
    q.add_argument("--targets", nargs="*", default=[], help="name patterns of layers to quantize")
    q.add_argument("--ignore", nargs="*", default=[], help="name patterns of layers to leave")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    """``prunekit quantize``: load, quantize, write; the report lists each layer's error."""
    from prunekit.compress.quantize import parse_granularity, quantize

    source = hf_source(args.path, "quantize")
    parse_granularity(args.granularity)  # ValueError naming the accepted forms
    out = check_output(args.out, sources=[source], overwrite=args.overwrite)
    model = load_hf(source)
    report = quantize(
        model,
        bits=args.bits,
        granularity=args.granularity,
        symmetric=not args.asymmetric,
        targets=args.targets or None,
        ignore=args.ignore or None,
        mode="int" if args.compressed else "fake",
        inplace=True,
    )
    meta = write_hf(
        model,
        out,
        source=source,
        args=args,
        metadata={"quantize": dict(report.settings)},
        compressed=args.compressed,
    )
    if args.json:
        print_json({**report.to_dict(), "out": str(out), "plain_loadable": meta["plain_loadable"]})
        return 0
    print(report)
    print(loading_note(out, meta))
    return 0
