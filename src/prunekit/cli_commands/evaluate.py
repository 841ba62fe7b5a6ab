"""``prunekit eval``: the quality of a model folder, beside its reference (the dense model).

    prunekit eval sparse --reference ./llama --text valid.txt          # causal LM: perplexity
    prunekit eval small --reference ./minilm --sts sts-dev.csv         # encoder: STS, fidelity

Causal LMs: perplexity on ``--text`` (default: CPython's pydoc prose), non-overlapping windows
of ``--seq-len`` tokens, at most ``--max-tokens`` tokens. Encoders: Spearman x100 on STS-B style
pairs (``--sts``), and with ``--reference`` the fidelity: mean cosine of the mean-pooled
outputs with the reference's on ``--n-samples`` windows of the text. Also reported: parameters
and the fraction of zeros in the prunable weights. Uses :mod:`prunekit.recipes.metrics`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from prunekit.cli_commands.common import (
    CliError,
    add_parser,
    hf_source,
    input_file,
    is_causal,
    load_hf,
    positive_int,
    print_json,
    seq_len_for,
    tokenizer_of,
)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    e = add_parser(
        subparsers,
        "eval",
        "quality of a Hugging Face folder (perplexity, STS Spearman, fidelity) beside a reference",
        "prunekit eval sparse --reference ./llama --text valid.txt",
        "prunekit eval small --reference ./minilm --sts sts-dev.csv",
    )
    e.add_argument("path", help="a Hugging Face model folder with its tokenizer")
    e.add_argument("--reference", default=None, help="the dense model folder to compare with")
    e.add_argument("--text", default=None, help="text file (None: CPython's pydoc prose)")
    e.add_argument("--sts", default=None, help="STS-B style tab-separated sentence pairs")
    e.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="tokens per window (None: 128, at most the model's positions)",
    )
    e.add_argument(
        "--max-tokens", type=positive_int, default=16384, help="perplexity: tokens of text used"
    )
    e.add_argument("--n-samples", type=positive_int, default=16, help="fidelity: windows")
    e.add_argument("--seed", type=int, default=0, help="seed of the fidelity windows")
    e.add_argument("--json", action="store_true", help="print the measures as JSON")
    e.set_defaults(func=cmd_eval)


def _text_ids(args: argparse.Namespace, tokenizer: Any) -> torch.Tensor:
    from prunekit.calibrate.data import _encode, pydoc_text

    text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else None
    ids = _encode(text if text is not None else pydoc_text()[: 40 * args.max_tokens], tokenizer)
    return ids[: args.max_tokens]


def _sparsity(model: torch.nn.Module) -> dict[str, float]:
    from prunekit.report import stats

    report = stats(model)
    return {"params": float(report.model_params), "sparsity": float(report.sparsity)}


def cmd_eval(args: argparse.Namespace) -> int:
    """``prunekit eval``: measure the model (and the reference), print a table."""
    from prunekit.recipes import metrics

    source = hf_source(args.path, "eval")
    reference_dir = hf_source(args.reference, "eval --reference") if args.reference else None
    input_file(args.text, "--text")
    sts_file = input_file(args.sts, "--sts")
    args.seq_len = seq_len_for(args, source)
    tokenizer = tokenizer_of(source, "eval")
    model = load_hf(source)
    causal = is_causal(model)
    if not causal and sts_file is None and reference_dir is None:
        raise CliError(
            f"{source}: an encoder has no perplexity; give --sts FILE (sentence pairs) and/or "
            "--reference DIR (fidelity to the dense model)"
        )
    if causal and sts_file is not None:
        raise CliError("--sts measures sentence encoders; a causal LM is measured by perplexity")
    reference = load_hf(reference_dir) if reference_dir else None
    measures: dict[str, Any] = {}
    ids = _text_ids(args, tokenizer)
    if causal:
        if ids.numel() < args.seq_len:
            raise CliError(
                f"the text has {ids.numel()} tokens, fewer than one window of --seq-len "
                f"{args.seq_len}"
            )
        measures["perplexity"] = metrics.perplexity(ids, seq_len=args.seq_len)
    else:
        if sts_file is not None:
            try:
                pairs = metrics.read_sts(str(sts_file))
            except ValueError as exc:
                raise CliError(f"--sts {sts_file}: {exc}") from exc
            measures["sts_spearman"] = metrics.sts_spearman(
                pairs, tokenizer, max_length=args.seq_len
            )
        if reference is not None:
            from prunekit.calibrate.data import calibration

            if ids.numel() < args.seq_len + 1:
                raise CliError(
                    f"the text has {ids.numel()} tokens, fewer than --seq-len {args.seq_len} + 1"
                )
            calib = calibration(ids, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
            batches = [
                {"input_ids": s["input_ids"], "attention_mask": torch.ones_like(s["input_ids"])}
                for s in calib
            ]
            measures["fidelity"] = metrics.fidelity(batches).bind(reference)
    rows = []
    for name, metric in measures.items():
        value = metric(model)
        ref = None
        if reference is not None and name != "fidelity":
            ref = metric(reference)
        rows.append({"measure": name, "model": value, "reference": ref})
    for name, value in _sparsity(model).items():
        ref = _sparsity(reference)[name] if reference is not None else None
        rows.append({"measure": name, "model": value, "reference": ref})
    for row in rows:
        ref = row["reference"]
        row["ratio"] = row["model"] / ref if ref else None
    result = {
        "model": str(source),
        "reference": str(reference_dir) if reference_dir else None,
        "causal_lm": causal,
        "text": args.text or "pydoc",
        "measures": rows,
    }
    if args.json:
        print_json(result)
        return 0
    print(_table(result))
    return 0


def _fmt(value: float | None, name: str) -> str:
    if value is None:
        return "-"
    if name == "params":
        return f"{value:,.0f}"
    if name == "sparsity":
        return f"{100 * value:.2f} %"
    return f"{value:.4f}"


def _table(result: dict) -> str:
    head = ("measure", "model", "reference", "model / reference")
    body = [
        (
            r["measure"],
            _fmt(r["model"], r["measure"]),
            _fmt(r["reference"], r["measure"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.4f}",
        )
        for r in result["measures"]
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(4)]
    lines = [
        f"prunekit eval {result['model']}"
        + (f" (reference {result['reference']})" if result["reference"] else "")
    ]
    for row in [head, *body]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)
