"""Sensitivity analysis: prune one layer at a time at several sparsities and record the damage.

Two ways to measure, chosen by ``mode``:

* ``"output"``: every layer in turn is pruned at every sparsity (the rest of the model dense),
  the model runs on the calibration data, and the damage is the divergence of its outputs from
  the dense outputs (``"kl"`` of the logits for classifiers and language models, ``"cosine"``:
  1 - cosine similarity, for encoders), or the drop of a user metric ``evaluate(model) ->
  float`` (higher is better). Cost: one pass over the data per layer and sparsity.
* ``"proxy"``: for models with repeated blocks (found as in ``prunekit.oneshot``), one pass
  block by block over the calibration data gathers each layer's input Gram matrix
  ``H = 2/n X X^T``; the damage of pruning ``W`` to ``W'`` is the relative reconstruction error
  of the layer's output, ``||(W - W') X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T)``, computed
  from H without running the model again. The cost stays near one one-shot pass.

``oneshot(allocation="sensitivity")`` uses a third measurement, :func:`sequential_damage`: block
by block as the one-shot runner goes (the earlier blocks already pruned in place), every block
is pruned with the one-shot method at every sparsity of a grid around the target, and the damage
is the divergence of the model's outputs (KL of the logits) on a small calibration subsample,
from the block's own dense reference; the runs start at the measured block (the earlier blocks'
outputs are replayed). The budget is then spent between blocks, exactly. Under
``torch.distributed`` (every rank passing the same data, as to ``oneshot``) it is data parallel:
the block statistics come from each rank's share of the samples, summed over the ranks
(:mod:`prunekit.distributed.reduce`), each SparseGPT grid is solved by one rank and broadcast,
and the measured runs are spread over the ranks (:mod:`prunekit.distributed.jobs`); every rank
gets every damage value, so the allocation is the same on all ranks and equal to one process's.

The per-layer pruning is the one-shot methods' own: ``"magnitude"``, ``"wanda"`` or
``"sparsegpt"`` (whose reconstruction is included in the damage), or any registered criterion
in output mode. The result is a :class:`SensitivityResult`: a table (``print`` it), CSV, JSON,
a plot, and :meth:`SensitivityResult.allocate` for per-layer sparsities under a budget.

Example:
    >>> import torch, prunekit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> data = [torch.randn(32, 8) for _ in range(2)]
    >>> result = prunekit.sensitivity(net, data, sparsities=(0.5, 0.9), targets=["0", "2"], progress=False)
    >>> sorted(result.layers)
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.analysis.allocate import Allocation, allocate
from prunekit.calibrate.data import calibration
from prunekit.calibrate.sequential import find_blocks, run_sequential
from prunekit.calibrate.sparsegpt import SparseGPTFailure, inverse_hessian_factor
from prunekit.calibrate.stats import (
    InputStats,
    check_calibratable,
    collect_input_stats,
    input_rows,
    run_model,
)
from prunekit.compress.durable import write_text_atomic
from prunekit.distributed import is_distributed, rank, shard_samples
from prunekit.distributed.jobs import run_shared
from prunekit.distributed.reduce import broadcast_tensor_, reduce_collected
from prunekit.distributed.solve import assign, sparsegpt_cost
from prunekit.masks import raw_parameter
from prunekit.patterns import NM, Pattern, Unstructured, parse_pattern
from prunekit.prune import ALLOCATORS, compute_masks, split_by_pattern
from prunekit.scope import lowest_k
from prunekit.scores import Criterion, get_criterion
from prunekit.targets import Target, per_layer_overrides, resolve_targets

DEFAULT_SPARSITIES = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MODES = ("auto", "output", "proxy")
SUBSAMPLE = 16  # calibration items run through the whole model per measured point (sequential)
DIVERGENCES = ("auto", "kl", "cosine")


# ------------------------------------------------------------------------------ the result


@dataclass
class SensitivityResult:
    """Damage of every layer pruned alone, at every sparsity of the grid.

    Attributes:
        layers: layer (parameter) names, in model order.
        sparsities: the measured sparsities.
        damage: ``{layer: [damage at each sparsity]}``, made non-decreasing in sparsity when
            ``monotone`` (the running maximum; the measured values stay in ``raw_damage``).
        metric: ``"kl"``, ``"cosine"``, ``"recon"`` (relative reconstruction error) or
            ``"evaluate"`` (drop of the user metric from ``dense``).
        sizes, macs_per_weight, bytes_per_weight: per-layer costs for :meth:`allocate`.
    """

    layers: list[str]
    sparsities: list[float]
    damage: dict[str, list[float]]
    raw_damage: dict[str, list[float]]
    metric: str
    method: str
    mode: str
    sizes: dict[str, int]
    macs_per_weight: dict[str, float] = field(default_factory=dict)
    bytes_per_weight: dict[str, float] = field(default_factory=dict)
    dense: float | None = None
    monotone: bool = True
    seconds: float = 0.0

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """``{layer: [(sparsity, damage), ...]}`` (the input of :func:`prunekit.allocate`)."""
        return {n: list(zip(self.sparsities, self.damage[n], strict=True)) for n in self.layers}

    def allocate(self, sparsity: float | None = None, **kwargs: Any) -> Allocation:
        """Per-layer sparsities under a budget; see :func:`prunekit.allocate`.

        Example:
            >>> result.allocate(0.7).per_layer  # doctest: +SKIP
        """
        return allocate(self, sparsity, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "prunekit-sensitivity",
            "metric": self.metric,
            "method": self.method,
            "mode": self.mode,
            "monotone": self.monotone,
            "dense": self.dense,
            "seconds": self.seconds,
            "sparsities": self.sparsities,
            "layers": [
                {
                    "name": n,
                    "size": self.sizes[n],
                    "macs_per_weight": self.macs_per_weight.get(n),
                    "bytes_per_weight": self.bytes_per_weight.get(n),
                    "damage": self.damage[n],
                    "raw_damage": self.raw_damage[n],
                }
                for n in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityResult:
        """Rebuild a result written by :meth:`to_json`."""
        if data.get("format") != "prunekit-sensitivity":
            raise ValueError("not a prunekit sensitivity file (format 'prunekit-sensitivity')")
        rows = data["layers"]
        return cls(
            layers=[r["name"] for r in rows],
            sparsities=list(data["sparsities"]),
            damage={r["name"]: list(r["damage"]) for r in rows},
            raw_damage={r["name"]: list(r["raw_damage"]) for r in rows},
            metric=data["metric"],
            method=data["method"],
            mode=data["mode"],
            sizes={r["name"]: int(r["size"]) for r in rows},
            macs_per_weight={
                r["name"]: r["macs_per_weight"] for r in rows if r.get("macs_per_weight")
            },
            bytes_per_weight={
                r["name"]: r["bytes_per_weight"] for r in rows if r.get("bytes_per_weight")
            },
            dense=data.get("dense"),
            monotone=data.get("monotone", True),
            seconds=data.get("seconds", 0.0),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SensitivityResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the curves as JSON (written to a temporary name, then renamed)."""
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One row per layer and sparsity: layer, size, sparsity, damage, raw_damage."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["layer", "size", "sparsity", "damage", "raw_damage"])
        for n in self.layers:
            for s, d, r in zip(self.sparsities, self.damage[n], self.raw_damage[n], strict=True):
                writer.writerow([n, self.sizes[n], s, repr(d), repr(r)])
        return write_text_atomic(Path(path), buffer.getvalue())

    def plot(self, path: str | os.PathLike, heatmap: bool | None = None) -> Path:
        """Damage vs sparsity, one line per layer (a heatmap when there are more than 16).

        Needs matplotlib (imported here, not by prunekit).
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
        heatmap = len(self.layers) > 16 if heatmap is None else heatmap
        path = Path(path)
        if heatmap:
            fig, ax = plt.subplots(
                figsize=(1.0 + 0.6 * len(self.sparsities), 1.5 + 0.22 * len(self.layers))
            )
            values = [[self.damage[n][j] for j in range(len(self.sparsities))] for n in self.layers]
            image = ax.imshow(values, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(self.sparsities)), [f"{s:g}" for s in self.sparsities])
            ax.set_yticks(range(len(self.layers)), self.layers, fontsize=6)
            fig.colorbar(image, ax=ax, label=self.metric)
        else:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for n in self.layers:
                ax.plot(self.sparsities, self.damage[n], marker="o", label=n)
            ax.set_ylabel(self.metric)
            if all(d > 0 for n in self.layers for d in self.damage[n]):
                ax.set_yscale("log")
            ax.legend(fontsize=6)
        ax.set_xlabel("sparsity of the layer")
        ax.set_title(f"sensitivity ({self.method}, {self.mode} mode)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
        try:
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)
        return path

    def __str__(self) -> str:
        width = max([len(n) for n in self.layers] + [5])
        head = f"{'layer':<{width}}  {'size':>9}  " + "  ".join(f"{s:>9g}" for s in self.sparsities)
        lines = [
            f"sensitivity: {self.metric} ({self.method}, {self.mode} mode"
            + (f", dense metric {self.dense:.6g}" if self.dense is not None else "")
            + f", {self.seconds:.1f} s)",
            head,
        ]
        for n in self.layers:
            cells = "  ".join(f"{d:>9.3g}" for d in self.damage[n])
            lines.append(f"{n:<{width}}  {self.sizes[n]:>9,}  {cells}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ pruning one layer


def _check_grid(sparsities: Iterable[float]) -> list[float]:
    grid = sorted(set(float(s) for s in sparsities))
    if not grid or any(not 0.0 <= s < 1.0 for s in grid):
        raise ValueError(f"sparsities must be numbers in [0, 1), got {list(sparsities)!r}")
    return grid


def sparsegpt_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsities: Sequence[float],
    *,
    frozen: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "layer",
) -> list[torch.Tensor]:
    """SparseGPT (unstructured) at several sparsities in one sweep over the columns.

    Returns the same weights as ``sparsegpt_prune(weight, hessian, s)`` for each ``s``: the
    copies are stacked as extra rows (rows are independent in SparseGPT except for the choice of
    how many weights each column block loses, which is made per copy), so the column loop runs
    once instead of once per sparsity.
    """
    from prunekit.scope import count_to_remove

    W0 = weight.detach().clone().float()
    H = hessian.detach().clone().float().to(W0.device)
    rows, cols = W0.shape
    must0 = torch.zeros_like(W0, dtype=torch.bool) if frozen is None else frozen.clone().bool()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W0[:, dead] = 0.0
    must0[:, dead] = True
    factor, _ = inverse_hessian_factor(H, damp, name)
    g = len(sparsities)
    W = W0.repeat(g, 1)
    must = must0.repeat(g, 1)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    totals = [count_to_remove(s, rows * cols) for s in sparsities]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        F1 = factor[start:end, start:end]
        d1 = torch.diagonal(F1)
        saliency = (W1**2 / d1[None, :] ** 2).masked_fill(must[:, start:end], float("-inf"))
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        for c, total in enumerate(totals):
            k = round(total * end / cols) - round(total * start / cols)
            P1[c * rows : (c + 1) * rows] = lowest_k(saliency[c * rows : (c + 1) * rows], k)
        P1 |= must[:, start:end]  # frozen entries beyond a block's share: compensated too
        for i in range(end - start):
            w = W1[:, i]
            q = w.masked_fill(P1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / F1[i, i]
            W1[:, i:] -= err[:, None] * F1[i, i:][None, :]
            Err1[:, i] = err
        W[:, start:end] = Q1
        pruned[:, start:end] = P1 | must[:, start:end]
        W[:, end:] -= Err1 @ factor[start:end, end:]
    W[pruned] = 0.0
    if not torch.isfinite(W).all():
        raise SparseGPTFailure(f"{name}: the SparseGPT update produced non-finite weights")
    return [W[c * rows : (c + 1) * rows].to(weight.dtype) for c in range(g)]


@dataclass
class _LayerPruner:
    """Prunes one target's weight matrix to a sparsity with the chosen method (no side effect)."""

    method: str
    criterion: Criterion | None
    pattern: Pattern
    scope: str
    block_size: int = 128
    damp: float = 0.01
    seed: int = 0

    def matrices(self, t: Target, stats: dict, grid: Sequence[float]) -> list[torch.Tensor]:
        """The pruned weight (weight-shaped) at every sparsity of ``grid``."""
        weight = t.weight()
        if self.method == "sparsegpt":
            matrix = t.as_matrix(weight)
            try:
                outs = sparsegpt_grid(
                    matrix,
                    stats[t.name]["hessian"],
                    grid,
                    frozen=matrix == 0,
                    block_size=self.block_size,
                    damp=self.damp,
                    name=t.name,
                )
                return [t.from_matrix(o, weight.shape) for o in outs]
            except SparseGPTFailure:
                criterion = get_criterion("magnitude")
        else:
            criterion = self.criterion
            if self.scope == "row" and isinstance(self.pattern, Unstructured) and len(grid) > 1:
                return self._row_grid(t, weight, stats, grid)
        out = []
        for s in grid:
            generator = torch.Generator().manual_seed(self.seed)
            keep = compute_masks(
                [t], criterion, stats, self.pattern, s, {}, self.scope, generator=generator
            )
            out.append(weight * keep[t.name].to(weight.dtype))
        return out

    def _row_grid(
        self, t: Target, weight: torch.Tensor, stats: dict, grid: Sequence[float]
    ) -> list[torch.Tensor]:
        """Row scope at every sparsity from one sort of the scores (the masks of
        ``select_rows``: the same per-row counts, the same stable order)."""
        from prunekit.prune import _element_scores
        from prunekit.scope import count_to_remove

        generator = torch.Generator().manual_seed(self.seed)
        scores = t.as_matrix(_element_scores(self.criterion, t, stats, generator))
        rows, cols = scores.shape
        order = torch.argsort(scores, dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
        alive = ~torch.isneginf(scores)
        out = []
        for s in grid:
            total = count_to_remove(s, rows * cols)
            per_row = torch.full((rows,), total // rows, dtype=torch.long, device=scores.device)
            per_row[: total - int(per_row.sum())] += 1
            keep = (ranks >= per_row[:, None]) & alive
            out.append(weight * t.from_matrix(keep, weight.shape).to(weight.dtype))
        return out


def _recon_damage(t: Target, hessian: torch.Tensor, pruned: list[torch.Tensor]) -> list[float]:
    """||(W - W') X||^2 / ||W X||^2 from the Gram matrix, for each pruned weight."""
    W = t.as_matrix(t.weight()).double()
    H = hessian.double().to(W.device)
    base = float(((W @ H) * W).sum())
    out = []
    for p in pruned:
        D = W - t.as_matrix(p).double().to(W.device)
        out.append(float(((D @ H) * D).sum()) / base if base > 0 else 0.0)
    return out


# ------------------------------------------------------------------------------ output damage


def _output_tensor(out: Any) -> tuple[torch.Tensor, str]:
    """The tensor compared, and the divergence that suits it."""
    if isinstance(out, torch.Tensor):
        return out, "kl"
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, "kl"
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden, "cosine"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], "kl"
    raise TypeError(
        f"cannot compare model outputs of type {type(out).__name__}: return a tensor, a tuple "
        "starting with one, or an object with .logits / .last_hidden_state; or pass evaluate="
    )


def _divergence(dense: torch.Tensor, out: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed divergence over the positions of one batch (and the position count)."""
    a, b = dense.float().reshape(-1, dense.shape[-1]), out.float().reshape(-1, out.shape[-1])
    if kind == "kl":
        la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
        return (la.exp() * (la - lb)).sum(-1).clamp_min(0).sum()
    return (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).sum()


class _OutputDamage:
    """Dense outputs on the calibration data, and the divergence of a changed model from them."""

    def __init__(
        self,
        model: nn.Module,
        data: list,
        divergence: str,
        input_fn,
        reference: tuple[list[torch.Tensor], str] | None = None,
    ) -> None:
        self.model, self.data, self.input_fn = model, data, input_fn
        self.last: list[torch.Tensor] = []
        if reference is not None:  # outputs already computed (and their divergence kind)
            self.dense, kind = list(reference[0]), reference[1]
        else:
            self.dense = []
            kind = None
            with torch.no_grad():
                for sample in data:
                    tensor, guess = _output_tensor(run_model(model, input_fn(sample)))
                    kind = kind or guess
                    self.dense.append(tensor.detach())
        self.guess = kind
        self.kind = kind if divergence == "auto" else divergence
        self.positions = sum(d.reshape(-1, d.shape[-1]).shape[0] for d in self.dense)

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None, keep: bool = False) -> float:
        """Mean divergence per position; ``keep`` keeps the outputs in ``last``."""
        total = 0.0
        self.last = []
        for sample, dense in zip(self.data, self.dense, strict=True):
            tensor, _ = _output_tensor(run_model(model or self.model, self.input_fn(sample)))
            total += float(_divergence(dense, tensor, self.kind))
            if keep:
                self.last.append(tensor.detach())
        return total / self.positions


# ------------------------------------------------------------------------------ per-weight costs


def _layer_costs(
    model: nn.Module, targets: list[Target], sample: Any, input_fn
) -> dict[str, float]:
    """MACs per weight of every target (output positions per forward) on one sample."""
    positions: dict[str, float] = {}

    def hook(t: Target):
        def record(module, inputs, output) -> None:
            x = inputs[0]
            rows = input_rows(t, x.detach()) if not isinstance(module, nn.Conv3d) else x
            positions[t.name] = positions.get(t.name, 0.0) + float(rows.shape[0])

        return record

    handles = [t.module.register_forward_hook(hook(t)) for t in targets]
    try:
        with torch.no_grad():
            run_model(model, input_fn(sample))
    except Exception:  # noqa: BLE001 - costs are optional; allocation by params still works
        positions = {}
    finally:
        for h in handles:
            h.remove()
    return positions


def _monotone(values: list[float]) -> list[float]:
    out, top = [], -math.inf
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


# ------------------------------------------------------------------------------ the verb


def _block_groups(
    blocks_name: str, n: int, targets: list[Target]
) -> tuple[list[list[Target]], list[Target]]:
    prefix = f"{blocks_name}." if blocks_name else ""
    groups: list[list[Target]] = [[] for _ in range(n)]
    rest = []
    for t in targets:
        head = t.module_name[len(prefix) :].partition(".")[0]
        if t.module_name.startswith(prefix) and head.isdigit() and int(head) < n:
            groups[int(head)].append(t)
        else:
            rest.append(t)
    return groups, rest


def proxy_damage(
    model: nn.Module,
    targets: list[Target],
    data: Sequence[Any],
    pruner: _LayerPruner,
    grid: Sequence[float],
    *,
    blocks: str | None = None,
    sequential: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Relative reconstruction error of every target at every sparsity, from one pass.

    With blocks, the pass runs block by block over the dense model (each block's Hessians are
    used and dropped before the next block); targets outside the blocks share one more
    whole-model pass. Changes no weight. Under torch.distributed each rank runs its share of
    ``data`` and the Hessians are summed over the ranks (as ``oneshot`` sums them), so every
    rank measures the single-process damage.
    """
    damage: dict[str, list[float]] = {}
    data = shard_samples(list(data))
    keep_parts = is_distributed()

    def reduced(collected: InputStats, group: list[Target]) -> dict:
        return reduce_collected(collected, group) if keep_parts else collected.stats

    def measure(group: list[Target], stats: dict) -> None:
        for t in group:
            hessian = stats[t.name]["hessian"]
            layer_stats = {t.name: {"hessian": hessian, "norm": torch.diagonal(hessian).clone()}}
            damage[t.name] = _recon_damage(t, hessian, pruner.matrices(t, layer_stats, grid))

    found = find_blocks(model, blocks) if sequential else None
    rest = targets
    if found is not None:
        blocks_name, module_list = found
        groups, rest = _block_groups(blocks_name, len(module_list), targets)

        def on_block(index: int, block: nn.Module, run) -> None:
            if groups[index]:
                with InputStats(groups[index], {"hessian"}, keep_parts) as collected:
                    run()
                measure(groups[index], reduced(collected, groups[index]))

        bar = (
            (lambda it: tqdm(it, desc="sensitivity", unit="block", leave=False))
            if progress
            else None
        )
        run_sequential(
            model, module_list, data, on_block, propagate="dense", device=device, progress=bar
        )
    if rest:
        if keep_parts:
            with InputStats(rest, {"hessian"}, keep_parts) as collected, torch.no_grad():
                for sample in data:
                    run_model(model, sample)
            stats = reduced(collected, rest)
        else:
            stats = collect_input_stats(model, rest, data, {"hessian"}, progress=progress)
        measure(rest, stats)
    return {t.name: damage[t.name] for t in targets}


def _merge(items: list[Any], max_tokens: int = 4096) -> list[Any]:
    """Calibration items joined into batches of at most ``max_tokens`` positions (one forward
    per batch instead of per item) when they can be: tensors, or dicts of tensors, with the
    same shapes and a batch dimension of 1. Otherwise the items as they are."""

    def parts(item: Any) -> dict[str, torch.Tensor] | None:
        if isinstance(item, torch.Tensor):
            return {"": item}
        if isinstance(item, dict) and all(isinstance(v, torch.Tensor) for v in item.values()):
            return dict(item)
        return None

    split = [parts(item) for item in items]
    if not items or any(p is None for p in split):
        return items
    first = split[0]
    same = all(
        p.keys() == first.keys() and all(p[k].shape == first[k].shape for k in first) for p in split
    )
    if not same or any(v.dim() < 2 or v.shape[0] != 1 for v in first.values()):
        return items
    per_item = max(v.numel() for v in first.values())
    size = max(1, max_tokens // max(1, per_item))
    out = []
    for start in range(0, len(split), size):
        chunk = split[start : start + size]
        joined = {k: torch.cat([p[k] for p in chunk]) for k in first}
        out.append(joined[""] if "" in joined else joined)
    return out


class _Replay:
    """Skip the blocks before ``index`` while a block is measured: the first use (the reference
    run) records what block ``index - 1`` returns for every sample; with ``replaying`` set, the
    earlier blocks are replaced by stand-ins that return those recorded outputs in turn, so each
    measured point runs the model from block ``index`` on (embeddings and head included)."""

    def __init__(self, blocks: nn.ModuleList, index: int, outputs: list | None = None) -> None:
        self.blocks, self.index = blocks, index
        self.outputs: list[Any] = list(outputs or [])
        self.replaying = outputs is not None
        self._saved: list[nn.Module] = []
        self._handle: Any = None

    def __enter__(self) -> _Replay:
        if not self.replaying:
            self._handle = self.blocks[self.index - 1].register_forward_hook(
                lambda module, args, out: self.outputs.append(out)
            )
            return self
        self._saved = [self.blocks[j] for j in range(self.index)]
        counter = [0]
        for j in range(self.index):
            self.blocks[j] = _StandIn(self.outputs, counter, last=j == self.index - 1)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for j, block in enumerate(self._saved):
            self.blocks[j] = block
        self._saved = []


class _StandIn(nn.Module):
    """Returns the recorded output of the block it replaces (the next one each call)."""

    def __init__(self, outputs: list, counter: list[int], last: bool) -> None:
        super().__init__()
        self.outputs, self.counter, self.last = outputs, counter, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.outputs[self.counter[0] % len(self.outputs)]
        if self.last:
            self.counter[0] += 1
        return out


def _sparsegpt_owners(group: list[Target], n_points: int) -> dict[str, int]:
    """The rank that solves each layer's SparseGPT grid (``n_points`` stacked copies of the
    weight), balanced by cost (the same on every rank)."""
    costs = []
    for t in group:
        rows, cols = t.as_matrix(t.weight()).shape
        costs.append(sparsegpt_cost(rows * n_points, cols))
    return {t.name: r for t, r in zip(group, assign(costs), strict=True)}


def _reduced_stats(
    collected: InputStats, group: list[Target], pruner: _LayerPruner, n_points: int
) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics over every rank's samples (this process's alone without a process
    group): Wanda's norms on every rank, SparseGPT's Hessians on the layer's solving rank."""
    if not is_distributed():
        return collected.stats
    owners = None
    if pruner.method == "sparsegpt":
        owners = _sparsegpt_owners(group, n_points)
    return reduce_collected(collected, group, owners)


@torch.no_grad()
def _rest_stats(
    model: nn.Module, t: Target, local: list, need: set[str], pruner: _LayerPruner, n_points: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of a target outside the blocks, from a whole-model pass over this rank's
    samples, reduced over the ranks."""
    if not is_distributed():
        return collect_input_stats(model, [t], local, need, progress=False)
    with InputStats([t], need, keep_parts=True) as collected:
        for sample in local:
            run_model(model, sample)
    return _reduced_stats(collected, [t], pruner, n_points)


def with_norms(group: list[Target], stats: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Each layer's statistics with Wanda's input norms read off the Hessian's diagonal where
    only the Hessian was collected (a layer without statistics gets an empty entry)."""
    out = {}
    for t in group:
        entry = dict(stats.get(t.name, {}))
        if "hessian" in entry and "norm" not in entry:
            entry["norm"] = torch.diagonal(entry["hessian"]).clone()
        out[t.name] = entry
    return out


def _grid_matrices(
    pruner: _LayerPruner, group: list[Target], stats: dict, points: Sequence[float]
) -> dict[str, list[torch.Tensor]]:
    """Every layer of ``group`` pruned at every sparsity of ``points``. Under torch.distributed
    a SparseGPT grid is solved by the rank that holds the layer's Hessian and broadcast;
    magnitude and Wanda (cheap, their statistics on every rank) are computed everywhere."""
    if not is_distributed() or pruner.method != "sparsegpt":
        return {t.name: pruner.matrices(t, stats, points) for t in group}
    owners = _sparsegpt_owners(group, len(points))
    out = {}
    for t in group:
        if owners[t.name] == rank():
            out[t.name] = pruner.matrices(t, stats, points)
        else:
            out[t.name] = [torch.empty_like(t.weight()) for _ in points]
    for t in group:
        for matrix in out[t.name]:
            broadcast_tensor_(matrix, src=owners[t.name])
    return out


def sequential_damage(
    model: nn.Module,
    targets: list[Target],
    data: Sequence[Any],
    pruner: _LayerPruner,
    grid: Sequence[float],
    *,
    operating: float,
    subsample: int | None = None,
    per_layer: bool = True,
    per_block: bool = True,
    blocks: str | None = None,
    sequential: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Damage to the final outputs of pruning each layer (and each block), block by block.

    One pass over the blocks in order, as the one-shot runner does: block ``i``'s statistics
    (Wanda norms, SparseGPT Hessians) come from the calibration inputs with blocks ``0..i-1``
    already pruned at ``operating`` sparsity by the same method; every layer of block ``i`` (and
    the whole block at once, with ``per_block``) is pruned at every sparsity of ``grid`` and the
    model runs on the first ``subsample`` calibration items (joined into batches when their
    shapes match); the damage is the divergence of its outputs (KL of the logits, 1 - cosine of
    hidden states) from the reference: the same model with block ``i`` dense and the earlier
    blocks as they are (measured from the dense model, the divergence would mix in the earlier
    blocks' damage, and the differences are not additive). All damages are on one scale (the
    model's outputs), so blocks compare. Block ``i`` is then left at ``operating`` for the next
    blocks; its run at ``operating`` is the next block's reference, and the runs start at the
    measured block (what the block before returned is replayed). Targets outside the blocks are
    measured last, with every block at ``operating``. The model's weights are restored at the
    end.

    Example:
        >>> layers, blocks = sequential_damage(model, targets, calib, pruner, [0.6, 0.7, 0.8],
        ...                                    operating=0.7)  # doctest: +SKIP

    Returns ``({layer: damages}, {block key: damages})`` (the second empty without per_block).
    """
    items = list(data)
    sample = _merge(items[: subsample or len(items)])
    local = shard_samples(items)  # under torch.distributed: this rank's share (statistics)
    need = {"sparsegpt": {"hessian"}, "wanda": {"norm"}}.get(pruner.method, set())
    params = {t.name: raw_parameter(t.module, t.param_name) for t in targets}
    originals = {n: p.detach().clone() for n, p in params.items()}
    layer_damage: dict[str, list[float]] = {}
    block_damage: dict[str, list[float]] = {}
    points = sorted(set(grid) | {operating})
    carried: dict[str, Any] = {}  # from one block's measurement to the next

    def set_weights(group: list[Target], weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for t in group:
                params[t.name].copy_(weights[t.name].to(params[t.name].dtype))

    def measure(key: str, group: list[Target], stats: dict, index: int | None = None) -> None:
        if not group:
            return
        pruned = _grid_matrices(pruner, group, with_norms(group, stats), points)
        dense = {t.name: params[t.name].detach().clone() for t in group}
        at = {s: {t.name: pruned[t.name][j] for t in group} for j, s in enumerate(points)}
        # the reference: this block dense, the earlier ones as they are now (pruned). The
        # previous block's run at the operating point was exactly that model: its outputs are
        # reused, and what that block returned is replayed, so the runs start here (_Replay).
        # Without them (first block, or per-layer only) the reference runs the whole model and
        # records what reaches this block.
        reuse = carried.pop("reference", None) if index else None
        if index and reuse is not None:
            replay = _Replay(module_list, index, carried.pop("outputs"))
            scorer = _OutputDamage(model, sample, "auto", lambda x: x, reference=reuse)
        else:
            carried.clear()
            replay = _Replay(module_list, index) if index else contextlib.nullcontext()
            with replay:
                scorer = _OutputDamage(model, sample, "auto", lambda x: x)
            if index:
                replay.replaying = True
        with replay:
            _score_grid(key, group, scorer, at, dense, index)
        set_weights(group, at[operating])

    def _score_grid(key, group, scorer, at, dense, index) -> None:
        # every point is an independent run of the model: under torch.distributed the points
        # are spread over the ranks (distributed.jobs) and every rank gets every value
        if per_layer:

            def layer_point(t: Target, s: float) -> float:
                set_weights([t], at[s])
                try:
                    return scorer()
                finally:
                    set_weights([t], dense)

            jobs = [partial(layer_point, t, s) for t in group for s in grid]
            values = run_shared(jobs)
            for i, t in enumerate(group):
                layer_damage[t.name] = values[i * len(grid) : (i + 1) * len(grid)]
        if per_block:

            def block_point(s: float) -> float:
                set_weights(group, at[s])
                return scorer()

            def reference_point(s: float) -> float:
                # this run is the next block's reference: keep its outputs and what this
                # block returns (every rank runs it: every rank measures the next block)
                set_weights(group, at[s])
                outputs: list = []
                handle = module_list[index].register_forward_hook(
                    lambda module, args, out, store=outputs: store.append(out)
                )
                try:
                    value = scorer(keep=True)
                finally:
                    handle.remove()
                carried.update(reference=(scorer.last, scorer.guess), outputs=outputs)
                return value

            keeps = index is not None and module_list is not None
            jobs = [
                partial(reference_point if keeps and s == operating else block_point, s)
                for s in grid
            ]
            everyone = {j for j, s in enumerate(grid) if keeps and s == operating}
            block_damage[key] = run_shared(jobs, everyone)

    module_list: Any = None
    try:
        found = find_blocks(model, blocks) if sequential else None
        rest = targets
        if found is not None:
            blocks_name, module_list = found
            groups, rest = _block_groups(blocks_name, len(module_list), targets)
            prefix = f"{blocks_name}." if blocks_name else ""
            home = next(module_list.parameters()).device

            def on_block(index: int, block: nn.Module, run) -> None:
                group = groups[index]
                stats: dict = {}
                if group and need:
                    with InputStats(group, need, keep_parts=is_distributed()) as collected:
                        run()
                    stats = _reduced_stats(collected, group, pruner, len(points))
                if device is not None:  # the whole model runs below: bring the block home
                    block.to(home)
                measure(f"{prefix}{index}", group, stats, index)
                if device is not None:
                    block.to(device)

            bar = (
                (lambda it: tqdm(it, desc="sensitivity", unit="block", leave=False))
                if progress
                else None
            )
            run_sequential(
                model,
                module_list,
                local,
                on_block,
                propagate="pruned",
                device=device,
                progress=bar,
            )
        for t in rest:
            stats = _rest_stats(model, t, local, need, pruner, len(points)) if need else {}
            measure(t.name, [t], stats)
    finally:
        with torch.no_grad():
            for n, original in originals.items():
                params[n].copy_(original)
    return layer_damage, block_damage


def sensitivity(
    model: nn.Module,
    data: Any,
    *,
    sparsities: Iterable[float] = DEFAULT_SPARSITIES,
    method: str | Criterion = "magnitude",
    pattern: str | Pattern = "unstructured",
    scope: str | None = None,
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    mode: str = "auto",
    evaluate: Callable[[nn.Module], float] | None = None,
    divergence: str = "auto",
    input_fn: Callable[[Any], Any] | None = None,
    monotone: bool = True,
    base: dict[str, float] | None = None,
    blocks: str | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> SensitivityResult:
    """Measure how much each layer suffers when it alone is pruned, at several sparsities.

    Args:
        model: any ``nn.Module`` (left unchanged: every layer is restored after its turn).
        data: calibration inputs: a :class:`prunekit.calibrate.CalibrationSet`, a 1-D tensor of
            token ids, or an iterable of model inputs (tensors, dicts, tuples of arguments).
        sparsities: the grid measured for every layer (each in (0, 1)).
        method: how a layer is pruned: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, or (output
            mode) any registered criterion.
        pattern: ``"unstructured"`` or ``"block:RxC"`` (N:M has a fixed sparsity: nothing to
            sweep).
        scope: ``"row"`` or ``"local"`` within the layer (default: row for Wanda, else local).
        targets, ignore: name patterns, as in :func:`prunekit.prune`.
        mode: ``"output"``, ``"proxy"`` or ``"auto"`` (proxy when the model has repeated blocks
            and no ``evaluate`` is given, otherwise output). See the module docstring.
        evaluate: ``evaluate(model) -> float``, higher is better; damage = dense value - value.
            Under torch.distributed the output-mode runs are spread over the ranks (every rank
            gets every curve), so ``evaluate`` runs on each rank for its share of the points and
            must not communicate itself.
        divergence: ``"kl"``, ``"cosine"`` or ``"auto"`` (KL for logits, cosine for
            ``last_hidden_state``).
        input_fn: turns a data item into the model input (e.g. ``lambda b: b[0]`` for
            ``(images, labels)`` batches).
        monotone: make each curve non-decreasing in sparsity (running maximum).
        base: ``{pattern: sparsity}`` of the other layers while one is measured (output mode):
            curves measured around an operating point (e.g. a first allocation's
            ``per_layer``) see how layers interact at high sparsity; default: the others dense.
        blocks: module path of the repeated blocks (proxy mode).
        device: run each block there in proxy mode.
        max_batches: use at most this many items of ``data``.
        block_size, damp: SparseGPT settings.

    Returns:
        A :class:`SensitivityResult`.

    Example:
        >>> result = prunekit.sensitivity(model, calib, method="wanda")  # doctest: +SKIP
        >>> print(result); result.plot("sens.png")                      # doctest: +SKIP
        >>> report = prunekit.oneshot(model, calib, per_layer=result.allocate(0.7).per_layer)  # doctest: +SKIP
    """
    started = time.perf_counter()
    grid = _check_grid(sparsities)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; accepted: {', '.join(DIVERGENCES)}")
    pattern = parse_pattern(pattern)
    if isinstance(pattern, NM):
        raise ValueError(
            f"pattern {pattern} has a fixed sparsity, so there is nothing to sweep; measure with "
            "'unstructured' or 'block:RxC'"
        )
    name = method.name if isinstance(method, Criterion) else method
    criterion = None if name == "sparsegpt" else get_criterion(method)
    scope = scope or ("row" if name == "wanda" else "local")
    if scope not in ("row", "local"):
        raise ValueError(f"scope must be 'row' or 'local' (within one layer), got {scope!r}")
    if scope == "row" and not isinstance(pattern, Unstructured):
        raise ValueError(f"scope 'row' works with the unstructured pattern, not {pattern}")
    if mode == "auto":
        mode = "proxy" if evaluate is None and find_blocks(model, blocks) is not None else "output"
    if mode == "proxy":
        if base:
            raise ValueError("base= needs mode='output' (proxy errors are per layer)")
        if evaluate is not None:
            raise ValueError(
                "evaluate= needs mode='output' (proxy mode never runs the whole model)"
            )
        if name not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"proxy mode supports magnitude, wanda and sparsegpt, not {name!r}")
    if criterion is not None and criterion.needs_loss:
        raise ValueError(f"method {name!r} needs a loss; sensitivity supports loss-free methods")
    input_fn = input_fn or (lambda item: item)
    if isinstance(data, torch.Tensor) and data.dim() == 1:  # token ids: oneshot's windows
        data = calibration(data)
    items = list(data)[:max_batches] if max_batches else list(data)
    if not items:
        raise ValueError("data holds no sample")

    chosen = resolve_targets(model, targets, ignore)
    if name != "magnitude" or mode == "proxy":
        for t in chosen:
            check_calibratable(t)
    usable, _ = split_by_pattern(chosen, pattern)  # as prune: warns per layer, raises if none
    pruner = _LayerPruner(name, criterion, pattern, scope, block_size, damp, seed)
    was_training = model.training
    model.eval()
    try:
        costs = _layer_costs(model, usable, items[0], input_fn)
        if mode == "proxy":
            proxy_items = [input_fn(x) for x in items]
            raw = proxy_damage(
                model,
                usable,
                proxy_items,
                pruner,
                grid,
                blocks=blocks,
                device=device,
                progress=progress,
            )
            metric, dense_value = "recon", None
        else:
            base_of = per_layer_overrides(usable, base) if base else {}
            if base_of and grid[0] > 0:  # the curve's start is not zero damage any more
                grid = [0.0, *grid]
            raw, metric, dense_value = _output_mode(
                model,
                usable,
                items,
                pruner,
                grid,
                evaluate,
                divergence,
                input_fn,
                progress,
                base_of,
            )
    finally:
        model.train(was_training)
    names = [t.name for t in usable]
    return SensitivityResult(
        layers=names,
        sparsities=grid,
        damage={n: _monotone(raw[n]) if monotone else list(raw[n]) for n in names},
        raw_damage={n: list(raw[n]) for n in names},
        metric=metric,
        method=name,
        mode=mode,
        sizes={t.name: t.weight().numel() for t in usable},
        macs_per_weight={n: costs[n] for n in names if n in costs},
        bytes_per_weight={t.name: float(t.weight().element_size()) for t in usable},
        dense=dense_value,
        monotone=monotone,
        seconds=time.perf_counter() - started,
    )


def _output_mode(
    model, targets, items, pruner, grid, evaluate, divergence, input_fn, progress, base
):
    """Damage of every target at every sparsity, the others dense or at their ``base``."""
    stats: dict = {}
    inputs = [input_fn(x) for x in items]
    if pruner.method == "sparsegpt":
        stats = collect_input_stats(model, targets, inputs, {"hessian"}, progress=False)
    elif pruner.criterion is not None and pruner.criterion.needs_data:
        stats = pruner.criterion.collect(
            model, targets, data=inputs, loss_fn=None, max_batches=None, progress=False
        )
    if evaluate is not None:  # measured on the dense model, before any base pruning
        dense_value = float(evaluate(model))
        metric = "evaluate"

        def measure() -> float:
            return dense_value - float(evaluate(model))
    else:
        scorer = _OutputDamage(model, items, divergence, input_fn)
        dense_value, metric, measure = None, scorer.kind, scorer
    params = {t.name: raw_parameter(t.module, t.param_name) for t in targets}
    originals = {name: p.detach().clone() for name, p in params.items()}
    at_base = {
        t.name: pruner.matrices(t, stats, [base[t.name]])[0] for t in targets if t.name in base
    }
    matrices: dict[str, list[torch.Tensor]] = {}  # a layer's grid, made when first needed
    bar = tqdm(
        total=len(targets) * len(grid), desc="sensitivity", unit="run", leave=False,
        disable=not progress,
    )  # fmt: skip

    def job(t: Target, j: int) -> Callable[[], float]:
        # one model run with layer t alone at grid point j (the others dense or at their base):
        # under torch.distributed the runs are spread over the ranks (distributed.jobs), each
        # made exactly as one process makes it, so every rank gets the single-process values
        def run() -> float:
            param = params[t.name]
            if t.name not in matrices:
                matrices.clear()  # one layer's grid in memory at a time
                with torch.no_grad():  # the grid prunes the dense weight, not the base
                    param.copy_(originals[t.name])
                matrices[t.name] = pruner.matrices(t, stats, grid)
            with torch.no_grad():
                param.copy_(matrices[t.name][j].to(param.dtype))
            try:
                return float(measure())
            finally:
                with torch.no_grad():
                    param.copy_(at_base.get(t.name, originals[t.name]).to(param.dtype))
                bar.update(1)

        return run

    raw: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for name, weight in at_base.items():
                params[name].copy_(weight.to(params[name].dtype))
        values = run_shared([job(t, j) for t in targets for j in range(len(grid))])
        for i, t in enumerate(targets):
            raw[t.name] = values[i * len(grid) : (i + 1) * len(grid)]
    finally:
        bar.close()
        with torch.no_grad():
            for name, original in originals.items():
                params[name].copy_(original)
    return raw, metric, dense_value


def oneshot_grid(sparsity: float) -> list[float]:
    """The default grid of ``oneshot(allocation="sensitivity")``: dense around the target.

    Example:
        >>> oneshot_grid(0.7)
        [0.6, 0.65, 0.7, 0.75, 0.8]
    """
    points = {round(sparsity + d, 4) for d in (-0.1, -0.05, 0.0, 0.05, 0.1)}
    return sorted(p for p in points if 0.0 < p < 1.0)


def split_count(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` removed weights split between layers in proportion to their sizes, exactly
    (largest remainders get the leftover units).

    Example:
        >>> split_count(10, [3, 3, 4])
        [3, 3, 4]
    """
    whole = sum(sizes)
    shares = [total * n / whole for n in sizes]
    counts = [min(n, int(x)) for x, n in zip(shares, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: shares[i] - counts[i], reverse=True)
    left = total - sum(counts)
    for i in order:
        if left <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            left -= 1
    return counts


def oneshot_allocation(
    model: nn.Module,
    targets: list[Target],
    calib: Sequence[Any],
    pruner: Any,
    fixed: dict[str, float],
    grid: Iterable[float] | None,
    blocks: str | None,
    sequential: bool,
    device: str | torch.device | None,
) -> dict[str, float]:
    """``oneshot(allocation="sensitivity")``: per-layer sparsities for the targets not in
    ``fixed``, with exactly as many weights removed as the uniform allocation
    (``round(sparsity * n)`` in every layer) would.

    The damage is measured by :func:`sequential_damage` with the one-shot method itself: block
    by block, with the earlier blocks already pruned at the target sparsity, every block is
    pruned whole at every sparsity of the grid and the divergence of the model's outputs (KL of
    the logits) on a subsample of the calibration set is recorded. The budget is then spent
    between blocks (:func:`prunekit.allocate`, exact), and a block's layers share its sparsity
    (its count split in proportion to their sizes). Per block rather than per layer: the
    per-layer output damages do not add up inside a block (on the character Llama a per-layer
    allocation from them loses to uniform), while whole blocks compare well.
    """
    free = [t for t in targets if t.name not in fixed]
    if not free:
        return {}
    points = allocation_grid(grid, pruner.sparsity)
    layer_pruner = layer_pruner_of(pruner)
    found = find_blocks(model, blocks) if sequential else None
    _, damage = sequential_damage(
        model,
        free,
        list(calib),
        layer_pruner,
        points,
        operating=pruner.sparsity,
        subsample=SUBSAMPLE,
        per_layer=False,
        per_block=True,
        blocks=None if found is None else found[0],
        sequential=found is not None,
        device=device,
        progress=pruner.progress,
    )
    groups = _unit_groups(model if found else None, found, free)
    return allocate_groups(groups, points, damage, pruner.sparsity)


def allocation_grid(grid: Iterable[float] | None, sparsity: float) -> list[float]:
    """The sparsities ``oneshot(allocation="sensitivity")`` measures: ``grid`` (default
    :func:`oneshot_grid`), extended above the target when the target is its top.

    Example:
        >>> allocation_grid(None, 0.5)
        [0.4, 0.45, 0.5, 0.55, 0.6]
    """
    points = _check_grid(grid if grid is not None else oneshot_grid(sparsity))
    if sparsity >= points[-1]:
        points = _check_grid([*points, sparsity, (1.0 + sparsity) / 2])
    return points


def layer_pruner_of(pruner: Any) -> _LayerPruner:
    """The per-layer pruner of a one-shot job's settings (``calibrate.oneshot._Pruner``)."""
    criterion = None if pruner.method == "sparsegpt" else get_criterion(pruner.method)
    return _LayerPruner(
        pruner.method,
        criterion,
        pruner.pattern,
        pruner.scope,
        pruner.block_size,
        pruner.damp,
        pruner.seed,
    )


def allocate_groups(
    groups: dict[str, list[Target]],
    points: Sequence[float],
    damage: dict[str, list[float]],
    sparsity: float,
) -> dict[str, float]:
    """Per-layer sparsities from per-group damage curves measured at ``points``: the budget
    (``round(sparsity * n)`` removed in every layer, summed) spent between the groups exactly,
    each group's count split between its layers in proportion to their sizes."""
    from prunekit.scope import count_to_remove

    sizes = {t.name: t.weight().numel() for group in groups.values() for t in group}
    removed = sum(count_to_remove(sparsity, n) for n in sizes.values())
    curves = {key: list(zip(points, _monotone(damage[key]), strict=True)) for key in groups}
    group_sizes = {key: sum(sizes[t.name] for t in group) for key, group in groups.items()}
    chosen = allocate(curves, sizes=group_sizes, removed=removed)
    per_layer: dict[str, float] = {}
    for key, group in groups.items():
        counts = split_count(chosen.removed[key], [sizes[t.name] for t in group])
        per_layer.update({t.name: k / sizes[t.name] for t, k in zip(group, counts, strict=True)})
    return per_layer


def _unit_groups(model, found, targets: list[Target]) -> dict[str, list[Target]]:
    """Targets grouped as :func:`sequential_damage` measures them: one group per block (key
    ``"<blocks>.<index>"``), each target outside the blocks alone (key: its name)."""
    if found is None:
        return {t.name: [t] for t in targets}
    blocks_name, module_list = found
    block_groups, rest = _block_groups(blocks_name, len(module_list), targets)
    prefix = f"{blocks_name}." if blocks_name else ""
    out = {f"{prefix}{i}": g for i, g in enumerate(block_groups) if g}
    out.update({t.name: [t] for t in rest})
    return out


def prune_allocation(
    model: nn.Module,
    chosen: list[Target],
    fixed: dict[str, float],
    allocation: Any,
    sparsity: float,
    pattern: Pattern,
    method: str | Criterion,
    data: Iterable[Any] | None,
    progress: bool,
) -> dict[str, float]:
    """``prune(allocation=...)``: per-layer sparsities of the layers not in ``fixed``.

    ``allocation`` is ``"sensitivity"`` (measured here on ``data`` by
    :func:`allocate_by_sensitivity`, two rounds) or a :class:`SensitivityResult`; the allocated
    layers lose exactly ``round(sparsity * n)`` weights together.
    """
    free = [t for t in chosen if t.name not in fixed]
    if isinstance(allocation, str):
        if allocation != "sensitivity":
            raise ValueError(
                f"unknown allocation {allocation!r}; accepted: None, 'sensitivity' or a "
                "SensitivityResult"
            )
        if data is None:
            raise ValueError(
                "allocation='sensitivity' measures on data: pass data=<iterable of model inputs>"
            )
        if isinstance(pattern, NM):
            raise ValueError("allocation does not apply to N:M patterns (their sparsity is fixed)")
        if not free:
            return {}
        removed = int(round(sparsity * sum(t.weight().numel() for t in free)))
        best, _ = allocate_by_sensitivity(
            model,
            data,
            budget={"removed": removed},
            rounds=2,
            method=method,
            pattern=pattern,
            targets=[t.module_name for t in free],
            progress=progress,
        )
        return best.per_layer
    if not isinstance(allocation, SensitivityResult):
        raise ValueError(
            f"allocation must be None, 'sensitivity' or a SensitivityResult, got "
            f"{type(allocation).__name__}"
        )
    names = {t.name for t in free}
    layers = [n for n in allocation.layers if n in names]
    if not layers:
        raise ValueError(
            "the SensitivityResult measured none of the layers this call prunes "
            f"({', '.join(sorted(names))})"
        )
    curves = allocation.curves()
    sizes = {n: allocation.sizes[n] for n in layers}
    removed = int(round(sparsity * sum(sizes.values())))
    chosen_curves = {n: curves[n] for n in layers}
    return allocate(chosen_curves, sizes=sizes, removed=removed).per_layer


def allocate_by_sensitivity(
    model: nn.Module,
    data: Any,
    sparsity: float | None = None,
    *,
    rounds: int = 2,
    budget: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[Allocation, list[SensitivityResult]]:
    """Sensitivity curves, an allocation, and ``rounds - 1`` refinements around it (output mode).

    Round 1 measures every layer with the others dense; each later round measures the curves
    with the other layers at the previous allocation (``base=``), where the layers' damages
    interact (at 90 % and more the additive prediction of round 1 is far off). Every round's
    allocation is applied in full and its true damage measured on the same data; the allocation
    with the lowest measured damage is returned (``budget["measured_damage"]``), with every
    round's curves.

    Args:
        sparsity: the budget (global sparsity of the measured layers); or give ``budget``, the
            keyword arguments of :func:`prunekit.allocate` (``nonzeros=``, ``cost=``, ``keep=``).
        rounds: measurements in all (1 = no refinement).
        options: the keyword arguments of :func:`sensitivity` (``method``, ``targets``,
            ``sparsities``, ``evaluate``, ``input_fn``...).

    Example:
        >>> alloc, curves = allocate_by_sensitivity(net, batches, 0.95, targets=layers)  # doctest: +SKIP
        >>> prunekit.prune(net, 0.95, targets=layers, per_layer=alloc.per_layer)      # doctest: +SKIP
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if options.get("mode", "output") != "output" or "base" in options:
        raise ValueError("allocate_by_sensitivity measures in output mode and sets base= itself")
    options = {**options, "mode": "output"}
    budget = dict(budget or {})
    if sparsity is not None:
        budget["sparsity"] = sparsity
    evaluate = options.get("evaluate")
    input_fn = options.get("input_fn") or (lambda item: item)
    items = list(data)[: options["max_batches"]] if options.get("max_batches") else list(data)
    scorer = None
    if evaluate is None:
        scorer = _OutputDamage(model, items, options.get("divergence", "auto"), input_fn)
        dense_value = 0.0
    else:
        dense_value = float(evaluate(model))
    results: list[SensitivityResult] = []
    best: Allocation | None = None
    base = None
    for _ in range(rounds):
        result = sensitivity(model, items, base=base, **options)
        results.append(result)
        allocation = result.allocate(**budget)
        pruned = _apply_allocation(model, items, allocation.per_layer, result, options, input_fn)
        measured = scorer(pruned) if scorer else dense_value - float(evaluate(pruned))
        allocation.budget["measured_damage"] = measured
        if best is None or measured < best.budget["measured_damage"]:
            best = allocation
        base = allocation.per_layer
    return best, results


def _apply_allocation(model, items, per_layer, result, options, input_fn) -> nn.Module:
    """A copy of ``model`` with every measured layer pruned to its allocated sparsity."""
    method = options.get("method", "magnitude")
    name = method.name if isinstance(method, Criterion) else method
    criterion = None if name == "sparsegpt" else get_criterion(method)
    scope = options.get("scope") or ("row" if name == "wanda" else "local")
    pruner = _LayerPruner(
        name,
        criterion,
        parse_pattern(options.get("pattern", "unstructured")),
        scope,
        options.get("block_size", 128),
        options.get("damp", 0.01),
        options.get("seed", 0),
    )
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    by_name = {
        t.name: t for t in resolve_targets(copied, options.get("targets"), options.get("ignore"))
    }
    targets = [by_name[n] for n in result.layers]
    inputs = [input_fn(x) for x in items]
    stats: dict = {}
    if name == "sparsegpt":
        stats = collect_input_stats(copied, targets, inputs, {"hessian"}, progress=False)
    elif criterion.needs_data:
        stats = criterion.collect(
            copied, targets, data=inputs, loss_fn=None, max_batches=None, progress=False
        )
    pruned = {t.name: pruner.matrices(t, stats, [per_layer[t.name]])[0] for t in targets}
    with torch.no_grad():
        for t in targets:
            raw_parameter(modules[t.module_name], t.param_name).copy_(pruned[t.name])
    return copied.eval()


ALLOCATORS["sensitivity"] = prune_allocation
