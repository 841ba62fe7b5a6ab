"""prunekit demo: one recipe turns a trained CNN into a smaller, faster, int8 model, measured.

What it shows, on CPU and offline, in well under a minute:

1. A tiny CNN is trained on scikit-learn's digits data set (1,797 real 8x8 scans of handwritten
   digits, shipped with scikit-learn, so nothing is downloaded). The data is split 75/25,
   stratified by class, with a fixed seed; every accuracy printed is on the 450 held-out test
   images, which training never sees.
2. ``prunekit.compress(model, "cnn-small", ...)`` runs the shipped ``cnn-small`` recipe
   (``prunekit recipes cnn-small`` prints it): channels cut to about half the MACs (structured,
   the model really shrinks), 90 % of the remaining weights pruned by global magnitude,
   recovery by fine-tuning with distillation from the dense model, int8 quantization, and a
   compressed save. Every stage is measured: parameters, non-zeros, MACs, file size against the
   dense fp32 file, latency at batch 1 and 32 next to the dense model, and test accuracy.
3. The saved model is loaded into a fresh instance with the pruned widths and checked to give
   outputs identical to the model the pipeline returned.

Run it with ``make demo``, or from the repository root:

    .venv/bin/python examples/demo.py            # full run
    .venv/bin/python examples/demo.py --quick    # fewer epochs, for smoke tests

Everything is seeded. The run folder (stage checkpoints, ``model/``, ``report.html``) goes to
``--out`` (default ``prunekit-demo/``); running again resumes from its checkpoints.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import prunekit

SEED = 0


class DigitsCNN(nn.Module):
    """A tiny CNN for 1x8x8 images (~23k parameters).

    Every layer but the first has an input size that is a multiple of 4 (conv2: 16 channels x
    3x3 = 144, conv3: 288, fc1: 128), so the 2:4 pattern applies to them. conv1 has 1 x 3x3 = 9
    inputs and is skipped by 2:4; ``fc2`` is the output head, which prunekit leaves alone by
    default.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)  # 16 x 8 x 8
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)  # 32 x 8 x 8 -> pool -> 32 x 4 x 4
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)  # 32 x 4 x 4 -> pool -> 32 x 2 x 2
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.pool(self.act(self.conv2(x)))
        x = self.pool(self.act(self.conv3(x)))
        x = self.act(self.fc1(x.flatten(1)))
        return self.fc2(x)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


def load_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Digits as float images in [0, 1], split 75/25 stratified by class."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # N x 1 x 8 x 8
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, stratify=digits.target, random_state=seed
    )
    train = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    test = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))
    return train, test


def train(model: nn.Module, data: TensorDataset, epochs: int, seed: int) -> None:
    """A plain PyTorch loop: Adam, cross-entropy, shuffled mini-batches of 64."""
    loader = DataLoader(
        data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(range(epochs), desc="training", unit="epoch")
    for _ in bar:
        total, count = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


def run_recipe(
    model: nn.Module, train_set: TensorDataset, test_set: TensorDataset, out: Path, quick: bool
) -> prunekit.CompressReport:
    """The shipped cnn-small recipe, end to end (fewer fine-tuning epochs with --quick)."""
    recipe = prunekit.load_recipe("cnn-small").to_dict()
    if quick:
        for stage in recipe["stages"]:
            if "finetune" in stage:
                stage["finetune"]["epochs"] = 2
        recipe["measure"] = {"repeats": 10}
    loader = DataLoader(
        train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    return prunekit.compress(
        model,
        recipe,
        data=loader,
        loss_fn=lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1]),
        evaluate=prunekit.recipes.metrics.accuracy([test_set.tensors]),
        example_inputs=test_set.tensors[0][:1],
        out=out,
    )


def check_round_trip(report: prunekit.CompressReport, test: TensorDataset, folder: Path) -> None:
    """Load the saved folder into a fresh DigitsCNN and compare outputs bit for bit."""
    restored = prunekit.load(folder, DigitsCNN())
    result = report.model.eval()
    x = test.tensors[0]
    with torch.no_grad():
        same = torch.equal(result(x), restored.eval()(x))
    if not same:
        raise SystemExit("the saved model does not reproduce the pipeline's outputs")
    widths = [m.out_channels for m in (restored.conv1, restored.conv2, restored.conv3)]
    print(
        f"\nreloaded {folder} into a fresh DigitsCNN (conv widths now {widths}, from 16/32/32);"
        f" outputs on all {len(x)} test images are identical."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, for smoke tests")
    parser.add_argument("--seed", type=int, default=SEED, help="data split, init and shuffling")
    parser.add_argument("--out", type=Path, default=Path("prunekit-demo"), help="run folder")
    args = parser.parse_args()
    epochs = 5 if args.quick else 25

    # A model this small gains nothing from many threads; two also keeps runs reproducible.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    seed_everything(args.seed)

    train_set, test_set = load_data(args.seed)
    print(
        f"prunekit {prunekit.__version__} demo: scikit-learn digits, {len(train_set)} train / "
        f"{len(test_set)} test images (stratified split, seed {args.seed}); accuracies are on "
        "the test split."
    )
    model = DigitsCNN()
    print(f"DigitsCNN: {sum(p.numel() for p in model.parameters()):,} parameters")
    train(model, train_set, epochs, args.seed)
    print(f"dense model test accuracy: {100 * accuracy(model, test_set):.2f} %\n")
    print("running the shipped recipe cnn-small (prunekit recipes cnn-small prints it)")
    report = run_recipe(model, train_set, test_set, args.out, args.quick)
    print()
    print(report)
    check_round_trip(report, test_set, args.out / "model")
    final = report.rows()[-1]
    print(
        f"\nresult: {100 * final['quality']:.2f} % test accuracy "
        f"({100 * final['quality_retained']:.1f} % of dense) with "
        f"{100 * final['nonzero_fraction']:.1f} % of the weights, "
        f"{100 * (final['mac_fraction'] or 1):.0f} % of the MACs, in "
        f"{100 * final['file_fraction']:.1f} % of the fp32 file."
    )
    print(f"report: {report.files['html']} (also report.md and report.json)")


if __name__ == "__main__":
    main()
