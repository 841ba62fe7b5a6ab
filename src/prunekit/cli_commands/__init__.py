"""The ``prunekit`` commands that take a model folder further: ``quantize``, ``finetune``,
``export`` and ``eval``; one module each, wired into the main parser by :func:`add_commands`.

    prunekit quantize sparse --out int8 --bits 8
    prunekit finetune sparse --out tuned --data train.txt --teacher ./llama
    prunekit export int8 --out int8.onnx
    prunekit eval int8 --reference ./llama --text valid.txt

Every command reads any folder the others write (plain, structurally pruned, compressed) and
checks its arguments, inputs and ``--out`` before loading a model. :mod:`.common` holds the
shared checks, loading and writing.
"""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quantize``, ``finetune``, ``export`` and ``eval`` to the ``prunekit`` parser."""
    from prunekit.cli_commands import evaluate, export, finetune, quantize

    for module in (quantize, finetune, export, evaluate):
        module.add_command(subparsers)
