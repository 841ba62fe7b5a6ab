"""prunekit demo: prune a small CNN trained on real handwritten digits, then measure it.

What it shows, on CPU and offline, in well under a minute:

1. A tiny CNN is trained on scikit-learn's digits data set (1,797 real 8x8 scans of handwritten
   digits, shipped with scikit-learn, so nothing is downloaded). The data is split 75/25,
   stratified by class, with a fixed seed; every accuracy printed is on the 450 held-out test
   images, which training never sees.
2. The trained model is pruned by weight magnitude, with no retraining afterwards:
   unstructured at 50/70/80/90 % sparsity, with one global ranking over all layers and with
   every layer pruned to the same sparsity (local), plus the 2:4 pattern (two non-zeros in
   every group of four weights, the layout sparse tensor cores accelerate).
3. Each pruned model is finalized (zeros baked in, plain ``nn.Module`` again) and saved with
   ``prunekit.save`` into a temporary folder; the table reports the real size of the
   ``model.safetensors`` file, of the same bytes gzip-compressed, and of the compressed format
   (``compressed=True``: only the non-zeros plus an index), in float32 and with int8 values.
4. One pruned model is saved with its masks, loaded into a fresh instance with
   ``prunekit.load``, and checked to give identical outputs.

Run it with ``make demo``, or from the repository root:

    .venv/bin/python examples/demo.py            # full run
    .venv/bin/python examples/demo.py --quick    # fewer epochs, for smoke tests

Everything is seeded, so a rerun on the same machine prints the same numbers. Nothing is written
outside a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import warnings
from dataclasses import dataclass
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
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
SHOWN_CONFIG = "unstructured global 80%"  # the one whose prunekit table is printed


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


@dataclass
class Row:
    """One line of the final table."""

    config: str
    sparsity: float  # zeros / params over the pruned (targeted) weights
    model_sparsity: float  # zeros / params over every parameter (biases and head included)
    accuracy: float
    file_bytes: int
    gzip_bytes: int
    compressed_bytes: int
    int8_bytes: int


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


def saved_sizes(model: nn.Module, folder: Path) -> tuple[int, int, int, int]:
    """Bytes of model.safetensors for the finalized model: raw, gzip -9, compressed format
    (non-zeros + index, float32) and compressed with int8 values."""
    final = prunekit.finalize(model)
    path = prunekit.save(final, folder, overwrite=True)
    raw = (path / "model.safetensors").read_bytes()
    compressed = prunekit.save(final, folder, overwrite=True, compressed=True)
    compressed_bytes = (compressed / "model.safetensors").stat().st_size
    int8 = prunekit.save(final, folder, overwrite=True, compressed=True, bits=8)
    int8_bytes = (int8 / "model.safetensors").stat().st_size
    return len(raw), len(gzip.compress(raw, compresslevel=9)), compressed_bytes, int8_bytes


def prune_configs() -> list[tuple[str, dict]]:
    """(name, prunekit.prune keyword arguments) for every configuration in the table."""
    configs = [
        (f"unstructured {scope} {round(100 * s)}%", {"sparsity": s, "scope": scope})
        for scope in ("global", "local")
        for s in SPARSITIES
    ]
    configs.append(("2:4", {"pattern": "2:4"}))  # sparsity is implied: 50 %
    return configs


def prune_quietly(model: nn.Module, **kwargs: object) -> prunekit.PruneReport:
    """prunekit.prune, with its "skipping layer" warning left to report.skipped instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="prunekit: skipping")
        return prunekit.prune(model, **kwargs)


def check_round_trip(pruned: nn.Module, test: TensorDataset, folder: Path) -> None:
    """Save a masked model, load it into a fresh DigitsCNN, compare outputs bit for bit."""
    prunekit.save(pruned, folder, overwrite=True)
    restored = prunekit.load(folder, DigitsCNN())
    pruned.eval()
    restored.eval()
    x = test.tensors[0]
    with torch.no_grad():
        same = torch.equal(pruned(x), restored(x))
    if not same:
        raise SystemExit("save/load round trip changed the outputs")
    files = " + ".join(sorted(p.name for p in folder.iterdir()))
    print(f"save/load round trip: masked model saved ({files}) and loaded into a fresh")
    print(f"DigitsCNN; checked: outputs on all {len(x)} test images are identical.")


def print_table(rows: list[Row]) -> None:
    header = (
        "configuration", "sparsity", "all params", "test acc", "safetensors", "gzip -9",
        "compressed", "+ int8",
    )  # fmt: skip
    lines = [
        (
            r.config,
            f"{100 * r.sparsity:.1f} %",
            f"{100 * r.model_sparsity:.1f} %",
            f"{100 * r.accuracy:.2f} %",
            f"{r.file_bytes:,} B",
            f"{r.gzip_bytes:,} B",
            f"{r.compressed_bytes:,} B",
            f"{r.int8_bytes:,} B",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train 5 epochs instead of 25")
    parser.add_argument("--seed", type=int, default=SEED, help="data split, init and shuffling")
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
    dense_acc = accuracy(model, test_set)
    print(f"dense model test accuracy: {100 * dense_acc:.2f} %\n")

    with tempfile.TemporaryDirectory(prefix="prunekit-demo-") as tmp:
        tmp_dir = Path(tmp)
        rows = [Row("dense", 0.0, 0.0, dense_acc, *saved_sizes(model, tmp_dir / "dense"))]
        shown: prunekit.PruneReport | None = None
        configs = prune_configs()
        print(f"pruning {len(configs)} configurations by magnitude (each on a copy of the model)")
        for name, kwargs in configs:
            report = prune_quietly(model, **kwargs)  # prunes a copy; `model` stays dense
            pruned = report.model
            totals = prunekit.stats(pruned)
            rows.append(
                Row(
                    name,
                    report.sparsity,
                    totals.model_zeros / totals.model_params,
                    accuracy(pruned, test_set),
                    *saved_sizes(pruned, tmp_dir / name.replace(" ", "-").replace(":", "of")),
                )
            )
            if name == SHOWN_CONFIG:
                shown = report
            for layer, why in report.skipped.items():
                print(f"  {name}: skipped {layer} ({why})")

        if shown is not None:
            print(f"\nprunekit's own table for {SHOWN_CONFIG}:")
            print(shown)
            print()
            check_round_trip(shown.model, test_set, tmp_dir / "roundtrip")

    print(f"\nResults (test accuracy on {len(test_set)} held-out images, no fine-tuning):")
    print_table(rows)
    print(
        "\nsparsity: zeros in the pruned layers (conv1-3, fc1); all params: over every weight, "
        "bias and the fc2 head.\nSizes are of the saved files. safetensors: dense tensors, zeros "
        "included. compressed: prunekit.save(..., compressed=True),\nthe non-zeros plus a bitmask, "
        "run-length or CSR index per tensor. + int8: the same with bits=8 (int8 values,\n"
        "per-channel scales). Accuracy is of the float32 model."
    )


if __name__ == "__main__":
    main()
