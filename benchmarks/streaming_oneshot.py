"""Pruning a checkpoint larger than the memory it is given: ``oneshot_from_pretrained``.

Generates a Llama-shaped Hugging Face checkpoint of a few GB with random weights, written block
by block into safetensors shards (never whole in memory), then prunes it to 50 % in a fresh
child process and reads that process's peak resident memory (``VmHWM`` of
``/proc/self/status``, the kernel's high-water mark of resident pages) against the checkpoint's
size. No cap is enforced here (no cgroup is available to this account); the figure is measured.
A method may name an allocation (``wanda:owl``, ``sparsegpt:sensitivity``): its first streamed
pass is then part of the run (and of the peak).

    .venv/bin/python benchmarks/streaming_oneshot.py [--hidden 2048] [--intermediate 5632]
        [--layers 12] [--methods wanda,sparsegpt] [--samples 2] [--seq-len 128] [--keep DIR]
        [--max-activation-mb MB] [--figure ID]

``--figure ID`` also prints the rows as docs/distributed.md's figure block ``ID`` (``make
bench`` runs the two documented configurations with ``--figure distributed-streaming`` and
``--figure distributed-streaming-allocations``); without it nothing is printed for the docs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import figure, md_table  # noqa: E402

NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude", "owl": "OWL"}


def doc_figure(fig_id: str, rows: list[dict], size: int) -> str:
    """The figure block ``fig_id``: per method, peak RSS, its share of the checkpoint, wall."""
    cells = []
    for r in rows:
        method, _, allocation = r["method"].partition(":")
        label = f"{NAMES.get(method, method)} 50 %"
        label += f" + {NAMES.get(allocation, allocation)}" if allocation else ""
        rss = r["peak_rss_kb"] * 1024
        cells.append([label, f"{rss / 2**30:.2f} GiB", f"{rss / size:.1%}".replace("%", " %"),
                      f"{r['wall_s']:.0f} s"])  # fmt: skip
    table = md_table(["method", "peak RSS", "of the checkpoint", "wall"], cells)
    return figure(fig_id, table + f"\n\nCheckpoint {size / 2**30:.2f} GiB.")


def generate(folder: Path, hidden: int, intermediate: int, layers: int) -> int:
    """A random Llama checkpoint, one shard per block; returns its size in bytes."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = f"block{int(parts[2]):05d}" if parts[1] == "layers" else "rest"
        groups.setdefault(key, []).append(name)
    weight_map, total = {}, 0
    for i, (_key, names) in enumerate(sorted(groups.items())):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen) * 0.02
        save_file(tensors, str(folder / file))
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def child(
    source: str, out: str, case: str, samples: int, seq_len: int, spill: float | None
) -> None:
    from prunekit.calibrate.streaming import oneshot_from_pretrained

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 4096, (1, seq_len), generator=gen) for _ in range(samples)]
    started = time.perf_counter()
    method, _, allocation = case.partition(":")
    summary = oneshot_from_pretrained(
        source,
        calib,
        out,
        method=method,
        allocation=allocation or "uniform",
        max_activation_mb=spill,
        progress=False,
    )
    elapsed = time.perf_counter() - started
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"wall_s": round(elapsed, 1), "peak_rss_kb": hwm, **summary}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--keep", type=Path, help="generate the checkpoint here and keep it")
    parser.add_argument("--max-activation-mb", type=float, help="spill activations above this")
    parser.add_argument("--figure", help="print the rows as this docs figure block")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.samples, args.seq_len, args.max_activation_mb)
        return 0
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        source = args.keep or Path(tmp) / "source"
        if not (source / "config.json").is_file():
            size = generate(source, args.hidden, args.intermediate, args.layers)
        else:
            size = json.loads((source / "model.safetensors.index.json").read_text())["metadata"][
                "total_size"
            ]
        print(f"checkpoint: {size / 2**30:.2f} GiB, load average {os.getloadavg()}", flush=True)
        rows = []
        for method in args.methods.split(","):
            out = Path(tmp) / f"out-{method.replace(':', '-')}"
            command = [sys.executable, __file__, "--child", str(source), str(out), method]
            command += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
            if args.max_activation_mb is not None:
                command += ["--max-activation-mb", str(args.max_activation_mb)]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row.pop("allocated", None)
            rows.append({"method": method, **row})
            ratio = row["peak_rss_kb"] * 1024 / size
            print(
                f"{method}: peak RSS {row['peak_rss_kb'] / 2**20:.2f} GiB = {ratio:.1%} of the "
                f"checkpoint; wall {row['wall_s']} s; {json.dumps(row)}",
                flush=True,
            )
    if args.figure:
        doc_figure(args.figure, rows, size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
