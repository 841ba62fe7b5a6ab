"""Data-parallel ``oneshot`` with 1 and 2 processes: wall time, perplexity, masks, traffic.

For each model and case (a method, optionally with an allocation: ``wanda``,
``sparsegpt:sensitivity``, ``wanda:owl``), ``oneshot`` runs twice in fresh processes started by ``torchrun``
(``--nproc_per_node 1``, then ``2``; one torch thread per process): the same script and the
same full calibration list, prunekit takes each rank's contiguous share. Printed per run:

* wall time of the ``oneshot`` call (rank 0's ``wall_time_s``) and the machine load
  (``os.getloadavg``) before the runs: on a shared machine the speed-up is only indicative;
* perplexity of the pruned model (measured by rank 0 on the same windows in both runs; it must
  match), and whether the keep-masks are bit-identical to the one-process run, with the largest
  weight difference (SparseGPT's Hessians are summed in another order: ~1e-6);
* bytes the ranks together put into collectives per block (norm vectors for Wanda; partial
  Hessians and the broadcast results for SparseGPT; with ``sensitivity`` also the measuring
  pass's statistics, its broadcast SparseGPT grids and the gathered damage values);
* with an allocation: whether the per-layer sparsities are identical in both runs.

Models: the character-level Llama of ``benchmarks/llm_oneshot.py`` (trained on
tiny-shakespeare; calibration 32 x 128 characters of the training split, perplexity on 64
validation windows of 128 characters), and a generated random Llama (hidden 1024,
intermediate 2816, 8 blocks, 16 heads / 8 kv heads; calibration 8 x 128 random tokens,
"perplexity" on 8 other random windows: meaningless as quality, used only to check equality).

    .venv/bin/python benchmarks/distributed_oneshot.py [--models char,random] \
        [--cases wanda,sparsegpt,wanda:sensitivity,sparsegpt:sensitivity]

The default cases are printed first; ``--cases`` picks others (e.g. to keep each timed run
short on a shared machine). A run of both models and the default cases (what ``make bench``
runs) also prints docs/distributed.md's figure block ``distributed-oneshot``; other runs print
none.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from figures import figure, md_table  # noqa: E402

MODELS = "char,random"
CASES = "wanda,sparsegpt,wanda:sensitivity,sparsegpt:sensitivity"


def char_model_and_data():
    import llm_oneshot as llm

    train_ids, val_ids, chars = llm.load_text()
    model = llm.trained_model(train_ids, len(chars), 600)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, train_ids.numel() - 129, (32,), generator=gen)
    calib = [train_ids[s : s + 128].unsqueeze(0) for s in starts]
    windows = [val_ids[i * 128 : (i + 1) * 128].unsqueeze(0) for i in range(64)]
    return model, calib, windows


def random_llama_config():
    """The generated Llama of the speed benchmarks: hidden 1024, 8 blocks, GQA 16/8 heads."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def random_model_and_data():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(random_llama_config()).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 512, (1, 128), generator=gen) for _ in range(8)]
    windows = [torch.randint(0, 512, (1, 128), generator=gen) for _ in range(8)]
    return model, calib, windows


@torch.no_grad()
def perplexity(model, windows) -> float:
    total, count = 0.0, 0
    for ids in windows:
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.numel() - 1)
        count += ids.numel() - 1
    return float(torch.tensor(total / count).exp())


def worker(model_name: str, case: str, out: Path) -> None:
    """One oneshot run in this (torchrun) process; rank 0 saves what it ends with."""
    import torch.distributed as dist

    import prunekit
    from prunekit.distributed import is_main, single_process
    from prunekit.distributed.reduce import traffic
    from prunekit.masks import get_mask, masked_parameters, raw_parameter

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    model, calib, windows = {"char": char_model_and_data, "random": random_model_and_data}[
        model_name
    ]()
    method, _, allocation = case.partition(":")
    traffic(reset=True)
    report = prunekit.oneshot(
        model,
        calib,
        method=method,
        allocation=allocation or "uniform",
        inplace=True,
        progress=False,
    )
    sent = traffic()["bytes"]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, sent)
        sent = sum(every)
    if is_main():
        with single_process():
            ppl = perplexity(model, windows)
        state = {}
        for mname, module, pname in masked_parameters(model):
            state[f"{mname}.{pname}"] = raw_parameter(module, pname).detach().clone()
            state[f"{mname}.{pname}:mask"] = get_mask(module, pname)
        torch.save(
            {
                "wall_s": report.settings["wall_time_s"],
                "ppl": ppl,
                "bytes_per_block": sent / model.config.num_hidden_layers,
                "allocated": report.details["allocated"],
                "state": state,
            },
            out,
        )
    if world > 1:
        dist.barrier()  # no rank leaves while rank 0 still saves (gloo teardown can abort)
        dist.destroy_process_group()


