"""``prunekit compress`` and ``prunekit recipes``: run a recipe on a Hugging Face folder, list
and show the shipped recipes.

    prunekit recipes                                   # the shipped recipes, one line each
    prunekit recipes llm-2of4-int8                     # one recipe's YAML
    prunekit compress MODEL_DIR --recipe llm-2of4-int8 --out runs/llm --calib text.txt \\
        --eval perplexity:valid.txt
    prunekit compress MODEL_DIR --recipe my.yaml --out runs/enc --calib text.txt --data text.txt \\
        --eval sts:sts-dev.csv --eval-also fidelity

Run the same command again after an interruption and it resumes at the first unfinished stage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

GOAL_NOT_MET = 3  # exit status when a recipe's goal: was not met (the model is still written)

EVAL_HELP = (
    "quality measure: perplexity:FILE (causal LM, text file), sts:FILE (sentence encoder, "
    "STS-B style tab-separated pairs), fidelity (cosine of pooled outputs with the dense model "
    "on the calibration samples), or module:function (a Python callable model -> float)"
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compress`` and ``recipes`` to the ``prunekit`` command's subparsers."""
    from prunekit.cli_commands.common import HelpFormatter, examples, positive_int

    c = subparsers.add_parser(
        "compress",
        help="run a recipe (prune, recover, quantize, save) on a Hugging Face folder, measured",
        description="Run a recipe stage by stage on a Hugging Face model folder; every stage is "
        "checkpointed under --out and measured (parameters, MACs, non-zeros, file size, "
        "latency, quality); report.json/.md/.html are written there. Run the same command again "
        "to resume after an interruption. A recipe with a goal: exits with status 3 when the "
        "goal was not met (the closest model is still written).",
        formatter_class=HelpFormatter,
        epilog=examples(
            "prunekit compress ./llama --recipe llm-2of4-int8 --out runs/llm --calib text.txt "
            "--eval perplexity:valid.txt"
        ),
    )
    c.add_argument(
        "model", type=Path, help="a Hugging Face model folder (config.json + safetensors)"
    )
    c.add_argument(
        "--recipe",
        required=True,
        help="a shipped recipe name (prunekit recipes) or a YAML/JSON file",
    )
    c.add_argument(
        "--out", type=Path, required=True, help="run folder: checkpoints, model/, report"
    )
    c.add_argument("--calib", default=None, help="calibration text file (default: pydoc prose)")
    c.add_argument("--data", default=None, help="training text file for finetune stages")
    c.add_argument("--eval", dest="eval_spec", default=None, help=EVAL_HELP)
    c.add_argument("--n-samples", type=positive_int, default=64, help="calibration samples")
    c.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sample / window")
    c.add_argument("--batch-size", type=positive_int, default=8, help="training batch size")
    c.add_argument(
        "--max-train-windows", type=positive_int, default=512, help="cap on training windows"
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    c.add_argument("--restart", action="store_true", help="ignore existing checkpoints")
    c.add_argument("--json", action="store_true", help="print report.json's table instead of text")
    c.set_defaults(func=run_compress)

    r = subparsers.add_parser(
        "recipes",
        help="list the shipped recipes, or print one",
        description="List the shipped recipes, or print one's YAML (a start for your own).",
        formatter_class=HelpFormatter,
        epilog=examples("prunekit recipes", "prunekit recipes llm-2of4-int8 > my.yaml"),
    )
    r.add_argument("name", nargs="?", help="a shipped recipe to print")
    r.set_defaults(func=run_recipes)


def run_recipes(args: argparse.Namespace) -> int:
    from prunekit.recipes.schema import builtin_dir, list_recipes

    recipes = list_recipes()
    if args.name is None:
        width = max(map(len, recipes), default=0)
        for name, text in recipes.items():
            first = text.split(". ")[0].rstrip(".")
            print(f"{name.ljust(width)}  {first}")
        return 0
    if args.name not in recipes:
        raise ValueError(f"no shipped recipe {args.name!r}; shipped: {', '.join(recipes)}")
    print((builtin_dir() / f"{args.name}.yaml").read_text(), end="")
    return 0


# ---------------------------------------------------------------------------- data from files


def _windows(text: str, tokenizer: Any, seq_len: int, limit: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)[:limit]


def _is_causal(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _training_batches(windows: torch.Tensor, batch_size: int, causal: bool) -> list[dict]:
    batches = []
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if causal:
            batch["labels"] = ids
        batches.append(batch)
    return batches


def _user_callable(spec: str) -> Any:

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--eval {spec}: cannot import {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--eval {spec}: {module_name} has no callable {attr!r}")
    return fn


def _check_eval_spec(spec: str | None) -> None:
    """Cheap checks of --eval before any model is loaded."""

    if spec is None:
        return
    kind, _, arg = spec.partition(":")
    if kind in ("perplexity", "sts") and (not arg or not Path(arg).is_file()):
        raise ValueError(f"--eval {spec}: no such file {arg!r}")
    if kind not in ("perplexity", "sts", "fidelity") and not arg:
        raise ValueError(f"--eval {spec}: unknown measure; accepted: {EVAL_HELP}")


def _metric(spec: str | None, tokenizer: Any, calib: Any, seq_len: int, causal: bool) -> Any:
    from prunekit.recipes import metrics

    if spec is None:
        return None
    kind, _, arg = spec.partition(":")
    if kind == "fidelity":
        return metrics.fidelity([dict(s) for s in calib])
    if kind in ("perplexity", "sts"):
        if not arg or not Path(arg).is_file():
            raise ValueError(f"--eval {spec}: no such file {arg!r}")
        if kind == "perplexity":
            if not causal:
                raise ValueError(
                    "--eval perplexity needs a causal LM; for encoders use sts: or fidelity"
                )
            text = Path(arg).read_text(encoding="utf-8")
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            return metrics.perplexity(ids.reshape(-1), seq_len=seq_len)
        try:
            return metrics.sts_spearman(metrics.read_sts(arg), tokenizer)
        except ValueError as exc:
            raise ValueError(f"--eval {spec}: {exc}") from exc
    if not arg:
        raise ValueError(f"--eval {spec}: unknown measure; accepted: {EVAL_HELP}")
    return _user_callable(spec)


def _record_run(args: argparse.Namespace, report: Any) -> None:
    """Add what produced the run (command line, seed, versions, time) to report.json."""
    from prunekit.cli_commands.common import run_record
    from prunekit.compress.durable import write_text_atomic

    path = Path(report.files.get("json", args.out / "report.json"))
    data = json.loads(path.read_text())
    data["run"] = run_record(args)
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def run_compress(args: argparse.Namespace) -> int:
    from prunekit.cli_hf import tokenizer_and_calibration
    from prunekit.graph.cli import hf_folder, load_hf_folder
    from prunekit.recipes.runner import compress
    from prunekit.recipes.schema import load_recipe

    recipe = load_recipe(args.recipe)  # a RecipeError (ValueError) lists every problem
    if args.model.is_file() and args.model.suffix == ".safetensors":
        raise ValueError(
            f"{args.model}: a bare safetensors file has no architecture to run, so compress "
            "cannot calibrate, fine-tune or measure it; give a Hugging Face folder (config.json "
            "+ weights), or use `prunekit prune FILE` for data-free pruning of a file"
        )
    hf_folder(str(args.model))  # a folder with config.json and safetensors weights
    from prunekit.cli_commands.common import check_writable

    if (
        args.out.resolve() == args.model.resolve()
        or args.model.resolve() in args.out.resolve().parents
    ):
        raise ValueError(
            f"--out {args.out} would overwrite or nest inside the input {args.model}; choose "
            "another path"
        )
    check_writable(args.out)  # an existing run folder is resumed; it must be writable
    _check_eval_spec(args.eval_spec)
    from prunekit.cli_commands.common import check_text_file

    for flag, value in (("--calib", args.calib), ("--data", args.data)):
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{flag} {value}: no such file")
        check_text_file(value, flag)
    kind, _, arg = (args.eval_spec or "").partition(":")
    if kind in ("perplexity", "sts"):
        check_text_file(arg, "--eval", shown=args.eval_spec)
    needs = recipe.needs()
    if "data" in needs and args.data is None:
        raise ValueError(
            f"the recipe's {', '.join(needs['data'])} stage needs --data FILE (training text)"
        )
    for name, value in (
        ("--n-samples", args.n_samples),
        ("--seq-len", args.seq_len),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    tokenizer, calib = tokenizer_and_calibration(
        args.model,
        args.calib,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        command="compress",
    )
    model = load_hf_folder(args.model)  # structurally pruned folders too
    causal = _is_causal(model)
    data = loss_fn = None
    if args.data is not None:
        text = Path(args.data).read_text(encoding="utf-8")
        try:
            windows = _windows(text, tokenizer, args.seq_len, args.max_train_windows)
        except ValueError as exc:
            raise ValueError(f"--data {args.data}: {exc}") from exc
        data = _training_batches(windows, args.batch_size, causal)
        if causal:

            def loss_fn(m, batch):  # noqa: E306 - the causal LM's own loss
                return m(**batch).loss

    metric = _metric(args.eval_spec, tokenizer, calib, args.seq_len, causal)
    example = {k: v for k, v in dict(calib[0]).items()}
    report = compress(
        model,
        recipe,
        calib=calib,
        data=data,
        loss_fn=loss_fn,
        evaluate=metric,
        example_inputs=example,
        out=args.out,
        resume=not args.restart,
        source=args.model,
    )
    _record_run(args, report)
    if args.json:
        print(json.dumps(report.rows(), indent=1, default=str))
    else:
        print(report)
        print(f"model: {args.out / 'model'}   report: {report.files.get('html')}")
    if report.goal_met is False:
        print(
            "prunekit compress: the recipe's goal was not met (see the goal line above); the "
            "closest model found was written",
            file=sys.stderr,
        )
        return GOAL_NOT_MET
    return 0
