"""Run the benchmarks whose figures README.md and docs/*.md quote; write what they print.

``make bench`` runs every entry of :data:`BENCHMARKS` (slow: tens of minutes to hours on two
cores; they need ``../shared/data`` or ``$PRUNEKIT_DATA`` and ``pip install -e ".[bench]"``);
``make bench BENCH=quick`` runs only the entries marked quick (about a minute). The output file
(default ``benchmarks/results/latest.md``) starts with the machine: CPU model, the vector
extensions that decide which kernel path runs (avx2, avx512f, avx512_vbmi2), cores, torch and
thread settings, load average, the git commit; then each benchmark's command, the figure it
backs, its exit status, wall time and full output. A benchmark that fails is recorded and the
run goes on; the exit status is 1 when any failed.

Documented figures are regenerated: every figure block a benchmark prints (see
``benchmarks/figures.py``) replaces the block with the same id in README.md and docs/*.md,
with a line naming the command, date, CPU flags, threads and load it ran with (``--no-docs``
leaves the docs alone). ``--list-figures`` shows which benchmark writes each documented block
and the blocks nothing writes.

Example:
    .venv/bin/python tools/run_benchmarks.py --only quick
    .venv/bin/python tools/run_benchmarks.py --only sparse_linear mnist_magnitude
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from figures import blocks, replace_blocks  # noqa: E402

DOCS = ("README.md", "docs/*.md")


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]
    backs: str
    quick: bool = False
    figures: tuple[str, ...] = ()  # the figure blocks it prints (benchmarks/figures.py)


BENCHMARKS = [
    Bench("kernel_paths", ("-m", "pytest", "-q", "-s", "-rs", "-p", "no:cacheprovider",
          "tests/test_kernel_paths.py"), "which kernel code paths this CPU runs (docs/serving.md)",
          quick=True),
    Bench("sparse_linear_quick", ("benchmarks/sparse_linear.py", "--quick", "--dtypes", "fp32",
          "--threads", "1", "--sizes", "1024"), "a one-size smoke run of the kernel table",
          quick=True),
    Bench("mnist_magnitude", ("benchmarks/mnist_magnitude.py",),
          "magnitude vs torch.nn.utils.prune (no documented figure)"),
    Bench("sparse_linear", ("benchmarks/sparse_linear.py", "--threads", "2", "1"),
          "docs/serving.md kernel latency table", figures=("serving-kernels", "serving-kernel-ranges")),
    Bench("sparse_linear_avx2", ("benchmarks/sparse_linear.py", "--march", "x86-64-v3", "--threads",
          "2", "--patterns", "70%", "90%", "2:4", "--batches", "1", "8", "32", "128"),
          "docs/serving.md AVX2 kernels (x86 only)", figures=("serving-kernels-avx2",)),
    Bench("accelerate_models", ("benchmarks/accelerate_models.py",),
          "docs/serving.md whole-model latency", figures=("serving-models",)),
    Bench("pipeline_size", ("benchmarks/pipeline_size.py",), "docs/compression.md file sizes",
          figures=("compression-pipeline",)),
    Bench("recipe_mnist", ("benchmarks/recipe_mnist.py", "--recipe", "cnn-tiny-file", "cnn-floor",
          "cnn-size", "--threads", "1"), "docs/recipes.md cnn goal recipes (cnn-tiny-file: issue 10)",
          figures=("recipes-cnn-goals",)),
    Bench("recipe_llm", ("benchmarks/recipe_llm.py", "--recipe", "llm-floor", "--threads", "1",
          "--calib-samples", "64"), "docs/recipes.md llm recipes", figures=("recipes-llm",)),
    Bench("recipe_minilm", ("benchmarks/recipe_minilm.py",),
          "the encoder recipe on MiniLM (no documented figure)"),
    Bench("oneshot_speed", ("benchmarks/oneshot_speed.py", "--repeat", "3"),
          "README one-shot wall time against llm-compressor (its own virtualenv)",
          figures=("oneshot-speed",)),
    Bench("oneshot_speed_large", ("benchmarks/oneshot_speed.py", "--random-llama"),
          "README one-shot time per block and peak memory on a random Llama (hidden 1024)",
          figures=("oneshot-speed-large",)),
    Bench("llm_oneshot", ("benchmarks/llm_oneshot.py",), "one-shot perplexities (no documented figure)"),
    Bench("minilm_oneshot", ("benchmarks/minilm_oneshot.py",), "one-shot STS-B (no documented figure)"),
    Bench("structured_mnist", ("benchmarks/structured_mnist.py",), "docs/structured.md",
          figures=("structured-mnist",)),
    Bench("structured_minilm", ("benchmarks/structured_minilm.py",), "docs/structured.md",
          figures=("structured-minilm",)),
    Bench("structured_reconstruct", ("benchmarks/structured_reconstruct.py",),
          "docs/structured.md repair and sensitivity allocation",
          figures=("structured-reconstruct", "structured-allocation")),
    Bench("structured_depth", ("benchmarks/structured_depth.py", "--remove", "1,2"),
          "docs/structured.md depth pruning", figures=("structured-depth",)),
    Bench("structured_latency_budget", ("benchmarks/structured_latency_budget.py", "--ratio", "0.6",
          "0.5", "0.4"), "docs/structured.md latency budget", figures=("structured-latency-budget",)),
    Bench("structured_speed", ("benchmarks/structured_speed.py",), "docs/structured.md speedups",
          figures=("structured-speed",)),
    Bench("structured_widths", ("benchmarks/structured_widths.py",), "docs/structured.md round_to"),
    Bench("sensitivity_allocation", ("benchmarks/sensitivity_allocation.py", "--threads", "1",
          "--calib-samples", "32"), "docs/analysis.md", figures=("analysis-allocation",)),
    Bench("minilm_allocation", ("benchmarks/minilm_allocation.py",), "docs/analysis.md MiniLM row",
          figures=("analysis-allocation-minilm",)),
    Bench("mnist_finetune_defaults", ("benchmarks/mnist_finetune_defaults.py", "--threads", "1"),
          "docs/training.md finetune defaults (MNIST CNN)", figures=("training-finetune-mnist",)),
    Bench("llm_finetune_defaults", ("benchmarks/llm_finetune_defaults.py", "--seed", "0", "1",
          "--threads", "1"), "docs/training.md finetune defaults (character Llama)",
          figures=("training-finetune-llm",)),
    Bench("mnist_train_time", ("benchmarks/mnist_train_time.py",), "docs/training.md"),
    Bench("digits_train_time", ("benchmarks/digits_train_time.py",), "docs/training.md"),
    Bench("minilm_distill_train", ("benchmarks/minilm_distill_train.py",), "docs/training.md"),
    Bench("cli_chain", ("benchmarks/cli_chain.py",), "docs/cli.md command chain on MiniLM",
          figures=("cli-chain",)),
    Bench("distributed_oneshot", ("benchmarks/distributed_oneshot.py",), "docs/distributed.md",
          figures=("distributed-oneshot",)),
    Bench("streaming_oneshot", ("benchmarks/streaming_oneshot.py", "--hidden", "1024",
          "--intermediate", "2816", "--layers", "75", "--samples", "2", "--seq-len", "128",
          "--figure", "distributed-streaming"), "docs/distributed.md peak memory, 3.3 GiB checkpoint",
          figures=("distributed-streaming",)),
    Bench("streaming_allocations", ("benchmarks/streaming_oneshot.py", "--hidden", "1024",
          "--intermediate", "2816", "--layers", "16", "--samples", "4", "--methods",
          "wanda,wanda:owl,wanda:sensitivity,sparsegpt:sensitivity", "--figure",
          "distributed-streaming-allocations"), "docs/distributed.md allocations' first passes",
          figures=("distributed-streaming-allocations",)),
]  # fmt: skip


def cpu_summary() -> list[str]:
    """Lines describing the CPU: model, the flags that pick kernel paths, cores."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.partition(":")[2].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.partition(":")[2].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_vnni")
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)
    return [f"- CPU: {model} ({os.cpu_count()} logical cores)", f"- CPU flags: {shown}"]


