"""Worker of tests/test_distributed.py: two processes forked by the test (``worker``), or
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py
OUT GROUP``.

Every rank runs the same calls under a gloo process group and saves what it ends with to
``OUT/GROUP-rank{r}.pt``; rank 0 also runs each call alone (``single_process()``, same thread
count) and saves that reference to ``OUT/GROUP-ref.pt``. The tests compare the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.distributed import single_process
from prunekit.distributed.reduce import traffic
from prunekit.masks import get_mask, masked_parameters, raw_parameter


def masked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict (weights as stored) and the keep-masks as ``name:mask``."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}
    for mname, module, pname in masked_parameters(model):
        out[f"{mname}.{pname}"] = raw_parameter(module, pname).detach().clone()
        out[f"{mname}.{pname}:mask"] = get_mask(module, pname)
    return out


def tiny_llama(**overrides) -> nn.Module:
    """conftest's tiny Llama, with transformers' warnings silenced in the ranks."""
    import transformers

    from conftest import tiny_llama as build

    transformers.logging.set_verbosity_error()
    return build(**overrides)


ONESHOT = {
    "wanda": dict(method="wanda"),
    "magnitude": dict(method="magnitude"),
    "sparsegpt": dict(method="sparsegpt"),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "wanda-owl": dict(method="wanda", allocation="owl", owl_lambda=0.1),
    "wanda-whole": dict(method="wanda", sequential=False),
    "sparsegpt-whole": dict(method="sparsegpt", sequential=False),
    "sparsegpt-sensitivity": dict(method="sparsegpt", allocation="sensitivity", sparsity=0.6),
    # 0.6: at 0.5 the tiny random model allocates uniformly, which would test nothing
    "wanda-sensitivity": dict(method="wanda", allocation="sensitivity", sparsity=0.6),
    "magnitude-sensitivity": dict(method="magnitude", allocation="sensitivity"),
    "wanda-sensitivity-whole": dict(method="wanda", allocation="sensitivity", sequential=False),
    "sparsegpt-owl": dict(method="sparsegpt", allocation="owl", owl_lambda=0.1),
}


class _Counted:
    """Counts what the allocation pass runs on this rank: the samples its block-by-block pass
    sees, and the whole-model damage runs."""

    def __enter__(self) -> dict:
        import importlib

        sensitivity = importlib.import_module("prunekit.analysis.sensitivity")
        self.module, self.seen = sensitivity, {"samples": [], "runs": 0}
        self.run_sequential = sensitivity.run_sequential
        self.call = sensitivity._OutputDamage.__call__

        def run_sequential(model, blocks, data, *args, **kwargs):
            data = list(data)
            self.seen["samples"].append(len(data))
            return self.run_sequential(model, blocks, data, *args, **kwargs)

        def call(scorer, *args, **kwargs):
            self.seen["runs"] += 1
            return self.call(scorer, *args, **kwargs)

        sensitivity.run_sequential = run_sequential
        sensitivity._OutputDamage.__call__ = call
        return self.seen

    def __exit__(self, *exc) -> None:
        self.module.run_sequential = self.run_sequential
        self.module._OutputDamage.__call__ = self.call


def run_oneshot(out: Path, rank: int) -> tuple[dict, dict]:
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 64, (1, 12), generator=gen) for _ in range(5)]  # shards of 2 and 3
    mine, ref = {}, {}
    for name, kwargs in ONESHOT.items():
        traffic(reset=True)
        with _Counted() as seen:
            report = prunekit.oneshot(model, calib, progress=False, **kwargs)
        mine[name] = masked_state(report.model)
        mine[name + "/traffic"] = traffic()
        mine[name + "/allocated"] = report.details["allocated"]
        mine[name + "/seen"] = seen
        if rank == 0:
            with single_process(), _Counted() as seen:
                single = prunekit.oneshot(model, calib, progress=False, **kwargs)
            ref[name] = masked_state(single.model)
            ref[name + "/allocated"] = single.details["allocated"]
            ref[name + "/seen"] = seen
    # a checkpointed run: only rank 0 may write the folder
    import prunekit.calibrate.progress as progress

    writes = []
    original = progress._replace
    progress._replace = lambda tmp, final: (writes.append(str(final)), original(tmp, final))[1]
    try:
        report = prunekit.oneshot(
            model, calib, method="wanda", progress=False, checkpoint=out / "oneshot-ck"
        )
    finally:
        progress._replace = original
    mine["checkpoint"] = masked_state(report.model)
    mine["checkpoint/writes"] = writes
    mine["structured"], mine["structured/runs"] = structured_sensitivity_case()
    if rank == 0:
        with single_process():
            ref["structured"], ref["structured/runs"] = structured_sensitivity_case()
    for mode in ("output", "proxy"):  # prunekit.sensitivity itself
        for method in ("wanda", "sparsegpt"):
            key = f"curves-{mode}-{method}"
            kwargs = dict(method=method, mode=mode, sparsities=(0.3, 0.6), progress=False)
            with _Counted() as seen:
                result = prunekit.sensitivity(model, calib, **kwargs)
            mine[key], mine[key + "/seen"] = result.raw_damage, seen
            if rank == 0:
                with single_process(), _Counted() as seen:
                    result = prunekit.sensitivity(model, calib, **kwargs)
                ref[key], ref[key + "/seen"] = result.raw_damage, seen
    return mine, ref


def structured_sensitivity_case() -> tuple[dict, int]:
    """prune_structured(allocation="sensitivity") on a small MLP whose middle layer is nearly
    dead: the pruned model and how many damage runs this rank made."""
    import importlib

    import prunekit.graph as pg

    module = importlib.import_module("prunekit.analysis.structured_sensitivity")

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():
        net[2].weight[:12] *= 1e-3
    gen = torch.Generator().manual_seed(6)
    calib = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    runs = [0]
    original = module._CosineDamage.__call__

    def call(self, model):
        runs[0] += 1
        return original(self, model)

    module._CosineDamage.__call__ = call
    try:
        report = pg.prune_structured(
            net,
            calib[0][:1],
            calib=calib,
            allocation="sensitivity",
            target_macs=0.6,
            round_to=1,
            measure_latency=False,
            progress=False,
        )
    finally:
        module._CosineDamage.__call__ = original
    return {k: v.clone() for k, v in report.model.state_dict().items()}, runs[0]


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def batches() -> list:
    gen = torch.Generator().manual_seed(4)
    return [
        (torch.randn(8, 16, generator=gen), torch.randint(0, 8, (8,), generator=gen))
        for _ in range(4)
    ]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5)


def finetune_cases(out: Path | None, data=None) -> dict:
    from prunekit.train import GradualPruner, PolynomialSchedule, finetune

    data = batches() if data is None else data
    result = {}
    pruned = prunekit.prune(mlp(), 0.5, scope="local").model
    ft = finetune(
        pruned,
        data,
        loss_fn,
        epochs=2,
        optimizer=sgd,  # not Adam: its steps hide a wrong gradient scale
        progress=False,
        checkpoint=None if out is None else out / "finetune-ck",
    )
    result["finetune"] = masked_state(ft.model)
    result["finetune/history"] = ft.history
    for method in ("magnitude", "movement"):
        model = mlp()
        pruner = GradualPruner(
            model,
            PolynomialSchedule(final_sparsity=0.75, begin_step=1, end_step=6, frequency=1),
            method=method,
        )
        seen = []
        original = pruner.step

        def step(original=original, pruner=pruner, seen=seen) -> bool:
            changed = original()
            seen.append({k: v.clone() for k, v in pruner.masks().items()})
            return changed

        pruner.step = step
        finetune(
            model, data, loss_fn, pruner=pruner, inplace=True, epochs=2, lr=1e-2, progress=False
        )
        result[f"pruner-{method}"] = masked_state(model)
        result[f"pruner-{method}/steps"] = seen
    return result


def run_train(out: Path, rank: int) -> tuple[dict, dict]:
    import prunekit.train  # noqa: F401 - the module below, not the function it exports

    ft_module = sys.modules["prunekit.train.finetune"]
    writes = []
    original = ft_module.write_point
    ft_module.write_point = lambda *a, **k: (writes.append(str(a[1])), original(*a, **k))[1]
    try:
        mine = finetune_cases(out)
    finally:
        ft_module.write_point = original
    mine["finetune/writes"] = writes
    # per-rank data: a DataLoader with a DistributedSampler (no split, each rank its rows)
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    x = torch.cat([b[0] for b in batches()])
    y = torch.cat([b[1] for b in batches()])
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, shuffle=False))
    from prunekit.train import finetune

    ft = finetune(
        prunekit.prune(mlp(), 0.5, scope="local").model,
        loader,
        loss_fn,
        epochs=2,
        optimizer=sgd,
        progress=False,
    )
    mine["sampler"] = masked_state(ft.model)
    # sync_masks_: rank 0's masks win over different ones
    from prunekit.distributed.train import sync_masks_

    net = mlp()
    keep = torch.rand(net[0].weight.shape, generator=torch.Generator().manual_seed(rank)) > 0.5
    prunekit.masks.apply_mask(net[0], "weight", keep)
    sync_masks_(net)
    mine["sync"] = masked_state(net)
    ref = {}
    if rank == 0:
        with single_process():
            ref = finetune_cases(None)
    return mine, ref


STREAM = {
    "wanda": dict(method="wanda"),
    "sparsegpt-owl": dict(method="sparsegpt", allocation="owl", owl_lambda=0.1),
    "wanda-sensitivity": dict(method="wanda", allocation="sensitivity", sparsity=0.6),
    "sparsegpt-sensitivity": dict(
        method="sparsegpt", allocation="sensitivity", sparsity=0.6, max_activation_mb=0.001
    ),
}


def run_stream(out: Path, rank: int) -> tuple[dict, dict]:
    """oneshot_from_pretrained from ``OUT/llama`` (written by the test) on both ranks, then
    alone on rank 0: what each rank wrote (shard files) and the summaries."""
    import prunekit.calibrate.streaming as streaming

    gen = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 64, (1, 12), generator=gen) for _ in range(5)]
    writes: list[str] = []
    original = streaming._write_shard
    streaming._write_shard = lambda path, tensors: (
        writes.append(path.name),
        original(path, tensors),
    )[1]
    mine, ref = {}, {}
    try:
        for name, kwargs in STREAM.items():
            writes.clear()
            traffic(reset=True)
            summary = streaming.oneshot_from_pretrained(
                out / "llama", calib, out / f"stream-{name}", progress=False, **kwargs
            )
            mine[name] = {"summary": summary, "writes": list(writes), "traffic": traffic()}
            if rank == 0:
                with single_process():
                    ref[name] = streaming.oneshot_from_pretrained(
                        out / "llama", calib, out / f"single-{name}", progress=False, **kwargs
                    )
    finally:
        streaming._write_shard = original
    return mine, ref


def run_timing(out: Path, rank: int) -> tuple[dict, dict]:
    """Latencies that steer decisions, under two ranks: rank 0 times, both get its figures."""
    import prunekit.graph.latency as latency
    from prunekit.distributed.decide import main_decides
    from prunekit.recipes.measure import MeasureSettings
    from prunekit.recipes.measure import latency as recipe_latency

    calls = {"bench": 0}
    real_bench = latency.bench

    def counting_bench(*args, **kwargs):
        calls["bench"] += 1
        return real_bench(*args, **kwargs)

    latency.bench = counting_bench
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(),
                        nn.Linear(64, 8))  # fmt: skip
    x = torch.randn(16, 64)
    measured = latency.measure({"dense": net}, x, budget_s=0.05)
    report = prunekit.prune_structured(net, x, target_latency=0.6, unit="channel", progress=False)
    widths = [tuple(p.shape) for p in report.model.parameters()]
    sparse = prunekit.finalize(prunekit.prune(net, sparsity=0.7, progress=False).model)
    served = recipe_latency(sparse, net, x, MeasureSettings(batch_sizes=[1], repeats=3))
    try:
        main_decides(lambda: 1 / 0)
        error = None
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank saw
        error = f"{type(exc).__name__}: {exc}"
    mine = {
        "measured": measured,
        "widths": widths,
        "search": report.latency.ratio,
        "served": served,
        "bench_calls": calls["bench"],
        "error": error,
    }
    return mine, {}


def run_cli(out: Path, rank: int, port: int, argv: list[str]) -> None:
    """``prunekit`` in torchrun's environment: the command joins the group itself."""
    import contextlib
    import io
    import os

    from prunekit.cli import main

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    torch.save({"rc": code, "stdout": printed.getvalue()}, out / f"cli-rank{rank}.pt")


