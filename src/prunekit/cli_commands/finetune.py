"""``prunekit finetune``: recover a pruned model folder on training text, keeping its zeros;
with ``--teacher``, distil from the dense model.

    prunekit finetune sparse --out tuned --data train.txt --max-steps 200
    prunekit finetune small-encoder --out tuned --data text.txt --teacher ./bert

Causal LMs train on next-token loss (plus, with ``--teacher``, the teacher's logits). Encoders
have no task loss on plain text: they need ``--teacher`` and learn to match its last hidden
states. The text is cut into ``--seq-len`` token windows (at most ``--max-windows``), in
batches of ``--batch-size``. ``--checkpoint DIR`` saves the run after every epoch; the same
command resumes there.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from prunekit.cli_commands.common import (
    CliError,
    add_output_flags,
    add_parser,
    check_output,
    hf_source,
    input_file,
    is_causal,
    load_hf,
    loading_note,
    positive_int,
    print_json,
    seq_len_for,
    tokenizer_of,
    write_hf,
)


def learning_rate(text: str) -> float | str:
    """``auto`` (a range test picks it) or a number > 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number > 0, got {text}")
    return value


def add_command(subparsers: argparse._SubParsersAction) -> None:
    f = add_parser(
        subparsers,
        "finetune",
        "fine-tune (or distil) a pruned Hugging Face folder on text, keeping its zeros",
        "prunekit finetune sparse --out tuned --data train.txt --max-steps 200",
        "prunekit finetune small-encoder --out tuned --data text.txt --teacher ./bert",
    )
    f.add_argument("path", help="a Hugging Face model folder with its tokenizer")
    add_output_flags(f)
    f.add_argument("--data", required=True, help="training text file")
    f.add_argument(
        "--teacher", default=None, help="the dense model folder to distil from (encoders: needed)"
    )
    f.add_argument("--epochs", type=positive_int, default=1, help="passes over the windows")
    f.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many")
    f.add_argument(
        "--lr", type=learning_rate, default="auto", help="peak learning rate, or auto (range test)"
    )
    f.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="tokens per window (None: 128, at most the model's positions)",
    )
    f.add_argument("--batch-size", type=positive_int, default=8, help="windows per step")
    f.add_argument("--max-windows", type=positive_int, default=512, help="cap on windows")
    f.add_argument("--checkpoint", default=None, help="folder for per-epoch resumable state")
    f.add_argument("--seed", type=int, default=0, help="seed of the run")
    f.set_defaults(func=cmd_finetune)


def _hidden(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def _encoder_loss(teacher: torch.nn.Module):
    """Mean squared difference of the last hidden states, over real tokens."""

    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            target = _hidden(teacher(**batch))
        hidden = _hidden(model(**batch))
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (((hidden - target) ** 2) * mask).sum() / (mask.sum() * hidden.shape[-1])

    return loss_fn


def cmd_finetune(args: argparse.Namespace) -> int:
    """``prunekit finetune``: checks, windows, train, write."""
    from prunekit.recipes.cli import _training_batches, _windows
    from prunekit.train import finetune

    source = hf_source(args.path, "finetune")
    data_file = input_file(args.data, "--data")
    teacher_dir = hf_source(args.teacher, "finetune --teacher") if args.teacher else None
    out = check_output(args.out, sources=[source], overwrite=args.overwrite)
    args.seq_len = seq_len_for(args, source)
    tokenizer = tokenizer_of(source, "finetune")
    text = data_file.read_text(encoding="utf-8", errors="replace")
    try:
        windows = _windows(text, tokenizer, args.seq_len, args.max_windows)
    except ValueError as exc:
        raise CliError(f"--data {data_file}: {exc}; lower --seq-len or give more text") from exc
    model = load_hf(source)
    causal = is_causal(model)
    teacher = load_hf(teacher_dir) if teacher_dir else None
    if not causal and teacher is None:
        raise CliError(
            f"{source}: an encoder has no task loss on plain text; give --teacher DIR (the dense "
            "model) to distil its hidden states"
        )
    if teacher is not None and not causal:
        width = (model.config.hidden_size, teacher.config.hidden_size)
        if width[0] != width[1]:
            raise CliError(
                f"--teacher {teacher_dir}: hidden size {width[1]}, the model's is {width[0]}; "
                "hidden states can only be matched at the same width"
            )
    torch.manual_seed(args.seed)
    batches = _training_batches(windows, args.batch_size, causal)
    if causal:
        result = finetune(
            model,
            batches,
            lambda m, b: m(**b).loss,
            teacher=teacher,
            epochs=args.epochs,
            max_steps=args.max_steps,
            lr=args.lr,
            checkpoint=args.checkpoint,
            inplace=True,
        )
    else:
        result = finetune(
            model,
            batches,
            _encoder_loss(teacher),
            epochs=args.epochs,
            max_steps=args.max_steps,
            lr=args.lr,
            checkpoint=args.checkpoint,
            inplace=True,
        )
    summary = {
        "steps": result.steps,
        "lr": result.lr,
        "windows": len(windows),
        "seq_len": args.seq_len,
        "teacher": str(teacher_dir) if teacher_dir else None,
        "history": result.history,
    }
    meta = write_hf(model, out, source=source, args=args, metadata={"finetune": summary})
    if args.json:
        print_json({**summary, "out": str(out), "plain_loadable": meta["plain_loadable"]})
        return 0
    losses = [row.get("train_loss") for row in result.history if row.get("train_loss") is not None]
    last = f", last train loss {losses[-1]:.4g}" if losses else ""
    print(
        f"finetune: {result.steps} steps on {len(windows)} windows of {args.seq_len} tokens, "
        f"lr {result.lr if result.lr is not None else 'given'}{last}"
    )
    print(loading_note(Path(out), meta))
    return 0
