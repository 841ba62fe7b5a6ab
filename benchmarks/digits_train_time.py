"""scikit-learn digits, a small CNN trained from scratch: every train-time pruning schedule.

Data: ``sklearn.datasets.load_digits`` (1,797 real 8x8 scans, shipped with scikit-learn), split
75/25 stratified by class with ``random_state=0`` (1,347 training images, 450 test images), as
in ``examples/demo.py``. Every accuracy is on the 450 test images, which no run trains or selects
on (fixed epochs, no early stopping). With 450 test images one image is 0.22 %, so each figure is
the mean over ``--seeds`` (default 3 seeds: initialisation, data order), with min-max.

Model: ``DigitsCNN`` (conv1 1->16, conv2 16->32, conv3 32->32, fc1 128->64, fc2 64->10;
22,954 parameters). Pruned: prunekit's default targets, every conv and linear weight except the
output head fc2 (22,160 weights); global scope.

What runs, at 90, 95 and 98 % sparsity:

1. **dense**: Adam (lr 3e-3), cross-entropy, ``--epochs`` epochs, batch 64.
2. **one-shot magnitude** from the dense model, without training and after recovery
   (``finetune``: ``--recovery-epochs`` epochs, CE + distillation from the dense model, T=4,
   Adam 1e-3 with cosine decay).
3. **gradual magnitude from scratch**: the dense recipe with a ``GradualPruner`` (cubic schedule
   from step 10 % to 60 % of training, updates every epoch).
4. **pruning at initialisation**: SNIP (one batch of 256 training images), SynFlow (data-free)
   and random, each followed by the dense recipe with the mask fixed.
5. **lottery ticket**: iterative magnitude pruning through 50, 80, 90, 95 and 98 % with late
   rewinding to the weights after one epoch (``rewind_to`` = steps per epoch); each round trains
   with the dense recipe. Control: the same masks with the weights re-initialised at random
   ("random re-init"), trained with the same recipe.

Run from the repository root (a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/digits_train_time.py
    .venv/bin/python benchmarks/digits_train_time.py --seeds 0 --json digits.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_common import Timer, accuracy, environment, pct, seed_everything, table, write_json

import prunekit
from prunekit.masks import apply_mask, get_mask
from prunekit.train import (
    GradualPruner,
    PolynomialSchedule,
    finetune,
    lottery_ticket,
    prune_at_init,
)

SPARSITIES = (0.90, 0.95, 0.98)
LOTTERY_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


class DigitsCNN(nn.Module):
    """A tiny CNN for 1x8x8 images (the demo's architecture)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_digits_split() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, stratify=digits.target, random_state=0
    )
    return tuple(torch.from_numpy(a) for a in (x_train, y_train.astype(np.int64), x_test, y_test))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class Bench:
    """One seed's data loader and training recipes."""

    def __init__(self, args: argparse.Namespace, seed: int, split: tuple[torch.Tensor, ...]):
        self.args, self.seed = args, seed
        self.x_train, self.y_train, self.x_test, self.y_test = split
        generator = torch.Generator().manual_seed(seed)
        self.data = DataLoader(
            TensorDataset(self.x_train, self.y_train),
            batch_size=64,
            shuffle=True,
            generator=generator,
        )
        self.steps_per_epoch = len(self.data)

    def fresh(self, offset: int = 0) -> DigitsCNN:
        torch.manual_seed(1000 * self.seed + offset)
        return DigitsCNN()

    def acc(self, model: nn.Module) -> float:
        return accuracy(model, self.x_test, self.y_test)

    def train(self, model: nn.Module, pruner: GradualPruner | None = None, ticket=None) -> None:
        """The dense recipe (also used with fixed masks, a pruner, or a lottery ticket)."""
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        if pruner is not None:
            pruner.optimizer = opt
        model.train()
        for _ in range(self.args.epochs):
            for batch in self.data:
                opt.zero_grad()
                ce(model, batch).backward()
                opt.step()
                if pruner is not None:
                    pruner.step()
                if ticket is not None:
                    ticket.step()
                prunekit.masks.reapply_masks(model)

    def recover(self, model: nn.Module, teacher: nn.Module) -> None:
        steps = self.args.recovery_epochs * self.steps_per_epoch
        finetune(
            model,
            self.data,
            ce,
            teacher=teacher,
            temperature=4.0,
            epochs=self.args.recovery_epochs,
            optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
            scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
            inplace=True,
            restore_best=False,
            progress=False,
        )