def run_launched(out: Path, rank: int, port: int) -> None:
    """``prunekit.distributed.launched`` in torchrun's environment, rank 0 working a second
    longer inside it (as when it writes ``--out``): when each rank's body ended and when each
    left the context."""
    import os
    import time

    from prunekit.distributed import launched

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    with launched() as joined:
        if rank == 0:
            time.sleep(1.0)
        body_done = time.time()
    left = time.time()
    torch.save({"joined": joined, "body_done": body_done, "left": left},
               out / f"launched-rank{rank}.pt")  # fmt: skip


def worker(rank: int | None, out: Path, group: str, init: str | None = None, *args) -> None:
    """Run ``group`` on this rank and save the results (``init``: a ``file://`` rendezvous for
    2 processes; None: torchrun's environment)."""
    torch.set_num_threads(1)
    if group == "cli":
        run_cli(out, rank, *args)
        return
    if group == "launched":
        run_launched(out, rank, *args)
        return
    if init is None:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    rank = dist.get_rank()
    try:
        runs = {"oneshot": run_oneshot, "train": run_train, "stream": run_stream,
                "timing": run_timing}  # fmt: skip
        mine, ref = runs[group](out, rank)
        torch.save(mine, out / f"{group}-rank{rank}.pt")
        if rank == 0:
            torch.save(ref, out / f"{group}-ref.pt")
        dist.barrier()  # no rank tears the group down while the other still saves
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(None, Path(sys.argv[1]), sys.argv[2])
