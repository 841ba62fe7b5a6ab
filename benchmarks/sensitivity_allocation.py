"""Choosing the ratios: sensitivity-based allocation against global, uniform and OWL.

Three parts, each on real trained models and data (same process, same calibration data):

1. **MNIST CNN at 95 %** (``mnist_cnn.pt``; conv1, conv2, fc1, fc2), magnitude pruning, no
   recovery: global magnitude (one ranking) against the sensitivity allocation with exactly the
   same number of non-zeros (``allocate_by_sensitivity``: curves of the KL divergence of the
   logits on calibration images 0-999, then two refinement rounds measured around the previous
   allocation, the allocation with the lowest measured KL kept). Accuracy on test images
   5000-9999.
2. **Prune to a floor on MNIST**: ``prune_to_floor`` with an absolute floor of 99.0 % accuracy
   on images 5000-7499 (validation half), global magnitude, and a short mask-keeping fine-tune
   (200 steps of SGD on images 0-4999) as ``recover`` at every point; every point is printed,
   and the best model's accuracy on the untouched images 7500-9999.
3. **Character Llama at 70 % unstructured** (the model of ``llm_oneshot.py``, same training and
   cache): ``prunekit.oneshot`` with Wanda and SparseGPT, allocation uniform, OWL and
   sensitivity (block by block with the earlier blocks pruned, each block pruned by the method
   at 5 sparsities around the target, KL of the logits on 16 calibration windows, then the
   exact-budget allocator between blocks; as many non-zeros as uniform). Validation perplexity
   (last 10 % of tiny-shakespeare), non-zeros, wall and CPU time; the cost of the sensitivity
   pass + allocation against one SparseGPT pass (target <= 3x), from the CPU time of the
   process (1 thread; wall times on a shared machine stretch unevenly) with the wall-time
   ratio printed too.

Prints PASS / MISS for the acceptance checks.

    .venv/bin/python benchmarks/sensitivity_allocation.py [--skip-mnist] [--skip-llama] [--json out.json]

A run of all three parts with the default training and recovery steps (what ``make bench`` runs,
with ``--threads 1 --calib-samples 32``) also prints docs/analysis.md's figure block
``analysis-allocation``; a run that skips a part prints none.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit
from prunekit.analysis import allocate_by_sensitivity, prune_to_floor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import figure, md_table  # noqa: E402
from train_common import accuracy, find_folder, load_mnist, load_mnist_model  # noqa: E402

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
GRID_MNIST = (0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


def nonzeros(model: torch.nn.Module, names) -> int:
    return sum(int((model.get_submodule(n).weight != 0).sum()) for n in names)


def mnist_part(args: argparse.Namespace) -> dict:
    folder = find_folder(None, "mnist", ("t10k-images-idx3-ubyte.gz", "mnist_cnn.pt"))
    if folder is None:
        print("skipped MNIST: data not found")
        return {}
    x, y = load_mnist(folder)
    model = load_mnist_model(folder)
    x_eval, y_eval = x[5000:], y[5000:]
    calib = [x[i : i + 500] for i in range(0, 1000, 500)]
    dense = accuracy(model, x_eval, y_eval)
    print(f"MNIST CNN: dense accuracy {dense:.4f} on test images 5000-9999")

    started = time.perf_counter()
    glob = prunekit.prune(model, 0.95, targets=LAYERS)
    glob_s = time.perf_counter() - started
    started = time.perf_counter()
    alloc, rounds = allocate_by_sensitivity(
        model, calib, 0.95, rounds=3, targets=LAYERS, sparsities=GRID_MNIST, progress=False
    )
    sens_s = time.perf_counter() - started
    sens = prunekit.prune(model, 0.95, targets=LAYERS, per_layer=alloc.per_layer)
    out = {
        "dense": dense,
        "global": accuracy(glob.model, x_eval, y_eval),
        "sensitivity": accuracy(sens.model, x_eval, y_eval),
        "global_nonzeros": nonzeros(glob.model, LAYERS),
        "sensitivity_nonzeros": nonzeros(sens.model, LAYERS),
        "global_layers": {r.name: r.sparsity for r in glob.layers},
        "sensitivity_layers": alloc.per_layer,
        "round_predicted_kl": [r.allocate(0.95).predicted_damage for r in rounds],
        "chosen_measured_kl": alloc.budget["measured_damage"],
        "seconds": {"global": glob_s, "sensitivity": sens_s},
    }
    print("95 % of conv1, conv2, fc1, fc2 (magnitude, no recovery)")
    for kind in ("global", "sensitivity"):
        layers = out[f"{kind}_layers"]
        per = "  ".join(f"{n.split('.')[0]} {layers[n]:.3f}" for n in layers)
        print(
            f"  {kind:>11}: accuracy {out[kind]:.4f}  non-zeros {out[f'{kind}_nonzeros']:,}  "
            f"[{per}]  {out['seconds'][kind]:.1f} s"
        )
    return out


def mnist_floor(args: argparse.Namespace) -> dict:
    folder = find_folder(None, "mnist", ("t10k-images-idx3-ubyte.gz", "mnist_cnn.pt"))
    if folder is None:
        return {}
    x, y = load_mnist(folder)
    model = load_mnist_model(folder)
    x_train, y_train = x[:5000], y[:5000]
    x_val, y_val = x[5000:7500], y[5000:7500]
    x_test, y_test = x[7500:], y[7500:]

    def recover(pruned: torch.nn.Module) -> torch.nn.Module:
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
        pruned.train()
        for _ in range(args.recover_steps):
            idx = torch.randint(0, len(x_train), (64,), generator=g)
            loss = F.nll_loss(pruned(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()  # masked weights: the zeros stay zero (the mask multiplies the weight)
        return pruned.eval()

    report = prune_to_floor(
        model,
        lambda m: accuracy(m, x_val, y_val),
        floor=0.99,
        relative=False,
        recover=recover,
        targets=LAYERS,
        ladder=(0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99),
        tolerance=0.005,
        progress=False,
    )
    print("\nprune_to_floor on MNIST: floor 99.0 % accuracy on images 5000-7499, global")
    print(f"magnitude, recover = {args.recover_steps} SGD steps on images 0-4999 at every point")
    print(report)
    test = accuracy(report.model, x_test, y_test) if report.model is not None else None
    if test is not None:
        zeros = 1 - nonzeros(report.model, LAYERS) / sum(
            report.model.get_submodule(n).weight.numel() for n in LAYERS
        )
        print(f"best model: measured sparsity {zeros:.4f}, accuracy {test:.4f} on images 7500-9999")
    return {**report.to_dict(), "test_accuracy_7500_9999": test}


def llama_part(args: argparse.Namespace) -> dict:
    import llm_oneshot as L

    from prunekit.eval import perplexity

    train_ids, val_ids, chars = L.load_text()
    model = L.trained_model(train_ids, len(chars), args.steps)
    calib = prunekit.calibration(train_ids, n_samples=args.calib_samples, seq_len=L.SEQ_LEN, seed=0)
    dense = perplexity(model, val_ids, L.SEQ_LEN, batch_size=32)
    print(f"\ncharacter Llama ({args.steps} steps), dense validation perplexity {dense:.3f}")
    print(f"calibration: {calib.description}; 70 % unstructured")
    rows = []
    for method in ("wanda", "sparsegpt"):
        for allocation in ("uniform", "owl", "sensitivity"):
            cpu = time.process_time()
            report = prunekit.oneshot(
                copy.deepcopy(model),
                calib,
                method=method,
                sparsity=0.7,
                allocation=allocation,
                inplace=True,
                progress=False,
            )
            cpu = time.process_time() - cpu
            names = [r.name.rsplit(".", 1)[0] for r in report.layers]
            row = {
                "method": method,
                "allocation": allocation,
                "ppl": perplexity(report.model, val_ids, L.SEQ_LEN, batch_size=32),
                "nonzeros": nonzeros(report.model, names),
                "wall_time_s": report.settings["wall_time_s"],
                "cpu_time_s": cpu,
                "allocated": report.details["allocated"],
                "layer_range": [
                    min(report.details["allocated"].values()),
                    max(report.details["allocated"].values()),
                ],
            }
            rows.append(row)
            print(
                f"  {method:>9} {allocation:>11}: ppl {row['ppl']:8.3f}  non-zeros "
                f"{row['nonzeros']:,}  layers {row['layer_range'][0]:.3f}-"
                f"{row['layer_range'][1]:.3f}  {row['wall_time_s']:.1f} s wall, "
                f"{cpu:.1f} s CPU",
                flush=True,
            )
    return {"dense_ppl": dense, "rows": rows}


def block_sparsities(allocated: dict[str, float]) -> str:
    """Per repeated block (the name up to its first numeric part), the mean of its layers'
    sparsities: ``0.65 / 0.75 / ...``."""
    blocks: dict[str, list[float]] = {}
    for name, sparsity in allocated.items():
        parts = name.split(".")
        cut = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
        blocks.setdefault(".".join(parts[: cut + 1]), []).append(sparsity)
    return " / ".join(f"{sum(v) / len(v):.2f}" for v in blocks.values())


def best_bold(cells: list[str], values: list[float], lower: bool) -> list[str]:
    """``cells`` with the one of the best value (lowest when ``lower``) in bold."""
    best = min(values) if lower else max(values)
    return [f"**{c}**" if v == best else c for c, v in zip(cells, values, strict=True)]


def doc_figure(out: dict, args: argparse.Namespace) -> str:
    """docs/analysis.md's ``analysis-allocation`` block from a run of all three parts."""
    m, f, llama = out["mnist"], out["floor"], out["llama"]
    cells = best_bold([f"{100 * m['global']:.2f} %", f"{100 * m['sensitivity']:.2f} %"],
                      [m["global"], m["sensitivity"]], lower=False)  # fmt: skip
    rows = [[
        f"MNIST CNN 95 % magnitude, no recovery, acc. on test 5000-9999 "
        f"({m['global_nonzeros']:,} non-zeros each)", f"{cells[0]} (global)", "-",
        f"{cells[1]} (3 rounds, KL on images 0-999)",
    ]]  # fmt: skip
    by = {(r["method"], r["allocation"]): r for r in llama["rows"]}
    first_blocks = None
    for method, label in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
        runs = [by[(method, a)] for a in ("uniform", "owl", "sensitivity")]
        cells = best_bold([f"{r['ppl']:.3f}" for r in runs], [r["ppl"] for r in runs], lower=True)
        blocks = block_sparsities(runs[2]["allocated"])
        shown = "same blocks" if blocks == first_blocks else f"blocks {blocks}"
        first_blocks = first_blocks or blocks
        what = (
            f"val. perplexity (dense {llama['dense_ppl']:.3f}), {args.calib_samples} calibration "
            f"windows; non-zeros {runs[0]['nonzeros']:,} (OWL {runs[1]['nonzeros']:,})"
            if method == "wanda"
            else "same"
        )
        rows.append(
            [f"char Llama 70 % {label}, {what}", cells[0], cells[1], f"{cells[2]} ({shown})"]
        )
    one, sens = by[("sparsegpt", "uniform")], by[("sparsegpt", "sensitivity")]
    cpu, wall = (sens[k] - one[k] for k in ("cpu_time_s", "wall_time_s"))
    best = f["best"]
    floor = (
        f"{len(f['points'])} points tried, best {100 * best['sparsity']:.1f} % sparsity "
        f"({100 * best['value']:.2f} %; {100 * f['test_accuracy_7500_9999']:.2f} % on the "
        "untouched images 7500-9999)"
        if best
        else f"{len(f['points'])} points tried, none above the floor"
    )
    head = ["model, budget", "global / uniform", "OWL", "sensitivity"]
    return figure(
        "analysis-allocation",
        md_table(head, rows)
        + f"\n\nCost on the character Llama, {args.threads} thread(s): the sensitivity pass + "
        f"allocation took {cpu:.1f} s of CPU against {one['cpu_time_s']:.1f} s for one SparseGPT "
        f"pass ({cpu / one['cpu_time_s']:.2f}x; wall time {wall:.1f} s against "
        f"{one['wall_time_s']:.1f} s, {wall / one['wall_time_s']:.2f}x).\n\n`prune_to_floor` on "
        f"MNIST (absolute floor 99.0 % on images 5000-7499, global magnitude, "
        f"{args.recover_steps} SGD steps of recovery at every point): {floor}.",
    )


