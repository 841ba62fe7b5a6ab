"""``oneshot``: calibrated post-training pruning (magnitude, Wanda, SparseGPT), block by block."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibrate.data import CalibrationSet, calibration
from prunekit.calibrate.precision import (
    CALIBRATION_DTYPES,
    calibration_dtype_name,
    compute_autocast,
    floating_dtype,
    resolve_calibration_dtype,
    resolved_name,
)
from prunekit.calibrate.progress import (
    OneshotProgress,
    Stage,
    check_marker,
    data_digest,
    model_digest,
)
from prunekit.calibrate.sequential import find_blocks, run_sequential
from prunekit.calibrate.sparsegpt import SparseGPTFailure, sparsegpt_prune_shared
from prunekit.calibrate.stats import (
    InputStats,
    check_calibratable,
    check_targets_run,
    collect_input_stats,
    input_device,
    run_model,
)
from prunekit.distributed import barrier, is_distributed, is_main, rank, shard_samples
from prunekit.distributed.reduce import reduce_collected
from prunekit.distributed.solve import share_result, sparsegpt_owners
from prunekit.masks import apply_mask, raw_parameter
from prunekit.patterns import NM, Pattern, Unstructured, parse_pattern
from prunekit.prune import (
    _check_choice,
    _check_sparsity,
    _resolve_sparsity,
    compute_masks,
    split_by_pattern,
)
from prunekit.report import PruneReport, layer_stats, model_counts
from prunekit.runtime.copies import copy_model
from prunekit.runtime.memory import PeakMemory
from prunekit.scope import owl_allocation
from prunekit.scores import get_criterion
from prunekit.targets import Target, per_layer_overrides, resolve_targets

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity")
_NEEDS = {"magnitude": set(), "wanda": {"norm"}, "sparsegpt": {"hessian"}}


def _owl_ratio(targets: list[Target], stats: dict, threshold: float) -> float:
    """Share of Wanda scores above ``threshold`` times their mean, over a group of layers."""
    parts = []
    for t in targets:
        weight = t.as_matrix(t.weight().abs().float())
        parts.append(
            (weight * stats[t.name]["norm"].to(weight.device).sqrt()[None, :]).reshape(-1).cpu()
        )
    scores = torch.cat(parts)
    return float((scores > threshold * scores.mean()).float().mean())


def _nm_for(pattern: NM, sparsity: float) -> NM:
    """The N:M pattern of a layer whose allocated sparsity differs from the target (mixed N:M)."""
    n = min(pattern.m - 1, max(1, round(pattern.m * (1 - sparsity))))
    return NM(n, pattern.m)


def round_nm_allocation(sparsities: list[float], sizes: list[int], pattern: NM) -> list[float]:
    """Snap per-unit sparsities to N:M levels while keeping the size-weighted average.

    Each unit gets ``floor(M * density)`` kept weights per group, then the units with the
    largest remainders get one more until the kept total reaches the target's (largest-remainder
    rounding), so mixed N:M averages the pattern's own sparsity whenever the sizes allow.

    Example:
        >>> round_nm_allocation([0.42, 0.5, 0.56, 0.52], [1, 1, 1, 1], NM(4, 8))
        [0.375, 0.5, 0.625, 0.5]
    """
    m = pattern.m
    ideal = [m * (1 - s) for s in sparsities]
    kept = [min(m - 1, max(1, int(x))) for x in ideal]
    target = (1 - pattern.sparsity) * sum(sizes)
    total = sum(k / m * size for k, size in zip(kept, sizes, strict=True))
    for i in sorted(range(len(ideal)), key=lambda j: ideal[j] - int(ideal[j]), reverse=True):
        if kept[i] < m - 1 and total + sizes[i] / m <= target + 1e-9:
            kept[i] += 1
            total += sizes[i] / m
    return [1 - k / m for k in kept]


@dataclass
class _Pruner:
    """One oneshot job's settings; prunes groups of layers given their calibration statistics."""

    method: str
    pattern: Pattern
    scope: str
    sparsity: float
    allocation: str
    owl_threshold: float
    owl_lambda: float
    block_size: int
    damp: float
    seed: int
    progress: bool
    allocated: dict[str, float] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)
    """Under torch.distributed: the rank that solves each SparseGPT layer."""
    compute_dtype: torch.dtype | None = None
    """The autocast dtype of the calibration forwards (None: the model's own dtype, no
    autocast); see :mod:`prunekit.calibrate.precision`."""

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def need(self) -> set[str]:
        """Statistics the method needs from calibration."""
        return _NEEDS[self.method]

    def owl(self, groups: list[list[Target]], stats: dict) -> list[float]:
        """Per-group sparsity from the groups' outlier ratios (N:M levels rounded)."""
        ratios = [_owl_ratio(group, stats, self.owl_threshold) for group in groups]
        sizes = [sum(t.weight().numel() for t in group) for group in groups]
        allocated = owl_allocation(ratios, sizes, self.sparsity, self.owl_lambda)
        if isinstance(self.pattern, NM):
            allocated = round_nm_allocation(allocated, sizes, self.pattern)
        return allocated

    def prune(self, targets: list[Target], stats: dict, sparsity: float) -> None:
        for t in [t for t in targets if t.name in self.per_layer]:  # own sparsity, one by one
            self._prune_group([t], stats, self.per_layer[t.name])
        rest = [t for t in targets if t.name not in self.per_layer]
        if rest:
            self._prune_group(rest, stats, sparsity)

    def _prune_group(self, targets: list[Target], stats: dict, sparsity: float) -> None:
        pattern = _nm_for(self.pattern, sparsity) if isinstance(self.pattern, NM) else self.pattern
        for t in targets:
            self.allocated[t.name] = pattern.sparsity if isinstance(pattern, NM) else sparsity
        if self.method == "sparsegpt":
            if is_distributed():  # each layer solved by its owner, then broadcast
                mine = [t for t in targets if self.owners[t.name] == rank()]
                for group in same_hessian(mine, stats):
                    self._sparsegpt_group(group, stats, pattern, sparsity)
                for t in targets:
                    note = share_result(t, self.owners[t.name], self.fallbacks.get(t.name))
                    if note is not None:
                        self.fallbacks[t.name] = note
                return
            for group in same_hessian(targets, stats):
                self._sparsegpt_group(group, stats, pattern, sparsity)
            return
        keeps = compute_masks(
            targets,
            get_criterion(self.method),
            stats,
            pattern,
            sparsity,
            {},
            self.scope,
            generator=self.generator,
        )
        for t in targets:
            apply_mask(t.module, t.param_name, keeps[t.name])

    def _sparsegpt_group(
        self, group: list[Target], stats: dict, pattern: Pattern, sparsity: float
    ) -> None:
        """Layers that read the same input share one sweep (the bits of separate solves); when
        the shared solve fails, each layer is solved (or falls back to magnitude) on its own."""
        if len(group) > 1:
            try:
                self._solve(group, stats[group[0].name]["hessian"], pattern, sparsity)
                return
            except SparseGPTFailure:
                pass  # the failure may be one layer's: the others still get SparseGPT below
        for t in group:
            try:
                self._solve([t], stats[t.name]["hessian"], pattern, sparsity)
            except SparseGPTFailure as exc:
                warnings.warn(
                    f"prunekit: {exc}; pruning {t.name} by magnitude instead", stacklevel=4
                )
                self.fallbacks[t.name] = str(exc)
                keeps = compute_masks(
                    [t], get_criterion("magnitude"), {}, pattern, sparsity, {}, "local"
                )
                apply_mask(t.module, t.param_name, keeps[t.name])

    def _solve(
        self, group: list[Target], hessian: torch.Tensor, pattern: Pattern, sparsity: float
    ) -> None:
        """SparseGPT on ``group`` (one Hessian), the updated weights and masks written back."""
        matrices = [t.as_matrix(t.weight()) for t in group]
        results = sparsegpt_prune_shared(
            matrices,
            hessian,
            sparsity,
            (pattern.n, pattern.m) if isinstance(pattern, NM) else None,
            frozen=[m == 0 for m in matrices],
            block_size=self.block_size,
            damp=self.damp,
            name=", ".join(t.name for t in group),
        )
        for t, result in zip(group, results, strict=True):
            shape = t.weight().shape
            with torch.no_grad():
                raw_parameter(t.module, t.param_name).copy_(t.from_matrix(result.weight, shape))
            apply_mask(t.module, t.param_name, t.from_matrix(result.keep, shape))


