"""Depth pruning: remove whole residual blocks or transformer layers.

Candidates are the blocks of an ``nn.ModuleList`` / ``nn.Sequential`` that are not single layers,
run once, and return a tensor of their input's shape (the innermost such blocks when they nest),
or the modules named by ``layers=`` patterns. Scores:

* ``"influence"``: block influence, 1 - cos(input, output) of the block's hidden states, averaged
  over tokens (or positions) of the calibration batches (ShortGPT, Men et al. 2024): a block
  that barely changes its input matters little;
* ``"loss"``: the loss increase when the block is skipped (its output replaced by its input);
* ``"random"``: seeded.

Removal deletes the block from its container (Hugging Face ``layer_idx`` and
``num_hidden_layers`` follow), so the model is really shallower.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.compress.structured import remove_blocks
from prunekit.graph.count import CountReport, count
from prunekit.graph.importance import batch_input, default_loss
from prunekit.graph.latency import (
    LATENCY_TOLERANCE,
    LATENCY_TRIES,
    Latency,
    measure_pair,
    warn_if_missed,
)
from prunekit.graph.plan import resolve_target
from prunekit.graph.report import GroupRow, StructuredReport
from prunekit.graph.surgery import verify
from prunekit.graph.trace import call_model, iter_tensors
from prunekit.runtime.copies import VERIFY_COPY, copy_model
from prunekit.targets import matches

LAYER_IMPORTANCE = ("influence", "loss", "random")


def find_blocks(
    model: nn.Module, example_inputs: Any, patterns: list[str] | None = None
) -> list[tuple[str, int, str]]:
    """Candidate blocks as (container name, index, block name)."""
    containers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2
    ]
    calls: dict[str, list] = defaultdict(list)
    handles = []
    for cname, container in containers:
        for i, block in enumerate(container):
            bname = (
                f"{cname}.{list(container._modules)[i]}" if cname else list(container._modules)[i]
            )

            def hook(module, args, kwargs, output, bname=bname):
                x = next(iter_tensors((args, kwargs)), None)
                y = next(iter_tensors(output), None)
                calls[bname].append(
                    (None if x is None else tuple(x.shape), None if y is None else tuple(y.shape))
                )

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    found = []
    for cname, container in containers:
        for i, (local, block) in enumerate(container._modules.items()):
            bname = f"{cname}.{local}" if cname else local
            shapes = calls.get(bname, [])
            if len(shapes) != 1 or shapes[0][0] is None or shapes[0][0] != shapes[0][1]:
                continue  # not run exactly once, or changes the shape: cannot become identity
            if patterns:
                if any(matches(p, bname) for p in patterns):
                    found.append((cname, i, bname))
                continue
            if not any(True for _ in block.children()) or not any(True for _ in block.parameters()):
                continue
            found.append((cname, i, bname))
    if not patterns:
        names = [b for _, _, b in found]
        found = [f for f in found if not any(other.startswith(f[2] + ".") for other in names)]
    return found


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float()
    if t.ndim == 4:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    if isinstance(output, dict):
        first = next(iter(output))
        return {**output, first: value}
    raise TypeError(f"cannot skip a block returning {type(output).__name__}")


def score_blocks(model, blocks, importance, calib, loss_fn, seed, progress) -> np.ndarray:
    modules = dict(model.named_modules())
    if importance == "random":
        return torch.rand(
            len(blocks), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        ).numpy()
    was = model.training
    model.eval()
    try:
        if importance == "influence":
            totals = np.zeros(len(blocks))
            counts = np.zeros(len(blocks))
            handles = []
            for j, (_, _, bname) in enumerate(blocks):

                def hook(module, args, kwargs, output, j=j):
                    x = next(iter_tensors((args, kwargs)), None)
                    y = next(iter_tensors(output), None)
                    if x is None or y is None or x.shape != y.shape:
                        return
                    cos = torch.nn.functional.cosine_similarity(_rows(x), _rows(y), dim=-1)
                    totals[j] += float((1 - cos).sum())
                    counts[j] += cos.numel()

                handles.append(modules[bname].register_forward_hook(hook, with_kwargs=True))
            try:
                with torch.no_grad():
                    for batch in tqdm(
                        calib, desc="block influence", disable=not progress, leave=False
                    ):
                        call_model(model, batch_input(batch))
            finally:
                for h in handles:
                    h.remove()
            return totals / np.maximum(counts, 1)
        fn = loss_fn or default_loss

        def mean_loss() -> float:
            with torch.no_grad():
                return float(np.mean([float(fn(model, batch)) for batch in calib]))

        base = mean_loss()
        scores = np.zeros(len(blocks))
        for j, (_, _, bname) in enumerate(
            tqdm(blocks, desc="layer loss", disable=not progress, leave=False)
        ):

            def skip(module, args, kwargs, output):
                x = next(iter_tensors((args, kwargs)))
                return _replace_first(output, x)

            handle = modules[bname].register_forward_hook(skip, with_kwargs=True)
            try:
                scores[j] = mean_loss() - base
            finally:
                handle.remove()
        return scores
    finally:
        model.train(was)


def prune_layers(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    importance: str,
    layers: list[str],
    ignore: list[str],
    target_macs: float | None,
    target_params: float | None,
    min_keep: int,
    calib: list[Any],
    loss_fn: Callable | None,
    seed: int,
    inplace: bool,
    progress: bool,
    settings: dict[str, Any],
    target_latency: float | None = None,
    threads: int | None = None,
):
    from prunekit.graph.hf import note_structure

    if importance not in LAYER_IMPORTANCE:
        raise ValueError(
            f"unknown layer importance {importance!r}; accepted: {', '.join(map(repr, LAYER_IMPORTANCE))}"
        )
    blocks = find_blocks(model, example_inputs, layers or None)
    if layers and not blocks:
        raise ValueError(
            f"layers patterns {layers} match no removable block (a block of a ModuleList / "
            "Sequential, run once, whose output has its input's shape)"
        )
    blocks = without_ignored(blocks, ignore)
    settings = {**settings, "importance": importance}
    before = count(model, example_inputs)
    notes = []
    if not blocks:
        notes.append(
            "no removable block found (blocks of a ModuleList / Sequential with output shape = input shape)"
        )
        kept = model if inplace else copy_model(model, "prune_structured")
        return StructuredReport(kept, before, before, [], [], settings, notes)
    scores = score_blocks(model, blocks, importance, calib, loss_fn, seed, progress)
    by_container: dict[str, list[int]] = defaultdict(list)
    for j, (cname, _, _) in enumerate(blocks):
        by_container[cname].append(j)
    sizes = {c: len(model.get_submodule(c)) for c in by_container}
    order = [int(j) for j in np.argsort(scores, kind="stable")]

    def allowed(chosen: list[int], j: int) -> bool:
        c = blocks[j][0]
        return sizes[c] - sum(1 for i in chosen if blocks[i][0] == c) - 1 >= min_keep

    chosen: list[int] = []
    latency = None
    if target_latency is not None:
        sequence: list[int] = []
        for j in order:
            if allowed(sequence, j):
                sequence.append(j)
        chosen, latency, note = _search_depth_latency(
            model, example_inputs, blocks, sizes, sequence, before, target_latency, threads
        )
        notes.append(note)
        settings["target_latency"] = target_latency
    elif target_macs is None and target_params is None:
        k = int(round(ratio * len(blocks)))
        for j in order:
            if len(chosen) >= k:
                break
            if allowed(chosen, j):
                chosen.append(j)
        settings["ratio"] = ratio
    else:
        want_macs = _with_slack(resolve_target(target_macs, before.macs))
        want_params = _with_slack(resolve_target(target_params, before.params))
        macs, params = before.macs, before.params
        for j in order:
            if (want_macs is None or macs <= want_macs) and (
                want_params is None or params <= want_params
            ):
                break
            if allowed(chosen, j):
                m, p = _block_cost(before, blocks[j][2])
                chosen.append(j)
                macs, params = macs - m, params - p
        if not (
            (want_macs is None or macs <= want_macs)
            and (want_params is None or params <= want_params)
        ):
            raise ValueError(
                f"the target cannot be reached by removing layers: at most {len(chosen)} of {len(blocks)} "
                f"blocks can go, leaving {macs:,} MACs and {params:,} params. Nothing was changed."
            )
        settings.update(
            {
                k: v
                for k, v in (("target_macs", target_macs), ("target_params", target_params))
                if v is not None
            }
        )
    step = _depth_step(blocks, sizes, chosen)
    candidate = _without_blocks(model, step, example_inputs)
    if inplace:
        _remove(model, step)
        candidate = model
    note_structure(candidate, step)
    after = count(candidate, example_inputs)
    names = sorted(
        (blocks[j][2] for j in chosen),
        key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")],
    )
    gone = {e["container"]: len(e["indices"]) for e in step["removed"]}
    rows = [GroupRow(c, "layer", sizes[c], sizes[c] - gone.get(c, 0), [c]) for c in by_container]
    report = StructuredReport(candidate, before, after, rows, names, settings, notes)
    if latency is not None:
        report.latency = latency  # the search's side-by-side measurement of this very model
    return report


def without_ignored(blocks: list, ignore: list[str]) -> list:
    """The blocks of :func:`find_blocks` whose name no ``ignore`` pattern matches."""
    return [b for b in blocks if not any(matches(p, b[2]) for p in ignore)]


DEPTH_TARGET_SLACK = 1e-3
"""Blocks are whole: a MAC / parameter target counts as met within this fraction above it, so
that the few MACs of a layer outside the blocks (a pooler, a head) do not cost another block
(MiniLM at ``target_macs=0.5``: 3 of 6 layers removed leave 50.02 % of the MACs)."""


def _block_cost(counted: CountReport, name: str) -> tuple[int, int]:
    """(MACs, parameters) of the block ``name`` in a :func:`count` report of the model."""
    rows = [r for r in counted.layers if r.name == name or r.name.startswith(name + ".")]
    return sum(r.macs for r in rows), sum(r.params for r in rows)


def _with_slack(want: float | None) -> float | None:
    return None if want is None else want * (1 + DEPTH_TARGET_SLACK)


def _depth_step(blocks: list, sizes: dict[str, int], chosen: list[int]) -> dict[str, Any]:
    """The structure record of removing blocks ``chosen`` (indices into ``blocks``)."""
    removed: dict[str, list[int]] = defaultdict(list)
    for j in chosen:
        removed[blocks[j][0]].append(blocks[j][1])
    return {
        "kind": "depth",
        "removed": [
            {"container": c, "indices": sorted(idx), "before": sizes[c]}
            for c, idx in removed.items()
        ],
    }


def _remove(target: nn.Module, step: dict[str, Any]) -> None:
    from prunekit.graph.hf import remember_original_config

    remember_original_config(target)
    for entry in step["removed"]:
        remove_blocks(target, entry["container"], entry["indices"])


def _without_blocks(model: nn.Module, step: dict[str, Any], example_inputs: Any) -> nn.Module:
    """A copy of ``model`` without the blocks of ``step``, checked to run on the inputs."""
    candidate = copy_model(model, "prune_structured", VERIFY_COPY)
    _remove(candidate, step)
    verify(candidate, model, example_inputs)
    return candidate


def _next_count(tries: dict[int, Latency], asked: float, last: int, most: int) -> int | None:
    """The next number of blocks to remove: interpolated between the closest tries on either
    side of ``asked`` once it is bracketed, extrapolated from the last try before. None: no
    untried count is left that could come closer."""
    slow = [k for k, t in tries.items() if t.ratio > asked]  # too few blocks removed
    fast = [k for k, t in tries.items() if t.ratio <= asked]
    if slow and fast:
        lo, hi = max(slow), min(fast)
        if hi - lo <= 1:
            return None
        r_lo, r_hi = tries[lo].ratio, tries[hi].ratio
        step = (r_lo - asked) / max(r_lo - r_hi, 1e-9) * (hi - lo)
        return min(max(lo + round(step), lo + 1), hi - 1)
    r = tries[last].ratio
    per_block = max((1.0 - r) / last, 1e-3) if last else 1e-3  # latency share of one block
    wanted = round((1.0 - asked) / per_block)
    if slow:
        return None if last >= most else min(max(wanted, last + 1), most)
    return None if last <= 1 else min(max(wanted, 1), last - 1)


def _search_depth_latency(
    model: nn.Module,
    example_inputs: Any,
    blocks: list,
    sizes: dict[str, int],
    sequence: list[int],
    before: CountReport,
    asked: float,
    threads: int | None,
) -> tuple[list[int], Latency, str]:
    """The first k blocks of ``sequence`` (lowest scores first) for the k whose measured latency
    ratio comes closest to ``asked``: a first guess from the blocks' MAC share, then steps
    interpolated from the measured ratios (at most ``LATENCY_TRIES`` models timed)."""
    if not sequence:
        raise ValueError(
            f"target_latency={asked} cannot be reached by removing layers: no block may go "
            "(min_keep). Nothing was changed."
        )
    left, k = before.macs, 0  # ``before``: the dense model's count
    while k < len(sequence) and left > asked * before.macs:
        left -= _block_cost(before, blocks[sequence[k]][2])[0]
        k += 1
    k = max(k, 1)
    tries: dict[int, Latency] = {}
    for _ in range(LATENCY_TRIES):
        candidate = _without_blocks(model, _depth_step(blocks, sizes, sequence[:k]), example_inputs)
        tries[k] = measure_pair(
            model, candidate, example_inputs, threads, budget_s=3.0, min_repeats=5
        )
        del candidate
        if abs(tries[k].ratio / asked - 1) <= LATENCY_TOLERANCE:
            break
        following = _next_count(tries, asked, k, len(sequence))
        if following is None or following in tries:
            break
        k = following
    best = min(tries, key=lambda n: abs(tries[n].ratio / asked - 1))
    lat = tries[best]
    steps = ", ".join(f"{n} -> {t.ratio:.2f}" for n, t in tries.items())
    if lat.ratio > asked * (1 + LATENCY_TOLERANCE) and len(sequence) in tries:
        raise ValueError(
            f"target_latency={asked} cannot be reached by removing layers: without all "
            f"{len(sequence)} removable blocks the model measures {tries[len(sequence)].pruned_ms:.3g} "
            f"ms against {tries[len(sequence)].dense_ms:.3g} ms dense (blocks removed -> latency "
            f"ratio: {steps}). Nothing was changed."
        )
    warn_if_missed(
        asked,
        lat.ratio,
        f"with {best} blocks removed (blocks removed -> latency ratio: {steps})",
        4,
    )
    note = (
        f"target_latency {asked}: measured latency ratio {lat.ratio:.2f} with {best} of "
        f"{len(blocks)} blocks removed, after {len(tries)} tries (blocks removed -> latency "
        f"ratio: {steps})"
    )
    return sequence[:best], lat, note