def checks(out: dict) -> list[tuple[str, bool]]:
    result = []
    m = out.get("mnist")
    if m:
        result.append(
            (
                "MNIST 95 %: sensitivity beats global magnitude at the same non-zeros",
                m["sensitivity"] > m["global"]
                and m["sensitivity_nonzeros"] == m["global_nonzeros"],
            )
        )
    f = out.get("floor")
    if f:
        result.append(
            ("MNIST floor 99.0 %: a point above the floor was found", f["best"] is not None)
        )
    llama = out.get("llama")
    if llama:
        ppl = {(r["method"], r["allocation"]): r for r in llama["rows"]}
        for method in ("wanda", "sparsegpt"):
            sens, uni, owl = (ppl[(method, a)] for a in ("sensitivity", "uniform", "owl"))
            result.append(
                (
                    f"Llama 70 % {method}: sensitivity < uniform and < OWL (same non-zeros as uniform)",
                    sens["ppl"] < uni["ppl"]
                    and sens["ppl"] < owl["ppl"]
                    and sens["nonzeros"] == uni["nonzeros"],
                )
            )
        # CPU time of the process (1 thread): other processes on a shared machine stretch the
        # wall times unevenly, not the work done; both are printed
        ratios = {}
        for clock in ("cpu_time_s", "wall_time_s"):
            one_pass = ppl[("sparsegpt", "uniform")][clock]
            with_sens = ppl[("sparsegpt", "sensitivity")][clock]
            extra = with_sens - one_pass
            ratios[clock] = extra / one_pass
            print(
                f"\ncost ({clock[:-7]} time): SparseGPT uniform {one_pass:.1f} s; with sensitivity "
                f"{with_sens:.1f} s: the sensitivity pass + allocation cost {extra:.1f} s = "
                f"{extra / one_pass:.2f}x one SparseGPT pass"
            )
        llama["cost_ratio"] = ratios["cpu_time_s"]
        llama["cost_ratio_wall"] = ratios["wall_time_s"]
        result.append(
            (
                "cost of sensitivity + allocation <= 3x one SparseGPT pass (CPU time, 1 thread)",
                ratios["cpu_time_s"] <= 3,
            )
        )
    print("\nacceptance")
    for name, ok in result:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600, help="Llama training steps (cached)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--recover-steps", type=int, default=200)
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"prunekit {prunekit.__version__}, torch {torch.__version__}, {args.threads} threads\n")
    out: dict = {}
    if not args.skip_mnist:
        out["mnist"] = mnist_part(args)
    if not args.skip_floor:
        out["floor"] = mnist_floor(args)
    if not args.skip_llama:
        out["llama"] = llama_part(args)
    out["checks"] = dict(checks(out))
    parts = out.get("mnist") and out.get("floor") and out.get("llama")
    if parts and (args.steps, args.recover_steps) == (600, 200):  # the documented run only
        doc_figure(out, args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