def same_hessian(targets: list[Target], stats: dict) -> list[list[Target]]:
    """``targets`` grouped by equal Hessians (layers that read the same input, such as q / k / v
    or gate / up), in first-seen order; a layer without one is a group of its own."""
    groups: list[list[Target]] = []
    for t in targets:
        h = stats.get(t.name, {}).get("hessian")
        for group in groups:
            other = stats.get(group[0].name, {}).get("hessian")
            if (
                h is not None
                and other is not None
                and h.shape == other.shape
                and h.device == other.device
                and torch.equal(h, other)
            ):
                group.append(t)
                break
        else:
            groups.append([t])
    return groups


def oneshot(
    model: nn.Module,
    calib: Any,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    allocation: str = "uniform",
    targets: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    *,
    per_layer: dict[str, float] | None = None,
    sensitivity_grid: Iterable[float] | None = None,
    blocks: str | None = None,
    sequential: bool = True,
    propagate: str = "pruned",
    scope: str | None = None,
    owl_threshold: float = 5.0,
    owl_lambda: float = 0.08,
    block_size: int = 128,
    damp: float = 0.01,
    device: str | torch.device | None = None,
    calibration_dtype: str | torch.dtype | None = "auto",
    seed: int = 0,
    inplace: bool = False,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> PruneReport:
    """Prune a trained model in one shot with calibration data; no retraining.

    Args:
        model: a Hugging Face causal LM or encoder, or any model (name its ``blocks``).
        calib: calibration samples: a :class:`prunekit.calibrate.CalibrationSet` (see
            ``prunekit.calibration``), a 1-D tensor of token ids, or an iterable of model inputs.
        method: ``"wanda"`` (|W| * ||X||), ``"sparsegpt"`` (second order, updates the surviving
            weights) or ``"magnitude"``.
        sparsity: fraction of zeros of every targeted layer (default 0.5; implied by N:M).
        pattern: ``"unstructured"`` or ``"N:M"``.
        allocation: ``"uniform"`` (every layer the same sparsity) or ``"owl"`` (outlier-weighted
            layerwise sparsity: blocks with more activation outliers keep more weights, within
            ``sparsity +- owl_lambda``, averaging exactly ``sparsity``; with N:M each block gets
            an N:M level, rounded so the average stays the pattern's sparsity, so 2:4 mostly
            stays uniform while 4:8 mixes 3:8, 4:8 and 5:8), or ``"sensitivity"`` (a first pass,
            block by block with the earlier blocks pruned, prunes each block with this method at
            the sparsities of ``sensitivity_grid`` and measures the divergence of the model's
            outputs; :func:`prunekit.allocate` then chooses per-block sparsities with exactly as
            many non-zeros as uniform; unstructured only).
        targets, ignore: name patterns, as in :func:`prunekit.prune` (the head is excluded).
        per_layer: ``{pattern: sparsity}`` overrides (e.g. ``Allocation.per_layer``), as in
            :func:`prunekit.prune`; unstructured only.
        sensitivity_grid: sparsities measured by ``allocation="sensitivity"`` (default:
            ``sparsity`` +- 0.1 in steps of 0.05, see :mod:`prunekit.analysis.sensitivity`).
        blocks: module path of the repeated blocks (default: the largest ``ModuleList``).
        sequential: prune block by block (bounded memory); False runs the whole model at once.
        propagate: ``"pruned"`` (next block sees the pruned block's outputs) or ``"dense"``.
        scope: ``"row"`` (Wanda's default) or ``"local"`` for unstructured magnitude / Wanda.
        owl_threshold: OWL's M: a score is an outlier above M times the mean score.
        owl_lambda: OWL's lambda, the largest deviation from the target sparsity.
        block_size, damp: SparseGPT's column block size and damping fraction.
        device: run each block there (e.g. ``"cuda"``) and move it back; the rest stays put.
        calibration_dtype: ``"auto"`` (default; None too): bfloat16 where it is native and
            the model is float32 (a CPU with AVX512-BF16 / AMX / Arm BF16, a CUDA GPU with
            bfloat16), else no autocast (the model's dtype); ``"float32"`` (no autocast: results independent of the
            hardware's bfloat16 support, bit for bit those of earlier releases);
            ``"bfloat16"`` (the forwards' matrix products under ``torch.autocast`` in bfloat16
            on any device, with a warning on a CPU where that is slower) or ``"float16"``
            (blocks on CUDA only). The statistics (Wanda's norms, SparseGPT's Hessians) are
            computed in float32 / float64 from the layer inputs cast up in every case, and the
            hidden states passed between blocks keep the model's dtype; see
            :mod:`prunekit.calibrate.precision`. The report's ``settings["calibration_dtype"]``
            names the dtype used. The sensitivity measurement of ``allocation="sensitivity"``
            runs in the model's dtype.
        inplace: prune ``model`` itself (recommended for large models); default: a copy. If
            the call is interrupted (``KeyboardInterrupt``, an error), the block in progress is
            rolled back, and a model with finished blocks carries
            ``model._prunekit_oneshot_progress = {"done_blocks": k, "of": n, ...}`` (a warning
            says so); ``oneshot`` then refuses it unless it can resume from ``checkpoint``.
        checkpoint: a folder that records every finished block (pruned weights and masks as
            safetensors, settings fingerprint as JSON, written atomically). Called again with
            the same model, data, arguments and ``checkpoint``, ``oneshot`` loads the finished
            blocks and continues with the first unfinished one; the result is identical to an
            uninterrupted run on the same device. See :mod:`prunekit.calibrate.progress`.

    A layer whose shape does not fit ``pattern`` is skipped with a warning naming it and listed
    in ``report.skipped``; when no targeted layer fits, ``ValueError`` is raised before anything
    is changed (as in :func:`prunekit.prune`).

    Returns:
        A :class:`prunekit.PruneReport`; ``settings`` holds the wall time (s), the peak memory
        growth (MiB) and the per-layer sparsity allocated.

    Example:
        >>> calib = prunekit.calibration("pydoc", tokenizer, n_samples=64, seq_len=256)  # doctest: +SKIP
        >>> report = prunekit.oneshot(model, calib, method="sparsegpt", pattern="2:4", inplace=True)  # doctest: +SKIP
    """
    _check_choice("method", method, METHODS)
    _check_choice("allocation", allocation, ALLOCATIONS)
    _check_choice("propagate", propagate, ("pruned", "dense"))
    pattern = parse_pattern(pattern)
    if not isinstance(pattern, (Unstructured, NM)):
        raise ValueError(f"oneshot supports the unstructured and N:M patterns, not {pattern}")
    sparsity = _resolve_sparsity(sparsity, pattern)
    scope = scope or ("row" if method == "wanda" else "local")
    _check_choice("scope", scope, ("row", "local"))
    if allocation == "owl":
        owl_allocation([0.0], [1], sparsity, owl_lambda)  # validates lambda against sparsity
    if (per_layer or allocation == "sensitivity") and not isinstance(pattern, Unstructured):
        raise ValueError("per_layer and allocation='sensitivity' work with unstructured sparsity")
    if not isinstance(calib, CalibrationSet):
        calib = calibration(calib)
    if len(calib) == 0:
        raise ValueError("calib holds no sample")
    run_on = device if device is not None else input_device(model)
    model_dtype = floating_dtype(model)
    # ValueError naming what is accepted, before any work
    compute_dtype = resolve_calibration_dtype(calibration_dtype, run_on, model_dtype)
    dtype_name = resolved_name(compute_dtype)  # "float32": no autocast (checkpoint fingerprint)
    local = shard_samples(calib)  # under torch.distributed: this rank's contiguous share
    progress = progress and is_main()
    check_marker(model, checkpoint, propagate)

    chosen = resolve_targets(model, targets, ignore)
    overrides = per_layer_overrides(chosen, per_layer)
    for key, value in overrides.items():
        _check_sparsity(value, f"per_layer[{key!r}]")
    if method != "magnitude" or allocation != "uniform":
        for t in chosen:
            check_calibratable(t)
    _, skipped = split_by_pattern(chosen, pattern)  # warns per layer; raises if none fits
    if method != "magnitude" or allocation != "uniform":
        check_targets_run(model, chosen, calib[0])
    if not inplace:
        names = [t.module_name for t in chosen]
        model = copy_model(model, "oneshot")
        modules = dict(model.named_modules())
        chosen = [Target(n, modules[n]) for n in names]
    usable = [t for t in chosen if t.name not in skipped]

    pruner = _Pruner(
        method,
        pattern,
        scope,
        sparsity,
        allocation,
        owl_threshold,
        owl_lambda,
        block_size,
        damp,
        seed,
        progress,
    )
    pruner.per_layer = dict(overrides)
    pruner.compute_dtype = compute_dtype
    found = find_blocks(model, blocks) if sequential else None
    if found is None:
        stages = [Stage("all", usable)]
    else:
        groups, rest = _block_targets(found[0], len(found[1]), usable)
        stages = [Stage(f"block-{i:04d}", group) for i, group in enumerate(groups)]
        stages += [Stage("rest", rest)] if rest else []
    fingerprint = None
    if checkpoint is not None:
        fingerprint = {
            "method": method,
            "pattern": str(pattern),
            "sparsity": sparsity,
            "allocation": allocation,
            "sensitivity_grid": None if sensitivity_grid is None else list(sensitivity_grid),
            "per_layer": overrides,
            "blocks": None if found is None else found[0],
            "stages": [s.key for s in stages],
            "propagate": propagate,
            "scope": scope,
            "owl": [owl_threshold, owl_lambda],
            "sparsegpt": [block_size, damp],
            "seed": seed,
            "model": type(model).__name__,
            "targets": [[t.name, list(t.weight().shape), str(t.weight().dtype)] for t in usable],
            "skipped": sorted(skipped),
            "calibration": [len(calib), data_digest(calib)],
            "model_sha256": model_digest(model, usable),
        }
        if compute_dtype is not None:  # absent on the default path: older checkpoints resume
            fingerprint["calibration_dtype"] = dtype_name
    tracker = OneshotProgress(model, stages, checkpoint, fingerprint or {}, inplace)
    tracker.writer = is_main()  # under torch.distributed only rank 0 writes the checkpoint
    try:
        tracker.open()  # validates an existing checkpoint against the model before any change
    except ValueError as exc:
        hint = _auto_dtype_hint(tracker.saved_settings, calibration_dtype, dtype_name)
        if hint:
            raise ValueError(f"{exc}; {hint}") from exc
        raise
    barrier()  # no rank may see a stage another rank has finished in this run
    started = time.perf_counter()
    with PeakMemory() as memory:
        try:
            if tracker.complete:  # a finished run: load it, no calibration pass
                for stage in stages:
                    tracker.restore(stage.key, pruner)
            else:
                _run_stages(
                    model,
                    found,
                    usable,
                    (calib, local),
                    pruner,
                    propagate,
                    device,
                    tracker,
                    (sensitivity_grid, blocks, sequential, overrides),
                )
        except BaseException:
            tracker.interrupted()
            raise
        tracker.completed()
    elapsed = time.perf_counter() - started

    rows = [layer_stats(t) for t in chosen]
    params, zeros = model_counts(model)
    settings = {
        "method": method,
        "pattern": str(pattern),
        "sparsity": sparsity,
        "allocation": allocation,
        "calibration": calib.description,
        "calibration_dtype": resolved_name(compute_dtype or model_dtype),
        "wall_time_s": round(elapsed, 3),
        "peak_memory_mb": round(memory.peak_mb, 1),
    }
    if memory.cuda_peak_mb is not None:
        settings["cuda_peak_memory_mb"] = round(memory.cuda_peak_mb, 1)
    if isinstance(pattern, Unstructured):
        settings["scope"] = scope
    details = {"allocated": pruner.allocated, "fallbacks": pruner.fallbacks}
    if checkpoint is not None:
        details["checkpoint"] = {
            "folder": os.fspath(checkpoint),
            "resumed_stages": tracker.resumed,
            "stages": len(stages),
        }
    return PruneReport(
        rows,
        params,
        zeros,
        skipped,
        model=model,
        settings=settings,
        details=details,
        verb="oneshot",
    )


def _auto_dtype_hint(
    saved: dict[str, Any] | None, asked: str | torch.dtype | None, chosen: str
) -> str:
    """When ``calibration_dtype="auto"`` chose another dtype than the checkpoint whose settings
    are ``saved`` (e.g. a float32 checkpoint of a release whose default was float32, on a CPU
    where "auto" is now bfloat16): the value that resumes it ("" otherwise)."""
    if saved is None or calibration_dtype_name(asked) != "auto":
        return ""
    recorded = saved.get("calibration_dtype", "float32")  # absent: no autocast
    if recorded == chosen or recorded not in CALIBRATION_DTYPES:
        return ""
    return (
        f"calibration_dtype='auto' (the default) calibrates in {chosen} here, the checkpoint "
        f"in {recorded}: pass calibration_dtype={recorded!r} to resume it"
    )


def _run_stages(
    model: nn.Module,
    found: tuple[str, nn.ModuleList] | None,
    usable: list[Target],
    calibs: tuple[Any, list],
    pruner: _Pruner,
    propagate: str,
    device: str | torch.device | None,
    tracker: OneshotProgress,
    sensitivity_args: tuple,
) -> None:
    """The passes of one oneshot call that are not finished yet (all of them without a
    checkpoint): the sensitivity measurement, then block by block, or everything at once.

    ``calibs`` is (all samples, this rank's share): the sensitivity pass runs whole on every
    rank; the pruning passes run each rank's share and sum the statistics over ranks."""
    calib, local = calibs
    grid, blocks, sequential, overrides = sensitivity_args
    if pruner.allocation == "sensitivity":  # one measuring pass (block by block if blocks exist)
        measured = tracker.allocation("per_layer")
        if measured is None:
            from prunekit.analysis.sensitivity import oneshot_allocation

            found_blocks = (blocks, sequential, device)
            measured = oneshot_allocation(
                model, usable, calib, pruner, overrides, grid, *found_blocks
            )
            tracker.save_allocation("per_layer", measured)
        pruner.per_layer.update(measured)
    if found is None:
        if sequential:
            warnings.warn(
                "prunekit: no repeated blocks found; calibrating the whole model at once",
                stacklevel=4,
            )
        tracker.begin("all")
        _prune_all_at_once(model, usable, local, pruner, pruner.allocation)
        tracker.finish("all", pruner)
    else:
        _prune_sequentially(model, found, usable, local, pruner, propagate, device, tracker)


def _prune_all_at_once(
    model: nn.Module, targets: list[Target], calib: Any, pruner: _Pruner, allocation: str
) -> None:
    wanted = pruner.need | ({"norm"} if allocation == "owl" else set())
    stats = {}
    # the whole model's forwards in the calibration dtype (the statistics stay in float32)
    autocast = compute_autocast(pruner.compute_dtype, input_device(model))
    if wanted and is_distributed():
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), InputStats(targets, wanted, keep_parts=True) as collected:
                for sample in calib:
                    with autocast:
                        run_model(model, sample)
        finally:
            model.train(was_training)
        stats = _reduced(collected, targets, pruner)
    elif wanted:
        with autocast:
            stats = collect_input_stats(model, targets, calib, wanted, progress=pruner.progress)
    per_layer = [pruner.sparsity] * len(targets)
    if allocation == "owl":
        per_layer = pruner.owl([[t] for t in targets], stats)
    for t, s in zip(targets, per_layer, strict=True):
        pruner.prune([t], stats, s)


