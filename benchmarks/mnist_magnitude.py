"""MNIST magnitude pruning: prunekit against ``torch.nn.utils.prune``, accuracy and training speed.

What it measures, on a small trained LeNet-style CNN (conv1, conv2, fc1, fc2):

1. Accuracy on MNIST test images 5000-9999 of the dense model, and after magnitude pruning to
   50, 70, 80 and 90 % sparsity with

   * prunekit, global scope and local scope, targets conv1, conv2, fc1 and fc2;
   * ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured)`` and
     ``prune.l1_unstructured`` (per layer) on the same four weights;
   * prunekit global scope with its default targets (the output head fc2 left dense), for
     reference only: it prunes a different set of weights.

2. Agreement of the global (and local) masks of prunekit and torch: the number of positions where
   the two keep-masks differ, how many of those are ties (weights whose magnitude equals the
   pruning threshold, which either library may keep), and whether the accuracies are equal.
   The script exits with status 1 when the masks differ anywhere other than at ties.

3. The time of one training step (forward, cross-entropy, backward, SGD with momentum) at batch
   size 64 on images 0-4999, for the dense model, the prunekit-masked model (90 % global) and the
   ``torch.nn.utils.prune`` model (forward pre-hooks, 90 % global). The three models run in
   alternating rounds (order rotated every round) and the reported time is the median of the
   per-round medians. The target is a masked step within 1.15x of the dense step; the result is
   printed as PASS or MISS (a MISS does not change the exit status: timings depend on the
   machine).

Data: ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz`` and ``mnist_cnn.pt`` (a state
dict), read from ``../shared/data/mnist`` next to the repository, or from ``--data`` / the
``PRUNEKIT_DATA`` environment variable (the MNIST folder itself or a folder holding ``mnist/``).
Without the data the script says so and exits 0.

Run it from the repository root::

    .venv/bin/python benchmarks/mnist_magnitude.py
    .venv/bin/python benchmarks/mnist_magnitude.py --threads 4 --rounds 10 --json results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunekit
from prunekit.masks import get_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_common import MnistNet, find_folder, load_mnist  # noqa: E402
from train_common import load_mnist_model as load_model  # noqa: E402

LAYERS = ("conv1", "conv2", "fc1", "fc2")
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
EVAL_RANGE = (5000, 10000)
TRAIN_RANGE = (0, 5000)
TIMING_SPARSITY = 0.9
TARGET_RATIO = 1.15
Batch = tuple[torch.Tensor, torch.Tensor]
FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "mnist_cnn.pt")


Net = MnistNet


def find_data_dir(override: str | None) -> Path | None:
    """The folder holding the MNIST files, or None when they are not there."""
    return find_folder(override, "mnist", FILES)


# ---------------------------------------------------------------------------------------------
# Pruning


def prunekit_model(model: Net, sparsity: float, scope: str, all_layers: bool = True) -> Net:
    targets = list(LAYERS) if all_layers else None
    return prunekit.prune(model, sparsity=sparsity, scope=scope, targets=targets).model


def torch_model(model: Net, sparsity: float, scope: str) -> Net:
    """A copy pruned with ``torch.nn.utils.prune`` (L1 magnitude) on the four weights."""
    pruned = copy.deepcopy(model)
    params = [(getattr(pruned, name), "weight") for name in LAYERS]
    if scope == "global":
        torch_prune.global_unstructured(
            params, pruning_method=torch_prune.L1Unstructured, amount=sparsity
        )
    else:
        for module, name in params:
            torch_prune.l1_unstructured(module, name, amount=sparsity)
    return pruned


def prunekit_masks(model: nn.Module) -> list[torch.Tensor]:
    masks = [get_mask(getattr(model, name), "weight") for name in LAYERS]
    if any(m is None for m in masks):
        raise RuntimeError("prunekit left one of the target layers unmasked")
    return [m.bool() for m in masks]


def torch_masks(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(model, name).weight_mask.bool() for name in LAYERS]


def layer_sparsities(model: nn.Module) -> dict[str, float]:
    masks = prunekit_masks(model)
    return {name: 1.0 - m.float().mean().item() for name, m in zip(LAYERS, masks, strict=True)}


def mask_differences(
    model: Net, pk: list[torch.Tensor], th: list[torch.Tensor], sparsity: float, scope: str
) -> tuple[int, int]:
    """(positions where the masks differ, of which ties at the threshold magnitude).

    Global scope ranks the four weights together, local scope each layer on its own; the
    threshold is the largest magnitude either library must remove in that ranking.
    """
    weights = [getattr(model, name).weight.detach().abs().reshape(-1) for name in LAYERS]
    pk_flat = [m.reshape(-1) for m in pk]
    th_flat = [m.reshape(-1) for m in th]
    if scope == "global":
        weights, pk_flat, th_flat = [torch.cat(weights)], [torch.cat(pk_flat)], [torch.cat(th_flat)]
    differ = ties = 0
    for w, a, b in zip(weights, pk_flat, th_flat, strict=True):
        removed = round(sparsity * w.numel())
        diff = a != b
        differ += int(diff.sum())
        if removed:
            threshold = torch.kthvalue(w, removed).values
            ties += int((diff & (w == threshold)).sum())
    return differ, ties


# ---------------------------------------------------------------------------------------------
# Accuracy


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def accuracy_rows(model: Net, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """One row per sparsity: accuracies, per-layer sparsity and mask agreement."""
    rows = []
    for s in SPARSITIES:
        row: dict[str, Any] = {"sparsity": s}
        for scope in ("global", "local"):
            pk, th = prunekit_model(model, s, scope), torch_model(model, s, scope)
            differ, ties = mask_differences(model, prunekit_masks(pk), torch_masks(th), s, scope)
            row[scope] = {
                "prunekit_accuracy": accuracy(pk, x, y),
                "torch_accuracy": accuracy(th, x, y),
                "mask_differences": differ,
                "tie_differences": ties,
                "layer_sparsity": layer_sparsities(pk),
            }
            row[scope]["accuracy_equal"] = (
                row[scope]["prunekit_accuracy"] == row[scope]["torch_accuracy"]
            )
            row[scope]["agree"] = differ == ties and (differ > 0 or row[scope]["accuracy_equal"])
        row["default_targets_global_accuracy"] = accuracy(
            prunekit_model(model, s, "global", all_layers=False), x, y
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Training-step timing


def make_batches(x: torch.Tensor, y: torch.Tensor, size: int, count: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    picks = [torch.randint(0, len(x), (size,), generator=generator) for _ in range(count)]
    return [(x[i].contiguous(), y[i].contiguous()) for i in picks]


def make_stepper(model: nn.Module, batches: list[Batch]) -> Callable[[], None]:
    """A closure running one training step on the next batch (cycling through ``batches``)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    counter = iter(range(10**12))

    def step() -> None:
        inputs, labels = batches[next(counter) % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(inputs), labels)  # cross-entropy: the model ends in log_softmax
        loss.backward()
        optimizer.step()

    return step


