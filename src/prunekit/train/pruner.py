"""The train-time pruner: masks that follow a sparsity schedule, a few lines in any training loop.

    pruner = GradualPruner(model, PolynomialSchedule(final_sparsity=0.9, end_step=5000),
                           optimizer=optimizer)
    for batch in data:
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()          # after every optimizer step

What ``step()`` does, in order:

1. For gradient-based methods trained on the fly (``movement``, and ``taylor`` without
   ``data=``), add this step's ``-w * g`` (or ``|w * g|``) to the running scores, with ``w`` the
   weights the gradient was computed at.
2. Count the step and ask the schedule for the sparsity at the new step count; if it is higher
   than what is applied, call ``prunekit.prune(..., inplace=True)`` with the method, pattern,
   scope, targets and ignore given here, which extends the masks (a zero stays zero).
3. Keep pruned weights at exactly zero: re-zero the raw parameters at masked positions, and
   clear the optimizer's per-weight state (momentum, Adam moments) there whenever masks change,
   so nothing stored before the mask can move a pruned weight again.

``state_dict()`` / ``load_state_dict()`` hold everything needed to resume exactly: the step count,
the applied sparsity, the masks, the running scores and the weights they refer to. Resume by
building the model, optimizer and pruner as before, then loading the pruner's state first (it
puts the masks on the model, so the model's state dict with its ``*_mask`` buffers loads), then
the model's and the optimizer's.

Patterns: every pattern ``prunekit.prune`` takes (unstructured, N:M, block), and structured
units (``"channel"`` / ``"neuron"``, ``"head"``, ``"channel+head"``): whole units of the
dependency groups ``prunekit.prune_structured`` uses are zeroed with soft masks on every slice
surgery would remove, and ``finalize()`` then cuts them out (``prunekit.train.structured``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.distributed.train import sync_masks_
from prunekit.masks import (
    apply_mask,
    finalize,
    get_mask,
    is_masked,
    raw_parameter,
    reapply_masks,
    remove_mask,
)
from prunekit.patterns import NM, Pattern, Unstructured, parse_pattern
from prunekit.prune import ALLOCATORS, prune, split_by_pattern
from prunekit.report import PruneReport
from prunekit.runtime.accelerated import refuse_accelerated
from prunekit.scope import NORMALIZATIONS, SCOPES
from prunekit.scores import Criterion, LayerContext, get_criterion
from prunekit.targets import Target, per_layer_overrides, resolve_targets
from prunekit.train.schedules import SupportsSparsityAt, as_schedule
from prunekit.train.structured import StructuredMasks, structured_units

STATE_VERSION = 1
ONLINE_METHODS = ("movement", "taylor")
"""Methods the pruner can score from the training gradients themselves (no ``data=`` needed)."""


def _check_choice(name: str, value: Any, accepted: Iterable[str]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")


def clear_optimizer_state(
    optimizer: torch.optim.Optimizer, masks: dict[nn.Parameter, torch.Tensor]
) -> None:
    """Zero every per-weight state tensor (momentum, Adam moments) at masked positions.

    ``masks`` maps parameters to bool keep-masks of their shape; state tensors of another shape
    (step counters, scalars) are left alone.
    """
    for param, keep in masks.items():
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(~keep.to(value.device), 0)


class GradualPruner:
    """Prune during training on a schedule; call :meth:`step` after every optimizer step.

    Args:
        model: the model to prune, in place.
        schedule: a schedule (:mod:`prunekit.train.schedules`), a number (constant sparsity from
            step 0), or a callable ``step -> sparsity``. ``step`` counts optimizer steps.
        method: any ``prunekit.prune`` method (``"magnitude"``, ``"random"``, ``"taylor"``,
            ``"movement"``, a registered name or a :class:`~prunekit.scores.Criterion`).
            ``"movement"`` and ``"taylor"`` are scored from the training gradients seen by
            :meth:`step` (movement: ``-w * g`` summed over all of training; taylor:
            ``|w * g|`` summed since the last mask update), unless ``data`` and ``loss_fn`` are
            given, in which case every update scores on that data like ``prunekit.prune``.
        pattern: ``"unstructured"``, ``"N:M"`` or ``"block:RxC"``. N:M is reached gradually:
            when the schedule asks for sparsity ``s``, every group of M keeps
            ``max(N, ceil((1 - s) * M))`` weights (4:4, 3:4, then 2:4 for ``"2:4"``).
            Structured: ``"channel"`` (``"neuron"``), ``"head"``, ``"channel+head"`` or a list;
            the sparsity is then the fraction of removable units removed (over all groups for
            ``scope="global"``, per group for ``"local"``), ``method`` is a group importance
            of ``prunekit.prune_structured`` (``"l2"``, the default for ``"magnitude"``,
            ``"l1"``, ``"bn_scale"``, ``"random"``, ``"activation"``, ``"apoz"`` and
            ``"taylor"``, which without ``data`` sums ``|w * g|`` of the training gradients),
            ``example_inputs`` is required and :meth:`finalize` performs surgery.
        scope: ``"global"`` or ``"local"`` (see ``prunekit.prune``).
        targets: name patterns of the layers to prune (default: Linear / Conv except the head).
            Structured: only groups produced by a matching module.
        ignore: name patterns of layers to leave alone (structured: groups produced by a
            matching module are left whole).
        optimizer: the optimizer training ``model``; its state at masked positions is cleared
            whenever masks change. Can be set later through :attr:`optimizer`.
        normalize, data, loss_fn, max_batches, seed: passed to ``prunekit.prune``.
        progress: show progress bars of data-driven scoring.
        example_inputs, min_keep, reduce, pin_outputs: structured patterns only; as in
            ``prunekit.prune_structured`` (``normalize="auto"`` means ``"mean"`` there).
        per_layer: ``{pattern: sparsity}`` each matching layer reaches at the end of the
            schedule (e.g. ``Allocation.per_layer``); along the way it is pruned to ``its
            sparsity * scheduled / final_sparsity``. Needs a schedule with ``final_sparsity``;
            unstructured and block patterns.
        allocation: ``"sensitivity"`` (measured once, at construction, on ``data``, as
            ``prunekit.prune(allocation="sensitivity")`` does for the schedule's
            ``final_sparsity``) or a :class:`prunekit.analysis.SensitivityResult`: per-layer
            final sparsities removing exactly ``round(final_sparsity * n)`` weights of the
            layers together; then as ``per_layer``.

    Attributes:
        step_count: optimizer steps seen so far.
        sparsity: the scheduled sparsity currently applied.
        history: ``(step, sparsity)`` of every mask update.
        report: the :class:`~prunekit.PruneReport` of the last update (None before the first).
        skipped: ``{weight name: reason}`` of the targeted layers that cannot take the pattern
            (N:M with an input size not a multiple of M, blocks that do not tile the weight):
            left dense with one warning, as ``prunekit.prune`` does; when no targeted layer can
            take it, the constructor raises ``ValueError`` with each layer's reason.

    Example:
        >>> import torch, prunekit
        >>> from prunekit.train import GradualPruner, PolynomialSchedule
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> pruner = GradualPruner(net, PolynomialSchedule(final_sparsity=0.5, end_step=10),
        ...                        optimizer=opt)
        >>> for _ in range(10):
        ...     opt.zero_grad(); net(torch.randn(4, 8)).sum().backward(); opt.step(); _ = pruner.step()
        >>> pruner.sparsity, int((net[0].weight == 0).sum())
        (0.5, 32)
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: SupportsSparsityAt | float | Callable[[int], float],
        method: str | Criterion = "magnitude",
        pattern: str | Pattern = "unstructured",
        scope: str = "global",
        targets: str | Iterable[str] | None = None,
        ignore: str | Iterable[str] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        normalize: str = "auto",
        data: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        max_batches: int | None = None,
        seed: int = 0,
        progress: bool = False,
        example_inputs: Any = None,
        min_keep: int = 1,
        reduce: str = "sum",
        pin_outputs: bool = True,
        per_layer: dict[str, float] | None = None,
        allocation: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        refuse_accelerated(model, "GradualPruner")  # structured patterns skip resolve_targets
        self.model = model
        self.schedule = as_schedule(schedule)
        self._structured: StructuredMasks | None = None
        units = structured_units(pattern)
        if units is not None and (per_layer or allocation is not None):
            raise ValueError(
                "per_layer= and allocation= work with unstructured and block patterns, not "
                f"structured {pattern!r}"
            )
        self._final_per_layer: dict[str, float] = {}
        if units is not None:
            self._init_structured(
                units,
                method,
                scope,
                targets,
                ignore,
                optimizer=optimizer,
                normalize=normalize,
                data=data,
                loss_fn=loss_fn,
                max_batches=max_batches,
                seed=seed,
                progress=progress,
                example_inputs=example_inputs,
                min_keep=min_keep,
                reduce=reduce,
                pin_outputs=pin_outputs,
            )
            return
        self.pattern = parse_pattern(pattern)
        _check_choice("scope", scope, SCOPES)
        if scope == "row" and not isinstance(self.pattern, Unstructured):
            raise ValueError(f"scope 'row' works with the unstructured pattern, not {self.pattern}")
        final = getattr(self.schedule, "final_sparsity", None)
        if (
            isinstance(self.pattern, NM)
            and final is not None
            and final > self.pattern.sparsity + 1e-9
        ):
            raise ValueError(
                f"pattern {self.pattern} stops at sparsity {self.pattern.sparsity:g}, but the "
                f"schedule asks for final_sparsity={final:g}; use final_sparsity <= "
                f"{self.pattern.sparsity:g} (the pruner ramps N:M from dense to {self.pattern})"
            )
        _check_choice("normalize", normalize, NORMALIZATIONS)
        criterion = get_criterion(method)
        self.targets_patterns, self.ignore_patterns = targets, ignore
        self.scope, self.normalize = scope, normalize
        self.data, self.loss_fn, self.max_batches = data, loss_fn, max_batches
        self.seed, self.progress = seed, progress

        self._online: str | None = None
        if data is None and criterion.name in ONLINE_METHODS and criterion.collect is not None:
            self._online = criterion.name
            criterion = Criterion(
                criterion.name,
                self._online_score,
                comparable_across_layers=criterion.comparable_across_layers,
            )
        elif criterion.needs_data and data is None:
            raise ValueError(
                f"method {criterion.name!r} scores weights on data: pass data=<iterable of "
                "batches> (and loss_fn=) to GradualPruner; only "
                f"{', '.join(map(repr, ONLINE_METHODS))} can be scored from training gradients"
            )
        elif criterion.needs_data and loss_fn is None and getattr(criterion, "needs_loss", True):
            raise ValueError(
                f"method {criterion.name!r} needs loss_fn=<callable(model, batch) -> scalar loss>"
            )
        self.criterion = criterion

        self.targets: list[Target] = resolve_targets(model, targets, ignore)
        # as prune: a layer that cannot take the pattern is skipped with one warning (listed in
        # .skipped); no layer that can is an error that gives each layer's reason
        usable, self.skipped = split_by_pattern(self.targets, self.pattern)
        self._scored = usable
        self._scores: dict[str, torch.Tensor] = {}
        self._previous: dict[str, torch.Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._warned_skip = bool(self.skipped)  # warned just now: the steps do not repeat it
        self._warned_decrease = False
        self._finalized = False
        self.step_count = 0
        self.sparsity = 0.0
        self.history: list[tuple[int, float]] = []
        self.report: PruneReport | None = None

        first = self._scheduled(0)
        if first > 0 and self._online:
            raise ValueError(
                f"method {self._online!r} is scored from training gradients, so the schedule "
                f"cannot ask for sparsity at step 0 (it asks for {first:g}); start it at "
                "begin_step >= 1"
            )
        if self._online:
            self._reset_scores()
            self._remember_weights()
        self._final_per_layer = self._allocate(per_layer, allocation, criterion)
        self.optimizer = optimizer
        if first > 0:
            self._update(first)

    def _allocate(
        self, per_layer: dict[str, float] | None, allocation: Any, criterion: Criterion
    ) -> dict[str, float]:
        """``{target name: sparsity at the end of the schedule}`` from per_layer / allocation."""
        if not per_layer and allocation is None:
            return {}
        if isinstance(self.pattern, NM):
            raise ValueError(
                "per_layer= and allocation= do not apply to N:M patterns (their sparsity is fixed)"
            )
        final = getattr(self.schedule, "final_sparsity", None)
        if not isinstance(final, (int, float)) or not 0 < final < 1:
            raise ValueError(
                "per_layer= and allocation= give the sparsities at the end of the schedule, so "
                "the schedule needs a final_sparsity in (0, 1) (PolynomialSchedule, ...); got "
                f"{type(self.schedule).__name__}"
            )
        for key, value in (per_layer or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"per_layer[{key!r}] must be a sparsity in [0, 1), got {value!r}")
        chosen = per_layer_overrides(self._scored, per_layer)
        if allocation is not None:
            chosen.update(  # the allocator is registered by prunekit.analysis (no import cycle)
                ALLOCATORS["sensitivity"](
                    self.model,
                    self._scored,
                    chosen,
                    allocation,
                    float(final),
                    self.pattern,
                    criterion if self._online is None else criterion.name,
                    self.data,
                    self.progress,
                )
            )
        return chosen

    @property
    def per_layer(self) -> dict[str, float]:
        """``{layer: sparsity}`` reached at the end of the schedule (empty: the scope decides).

        Along the schedule every such layer is pruned to ``its sparsity * scheduled /
        final_sparsity``, so the ratios between layers hold at every step.
        """
        return dict(self._final_per_layer)

    def _init_structured(
        self, units: set[str], method: Any, scope: str, targets: Any, ignore: Any, **kw: Any
    ) -> None:
        _check_choice("scope", scope, SCOPES)
        if not isinstance(method, str) and not hasattr(method, "score"):
            raise TypeError(
                "structured patterns take a group importance (a name such as 'l2' or a "
                f"prunekit.graph.importance.GroupImportance), got {method!r}"
            )
        normalize = "mean" if kw["normalize"] == "auto" else kw["normalize"]
        self._structured = engine = StructuredMasks(
            self.model,
            units,
            kw["example_inputs"],
            importance=method,
            scope=scope,
            targets=targets,
            ignore=ignore,
            normalize=normalize,
            reduce=kw["reduce"],
            min_keep=kw["min_keep"],
            pin_outputs=kw["pin_outputs"],
            data=kw["data"],
            loss_fn=kw["loss_fn"],
            max_batches=kw["max_batches"],
            seed=kw["seed"],
            progress=kw["progress"],
        )
        self.pattern = "+".join(sorted(units))
        self.criterion = engine.criterion
        self.targets_patterns, self.ignore_patterns = targets, ignore
        self.scope, self.normalize = scope, normalize
        self.data, self.loss_fn, self.max_batches = kw["data"], kw["loss_fn"], kw["max_batches"]
        self.seed, self.progress = kw["seed"], kw["progress"]
        self._online = "taylor" if engine.online else None
        self.targets = []
        self.skipped: dict[str, str] = {}
        self._scored = []
        self._scores, self._previous = {}, {}
        self._optimizer = None
        self._warned_skip = self._warned_decrease = self._finalized = False
        self.step_count = 0
        self.sparsity = 0.0
        self.history = []
        self.report = None
        first = self._scheduled(0)
        if first > 0 and self._online:
            raise ValueError(
                "method 'taylor' without data= is scored from training gradients, so the "
                f"schedule cannot ask for sparsity at step 0 (it asks for {first:g}); start it "
                "at begin_step >= 1"
            )
        self.optimizer = kw["optimizer"]
        if first > 0:
            self._update(first)

    @property
    def structured(self) -> bool:
        """Whether this pruner removes whole units (channels, heads) and finalizes by surgery."""
        return self._structured is not None

    @property
    def unit_sparsity(self) -> float:
        """Structured patterns: the fraction of removable units currently removed."""
        if self._structured is None:
            raise AttributeError("unit_sparsity is defined for structured patterns only")
        return self._structured.removed_count / self._structured.total_units

    def removed_units(self) -> dict[str, list[int]]:
        """Structured patterns: the removed units (indices) of every dependency group, by name."""
        if self._structured is None:
            raise AttributeError("removed_units() is defined for structured patterns only")
        return self._structured.removed_units()

    # ------------------------------------------------------------------------------------------
    # The training-loop API

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose state is cleared at masked positions (settable)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        self._optimizer = optimizer
        self._clear_optimizer_state()

    def step(self) -> bool:
        """Count one optimizer step and update the masks if the schedule asks for more sparsity.

        Returns True when the masks changed at this step.
        """
        if self._online:
            if self._structured is not None:
                self._structured.accumulate()
            else:
                self._accumulate()
        self.step_count += 1
        target = self._scheduled(self.step_count)
        changed = False
        if self._needs_update(target):
            self._update(target)
            changed = True
        else:
            self._rezero()
        if self._online:
            if self._structured is not None:
                self._structured.remember_weights()
            else:
                self._remember_weights()
        return changed

    def finalize(self, surgery: bool | None = None, *, check: bool = True) -> nn.Module:
        """Bake the masks into the weights (``prunekit.finalize`` in place) and return the model.

        Structured patterns (``surgery`` defaults to True there): then cut the removed units
        out (the surgery of ``prunekit.prune_structured``), in place, and return the smaller
        dense model. It computes what the masked model computed, except where a removed unit
        takes part in a cross-channel computation such as LayerNorm over a pruned hidden size;
        with ``check``, the outputs on ``example_inputs`` are compared and a warning says so.
        The optimizer holds the old parameters afterwards: build a new one to keep training.
        ``surgery=False`` only bakes the zeros in (same shapes).

        The pruner cannot step any more afterwards.
        """
        if surgery is None:
            surgery = self._structured is not None
        if surgery and self._structured is None:
            raise ValueError(
                f"surgery needs a structured pattern ('channel', 'head'); this pruner's pattern "
                f"is '{self.pattern}'"
            )
        if self._finalized:
            raise RuntimeError("the pruner was finalized already")
        if surgery:
            self._structured.surgery(check=check)
        else:
            finalize(self.model, inplace=True)
            if self._structured is not None:
                self._structured.sites = []
        self._finalized = True
        return self.model

    def masks(self) -> dict[str, torch.Tensor]:
        """Bool keep-masks (True = kept) of every masked target, by parameter name."""
        if self._structured is not None:
            return self._structured.keep_masks() if not self._finalized else {}
        out = {}
        for t in self.targets:
            keep = get_mask(t.module, t.param_name)
            if keep is not None:
                out[t.name] = keep
        return out

    def __repr__(self) -> str:
        return (
            f"GradualPruner(method={self.criterion.name!r}, pattern='{self.pattern}', "
            f"scope={self.scope!r}, step={self.step_count}, sparsity={self.sparsity:.4f}, "
            f"schedule={self.schedule!r})"
        )

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, applied sparsity, masks, running scores.

        Tensors are copies; the dict holds only tensors, numbers, strings and lists, so
        ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it. Structured patterns
        add ``groups`` (names) and ``removed`` (the removed units of each group).
        """
        state = {
            "version": STATE_VERSION,
            "step": self.step_count,
            "sparsity": self.sparsity,
            "history": [[s, v] for s, v in self.history],
            "method": self.criterion.name,
            "pattern": str(self.pattern),
            "scope": self.scope,
            "masks": {k: v.clone() for k, v in self.masks().items()},
        }
        if self._structured is not None:
            engine = self._structured.state_dict()
            return {
                **state,
                "targets": [],
                "groups": engine["groups"],
                "removed": engine["removed"],
                "scores": engine["scores"],
                "previous": engine["previous"],
            }
        return {
            **state,
            "per_layer": dict(self._final_per_layer),
            "targets": [t.name for t in self.targets],
            "scores": {k: v.clone() for k, v in self._scores.items()},
            "previous": {k: v.clone() for k, v in self._previous.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: step, sparsity, running scores, and the masks on the model.

        Masks are replaced, not intersected: the model's masks become exactly the saved ones.
        Load the pruner before ``model.load_state_dict(...)`` when the model is freshly built.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"unsupported pruner state version {state.get('version')!r}; "
                f"this prunekit reads version {STATE_VERSION}"
            )
        if self._structured is not None:
            self._load_structured(state)
            return
        names = [t.name for t in self.targets]
        if list(state["targets"]) != names:
            raise ValueError(
                "the saved pruner state is for other layers: saved targets "
                f"{list(state['targets'])}, this pruner's targets {names}"
            )
        self._warn_on_other_settings(state)
        if "per_layer" in state:  # the allocation the run was started with
            self._final_per_layer = {k: float(v) for k, v in state["per_layer"].items()}
        masks = state["masks"]
        for t in self.targets:
            keep = masks.get(t.name)
            current = get_mask(t.module, t.param_name)
            if keep is None:
                if current is not None:
                    remove_mask(t.module, t.param_name)
                continue
            keep = keep.to(torch.bool)
            if current is not None and torch.equal(current.cpu(), keep.cpu()):
                continue
            if current is not None:
                remove_mask(t.module, t.param_name)
            apply_mask(t.module, t.param_name, keep)
        self.step_count = int(state["step"])
        self.sparsity = float(state["sparsity"])
        self.history = [(int(s), float(v)) for s, v in state["history"]]
        self._scores = {k: v.clone() for k, v in state["scores"].items()}
        self._previous = {k: v.clone() for k, v in state["previous"].items()}
        self._clear_optimizer_state()

    def _warn_on_other_settings(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("method", self.criterion.name),
            ("pattern", str(self.pattern)),
            ("scope", self.scope),
        ):
            if state[key] != mine:
                warnings.warn(
                    f"prunekit: loading a pruner state saved with {key}={state[key]!r} into a "
                    f"pruner with {key}={mine!r}",
                    stacklevel=4,
                )

    def _load_structured(self, state: dict[str, Any]) -> None:
        if "removed" not in state:
            raise ValueError("the saved pruner state is not of a structured pattern")
        self._warn_on_other_settings(state)
        self._structured.load_state_dict(state)
        self.step_count = int(state["step"])
        self.sparsity = float(state["sparsity"])
        self.history = [(int(s), float(v)) for s, v in state["history"]]
        self._clear_optimizer_state()

    # ------------------------------------------------------------------------------------------
    # Internals

    def _scheduled(self, step: int) -> float:
        value = self.schedule.sparsity_at(step)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(
                f"the schedule returned {value!r} at step {step}; sparsities must be in [0, 1)"
            )
        return float(value)

    def _nm_at(self, sparsity: float) -> NM | None:
        """The N':M pattern applied at ``sparsity`` for a gradual N:M target (None: dense)."""
        assert isinstance(self.pattern, NM)
        m = self.pattern.m
        n = max(self.pattern.n, math.ceil((1.0 - sparsity) * m - 1e-9))
        return None if n >= m else NM(n, m)

    def _needs_update(self, target: float) -> bool:
        if self._finalized:
            raise RuntimeError("the pruner was finalized; build a new one to keep pruning")
        if target < self.sparsity - 1e-12:
            if not self._warned_decrease:
                warnings.warn(
                    f"prunekit: the schedule went down from {self.sparsity:g} to {target:g} at "
                    f"step {self.step_count}; masks never shrink, so sparsity stays",
                    stacklevel=3,
                )
                self._warned_decrease = True
            return False
        if isinstance(self.pattern, NM):
            return self._nm_at(target) != self._nm_at(self.sparsity)
        return target > self.sparsity + 1e-12

    def _update(self, target: float) -> None:
        if self._structured is not None:
            self._structured.update(target, len(self.history))
            self.sparsity = target
            self.history.append((self.step_count, target))
            sync_masks_(self.model)  # torch.distributed: rank 0's masks on every rank
            self._clear_optimizer_state()
            return
        pattern: Pattern | None = self.pattern
        sparsity: float | None = target
        if isinstance(self.pattern, NM):
            pattern, sparsity = self._nm_at(target), None
        overrides = None
        if self._final_per_layer and sparsity is not None:
            scale = sparsity / float(self.schedule.final_sparsity)
            overrides = {n: min(s * scale, 1.0 - 1e-9) for n, s in self._final_per_layer.items()}
        if pattern is not None:
            with warnings.catch_warnings():
                if self._warned_skip:
                    warnings.filterwarnings("ignore", message="prunekit: skipping")
                self.report = prune(
                    self.model,
                    sparsity,
                    method=self.criterion,
                    pattern=pattern,
                    scope=self.scope,
                    targets=self.targets_patterns,
                    ignore=self.ignore_patterns,
                    normalize=self.normalize,
                    data=self.data,
                    loss_fn=self.loss_fn,
                    max_batches=self.max_batches,
                    seed=self.seed + len(self.history),
                    per_layer=overrides,
                    inplace=True,
                    progress=self.progress,
                )
            self._warned_skip = True
        if isinstance(self.pattern, NM):  # record what was applied: N':M levels are discrete
            target = 0.0 if pattern is None else pattern.sparsity
        self.sparsity = target
        self.history.append((self.step_count, target))
        if self._online == "taylor":
            self._reset_scores()
        sync_masks_(self.model)  # torch.distributed: rank 0's masks on every rank
        self._clear_optimizer_state()

    def _online_score(self, layer: LayerContext) -> torch.Tensor:
        return self._scores[layer.target.name].to(layer.weight.device)

    def _reset_scores(self) -> None:
        self._scores = {
            t.name: torch.zeros(t.weight().shape, dtype=torch.float32, device=t.weight().device)
            for t in self._scored
        }

    def _remember_weights(self) -> None:
        self._previous = {t.name: t.weight().float().clone() for t in self._scored}

    def _accumulate(self) -> None:
        for t in self._scored:
            grad = raw_parameter(t.module, t.param_name).grad
            previous = self._previous.get(t.name)
            if grad is None or previous is None:
                continue
            product = previous * grad.detach().float()
            if self._online == "movement":
                self._scores[t.name].sub_(product)
            else:
                self._scores[t.name].add_(product.abs())

    def _masked(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        if self._structured is not None:
            return self._structured.masked()
        out = []
        for t in self.targets:
            if is_masked(t.module, t.param_name):
                keep = get_mask(t.module, t.param_name)
                out.append((raw_parameter(t.module, t.param_name), keep))
        return out

    def _rezero(self) -> None:
        reapply_masks(self.model)
        if self._structured is not None:
            self._structured.rezero_buffers()

    def _clear_optimizer_state(self) -> None:
        masked = self._masked()
        with torch.no_grad():
            for param, keep in masked:
                param.masked_fill_(~keep, 0)
        if self._optimizer is not None:
            clear_optimizer_state(self._optimizer, dict(masked))