def _reduced(collected: InputStats, targets: list[Target], pruner: _Pruner | None) -> dict:
    """Statistics over every rank's samples (this rank's alone without torch.distributed);
    SparseGPT's Hessians go only to the rank that will solve the layer."""
    if not is_distributed():
        return collected.stats
    owners = None
    if pruner is not None and pruner.method == "sparsegpt" and "hessian" in collected.need:
        owners = sparsegpt_owners(targets, collected.input_groups())
        pruner.owners.update(owners)
    return reduce_collected(collected, targets, owners)


def _block_targets(blocks_name: str, n_blocks: int, targets: list[Target]) -> tuple[list, list]:
    prefix = f"{blocks_name}." if blocks_name else ""
    groups: list[list[Target]] = [[] for _ in range(n_blocks)]
    rest = []
    for t in targets:
        head, _, _ = t.module_name[len(prefix) :].partition(".")
        if t.module_name.startswith(prefix) and head.isdigit() and int(head) < n_blocks:
            groups[int(head)].append(t)
        else:
            rest.append(t)
    return groups, rest


def _prune_sequentially(
    model: nn.Module,
    found: tuple[str, nn.ModuleList],
    targets: list[Target],
    calib: Any,
    pruner: _Pruner,
    propagate: str,
    device: str | torch.device | None,
    tracker: OneshotProgress,
) -> None:
    blocks_name, blocks = found
    groups, rest = _block_targets(blocks_name, len(blocks), targets)
    per_block = [pruner.sparsity] * len(blocks)

    def bar(desc: str):
        return (
            (lambda it: tqdm(it, desc=desc, unit="block", leave=False)) if pruner.progress else None
        )

    saved = tracker.allocation("per_block") if pruner.allocation == "owl" else None
    if saved is not None:  # resuming: the allocation of the checkpointed run
        per_block = [float(s) for s in saved]
    elif pruner.allocation == "owl":
        stats: dict = {}

        def measure(index: int, block: nn.Module, run) -> None:
            if groups[index]:
                last = index == len(blocks) - 1  # its outputs are not needed: stop early
                until = [t.module for t in groups[index]] if last else None
                with InputStats(groups[index], {"norm"}, keep_parts=is_distributed()) as collected:
                    run(until)
                reduced = _reduced(collected, groups[index], None)
                # blocks go back to their home device after their turn: keep the norms on the CPU
                stats.update(
                    {name: {"norm": entry["norm"].cpu()} for name, entry in reduced.items()}
                )

        run_sequential(
            model,
            blocks,
            calib,
            measure,
            propagate="dense",
            device=device,
            progress=bar("oneshot (OWL pass)"),
            compute_dtype=pruner.compute_dtype,
        )
        used = [i for i, g in enumerate(groups) if g]
        for i, s in zip(used, pruner.owl([groups[i] for i in used], stats), strict=True):
            per_block[i] = s
        tracker.save_allocation("per_block", per_block)

    def prune_block(index: int, block: nn.Module, run) -> None:
        key = f"block-{index:04d}"
        if tracker.is_done(key):  # resuming: load what the checkpointed run wrote
            if propagate == "dense":
                run()  # dense outputs first (check_marker ensured this block is dense)
            tracker.restore(key, pruner)
            return
        tracker.begin(key)
        if groups[index]:
            stats = {}
            if pruner.need:
                # the outputs of this run are not used when the pruned block is run again (or
                # for the last block): each call stops once the last targeted layer has its inputs
                unused = propagate == "pruned" or index == len(blocks) - 1
                until = [t.module for t in groups[index]] if unused else None
                with InputStats(
                    groups[index], pruner.need, keep_parts=is_distributed()
                ) as collected:
                    run(until)
                stats = _reduced(collected, groups[index], pruner)
            pruner.prune(groups[index], stats, per_block[index])
        tracker.finish(key, pruner)

    if pruner.need:
        run_sequential(
            model,
            blocks,
            calib,
            prune_block,
            propagate=propagate,
            device=device,
            progress=bar(f"oneshot {pruner.method}"),
            compute_dtype=pruner.compute_dtype,
        )
    else:  # magnitude: the masks depend on the weights alone, no calibration pass is needed
        wrap = bar(f"oneshot {pruner.method}")
        indices = range(len(blocks))
        for index in wrap(indices) if wrap else indices:
            prune_block(index, blocks[index], lambda: None)
    if rest:
        tracker.begin("rest")
        _prune_all_at_once(model, rest, calib, pruner, "uniform")
        tracker.finish("rest", pruner)