def timed_steps(step: Callable[[], None], warmup: int, measured: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(measured):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def time_training(
    models: dict[str, nn.Module], batches: list[Batch], args: argparse.Namespace
) -> dict[str, Any]:
    """Median step time per model: alternating rounds, order rotated, median of round medians."""
    steppers = {name: make_stepper(model, batches) for name, model in models.items()}
    for step in steppers.values():
        timed_steps(step, args.warmup, 0)
    per_round = max(1, args.steps // args.rounds)
    names = list(steppers)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times = timed_steps(steppers[name], args.round_warmup, per_round)
            medians[name].append(statistics.median(times))
    return {
        "round_medians_ms": medians,
        "median_ms": {name: statistics.median(m) for name, m in medians.items()},
        "steps_per_round": per_round,
    }


def timing_models(model: Net) -> dict[str, nn.Module]:
    return {
        "dense": copy.deepcopy(model),
        "prunekit masked": prunekit_model(model, TIMING_SPARSITY, "global"),
        "torch prune": torch_model(model, TIMING_SPARSITY, "global"),
    }


# ---------------------------------------------------------------------------------------------
# Output


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        """First column left-aligned (labels), the others right-aligned (numbers)."""
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def print_accuracy(dense: float, rows: list[dict[str, Any]]) -> None:
    print(f"dense accuracy: {pct(dense)} %\n")
    print("accuracy (%) after magnitude pruning; prunekit and torch prune the same four weights")
    print(f"({', '.join(LAYERS)}); the last column is prunekit's default target set (fc2 dense)")
    header = ("sparsity", "pk global", "torch global", "pk local", "torch local", "pk default")
    body = [
        (
            f"{s['sparsity']:.0%}",
            pct(s["global"]["prunekit_accuracy"]),
            pct(s["global"]["torch_accuracy"]),
            pct(s["local"]["prunekit_accuracy"]),
            pct(s["local"]["torch_accuracy"]),
            pct(s["default_targets_global_accuracy"]),
        )
        for s in rows
    ]
    print(table(header, body) + "\n")
    print("per-layer sparsity (%) chosen by prunekit global magnitude")
    body = [
        (f"{s['sparsity']:.0%}", *(pct(s["global"]["layer_sparsity"][n]) for n in LAYERS))
        for s in rows
    ]
    print(table(("sparsity", *LAYERS), body) + "\n")


def print_agreement(rows: list[dict[str, Any]]) -> bool:
    print("mask agreement with torch.nn.utils.prune (positions that differ; ties at threshold)")
    header = ("sparsity", "scope", "differ", "ties", "same acc", "verdict")
    body = [
        (
            f"{s['sparsity']:.0%}",
            scope,
            str(s[scope]["mask_differences"]),
            str(s[scope]["tie_differences"]),
            "yes" if s[scope]["accuracy_equal"] else "no",
            "agree" if s[scope]["agree"] else "DISAGREE",
        )
        for s in rows
        for scope in ("global", "local")
    ]
    print(table(header, body) + "\n")
    return all(s[scope]["agree"] for s in rows for scope in ("global", "local"))


def print_timing(timing: dict[str, Any], args: argparse.Namespace) -> None:
    med = timing["median_ms"]
    print("training step: forward + cross-entropy + backward + SGD (momentum 0.9)")
    print(
        f"batch {args.batch_size} from images {TRAIN_RANGE[0]}-{TRAIN_RANGE[1] - 1}, "
        f"{args.threads} threads; pruned models: {TIMING_SPARSITY:.0%} global over the four layers"
    )
    print(
        f"{args.rounds} alternating rounds x {timing['steps_per_round']} measured steps per "
        f"model (order rotated; {args.warmup} warm-up steps first, {args.round_warmup} per round)"
    )
    print("reported: median of the per-round medians")
    body = [
        (name, f"{ms:.3f}", " ".join(f"{m:.2f}" for m in timing["round_medians_ms"][name]))
        for name, ms in med.items()
    ]
    print(table(("model", "median ms", "round medians ms"), body))
    verdict = "PASS" if timing["masked_over_dense"] <= TARGET_RATIO else "MISS"
    print(
        f"masked / dense       = {timing['masked_over_dense']:.3f}x  "
        f"(target <= {TARGET_RATIO}x: {verdict})"
    )
    print(f"masked / torch prune = {timing['masked_over_torch']:.3f}x")


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", default=os.environ.get("PRUNEKIT_DATA"), help="MNIST folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps per model")
    parser.add_argument("--steps", type=int, default=200, help="measured steps per model")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--round-warmup", type=int, default=5, help="unmeasured steps per round")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = find_data_dir(args.data)
    if folder is None:
        where = args.data or "../shared/data/mnist (relative to the repository root)"
        print(f"skipped: MNIST files {', '.join(FILES)} not found in {where}; set PRUNEKIT_DATA")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = load_mnist(folder)
    model = load_model(folder)
    x_eval, y_eval = x[slice(*EVAL_RANGE)], y[slice(*EVAL_RANGE)]
    x_train, y_train = x[slice(*TRAIN_RANGE)], y[slice(*TRAIN_RANGE)]

    print(
        f"prunekit {prunekit.__version__}, torch {torch.__version__}, "
        f"{platform.machine()} with {os.cpu_count()} CPUs, torch threads {args.threads}"
    )
    print(f"data: {folder}")
    print(f"evaluation: MNIST test images {EVAL_RANGE[0]}-{EVAL_RANGE[1] - 1} (n={len(x_eval)})\n")

    dense = accuracy(model, x_eval, y_eval)
    rows = accuracy_rows(model, x_eval, y_eval)
    print_accuracy(dense, rows)
    agree = print_agreement(rows)

    batches = make_batches(x_train, y_train, args.batch_size, count=64)
    timing = time_training(timing_models(model), batches, args)
    med = timing["median_ms"]
    timing["masked_over_dense"] = med["prunekit masked"] / med["dense"]
    timing["masked_over_torch"] = med["prunekit masked"] / med["torch prune"]
    timing["target_ratio"] = TARGET_RATIO
    timing["target_met"] = timing["masked_over_dense"] <= TARGET_RATIO
    print_timing(timing, args)

    if args.json:
        results = {
            "settings": {**vars(args), "json": str(args.json), "data": str(folder)},
            "versions": {"prunekit": prunekit.__version__, "torch": torch.__version__},
            "eval_images": list(EVAL_RANGE),
            "train_images": list(TRAIN_RANGE),
            "layers": list(LAYERS),
            "dense_accuracy": dense,
            "sparsities": rows,
            "masks_agree": agree,
            "timing": timing,
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    if not agree:
        print("\nFAIL: prunekit's magnitude masks differ from torch.nn.utils.prune beyond ties")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