def run_seed(bench: Bench) -> dict[str, Any]:
    args = bench.args
    out: dict[str, Any] = {}
    seed_everything(bench.seed)
    dense = bench.fresh()
    bench.train(dense)
    out["dense"] = bench.acc(dense)
    for s in args.sparsities:
        key = f"{s:g}"
        pruned = prunekit.prune(dense, s).model
        out[f"one_shot/{key}"] = bench.acc(pruned)
        bench.recover(pruned, dense)
        out[f"one_shot_recovered/{key}"] = bench.acc(pruned)

        model = bench.fresh()
        total = args.epochs * bench.steps_per_epoch
        schedule = PolynomialSchedule(
            final_sparsity=s,
            begin_step=total // 10,
            end_step=(6 * total) // 10,
            frequency=bench.steps_per_epoch,
        )
        pruner = GradualPruner(model, schedule)
        bench.train(model, pruner=pruner)
        out[f"gradual/{key}"] = bench.acc(model)

        g = torch.Generator().manual_seed(bench.seed)
        picks = torch.randperm(len(bench.x_train), generator=g)[:256]
        snip_batch = (bench.x_train[picks], bench.y_train[picks])
        for method in ("snip", "synflow", "random"):
            model = bench.fresh()
            prune_at_init(
                model,
                s,
                method,
                data=[snip_batch],
                loss_fn=ce,
                example_input=bench.x_train[:1],
                seed=bench.seed,
                inplace=True,
                progress=False,
            )
            bench.train(model)
            out[f"{method}_at_init/{key}"] = bench.acc(model)

    def train_fn(model, ticket):
        bench.train(model, ticket=ticket)
        return bench.acc(model)

    result = lottery_ticket(
        bench.fresh(),
        train_fn,
        sparsities=args.lottery_sparsities,
        rewind_to=bench.steps_per_epoch,
        progress=False,
    )
    for r in result.rounds[1:]:
        key = f"{args.lottery_sparsities[r.round - 1]:g}"
        out[f"lottery/{key}"] = r.metrics
        out[f"lottery_sparsity/{key}"] = r.sparsity
        control = bench.fresh(offset=1 + r.round)
        for name, keep in r.masks.items():
            apply_mask(control.get_submodule(name.rsplit(".", 1)[0]), "weight", keep)
        bench.train(control)
        out[f"random_reinit/{key}"] = bench.acc(control)
        assert torch.equal(get_mask(control.conv2), r.masks["conv2.weight"])
    return out


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return pct(mean)
    return f"{pct(mean)} ({pct(min(values), 1)}-{pct(max(values), 1)})"


def print_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    runs = results["runs"]

    def col(key: str) -> str:
        return summary([r[key] for r in runs if key in r])

    print()
    print(
        "scikit-learn digits, DigitsCNN from scratch; train 1,347 / test 450 images "
        "(75/25 stratified split, random_state=0)"
    )
    print(
        f"pruned: default targets ({results['pruned_weights']:,} weights; head fc2 dense), "
        f"global scope; mean over seeds {args.seeds} (min-max)"
    )
    print(f"dense accuracy: {col('dense')} %\n")
    methods = [
        ("one-shot magnitude", "one_shot"),
        ("one-shot + recovery", "one_shot_recovered"),
        ("gradual from scratch", "gradual"),
        ("SNIP at init", "snip_at_init"),
        ("SynFlow at init", "synflow_at_init"),
        ("random at init", "random_at_init"),
        ("lottery ticket (rewind 1 epoch)", "lottery"),
        ("  control: random re-init", "random_reinit"),
    ]
    header = ("method", *(f"{s:.0%}" for s in args.sparsities))
    body = [(label, *(col(f"{key}/{s:g}") for s in args.sparsities)) for label, key in methods]
    print(
        f"test accuracy (%), {args.epochs} training epochs, {args.recovery_epochs} recovery epochs"
    )
    print(table(header, body))
    extra = [s for s in args.lottery_sparsities if s not in args.sparsities]
    if extra:
        print("\nlottery ticket at its other rounds")
        print(
            table(
                ("method", *(f"{s:.0%}" for s in extra)),
                [(label, *(col(f"{key}/{s:g}") for s in extra)) for label, key in methods[-2:]],
            )
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of every recipe")
    parser.add_argument("--recovery-epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.lottery_sparsities = sorted(set(LOTTERY_SPARSITIES) | set(args.sparsities))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        split = load_digits_split()
    except ImportError:
        print("skipped: scikit-learn is not installed (pip install scikit-learn)")
        return 0
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "settings": {**vars(args), "json": str(args.json)},
        "environment": environment(args.threads),
        "split": "sklearn digits, train_test_split(test_size=0.25, stratify, random_state=0)",
        "pruned_weights": sum(
            t.weight().numel() for t in prunekit.targets.resolve_targets(DigitsCNN())
        ),
        "runs": [],
    }
    with Timer() as timer:
        try:
            for seed in args.seeds:
                with Timer() as one:
                    run = run_seed(Bench(args, seed, split))
                run["seed"], run["seconds"] = seed, one.seconds
                results["runs"].append(run)
                print(f"seed {seed}: done in {one.seconds:.0f} s", flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted: reporting the seeds that finished")
            results["interrupted"] = True
    results["seconds"] = timer.seconds
    print_report(results, args)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