def launch(model_name: str, case: str, nproc: int, folder: Path) -> dict:
    out = folder / f"{model_name}-{case.replace(':', '-')}-{nproc}.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--worker",
        model_name,
        case,
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    result = torch.load(out, weights_only=False)
    result["process_s"] = time.perf_counter() - started
    return result


def compare(one: dict, two: dict) -> tuple[bool, float, int]:
    masks_equal, differ, diff = True, 0, 0.0
    for key, value in one["state"].items():
        other = two["state"][key]
        if key.endswith(":mask"):
            differ += int((value != other).sum())
            masks_equal &= torch.equal(value, other)
        else:
            diff = max(diff, float((value.float() - other.float()).abs().max()))
    return masks_equal, diff, differ


def doc_figure(rows: list[dict]) -> str:
    """docs/distributed.md's ``distributed-oneshot`` block: a row per model and case."""
    names = {"char": "char Llama", "random": "random Llama"}
    methods = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude"}
    cells = []
    for r in rows:
        method, _, allocation = r["case"].partition(":")
        case = methods.get(method, method) + (f" + {allocation}" if allocation else " 50 %")
        same = "identical" if r["masks_identical"] else f"{r['mask_entries_differing']} differ"
        if r["allocation_levels"] > 1:
            same += f" ({r['allocation_levels']} levels)"
        if not r["allocation_identical"]:
            same += ", allocation differs"
        cells.append([
            names.get(r["model"], r["model"]), case, f"{r['wall_1p_s']:.2f}",
            f"{r['wall_2p_s']:.2f}", f"{r['speedup']:.2f}x",
            f"{r['ppl_1p']:.5g} / {r['ppl_2p']:.5g}", same,
            f"{r['bytes_per_block_2p'] / 2**20:.3g}",
        ])  # fmt: skip
    head = ["model", "case", "1 proc s", "2 procs s", "speed-up", "perplexity 1 / 2 procs",
            "masks, weights, allocation", "MB / block"]  # fmt: skip
    return figure("distributed-oneshot", md_table(head, cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--cases", default=CASES, help="method[:allocation], comma separated")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]))
        return 0
    sys.path.insert(0, str(ROOT / "tools"))
    from run_benchmarks import cpu_summary

    print(f"load average before the runs (1, 5, 15 min): {os.getloadavg()}; cpus {os.cpu_count()}")
    print("\n".join(cpu_summary()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            for case in args.cases.split(","):
                one = launch(model_name, case, 1, Path(tmp))
                two = launch(model_name, case, 2, Path(tmp))
                same_masks, weight_diff, differ = compare(one, two)
                row = {
                    "model": model_name,
                    "case": case,
                    "wall_1p_s": one["wall_s"],
                    "wall_2p_s": two["wall_s"],
                    "speedup": one["wall_s"] / two["wall_s"],
                    "ppl_1p": one["ppl"],
                    "ppl_2p": two["ppl"],
                    "masks_identical": same_masks,
                    "mask_entries_differing": differ,
                    "max_weight_diff": weight_diff,
                    "bytes_per_block_2p": two["bytes_per_block"],
                    "allocation_identical": one["allocated"] == two["allocated"],
                    "allocation_levels": len(set(one["allocated"].values())),
                    "load_after": os.getloadavg()[0],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    header = (
        "model   case                   1 proc s  2 procs s  speed-up  ppl 1p     ppl 2p     "
        "masks      max |dW|  MB/block  allocation"
    )
    print(header)
    for r in rows:
        masks = "identical" if r["masks_identical"] else f"{r['mask_entries_differing']} differ"
        levels = r["allocation_levels"]
        alloc = "uniform" if levels == 1 else f"{levels} levels"
        alloc += ", identical" if r["allocation_identical"] else ", DIFFERENT"
        print(
            f"{r['model']:<7} {r['case']:<22} {r['wall_1p_s']:>8.2f}  {r['wall_2p_s']:>9.2f}  "
            f"{r['speedup']:>7.2f}x  {r['ppl_1p']:<10.5g} {r['ppl_2p']:<10.5g} "
            f"{masks:<10} {r['max_weight_diff']:.1e}  {r['bytes_per_block_2p'] / 2**20:>8.2f}  "
            f"{alloc}"
        )
    if (args.models, args.cases) == (MODELS, CASES):
        doc_figure(rows)  # the documented run; a partial one must not overwrite the table
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
