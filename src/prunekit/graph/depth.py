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
from prunekit.graph.count import count
from prunekit.graph.importance import batch_input, default_loss
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
):
    from prunekit.graph.hf import note_structure, remember_original_config

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
    blocks = [b for b in blocks if not any(matches(p, b[2]) for p in ignore)]
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
    if target_macs is None and target_params is None:
        k = int(round(ratio * len(blocks)))
        for j in order:
            if len(chosen) >= k:
                break
            if allowed(chosen, j):
                chosen.append(j)
        settings["ratio"] = ratio
    else:
        cost = {r.name: r for r in before.layers}
        want_macs = resolve_target(target_macs, before.macs)
        want_params = resolve_target(target_params, before.params)

        def block_cost(name: str) -> tuple[int, int]:
            rows = [r for n, r in cost.items() if n == name or n.startswith(name + ".")]
            return sum(r.macs for r in rows), sum(r.params for r in rows)

        macs, params = before.macs, before.params
        for j in order:
            if (want_macs is None or macs <= want_macs) and (
                want_params is None or params <= want_params
            ):
                break
            if allowed(chosen, j):
                m, p = block_cost(blocks[j][2])
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
    removed = defaultdict(list)
    for j in chosen:
        removed[blocks[j][0]].append(blocks[j][1])
    step = {
        "kind": "depth",
        "removed": [
            {"container": c, "indices": sorted(idx), "before": sizes[c]}
            for c, idx in removed.items()
        ],
    }

    def apply(target: nn.Module) -> None:
        remember_original_config(target)
        for entry in step["removed"]:
            remove_blocks(target, entry["container"], entry["indices"])

    candidate = copy_model(model, "prune_structured", VERIFY_COPY)
    apply(candidate)
    verify(candidate, model, example_inputs)
    if inplace:
        apply(model)
        candidate = model
    note_structure(candidate, step)
    after = count(candidate, example_inputs)
    names = sorted(
        (blocks[j][2] for j in chosen),
        key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")],
    )
    rows = [
        GroupRow(c, "layer", sizes[c], sizes[c] - len(removed.get(c, [])), [c])
        for c in by_container
    ]
    return StructuredReport(candidate, before, after, rows, names, settings, notes)
