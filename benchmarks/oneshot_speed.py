"""One-shot pruning speed: prunekit vs llm-compressor on the same model and calibration data.

Model: the character-level Llama of ``benchmarks/llm_oneshot.py`` (2.9 M parameters, trained on
the first 90 % of tiny-shakespeare, cached as a Hugging Face folder under ``$PRUNEKIT_CACHE``).
Calibration: 128 windows of 128 characters from the training split (``prunekit.calibration``,
seed 0); both libraries get exactly these token ids. Perplexity: the last 10 % of the text,
non-overlapping 128-character windows, measured here with ``prunekit.eval.perplexity`` on both
pruned models.

For SparseGPT and Wanda at 50 %, 70 % and 2:4 the script times

* ``prunekit.oneshot(model, calib, method=..., inplace=True)`` (default arguments otherwise),
  in this process, on a fresh copy of the dense model;
* llm-compressor's ``oneshot(model=..., dataset=DataLoader, recipe=[SparseGPTModifier |
  WandaPruningModifier])`` (its defaults: sequential pipeline, one sample per forward), in a
  child process that runs the Python of llm-compressor's own virtualenv (``--llmc-python``,
  or ``$PRUNEKIT_LLMC_PYTHON``; default ``/work/venvs/llmc/bin/python``). The child stays up
  for the whole benchmark and takes one run at a time; each run loads the dense model afresh,
  and only the ``oneshot`` call is timed (not the import or model loading). The child writes
  the pruned weights as safetensors and the perplexity is measured here. Without that
  interpreter, or when llm-compressor does not import there, the comparison is skipped with a
  message and only prunekit's figures are printed.

The default ``calibration_dtype="auto"`` runs the block forwards' matrix products in bfloat16
under ``torch.autocast`` (statistics still float32 / float64) on a CPU with native bfloat16 dot
products (AVX512-BF16, AMX), in float32 elsewhere; the figure names the dtype the default rows
used. After those default rows come labelled non-default rows (``--no-tuned`` leaves them out):
each method at 50 % with ``calibration_dtype="float32"`` (results independent of the CPU's
bfloat16 support), timed like the default rows and compared with llm-compressor's run of the
same default row. The targets are judged on the default rows alone.

Both run with ``--threads`` torch threads (default 1); ``--repeat N`` times each run N times,
prunekit's and llm-compressor's runs alternating (so that both see the same load on a shared
machine), and reports the fastest of each (the least disturbed figure). The targets of the
issue: prunekit's wall time <= 0.5x llm-compressor's, perplexity within 1 %.

``--random-llama`` instead times prunekit alone on a generated Llama with random weights
(hidden 1024, intermediate 2816, 8 blocks, 16 / 8 heads; 128 x 128 random tokens): seconds per
block and peak memory growth (``report.settings``) for each method, in a fresh process each.

    .venv/bin/python benchmarks/oneshot_speed.py [--threads 1] [--methods sparsegpt,wanda]
    .venv/bin/python benchmarks/oneshot_speed.py --random-llama [--samples 128]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from figures import figure, md_table  # noqa: E402

CONFIGS = [("50%", 0.5, "unstructured"), ("70%", 0.7, "unstructured"), ("2:4", None, "2:4")]
TUNED = [("50%", 0.5, "unstructured", {"calibration_dtype": "float32"}, "float32 calibration")]
"""The non-default rows, after the default ones: (config label, sparsity, pattern, extra oneshot
arguments, row label)."""
SEQ_LEN = 128
DEFAULT_LLMC = "/work/venvs/llmc/bin/python"


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


# ---------------------------------------------------------------- llm-compressor child process

LLMC_CHILD = r"""
import json, sys, time
import torch
from safetensors.torch import load_file, save_file
torch.set_num_threads(int(sys.argv[1]))
import transformers
from torch.utils.data import DataLoader
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
import llmcompressor
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
print("READY", flush=True)
for line in sys.stdin:  # one run per line of JSON
    args = json.loads(line)
    ids = load_file(args["calib"])["input_ids"]
    samples = [{"input_ids": row[None, :], "attention_mask": torch.ones_like(row)[None, :]} for row in ids]
    loader = DataLoader(samples, batch_size=None, collate_fn=lambda s: s)
    model = transformers.AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
    kind = SparseGPTModifier if args["method"] == "sparsegpt" else WandaPruningModifier
    options = {"sparsity": args["sparsity"], "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if args["mask"]:
        options["mask_structure"] = args["mask"]
    recipe = [kind(**options)]
    # llm-compressor wants a processor whenever a dataset is given; the data are token ids already
    vocab = {f"c{i}": i for i in range(model.config.vocab_size)}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="c0")))
    started = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, tokenizer=tokenizer, num_calibration_samples=len(samples),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    elapsed = time.perf_counter() - started
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args["out"])
    print("RESULT " + json.dumps({"wall_time_s": elapsed, "version": llmcompressor.__version__}), flush=True)
