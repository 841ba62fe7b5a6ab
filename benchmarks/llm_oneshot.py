"""One-shot LLM pruning on a real trained language model: magnitude vs Wanda vs SparseGPT.

The model: a Llama-architecture (grouped-query attention, RMSNorm, SwiGLU, rotary) character
level language model with 2.9 M parameters, trained here on tiny-shakespeare
(``../shared/data/tinyshakespeare/input.txt``): first 90 % of the characters for training, last
10 % for validation. Training takes a few minutes on 2 CPU cores; the trained model is cached
as safetensors under ``$PRUNEKIT_CACHE`` (default ``~/.cache/prunekit``) and reused.

For every method (magnitude, Wanda, SparseGPT), pattern (50 % and 70 % unstructured, 2:4, 4:8)
and allocation (uniform, OWL) the dense model is copied, pruned with ``prunekit.oneshot`` on
128 calibration windows of 128 characters from the training split, and its validation
perplexity measured (non-overlapping 128-character windows over the whole validation split).
Wall time of each pruning run is reported, and the peak memory growth of each method is
measured in a fresh process (in one long process the allocator reuses freed memory and the
growth reads near zero).

The papers' ordering is checked and printed as PASS / MISS: at 50 % SparseGPT and Wanda are far
closer to dense than magnitude; SparseGPT is best at 2:4 and at 70 %.

    .venv/bin/python benchmarks/llm_oneshot.py [--steps 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import prunekit
from prunekit.calibrate.oneshot import oneshot
from prunekit.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128


def data_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_DATA", ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def load_text() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    path = data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        print(f"skipped: {path} not found (set PRUNEKIT_DATA to the shared data folder)")
        raise SystemExit(0)
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], chars


def build_model(vocab: int):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(config)


def train(train_ids: torch.Tensor, vocab: int, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="training char-level Llama", unit="step")
    for _ in bar:
        starts = torch.randint(0, train_ids.numel() - SEQ_LEN - 1, (32,), generator=generator)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def trained_model(train_ids: torch.Tensor, vocab: int, steps: int):
    import transformers

    folder = cache_dir() / f"char-llama-shakespeare-{steps}steps"
    if (folder / "config.json").is_file():
        print(f"using the cached model in {folder}")
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    model = train(train_ids, vocab, steps)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.replace(folder)
    print(f"cached the trained model in {folder}")
    return model


CONFIGS = [
    ("50%", 0.5, "unstructured"),
    ("70%", 0.7, "unstructured"),
    ("2:4", None, "2:4"),
    ("4:8", None, "4:8"),
]
METHODS = ["magnitude", "wanda", "sparsegpt"]
ALLOCATIONS = ["uniform", "owl"]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    train_ids, val_ids, chars = load_text()
    model = trained_model(train_ids, len(chars), args.steps)
    calib = prunekit.calibration(train_ids, n_samples=args.calib_samples, seq_len=SEQ_LEN, seed=0)
    dense_ppl = perplexity(model, val_ids, SEQ_LEN, batch_size=32)
    print(f"\nprunekit {prunekit.__version__}, torch {torch.__version__}, {args.threads} threads")
    print(
        f"model: Llama char-level, {sum(p.numel() for p in model.parameters()):,} params, "
        f"trained {args.steps} steps on the first 90 % of tiny-shakespeare"
    )
    print(f"calibration: {calib.description} (training split)")
    print(
        f"evaluation: perplexity on the last 10 % ({val_ids.numel():,} chars), "
        f"non-overlapping {SEQ_LEN}-char windows"
    )
    print(f"dense validation perplexity: {dense_ppl:.3f}\n")
    results = []
    for label, sparsity, pattern in CONFIGS:
        for method in METHODS:
            for allocation in ALLOCATIONS:
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
                ppl = perplexity(report.model, val_ids, SEQ_LEN, batch_size=32)
                allocated = sorted(set(round(v, 3) for v in report.details["allocated"].values()))
                results.append(
                    {
                        "config": label,
                        "method": method,
                        "allocation": allocation,
                        "ppl": ppl,
                        "sparsity": report.sparsity,
                        "wall_time_s": report.settings["wall_time_s"],
                        "peak_memory_mb": report.settings["peak_memory_mb"],
                        "allocated_range": [allocated[0], allocated[-1]],
                    }
                )
                print(
                    f"{label:>4} {method:>9} {allocation:>7}: ppl {ppl:8.3f}  sparsity "
                    f"{report.sparsity:.4f}  layer sparsity {allocated[0]:.3f}-{allocated[-1]:.3f}  "
                    f"{report.settings['wall_time_s']:6.2f} s",
                    flush=True,
                )
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {
        "dense_ppl": dense_ppl,
        "results": results,
        "steps": args.steps,
        "calibration": calib.description,
        "model_mb": model_mb,
    }


def measure_memory_child(method: str, steps: int, calib_samples: int) -> None:
    """Run one pruning job in this fresh process and print its peak memory as JSON."""
    import gc

    train_ids, _, chars = load_text()
    model = trained_model(train_ids, len(chars), steps)
    calib = prunekit.calibration(train_ids, n_samples=calib_samples, seq_len=SEQ_LEN, seed=0)
    with torch.no_grad():  # warm up: library loading and first-call buffers are not the method's
        model(**calib[0])
    gc.collect()
    report = oneshot(model, calib, method=method, sparsity=0.5, inplace=True, progress=False)
    print(
        json.dumps(
            {
                "method": method,
                "peak_memory_mb": report.settings["peak_memory_mb"],
                "wall_time_s": report.settings["wall_time_s"],
            }
        )
    )


def measure_memory(args: argparse.Namespace) -> list[dict]:
    """Peak memory growth of each method, each in its own process (no allocator reuse)."""
    rows = []
    for method in METHODS:
        cmd = [
            sys.executable,
            __file__,
            "--measure-memory",
            method,
            "--steps",
            str(args.steps),
            "--calib-samples",
            str(args.calib_samples),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def print_table(out: dict) -> None:
    rows = out["results"]
    print(f"\nvalidation perplexity (dense {out['dense_ppl']:.3f}); uniform / OWL")
    print(f"{'pattern':>7}  " + "  ".join(f"{m:>19}" for m in METHODS))
    for label, _, _ in CONFIGS:
        cells = []
        for method in METHODS:
            pair = [r["ppl"] for r in rows if r["config"] == label and r["method"] == method]
            cells.append(f"{pair[0]:8.2f} / {pair[1]:8.2f}")
        print(f"{label:>7}  " + "  ".join(f"{c:>19}" for c in cells))
    print("\nwall time (s) of each pruning run, uniform / OWL (OWL adds a calibration pass)")
    for method in METHODS:
        cells = []
        for label, _, _ in CONFIGS:
            pair = [
                r["wall_time_s"] for r in rows if r["config"] == label and r["method"] == method
            ]
            cells.append(f"{label} {pair[0]:.1f} / {pair[1]:.1f}")
        print(f"{method:>9}: " + "  ".join(cells))
    if out.get("memory"):
        print(
            "\npeak memory growth while pruning (RSS above the level before the call, fresh "
            "process each, 50 % uniform; the fp32 model itself is "
            f"{out['model_mb']:.1f} MiB)"
        )
        for r in out["memory"]:
            print(f"{r['method']:>9}: +{r['peak_memory_mb']:.1f} MiB in {r['wall_time_s']:.2f} s")


def check_ordering(out: dict) -> list[tuple[str, bool]]:
    def ppl(config: str, method: str, allocation: str = "uniform") -> float:
        return next(
            r["ppl"]
            for r in out["results"]
            if r["config"] == config and r["method"] == method and r["allocation"] == allocation
        )

    dense = out["dense_ppl"]
    gap = {m: ppl("50%", m) - dense for m in METHODS}
    checks = [
        ("50 %: Wanda's gap to dense < half of magnitude's", gap["wanda"] < 0.5 * gap["magnitude"]),
        (
            "50 %: SparseGPT's gap to dense < half of magnitude's",
            gap["sparsegpt"] < 0.5 * gap["magnitude"],
        ),
        (
            "70 %: SparseGPT best",
            ppl("70%", "sparsegpt") < min(ppl("70%", "wanda"), ppl("70%", "magnitude")),
        ),
        (
            "2:4: SparseGPT best",
            ppl("2:4", "sparsegpt") < min(ppl("2:4", "wanda"), ppl("2:4", "magnitude")),
        ),
    ]
    print("\nexpected ordering from the papers (uniform allocation)")
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (cached per value)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--measure-memory", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        torch.set_num_threads(args.threads)
        measure_memory_child(args.measure_memory, args.steps, args.calib_samples)
        return 0
    started = time.perf_counter()
    out = run(args)
    if not args.no_memory:
        out["memory"] = measure_memory(args)
    print_table(out)
    out["checks"] = {name: ok for name, ok in check_ordering(out)}
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
