"""Shared pieces of every ``prunekit`` command: argument types, input and output checks made
before any work, quiet transformers, loading and writing Hugging Face folders, the run record.

Every command follows one order: check the arguments, the input paths and the output path (no
model loaded, nothing written); load; work; write to a temporary name renamed into place; print.
A bad input is one line on stderr and exit status 2 (see :class:`CliError`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from torch import nn

RUN_KEY = "run"  # in prunekit.json: the command line, seed, versions and time of the run


class CliError(ValueError):
    """A user-facing error: printed as one line without a traceback, exit status 2."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr (exit status 2).

    Example:
        >>> Parser(prog="prunekit").prog
        'prunekit'
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (not the empty ones: None, False, []), keeps the examples'
    line breaks."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default not in (None, False):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or action.required
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


def examples(*lines: str) -> str:
    """An ``epilog`` listing example command lines.

    Example:
        >>> print(examples("prunekit stats out"))
        example:
          prunekit stats out
    """
    head = "example:" if len(lines) == 1 else "examples:"
    return "\n".join([head, *(f"  {line}" for line in lines)])


# ---------------------------------------------------------------- argument types


def _number(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def fraction(text: str) -> float:
    """A number in [0, 1) (sparsities, ratios).

    Example:
        >>> fraction("0.5")
        0.5
    """
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, lengths, sizes).

    Example:
        >>> positive_int("8")
        8
    """
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (learning rates, tolerances, targets)."""
    value = _number(float, text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# ---------------------------------------------------------------- quiet transformers


def quiet() -> None:
    """Silence transformers' and tokenizers' progress bars, advisories and warnings (the
    command prints its own progress). Environment variables set by the user win."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # already imported: its logger read the variables then
        transformers = sys.modules["transformers"]
        try:
            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except AttributeError:  # pragma: no cover - an old or partial transformers
            pass


# ---------------------------------------------------------------- inputs and outputs


def hf_source(path: str | os.PathLike, command: str) -> Path:
    """A Hugging Face model folder with safetensors weights (plain or prunekit-written).

    Example:
        >>> hf_source("missing", "eval")  # doctest: +SKIP
        CliError: missing: no such file or folder
    """
    folder = Path(path)
    if not folder.exists():
        raise CliError(f"{folder}: no such file or folder")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise CliError(f"{folder}: {command} needs a Hugging Face model folder (with config.json)")
    if not any(folder.glob("*.safetensors")):
        raise CliError(
            f"{folder}: no *.safetensors weights. prunekit never loads pickle (.bin/.pt); convert "
            "with transformers: Model.from_pretrained(path).save_pretrained(out, "
            "safe_serialization=True)"
        )
    return folder


def input_file(path: str | None, flag: str) -> Path | None:
    """An existing, non-empty file given with ``flag`` (None when the flag was not given)."""
    if path is None:
        return None
    file = Path(path)
    if not file.exists():
        raise CliError(f"{flag} {file}: no such file")
    if not file.is_file():
        raise CliError(f"{flag} {file}: expected a file, got a folder")
    if file.stat().st_size == 0:
        raise CliError(f"{flag} {file}: the file is empty")
    return file


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_output(
    out: str | os.PathLike, *, sources: Sequence[Path] = (), overwrite: bool = False
) -> Path:
    """``--out``: not an input, not inside one, absent unless ``overwrite``, and writable (its
    nearest existing parent is a folder we can create files in). Writes nothing.

    Example:
        >>> check_output("/proc/out")  # doctest: +SKIP
        CliError: --out /proc/out: cannot write in /proc (...)
    """
    out = Path(out)
    check_not_inside(out, sources)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    return check_writable(out)


def check_not_inside(out: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> None:
    """``--out`` is none of the inputs and not inside one of them."""
    out = Path(out)
    for source in map(Path, sources):
        resolved, src = out.resolve(), source.resolve()
        if resolved == src or src in resolved.parents:
            raise CliError(
                f"--out {out} would overwrite or nest inside the input {source}; choose another path"
            )


def max_positions(folder: Path) -> int | None:
    """The positions a Hugging Face folder's model takes (``config.json``), None if unsaid."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def seq_len_for(args: Any, folder: Path, default: int = 128) -> int:
    """``--seq-len``, checked against the model's positions (read from ``config.json``, before
    any model is loaded); when not given, ``default`` capped at those positions."""
    max_pos = max_positions(folder)
    if args.seq_len is None:
        return min(default, max_pos) if max_pos else default
    if max_pos is not None and args.seq_len > max_pos:
        raise CliError(f"--seq-len {args.seq_len} is above the model's {max_pos} positions")
    return args.seq_len


def check_writable(out: str | os.PathLike, flag: str = "--out") -> Path:
    """``out`` can be created: its nearest existing parent is a folder we can write in (probed
    with a temporary file, removed at once). Writes nothing that stays.

    Example:
        >>> check_writable("/proc/out")  # doctest: +SKIP
        CliError: --out /proc/out: cannot write in /proc (Permission denied)
    """
    out = Path(out)
    if out.is_dir() and not os.access(out, os.W_OK):
        raise CliError(f"{flag} {out}: the folder is not writable")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise CliError(f"{flag} {out}: {parent} is a file, not a folder")
    try:  # a real probe: permissions, read-only file systems, quotas; removed at once
        fd, probe = tempfile.mkstemp(prefix=".prunekit-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CliError(f"{flag} {out}: cannot write in {parent} ({exc.strerror})") from None
    return out


def run_record(args: argparse.Namespace) -> dict[str, Any]:
    """What produced an output: the command line, the seed, versions and the time (UTC)."""
    import torch

    from prunekit._version import __version__

    argv = getattr(args, "argv", None)
    record: dict[str, Any] = {
        "command": "prunekit " + shlex.join(argv) if argv is not None else None,
        "seed": getattr(args, "seed", None),
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import transformers

        record["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    return record


def load_hf(folder: Path) -> nn.Module:
    """Load any Hugging Face folder the commands write or read: plain, structurally pruned
    (per-layer widths rebuilt from ``prunekit.json`` before the weights load) or compressed."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CliError(
            "Hugging Face folders need transformers: pip install 'prunekit[hf]'"
        ) from exc
    quiet()
    from prunekit.graph.hf import from_pretrained

    return from_pretrained(folder).eval()


def write_hf(
    model: nn.Module,
    out: Path,
    *,
    source: Path,
    args: argparse.Namespace,
    metadata: dict[str, Any] | None = None,
    compressed: bool = False,
    bits: int | None = None,
    granularity: str = "per_channel",
) -> dict[str, Any]:
    """Write ``model`` as a Hugging Face folder with ``prunekit.save_pretrained`` (its surgery
    record kept, so prunekit reloads it with its per-layer shapes), the source folder's other
    files (tokenizer, sentence-transformers modules, README ...) and the run record; return
    the written ``prunekit.json``."""
    from prunekit.graph.hf import save_pretrained

    meta = {**(metadata or {}), RUN_KEY: run_record(args)}
    save_pretrained(
        model,
        out,
        source=source,
        overwrite=getattr(args, "overwrite", False),
        metadata=meta,
        compressed=compressed,
        bits=bits,
        granularity=granularity,
    )
    return json.loads((out / "prunekit.json").read_text())


def loading_note(out: Path, meta: dict[str, Any]) -> str:
    """One line: how to load the written folder (transformers, or only prunekit), and why.

    Example:
        >>> loading_note(Path("out"), {"plain_loadable": True})
        "wrote out (loads with transformers' from_pretrained and prunekit.from_pretrained)"
    """
    if meta.get("plain_loadable", True):
        return (
            f"wrote {out} (loads with transformers' from_pretrained and prunekit.from_pretrained)"
        )
    if meta.get("compressed_weights"):
        why = "its weights are stored compressed"
    else:
        from prunekit.graph.hf_config import plain_mismatch

        try:
            mismatch = plain_mismatch(out)
        except Exception:  # the note is advice; never fail a finished write over it
            mismatch = None
        why = (
            f"config.json cannot hold its pruned shapes: {mismatch}"
            if mismatch
            else "config.json cannot hold its pruned shapes"
        )
    return (
        f"wrote {out}; transformers' from_pretrained cannot load it ({why}); load it with "
        f"prunekit.from_pretrained({str(out)!r}) or any prunekit command"
    )


def add_parser(
    subparsers: argparse._SubParsersAction, name: str, help: str, *example_lines: str
) -> argparse.ArgumentParser:
    """A command's parser: its help as description, defaults shown, examples as epilog."""
    return subparsers.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        formatter_class=HelpFormatter,
        epilog=examples(*example_lines) if example_lines else None,
    )


def add_output_flags(parser: argparse.ArgumentParser, out_help: str = "output folder") -> None:
    """``--out``, ``--overwrite`` and ``--json``, the same on every writing command."""
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def is_causal(model: nn.Module) -> bool:
    """A causal language model (next-token logits), judged by its class name."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def tokenizer_of(folder: Path, command: str) -> Any:
    """The folder's tokenizer, or a CliError saying the command needs one."""
    quiet()
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(
            f"{folder}: {command} needs the model's tokenizer in the folder ({exc})"
        ) from exc


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def check_text_file(path: str | os.PathLike | None, flag: str, shown: str | None = None) -> None:
    """Refuse a ``--calib`` / ``--data`` / ``--eval`` text file that is not UTF-8 text.

    Calibration text is decoded leniently (bad bytes become replacement characters), so a
    binary file given by mistake (an archive, a checkpoint, an image) would otherwise calibrate
    the model on noise without a word; training and evaluation text would fail later with a
    codec error that names no flag. A final multi-byte character cut short is not an error.
    ``shown`` is how the file appears in the message after ``flag`` (default: the path).
    """
    if path is None:
        return
    data = Path(path).read_bytes()
    hint = "; it is gzip-compressed: decompress it first" if data[:2] == b"\x1f\x8b" else ""
    bad = [data.find(b"\x00")]  # NUL: valid UTF-8, but never in text
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad.append(exc.start if exc.reason != "unexpected end of data" else -1)
    position = min((b for b in bad if b >= 0), default=-1)
    if position >= 0:
        raise CliError(
            f"{flag} {shown or path}: not a UTF-8 text file (binary data at byte {position:,}"
            f"{hint}); "
            "give plain UTF-8 text"
        )