"""


def llmc_available(python: str) -> str | None:
    """None when ``python`` imports llm-compressor, else the reason it cannot be used."""
    if not Path(python).is_file():
        return f"no interpreter at {python}"
    done = subprocess.run(
        [python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        return f"llmcompressor does not import with {python}: {done.stderr.strip()[-300:]}"
    return None


class LlmcWorker:
    """llm-compressor's child process (its own virtualenv), kept up between runs; ``run`` sends
    one run and waits for its result. Use as a context manager."""

    def __init__(self, python: str, threads: int) -> None:
        self.python = python
        self.threads = threads

    def __enter__(self) -> LlmcWorker:
        env = {**os.environ, "TQDM_DISABLE": "1"}
        self.log = tempfile.TemporaryFile(mode="w+")  # its logging, read back on a failure
        self.proc = subprocess.Popen(
            [self.python, "-c", LLMC_CHILD, str(self.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self._read("READY")
        return self

    def _read(self, marker: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker) :].strip()
        self.log.seek(0)
        raise RuntimeError(f"llm-compressor child failed:\n{self.log.read()[-3000:]}")

    def run(
        self,
        folder: Path,
        calib_file: Path,
        method: str,
        sparsity: float,
        mask: str | None,
        out: Path,
    ) -> dict:
        args = {
            "model": str(folder),
            "calib": str(calib_file),
            "method": method,
            "sparsity": sparsity,
            "mask": mask,
            "out": str(out),
        }
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


# ----------------------------------------------------------------------------- character Llama


def compare(args: argparse.Namespace) -> dict:
    import llm_oneshot as llm
    from safetensors.torch import load_file, save_file

    import prunekit
    from prunekit.eval import perplexity

    torch.set_num_threads(args.threads)
    train_ids, val_ids, chars = llm.load_text()
    model = llm.trained_model(train_ids, len(chars), 600)
    folder = llm.cache_dir() / "char-llama-shakespeare-600steps"
    calib = prunekit.calibration(train_ids, n_samples=128, seq_len=SEQ_LEN, seed=0)
    ids = torch.cat([s["input_ids"] for s in calib])
    dense_ppl = perplexity(model, val_ids, SEQ_LEN, batch_size=32)
    python = args.llmc_python or os.environ.get("PRUNEKIT_LLMC_PYTHON") or DEFAULT_LLMC
    missing = None if args.no_llmc else llmc_available(python)
    if args.no_llmc:
        missing = "--no-llmc"
    print(f"machine: {machine()}; {args.threads} torch thread(s)")
    print(f"prunekit {prunekit.__version__}; calibration {calib.description}")
    if args.repeat > 1:
        print(
            f"wall times: the fastest of {args.repeat} alternating runs of each (a loaded machine)"
        )
    print(f"dense validation perplexity {dense_ppl:.4f}")
    if missing:
        print(f"llm-compressor comparison skipped: {missing}")
    runs = [(m, label, s, p, {}, None) for m in args.methods for label, s, p in CONFIGS]
    if args.tuned:  # after every default row
        from prunekit.calibrate.precision import native_bf16_cpu

        print(
            "non-default rows: float32 calibration; native bfloat16 dot products (the default "
            f"'auto' calibrates in bfloat16 where they exist): {native_bf16_cpu()}"
        )
        runs += [(m, *tuned) for m in args.methods for tuned in TUNED]
    rows = []
    llmc_rows: dict[tuple[str, str], dict] = {}  # llm-compressor's result per (method, config)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        calib_file = Path(tmp) / "calib.safetensors"
        save_file({"input_ids": ids.contiguous()}, str(calib_file))
        worker = None if missing else stack.enter_context(LlmcWorker(python, args.threads))
        out = Path(tmp) / "llmc.safetensors"
        for method, label, sparsity, pattern, options, tuned in runs:
            times, theirs = [], []
            pruned = model
            mask = pattern if ":" in pattern else None
            level = 0.5 if sparsity is None else sparsity
            # a tuned row is compared with llm-compressor's run of the same default row
            their_turn = worker is not None and (method, label) not in llmc_rows
            for r in range(args.repeat):  # alternating, so that both meet the same load
                for who in ("prunekit", "llmc") if r % 2 == 0 else ("llmc", "prunekit"):
                    if who == "llmc":
                        if their_turn:
                            theirs.append(worker.run(folder, calib_file, method, level, mask, out))
                        continue
                    pruned = copy.deepcopy(model)
                    started = time.perf_counter()
                    report = prunekit.oneshot(
                        pruned,
                        calib,
                        method=method,
                        sparsity=sparsity,
                        pattern=pattern,
                        inplace=True,
                        progress=False,
                        **options,
                    )
                    times.append(time.perf_counter() - started)
            ours_s = min(times)
            ours_ppl = perplexity(pruned, val_ids, SEQ_LEN, batch_size=32)
            row = {
                "method": method,
                "config": label,
                "prunekit_s": ours_s,
                "prunekit_ppl": ours_ppl,
                "prunekit_runs_s": times,
                "calibration_dtype": report.settings["calibration_dtype"],
            }
            if tuned:
                row.update(tuned=tuned, options=options)
            if theirs:
                other = copy.deepcopy(model)
                other.load_state_dict(load_file(str(out)), strict=False)
                llmc_rows[(method, label)] = {
                    "llmc_s": min(r["wall_time_s"] for r in theirs),
                    "llmc_ppl": perplexity(other, val_ids, SEQ_LEN, batch_size=32),
                    "llmc_version": theirs[0]["version"],
                    "llmc_runs_s": [r["wall_time_s"] for r in theirs],
                }
            if (method, label) in llmc_rows:
                row.update(llmc_rows[(method, label)])
                row["time_ratio"] = ours_s / row["llmc_s"]
                row["ppl_ratio"] = ours_ppl / row["llmc_ppl"]
            rows.append(row)
            print(_line(row), flush=True)
    verdicts = []
    if not missing:
        defaults = [r for r in rows if not r.get("tuned")]  # the targets: default arguments
        time_ok = all(r["time_ratio"] <= 0.5 for r in defaults)
        ppl_ok = all(abs(r["ppl_ratio"] - 1) <= 0.01 for r in defaults)
        verdicts = [
            ("wall time <= 0.5x llm-compressor's in every case", time_ok),
            ("perplexity within 1 % of llm-compressor's in every case", ppl_ok),
        ]
        for name, ok in verdicts:
            print(f"  {'PASS' if ok else 'MISS'}  {name}")
        if args.methods == ["sparsegpt", "wanda"] and args.repeat >= 3 and args.threads == 1:
            doc_figure(rows, args.threads, args.repeat)  # the documented run
    return {
        "machine": machine(),
        "dense_ppl": dense_ppl,
        "rows": rows,
        "threads": args.threads,
        "checks": dict(verdicts),
        "llmc_skipped": missing,
    }


def doc_figure(rows: list[dict], threads: int, repeat: int) -> str:
    """README's ``oneshot-speed`` block: per method and pattern, both libraries' wall time and
    perplexity on the character Llama."""
    head = ["method", "sparsity", "prunekit s", "llm-compressor s", "time / llm-compressor's",
            "perplexity: prunekit / llm-compressor"]  # fmt: skip
    rows = sorted(rows, key=lambda r: bool(r.get("tuned")))  # the default rows first
    cells = [
        [_method_cell(r), r["config"], f"{r['prunekit_s']:.2f}", f"{r['llmc_s']:.2f}",
         f"**{r['time_ratio']:.2f}**", f"{r['prunekit_ppl']:.4f} / {r['llmc_ppl']:.4f}"]
        for r in rows
    ]  # fmt: skip
    version = rows[0].get("llmc_version", "?")
    used = sorted({r["calibration_dtype"] for r in rows if not r.get("tuned")})
    from prunekit.calibrate.precision import native_bf16_cpu

    native = "has" if native_bf16_cpu() else "lacks"
    tuned = (
        f' The default rows calibrated in {" / ".join(used)} (`calibration_dtype="auto"`; '
        f"this CPU {native} native bfloat16 dot products)."
    )
    if any(r.get("tuned") for r in rows):
        tuned += (
            ' Rows marked *non-default* pass `calibration_dtype="float32"` (results independent '
            "of the CPU's bfloat16 support) and are compared with llm-compressor's run of the "
            "default row; the targets are judged on the default rows."
        )
    return figure(
        "oneshot-speed",
        md_table(head, cells) + f"\n\nCharacter Llama (2.9 M parameters), 128 x {SEQ_LEN} "
        f"calibration tokens, {threads} thread(s); the fastest of {repeat} alternating runs of "
        f"each; llm-compressor {version} with its defaults (sequential pipeline, one sample per "
        "forward) in its own virtualenv; perplexity on the held-out 10 % of the text." + tuned,
    )


def _method_cell(row: dict) -> str:
    """The method, with the label of a non-default row (``sparsegpt, float32 calibration
    (*non-default*)``)."""
    if row.get("tuned"):
        return f"{row['method']}, {row['tuned']} (*non-default*)"
    return row["method"]


def large_figure(rows: list[dict], samples: int, threads: int) -> str:
    """README's ``oneshot-speed-large`` block: seconds per block and peak memory growth on the
    random Llama (hidden 1024, 8 blocks)."""
    head = ["method (50 %)", "wall s", "s per block", "peak memory growth MiB"]
    cells = [
        [r["method"], f"{r['wall_time_s']:.1f}", f"{r['s_per_block']:.2f}",
         f"{r['peak_memory_mb']:.0f}"]
        for r in rows
    ]  # fmt: skip
    return figure(
        "oneshot-speed-large",
        md_table(head, cells) + f"\n\nRandom Llama: hidden 1024, intermediate 2816, 8 blocks, "
        f"16 / 8 heads; {samples} x {SEQ_LEN} random tokens; {threads} thread(s), one fresh "
        "process per method.",
    )


def _line(row: dict) -> str:
    method = f"{row['method']} ({row['tuned']}, tuned)" if row.get("tuned") else row["method"]
    text = (
        f"{method:>9} {row['config']:>4}: prunekit {row['prunekit_s']:6.2f} s "
        f"ppl {row['prunekit_ppl']:.4f}"
    )
    if "llmc_s" in row:
        text += (
            f" | llm-compressor {row['llmc_s']:6.2f} s ppl {row['llmc_ppl']:.4f} | time "
            f"ratio {row['time_ratio']:.2f}, ppl ratio {row['ppl_ratio']:.4f}"
        )
    return text


# ------------------------------------------------------------------------------- random Llama


def random_llama_child(method: str, pattern: str, samples: int, threads: int) -> None:
    """One oneshot run on the random Llama in this fresh process; prints a JSON line."""
    import gc

    import transformers
    from distributed_oneshot import random_llama_config

    import prunekit

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(random_llama_config()).eval()
    tokens = torch.randint(
        0, 512, (samples * SEQ_LEN * 4,), generator=torch.Generator().manual_seed(1)
    )
    calib = prunekit.calibration(tokens, n_samples=samples, seq_len=SEQ_LEN, seed=0)
    with torch.no_grad():
        model(**calib[0])
    gc.collect()
    report = prunekit.oneshot(
        model,
        calib,
        method=method,
        sparsity=None if ":" in pattern else 0.5,
        pattern=pattern,
        inplace=True,
        progress=False,
    )
    wall = report.settings["wall_time_s"]
    print(
        "RESULT "
        + json.dumps(
            {
                "method": method,
                "pattern": pattern,
                "wall_time_s": wall,
                "s_per_block": wall / 8,
                "peak_memory_mb": report.settings["peak_memory_mb"],
            }
        )
    )


def random_llama(args: argparse.Namespace) -> dict:
    print(f"machine: {machine()}; {args.threads} torch thread(s)")
    print(f"prunekit from {args.src or ROOT / 'src'}")
    print(
        "random Llama: hidden 1024, intermediate 2816, 8 blocks, 16 / 8 heads; "
        f"calibration {args.samples} x {SEQ_LEN} random tokens"
    )
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(args.src)
    rows = []
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--random-child",
            method,
            "--samples",
            str(args.samples),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        row = json.loads(done.stdout.split("RESULT ")[-1])
        rows.append(row)
        print(
            f"{method:>9} 50 %: {row['wall_time_s']:7.2f} s in all, {row['s_per_block']:6.2f} "
            f"s per block, peak memory growth {row['peak_memory_mb']:.0f} MiB",
            flush=True,
        )
    if args.src is None and args.methods == ["sparsegpt", "wanda"] and args.samples == 128:
        large_figure(rows, args.samples, args.threads)  # the documented run
    return {"machine": machine(), "rows": rows, "samples": args.samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods", default="sparsegpt,wanda", type=lambda s: [m for m in s.split(",") if m]
    )
    parser.add_argument("--llmc-python", help="python of llm-compressor's virtualenv")
    parser.add_argument("--no-llmc", action="store_true", help="time prunekit alone")
    parser.add_argument(
        "--no-tuned",
        dest="tuned",
        action="store_false",
        help="leave out the non-default rows (calibration_dtype='float32')",
    )
    parser.add_argument("--random-llama", action="store_true")
    parser.add_argument("--samples", type=int, default=128, help="random Llama: calibration")
    parser.add_argument("--src", type=Path, help="random Llama: import prunekit from here")
    parser.add_argument("--random-child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each run this often, report the fastest"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.random_child:
        random_llama_child(args.random_child, "unstructured", args.samples, args.threads)
        return 0
    out = random_llama(args) if args.random_llama else compare(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
