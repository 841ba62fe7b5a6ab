"""Helpers shared by the train-time benchmarks: data location, MNIST loading, tables, JSON.

Not a benchmark itself. Data is read from ``../shared/data`` next to the repository, or from the
folder named by ``--data`` / the ``PRUNEKIT_DATA`` environment variable.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import prunekit

REPO = Path(__file__).resolve().parents[1]
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "mnist_cnn.pt")
MNIST_LAYERS = ("conv1", "conv2", "fc1", "fc2")
MEAN, STD = 0.1307, 0.3081


def data_root(override: str | None) -> Path:
    """The shared data folder: ``override``, else $PRUNEKIT_DATA, else ../shared/data."""
    chosen = override or os.environ.get("PRUNEKIT_DATA")
    return Path(chosen).expanduser() if chosen else REPO.parent / "shared" / "data"


def find_folder(override: str | None, name: str, files: Sequence[str]) -> Path | None:
    """``<root>/<name>`` (or ``<root>`` itself) when it holds every file in ``files``."""
    root = data_root(override)
    for folder in (root / name, root):
        if all((folder / f).is_file() for f in files):
            return folder.resolve()
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MnistNet(nn.Module):
    """The CNN that ``mnist_cnn.pt`` was trained as (the classic PyTorch MNIST example)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file: magic (0, 0, dtype, ndim), big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[0:2], "big") != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised MNIST test images (10000, 1, 28, 28) and labels."""
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    x = (torch.from_numpy(images).unsqueeze(1) - MEAN) / STD
    return x, torch.from_numpy(labels)


def load_mnist_model(folder: Path) -> MnistNet:
    model = MnistNet()
    state = torch.load(folder / "mnist_cnn.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    model.train(was_training)
    return correct / len(x)


def targeted_sparsity(model: nn.Module, layers: Sequence[str]) -> float:
    """Fraction of zeros over the weights of ``layers`` (masks applied)."""
    report = prunekit.stats(model)
    rows = [report.layer(name) for name in layers]
    return sum(r.zeros for r in rows) / sum(r.params for r in rows)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def environment(threads: int) -> dict[str, Any]:
    return {
        "prunekit": prunekit.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
    }


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` through a temporary name (no half-written files)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"\nresults written to {path}")


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
