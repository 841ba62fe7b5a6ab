"""Structured pruning of the pretrained MNIST CNN: prunekit against Torch-Pruning, no fine-tuning.

Model: ``mnist_cnn.pt`` (conv1 20, conv2 50, fc1 500, fc2 10). Channels of conv1 / conv2 and
neurons of fc1 are removed (the output layer fc2 keeps its 10 outputs); the flatten between conv2
and fc1 is followed by both libraries.

For every setting it reports, measured in one process:

* params and MACs (``prunekit.graph.count`` for every model, Torch-Pruning's included);
* accuracy on MNIST test images 5000-9999, before any fine-tuning;
* CPU latency ratio to the dense model (pruned / dense) at batch 1 and batch 32, fixed thread
  count (``--threads``), median of ``--rounds`` x ``--reps`` forward passes in alternating order.

Settings: uniform local ratios 0.3 / 0.5 / 0.7 with group L2 magnitude (prunekit ``importance=
"l2"``, Torch-Pruning ``GroupMagnitudeImportance(p=2)``), then a 2x MAC cut: prunekit
``target_macs=0.5`` with several criteria, and Torch-Pruning at the ratio (found by bisection) that
reaches the same MACs, with magnitude and Taylor importance. Data-driven criteria calibrate on
test images 0-4999 (10 batches of 64), never on the evaluation half.

Targets (printed PASS / MISS): at batch 32, the 2x-MAC model's speedup is at least 0.8x its MAC
reduction; prunekit's accuracy at 2x MACs is at least Torch-Pruning's with the same criterion.

    .venv/bin/python benchmarks/structured_mnist.py --threads 1

With the default ``--reps`` and ``--rounds`` it also prints docs/structured.md's figure block
``structured-mnist`` (the rows the doc compares); other timing settings print none.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from figures import figure, md_table
from structured_common import comparison_rows, data_root, latency, machine, macs_params, table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_magnitude import FILES, load_mnist, load_model  # noqa: E402

import prunekit.graph as pg  # noqa: E402

EVAL, CALIB = (5000, 10000), (0, 5000)


def accuracy(model, images, labels) -> float:
    with torch.inference_mode():
        correct = sum(
            int((model(x).argmax(1) == y).sum())
            for x, y in zip(images.split(1000), labels.split(1000), strict=True)
        )
    return correct / len(labels)


def calib_batches(images, labels, n: int = 10, size: int = 64):
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(CALIB[1] - CALIB[0], generator=g)[: n * size] + CALIB[0]
    return [(images[i], labels[i]) for i in idx.split(size)]


def loss_fn(model, batch):
    return F.nll_loss(model(batch[0]), batch[1])


def torch_pruning(
    model, example, ratio: float, importance: str, calib, global_pruning: bool = False
):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    imp = (
        tp.importance.GroupMagnitudeImportance(p=2)
        if importance == "l2"
        else tp.importance.GroupTaylorImportance()
    )
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=[model.fc2],
        global_pruning=global_pruning,
    )
    if importance == "taylor":
        model.zero_grad()
        for batch in calib:
            loss_fn(model, batch).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def tp_at_macs(
    model, example, target: float, importance: str, calib
) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning at the smallest ratio whose model has at most ``target`` MACs."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        pruned = torch_pruning(model, example, mid, importance, calib)
        if macs_params(pruned, example)[0] <= target:
            hi, best = mid, pruned
        else:
            lo = mid
    return best, hi


def doc_figure(by: dict[str, dict], dense_macs: int, threads: int) -> str:
    """docs/structured.md's ``structured-mnist`` block from the results by model name."""
    tp_macs = next(n for n in by if n.startswith("torch-pruning l2 local 2x"))
    ours, theirs = by["prunekit l2 local r=0.5"], by["torch-pruning l2 local r=0.5"]
    same = "same widths" if ours["widths"] == theirs["widths"] else theirs["widths"]
    picks = [
        ("MNIST CNN dense", "dense"),
        (f"prunekit L2 local r=0.5 ({ours['widths']})", "prunekit l2 local r=0.5"),
        (f"Torch-Pruning L2 local r=0.5 ({same})", "torch-pruning l2 local r=0.5"),
        ("prunekit L2 local, target_macs=0.5", "prunekit l2 local 2x MACs"),
        ("Torch-Pruning L2 local at <= 0.5 MACs", tp_macs),
    ]
    rows = comparison_rows(by, picks, dense_macs, "accuracy", "acc., test images 5000-9999")
    head = ["model, setting", "MACs / dense", "latency b32 / dense", "quality"]
    return figure(
        "structured-mnist",
        md_table(head, rows) + f"\n\nNo fine-tuning; {threads} thread(s); widths conv1/conv2/fc1.",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="the folder holding mnist/ (default ../shared/data)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    root = data_root(args.data)
    folder = root / "mnist" if root else None
    if folder is None or not all((folder / f).is_file() for f in FILES):
        print("MNIST data not found (../shared/data/mnist, --data or PRUNEKIT_DATA): skipping")
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    images, labels = load_mnist(folder)
    dense = load_model(folder)
    ev_x, ev_y = images[EVAL[0] : EVAL[1]], labels[EVAL[0] : EVAL[1]]
    calib = calib_batches(images, labels)
    example = images[:1]
    dense_macs, dense_params = macs_params(dense, example)
    print(f"machine: {machine()}; threads {args.threads}")
    print(
        f"dense: {dense_params:,} params, {dense_macs:,} MACs/image, accuracy {accuracy(dense, ev_x, ev_y):.4f} (test images 5000-9999)"
    )

    models: dict[str, torch.nn.Module] = {"dense": dense}
    for ratio in (0.3, 0.5, 0.7):
        models[f"prunekit l2 local r={ratio}"] = pg.prune_structured(
            dense, example, ratio=ratio, progress=False
        ).model
        models[f"torch-pruning l2 local r={ratio}"] = torch_pruning(
            dense, example, ratio, "l2", calib
        )
    for importance in ("l2", "taylor", "activation", "apoz"):
        for scope in ("local", "global"):
            report = pg.prune_structured(
                dense,
                example,
                target_macs=0.5,
                importance=importance,
                scope=scope,
                calib=calib,
                loss_fn=loss_fn,
                progress=False,
            )
            models[f"prunekit {importance} {scope} 2x MACs"] = report.model
    models["prunekit l2 local 2x MACs round_to=8"] = pg.prune_structured(
        dense, example, target_macs=0.5, round_to=8, progress=False
    ).model
    for importance in ("l2", "taylor"):
        pruned, ratio = tp_at_macs(dense, example, 0.5 * dense_macs, importance, calib)
        models[f"torch-pruning {importance} local 2x MACs (r={ratio:.3f})"] = pruned

    x1, x32 = ev_x[:1], ev_x[:32]
    t1 = latency(models, lambda m: m(x1), threads=args.threads, reps=args.reps, rounds=args.rounds)
    t32 = latency(
        models, lambda m: m(x32), threads=args.threads, reps=args.reps, rounds=args.rounds
    )
    rows, results = [], []
    for name, model in models.items():
        macs, params = macs_params(model, example)
        acc = accuracy(model, ev_x, ev_y)
        widths = f"{model.conv1.out_channels}/{model.conv2.out_channels}/{model.fc1.out_features}"
        r1, r32 = t1[name] / t1["dense"], t32[name] / t32["dense"]
        rows.append(
            [
                name,
                widths,
                f"{params:,}",
                f"{macs:,}",
                f"{macs / dense_macs:.3f}",
                f"{r1:.3f}",
                f"{r32:.3f}",
                f"{acc:.4f}",
            ]
        )
        results.append(
            {
                "model": name,
                "widths": widths,
                "params": params,
                "macs": macs,
                "latency_b1_s": t1[name],
                "latency_b32_s": t32[name],
                "accuracy": acc,
            }
        )
    print()
    print(
        table(
            [
                "model",
                "conv1/conv2/fc1",
                "params",
                "MACs",
                "MACs/dense",
                "lat b1/dense",
                "lat b32/dense",
                "acc 5000-9999",
            ],
            rows,
        )
    )
    print(
        f"\ndense latency: batch 1 {1e3 * t1['dense']:.3f} ms, batch 32 {1e3 * t32['dense']:.3f} ms ({args.threads} thread(s))"
    )

    by = {r["model"]: r for r in results}
    key = "prunekit l2 local 2x MACs"
    speedup = t32["dense"] / t32[key]
    reduction = dense_macs / by[key]["macs"]
    verdict = "PASS" if speedup >= 0.8 * reduction else "MISS"
    print(
        f"\ntarget latency ({key}, batch 32): speedup {speedup:.2f}x for a {reduction:.2f}x MAC cut = {speedup / reduction:.2f} of it (target >= 0.80): {verdict}"
    )
    for ratio in (0.3, 0.5, 0.7):
        ours, theirs = by[f"prunekit l2 local r={ratio}"], by[f"torch-pruning l2 local r={ratio}"]
        same = ours["widths"] == theirs["widths"]
        verdict = "PASS" if ours["accuracy"] >= theirs["accuracy"] else "MISS"
        print(
            f"target quality (l2, r={ratio}, {'identical widths' if same else 'different widths'}, "
            f"{ours['macs']:,} MACs): prunekit {ours['accuracy']:.4f} vs torch-pruning {theirs['accuracy']:.4f}: {verdict}"
        )
    for imp in ("l2", "taylor"):
        tp_name = next(n for n in by if n.startswith(f"torch-pruning {imp} local 2x"))
        ours = by[f"prunekit {imp} local 2x MACs"]
        theirs = by[tp_name]
        verdict = "PASS" if ours["accuracy"] >= theirs["accuracy"] else "MISS"
        print(
            f"target quality ({imp}, 2x MAC target): prunekit {ours['accuracy']:.4f} at {ours['macs']:,} MACs vs "
            f"torch-pruning {theirs['accuracy']:.4f} at {theirs['macs']:,} MACs: {verdict}"
        )
    best = max(
        (r for r in results if r["model"].startswith("prunekit") and "2x" in r["model"]),
        key=lambda r: r["accuracy"],
    )
    print(f"best prunekit criterion at 2x MACs: {best['model']} {best['accuracy']:.4f}")
    if (args.reps, args.rounds) == (30, 7):  # the documented timing settings
        doc_figure(by, dense_macs, args.threads)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine(), "threads": args.threads, "results": results}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
