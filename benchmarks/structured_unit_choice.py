"""Widths or whole blocks for a MAC target: does the default's output-error rule pick the model
that is more accurate, on *trained* residual networks?

``prune_structured(model, x, target_macs=0.5)`` prunes channel widths; when they run under 0.85
of their MAC ratio it also removes whole blocks to the same MACs and keeps them only if they are
faster and their outputs on ``x`` are as close to the dense model's
(:mod:`prunekit.graph.unit_choice`). The speed benchmark (``structured_speed.py``) runs on
random weights, where "as close" says little about accuracy. Here the two architectures of that
benchmark (ResNet-56 with option-A shortcuts, a CIFAR MobileNetV2) are trained on MNIST test
images 0-4999 (padded to 32 x 32, three channels; a few epochs, cached under
``$PRUNEKIT_CACHE``), and then, per batch size of ``x`` (real training images):

* the default call: which unit it kept, its measured speedup over its MAC ratio;
* widths (``unit="channel"``) and blocks (``unit="layer"``), both at ``target_macs=0.5``: output
  error on ``x``, accuracy on test images 5000-9999 without recovery and after one epoch of
  ``prunekit.finetune(..., teacher=dense)`` with its defaults on images 0-4999.

The rule is right when the unit it keeps is the more accurate one (or level).

Measured 2026-12-04 (1 thread, the other core busy; 3 epochs of training; accuracy % on test
images 5000-9999; one seed, whose sampling error is about 0.3 points):

| model | batch of x | default kept | speedup / MAC ratio | widths: output error, accuracy, recovered | blocks: output error, accuracy, recovered |
|---|---|---|---|---|---|
| ResNet-56 (dense 95.92) | 1 | blocks | 0.98 | 1.938, 13.34, 96.26 | 0.970, 16.46, 94.76 |
| ResNet-56 | 32 | blocks | 0.94 | 1.280, 13.34, 96.26 | 0.948, 17.52, 96.04 |
| MobileNetV2 (dense 97.98) | 1 | blocks | 0.92 | 0.992, 11.28, 97.88 | 1.001, 11.28, 97.78 |
| MobileNetV2 | 32 | widths | 1.04 | 0.985, 11.28, 97.88 | 0.990, 11.28, 97.78 |

At 2x fewer MACs and no recovery both units leave these nets near chance, and both recover to
within 0.2 points of each other after one epoch, except ResNet-56 with blocks scored on a
single image (batch 1: block influence from one example), 1.5 points behind the widths. Pass
``calib=`` (more batches for the block scores) or ``unit="channel"`` where that matters.

    .venv/bin/python benchmarks/structured_unit_choice.py [--models resnet56 mobilenetv2]
        [--batches 1 32] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import structured_speed as speed  # noqa: E402
from llm_oneshot import cache_dir  # noqa: E402
from train_common import accuracy, find_folder, load_mnist, seed_everything  # noqa: E402

import prunekit  # noqa: E402
from prunekit.graph.hardware import output_error  # noqa: E402

EPOCHS = 3  # of training on 5,000 MNIST images: 96-98 % on the other 5,000
ARCHS = {"resnet56": lambda: speed.ResNetCifar(56), "mobilenetv2": speed.MobileNetV2Cifar}


def as_cifar(images: torch.Tensor) -> torch.Tensor:
    """MNIST (n, 1, 28, 28) as the CIFAR nets take it: padded to 32 x 32, three channels."""
    return F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """SGD (momentum 0.9, lr 0.05, cosine), batch 64, cross-entropy."""
    seed_everything(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {epoch + 1}/{epochs}: last loss {float(loss.detach()):.3f}", flush=True)
    model.eval()


def trained(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    path = cache_dir() / "structured_unit_choice" / f"{name}-e{epochs}.safetensors"
    seed_everything(0)
    model = ARCHS[name]()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    print(f"training {name} on MNIST 0-4999 for {epochs} epochs (cached at {path})", flush=True)
    start = time.time()
    train(model, x, y, epochs, seed=0)
    print(f"  {time.time() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def recovered(pruned: nn.Module, dense: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    seed_everything(0)
    return prunekit.finetune(
        pruned,
        data,
        lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        teacher=dense,
        epochs=1,
        progress=False,
    ).model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    folder = find_folder(args.data, "mnist", ["t10k-images-idx3-ubyte.gz"])
    if folder is None:
        print("SKIP: MNIST not found (../shared/data/mnist)")
        return 0
    images, labels = load_mnist(folder)
    images = as_cifar(images)
    train_x, train_y = images[:5000], labels[:5000]
    test_x, test_y = images[5000:], labels[5000:]
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        dense = trained(name, train_x, train_y, args.epochs)
        dense_acc = accuracy(dense, test_x, test_y)
        print(f"{name}: dense accuracy {100 * dense_acc:.2f} % on test images 5000-9999")
        for batch in args.batches:
            x = train_x[:batch]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                default = prunekit.prune_structured(dense, x, target_macs=0.5, progress=False)
            kept = "blocks" if default.settings.get("unit_switched_from") else "widths"
            d_ms, p_ms, _ = speed.timed(dense, default.model, x, args)
            mac_x = default.macs_before / default.macs_after
            got = {}
            for unit, label in (("channel", "widths"), ("layer", "blocks")):
                report = prunekit.prune_structured(
                    dense, x, target_macs=0.5, unit=unit, progress=False, measure_latency=False
                )
                got[label] = {
                    "macs": report.macs_ratio,
                    "error": output_error(dense, report.model, x),
                    "acc": accuracy(report.model, test_x, test_y),
                    "recovered": accuracy(
                        recovered(report.model, dense, train_x, train_y), test_x, test_y
                    ),
                }
            better = max(got, key=lambda u: got[u]["recovered"])
            rows.append((name, batch, kept, d_ms / p_ms / mac_x, got, better, dense_acc))
            print(
                f"{name} batch {batch}: default kept {kept} (speedup / MAC ratio "
                f"{d_ms / p_ms / mac_x:.2f}); "
                + "; ".join(
                    f"{u}: MACs {g['macs']:.3f}, output error {g['error']:.3f}, accuracy "
                    f"{100 * g['acc']:.2f} %, recovered {100 * g['recovered']:.2f} %"
                    for u, g in got.items()
                ),
                flush=True,
            )
    print()
    print(
        "| model | batch | default kept | speedup / MAC ratio | widths: output error, accuracy, "
        "recovered | blocks: output error, accuracy, recovered |"
    )
    print("|---|---|---|---|---|---|")
    for name, batch, kept, share, got, _, dense_acc in rows:
        cells = [
            f"{g['error']:.3f}, {100 * g['acc']:.2f}, {100 * g['recovered']:.2f}"
            for g in got.values()
        ]
        print(f"| {name} (dense {100 * dense_acc:.2f}) | {batch} | {kept} | {share:.2f} | "
              + " | ".join(cells) + " |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