def commit_id() -> str:
    """The short commit of the checkout."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def header() -> str:
    import torch

    commit = commit_id()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, cwd=ROOT,
    ).stdout.strip()  # fmt: skip
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    try:
        from prunekit.runtime import kernels

        lib = kernels.load()
        kernel = lib.describe() if lib else f"none ({kernels.why_unavailable()})"
    except Exception as exc:  # the header must not stop the run
        kernel = f"unknown ({exc})"
    lines = [
        "# prunekit benchmark results",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
        *cpu_summary(),
        f"- kernels: {kernel}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in load)}",
        "",
    ]
    return "\n".join(lines)


def doc_files() -> list[Path]:
    """README.md and docs/*.md: the files whose figure blocks ``make bench`` rewrites."""
    return sorted({f for pattern in DOCS for f in ROOT.glob(pattern)})


def update_docs(output: str, note: str) -> dict[str, list[str]]:
    """Copy every figure block in a benchmark's ``output`` into the docs that hold its id;
    returns figure id -> the files (relative paths) it was written to."""
    new = blocks(output)
    written: dict[str, list[str]] = {fig_id: [] for fig_id in new}
    if not new:
        return written
    for path in doc_files():
        text = path.read_text()
        updated, done = replace_blocks(text, new, note)
        if updated != text:
            path.write_text(updated)
        for fig_id in done:
            written[fig_id].append(str(path.relative_to(ROOT)))
    return written


def short_machine() -> str:
    """One line for a figure's provenance: CPU flags that pick kernel paths, cores, load."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{vector} CPU, {os.cpu_count()} logical cores, load {load:.1f}"


def list_figures() -> int:
    """Print each documented figure block with the benchmark that writes it; 1 when a block has
    no writer or a benchmark declares a block that no doc holds."""
    writers = {fig_id: b.name for b in BENCHMARKS for fig_id in b.figures}
    held: dict[str, list[str]] = {}
    for path in doc_files():
        for fig_id in blocks(path.read_text()):
            held.setdefault(fig_id, []).append(str(path.relative_to(ROOT)))
    bad = 0
    for fig_id in sorted(held | writers):
        where = ", ".join(held.get(fig_id, [])) or "NOT IN ANY DOC"
        writer = writers.get(fig_id, "NO BENCHMARK WRITES IT")
        bad += fig_id not in held or fig_id not in writers
        print(f"{fig_id:<32} {writer:<26} {where}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["all"],
                        help="'all', 'quick', or benchmark names: " + ", ".join(b.name for b in BENCHMARKS))  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/latest.md")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per benchmark")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not copy the printed figure blocks into README.md / docs")  # fmt: skip
    parser.add_argument("--list-figures", action="store_true",
                        help="list the documented figure blocks and their benchmarks, then stop")  # fmt: skip
    args = parser.parse_args(argv)
    if args.list_figures:
        return list_figures()
    names = {b.name for b in BENCHMARKS}
    unknown = [n for n in args.only if n not in names | {"all", "quick"}]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; accepted: all, quick, {', '.join(names)}")
    chosen = [
        b
        for b in BENCHMARKS
        if "all" in args.only or b.name in args.only or ("quick" in args.only and b.quick)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.md")
    failed = []
    with partial.open("w") as out:
        out.write(header())
        out.flush()
        for bench in chosen:
            cmd = [sys.executable, *bench.args]
            print(f"== {bench.name}: {' '.join(bench.args)}", flush=True)
            start, machine = time.perf_counter(), short_machine()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                      timeout=args.timeout)  # fmt: skip
                status, text = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as exc:
                status, text = "timeout", f"{exc.stdout or ''}\nstopped after {args.timeout} s"
            wall = time.perf_counter() - start
            if status != 0:
                failed.append(bench.name)
            if not args.no_docs:
                note = (f"Measured by `make bench BENCH={bench.name}` on "
                        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, "
                        f"{machine} at start, commit {commit_id()} (exit status {status}).")  # fmt: skip
                for fig_id, files in update_docs(text, note).items():
                    print(f"   figure {fig_id}: " + (", ".join(files) or "in no doc"), flush=True)
                for fig_id in set(bench.figures) - set(blocks(text)):
                    print(f"   figure {fig_id}: NOT PRINTED (docs keep the old one)", flush=True)
            out.write(f"\n## {bench.name}\n\n- command: `python {' '.join(bench.args)}`\n"
                      f"- backs: {bench.backs}\n- exit status: {status}, wall {wall:.0f} s\n\n"
                      f"```\n{text.rstrip()}\n```\n")  # fmt: skip
            out.flush()
            print(f"   exit {status}, {wall:.0f} s", flush=True)
    os.replace(partial, args.out)  # a stopped run leaves the .partial.md, never a half latest.md
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
