"""Structured units during training: soft masks on whole dependency-graph units, surgery at the end.

:class:`StructuredMasks` is the engine behind ``GradualPruner(model, schedule, pattern="channel"
| "head" | ...)``. At construction it traces the model once (``prunekit.graph.trace``) and builds
the same dependency groups ``prunekit.prune_structured`` uses. Each unit of a group is a set of
parameter slices that surgery removes together: a layer's output rows and bias entries, the
BatchNorm / LayerNorm entries, the next layers' input columns, every layer on the same residual
stream. Removing a unit during training masks *every* one of those slices with
:func:`prunekit.masks.apply_mask` (and zeroes the matching ``running_mean`` entries of
BatchNorm buffers), so the unit carries exactly zero and gets exactly zero gradient. Surgery at
the end (:meth:`StructuredMasks.surgery`) cuts exactly those units out.

Lossless: after surgery the model computes what the masked model computed (to float rounding)
when every removed unit's contribution downstream is zero. Masking the consumers' input columns
makes this hold whatever sits between producer and consumer (BatchNorm with running statistics,
biases, a sigmoid or any element-wise function, residual adds). It does not hold when a removed
channel takes part in a computation *across* channels that has no parameter slice to mask:
normalisation over the channel dim (LayerNorm / RMSNorm / GroupNorm on a pruned hidden size
count the zeroed channels in their mean and variance), softmax or mean over channels, or a
channel that reaches the model output unmasked (outputs are pinned by default, so this does
not happen unless ``pin_outputs=False``). :meth:`StructuredMasks.surgery` compares the outputs
on ``example_inputs`` before and after and warns when they differ.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.graph.groups import Group, build_groups
from prunekit.graph.importance import (
    NORMALIZATIONS,
    REDUCTIONS,
    get_importance,
    per_index,
    score_groups,
    unit_sums,
)
from prunekit.graph.importance import normalize as normalize_scores
from prunekit.graph.pruner import _drop_ignored, _surgery_verified
from prunekit.graph.trace import _plain, call_model, iter_tensors, trace
from prunekit.masks import (
    apply_mask,
    finalize,
    masked_parameters,
    raw_parameter,
    remove_mask,
)
from prunekit.targets import matches

STRUCTURED_UNITS = ("channel", "neuron", "head")
"""Patterns that make :class:`~prunekit.train.GradualPruner` remove whole units."""


def structured_units(pattern: Any) -> set[str] | None:
    """The unit kinds named by ``pattern`` (``"channel"``, ``"head"``, ``"channel+head"``, a list
    of them; ``"neuron"`` is ``"channel"``), or None when ``pattern`` is not structured."""
    if isinstance(pattern, str):
        parts = [p.strip().lower() for p in pattern.split("+")]
    elif isinstance(pattern, (list, tuple, set, frozenset)) and all(
        isinstance(p, str) for p in pattern
    ):
        parts = [p.strip().lower() for p in pattern]
    else:
        return None
    if "layer" in parts:
        raise ValueError(
            "pattern='layer' (depth pruning) is not available during training; use "
            "prunekit.prune_structured(..., unit='layer') after training"
        )
    if not parts or not all(p in STRUCTURED_UNITS for p in parts):
        if isinstance(pattern, str):
            return None
        raise ValueError(
            f"unknown structured pattern {pattern!r}; accepted units: "
            f"{', '.join(map(repr, STRUCTURED_UNITS))}"
        )
    return {"channel" if p == "neuron" else p for p in parts}


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [
                t.detach().clone() for t in iter_tensors(_plain(call_model(model, example_inputs)))
            ]
    finally:
        model.train(was)


class StructuredMasks:
    """Soft masks over whole units of a model's dependency groups (see the module docstring).

    ``removed[i]`` is the sorted list of removed units of group ``i`` (indices into the group's
    units, as in ``prunekit.prune_structured``'s selection). Units only ever get added.
    """

    def __init__(
        self,
        model: nn.Module,
        units: set[str],
        example_inputs: Any,
        *,
        importance: Any = "l2",
        scope: str = "global",
        targets: str | Iterable[str] | None = None,
        ignore: str | Iterable[str] | None = None,
        normalize: str = "mean",
        reduce: str = "sum",
        min_keep: int = 1,
        pin_outputs: bool = True,
        data: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        max_batches: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        if example_inputs is None:
            raise ValueError(
                "structured patterns trace the model: pass example_inputs=<what the model is "
                "called with> (a tensor, a tuple of positional inputs or a dict of kwargs)"
            )
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalize {normalize!r} for structured patterns; accepted: "
                f"{', '.join(map(repr, NORMALIZATIONS))}"
            )
        if reduce not in REDUCTIONS:
            raise ValueError(
                f"unknown reduce {reduce!r}; accepted: {', '.join(map(repr, REDUCTIONS))}"
            )
        if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
            raise ValueError(f"min_keep must be an integer >= 1, got {min_keep!r}")
        if importance == "magnitude":
            importance = "l2"
        self.model = model
        self.units = units
        self.example_inputs = example_inputs
        self.scope, self.normalize, self.reduce = scope, normalize, reduce
        self.min_keep, self.pin_outputs = min_keep, pin_outputs
        self.data, self.loss_fn, self.max_batches = data, loss_fn, max_batches
        self.seed, self.progress = seed, progress

        criterion = get_importance(importance)
        self.online = data is None and criterion.name == "taylor"
        if criterion.needs_loss and data is None and not self.online:
            raise ValueError(
                f"importance {criterion.name!r} needs data=<iterable of batches> and loss_fn="
            )
        self.criterion = criterion

        # trace a plain copy when the model already carries masks (their weights are computed
        # tensors, which the tracer would not recognise as parameters)
        plain = finalize(model) if any(True for _ in masked_parameters(model)) else model
        self.graph = trace(plain, example_inputs, pin_outputs=pin_outputs)
        groups = [g for g in build_groups(self.graph) if g.kind in units]
        groups = _drop_ignored(groups, _patterns(ignore))
        wanted = _patterns(targets)
        if wanted:
            groups = [
                g
                for g in groups
                if any(matches(p, k.rpartition(".")[0]) for p in wanted for k, _ in g.producers)
            ]
        if not groups:
            raise ValueError(
                f"no removable {'/'.join(sorted(units))} unit in this model (every unit is "
                "pinned, ignored or of another kind)"
            )
        self.groups: list[Group] = groups
        self.removed: dict[int, list[int]] = {g.index: [] for g in groups}
        self.sites: list[tuple[str, str]] = []  # (module name, parameter name) masked here
        self.scores: dict[int, np.ndarray] = {}
        self.previous: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []
        if self.online:
            self.reset_scores()
            self.remember_weights()

    # ------------------------------------------------------------------------------ counting

    @property
    def total_units(self) -> int:
        return sum(g.n_units for g in self.groups)

    @property
    def removed_count(self) -> int:
        return sum(len(v) for v in self.removed.values())

    def removed_units(self) -> dict[str, list[int]]:
        """Removed units by group name (groups with the same name get a ``#index`` suffix)."""
        names = [g.name for g in self.groups]
        out = {}
        for g in self.groups:
            name = g.name if names.count(g.name) == 1 else f"{g.name}#{g.index}"
            out[name] = list(self.removed[g.index])
        return out

    def _cap(self, group: Group) -> int:
        return max(group.n_units - self.min_keep, 0)

    # ------------------------------------------------------------------------------ scoring

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        named.update({k: v for k, v in self.model.named_buffers() if k not in named})
        return named

    def reset_scores(self) -> None:
        self.scores = {g.index: np.zeros(g.n_units) for g in self.groups}

    def _param_members(self) -> set[str]:
        return {
            key
            for g in self.groups
            for key, _ in g.members
            if self.graph.tensors[key][0] == "param"
        }

    def remember_weights(self) -> None:
        named = dict(self.model.named_parameters())
        self.previous = {
            k: named[k].detach().float().clone() for k in sorted(self._param_members())
        }

    def accumulate(self) -> None:
        """Online Taylor: add this step's sum of |w * g| over each unit's slices."""
        named = dict(self.model.named_parameters())
        cache: dict[tuple[str, int], np.ndarray] = {}
        for g in self.groups:
            for member in g.members:
                key, dim = member
                p, w = named.get(key), self.previous.get(key)
                if p is None or p.grad is None or w is None:
                    continue
                if member not in cache:
                    cache[member] = per_index(w * p.grad.detach().float(), dim, torch.abs)
                self.scores[g.index] += unit_sums(g, member, cache[member])

    def _score(self, update: int) -> dict[int, np.ndarray]:
        if self.online:
            return {i: s.copy() for i, s in self.scores.items()}
        calib = list(self.data) if self.data is not None else [self.example_inputs]
        if self.max_batches is not None:
            calib = calib[: self.max_batches]
        scores, notes = score_groups(
            self.criterion,
            self.model,
            self.graph,
            self.groups,
            reduce=self.reduce,
            calib=calib,
            loss_fn=self.loss_fn,
            seed=self.seed + update,
            progress=self.progress,
        )
        for note in notes:
            if note not in self.notes:
                self.notes.append(note)
                warnings.warn(f"prunekit: {note}", stacklevel=4)
        return scores

    # ------------------------------------------------------------------------------ selection

    def update(self, sparsity: float, update: int) -> int:
        """Remove more units until ``sparsity`` of them is gone; return how many were added."""
        scores = self._score(update)
        chosen: dict[int, list[int]] = {}
        if self.scope == "local":
            for g in self.groups:
                if g.index not in scores:
                    continue
                want = min(int(round(sparsity * g.n_units)), self._cap(g))
                extra = want - len(self.removed[g.index])
                if extra > 0:
                    alive = self._alive(g)
                    order = np.argsort(scores[g.index][alive], kind="stable")
                    chosen[g.index] = [int(u) for u in alive[order[:extra]]]
        else:
            pool = [g for g in self.groups if g.index in scores]
            want = int(round(sparsity * sum(g.n_units for g in pool)))
            extra = want - sum(len(self.removed[g.index]) for g in pool)
            candidates = []
            for g in pool:
                alive = self._alive(g)
                if not len(alive):
                    continue
                normed = normalize_scores(scores[g.index][alive], self.normalize)
                candidates.extend(
                    (float(s), g.index, int(u)) for s, u in zip(normed, alive, strict=True)
                )
            candidates.sort(key=lambda c: c[0])
            room = {g.index: self._cap(g) - len(self.removed[g.index]) for g in pool}
            for _, i, u in candidates:
                if extra <= 0:
                    break
                if room[i] > 0:
                    chosen.setdefault(i, []).append(u)
                    room[i] -= 1
                    extra -= 1
        added = 0
        for i, units in chosen.items():
            self.removed[i] = sorted(set(self.removed[i]) | set(units))
            added += len(units)
        self.apply()
        if self.online:
            self.reset_scores()
        return added

    def _alive(self, group: Group) -> np.ndarray:
        gone = set(self.removed[group.index])
        return np.array([u for u in range(group.n_units) if u not in gone], dtype=np.int64)

    # ------------------------------------------------------------------------------ masks

    def keep_masks(self, buffers: bool = False) -> dict[str, torch.Tensor]:
        """Bool keep-masks (True = kept) of every parameter (and, with ``buffers``, buffer) the
        removed units touch, by name."""
        named = self._tensors()
        keep: dict[str, torch.Tensor] = {}
        for g in self.groups:
            units = self.removed[g.index]
            if not units:
                continue
            for (key, dim), slices in g.slices.items():
                if not buffers and self.graph.tensors[key][0] != "param":
                    continue
                tensor = named[key]
                mask = keep.get(key)
                if mask is None:
                    mask = keep[key] = torch.ones(
                        tensor.shape, dtype=torch.bool, device=tensor.device
                    )
                idx = torch.as_tensor(
                    np.concatenate([slices[u] for u in units]), device=tensor.device
                )
                mask.index_fill_(dim, idx, False)
        return keep

    def apply(self) -> None:
        """Mask every parameter slice of the removed units; zero their BatchNorm running means."""
        modules = dict(self.model.named_modules())
        sites = set(self.sites)
        for key, keep in self.keep_masks(buffers=True).items():
            module_name, _, name = key.rpartition(".")
            module = modules[module_name]
            if self.graph.tensors[key][0] == "param":
                apply_mask(module, name, keep)
                sites.add((module_name, name))
            elif name == "running_mean":
                with torch.no_grad():
                    module._buffers[name].masked_fill_(~keep, 0)
        self.sites = sorted(sites)

    def clear(self) -> None:
        """Take this engine's masks off the model (their zeros stay in the raw weights)."""
        modules = dict(self.model.named_modules())
        for module_name, name in self.sites:
            remove_mask(modules[module_name], name)
        self.sites = []

    def masked(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        modules = dict(self.model.named_modules())
        out = []
        for module_name, name in self.sites:
            module = modules[module_name]
            keep = module._buffers[name + "_mask"] != 0
            out.append((raw_parameter(module, name), keep))
        return out

    def rezero_buffers(self) -> None:
        named = dict(self.model.named_buffers())
        with torch.no_grad():
            for key, keep in self.keep_masks(buffers=True).items():
                if key.endswith(".running_mean") and key in named:
                    named[key].masked_fill_(~keep, 0)

    # ------------------------------------------------------------------------------ surgery

    def surgery(self, check: bool = True) -> nn.Module:
        """Bake every mask in and cut the removed units out of the model, in place.

        With ``check``, the outputs on ``example_inputs`` (eval mode) before and after are
        compared and a warning says when they differ (see the module docstring for when).
        """
        before = _outputs(self.model, self.example_inputs) if check else None
        finalize(self.model, inplace=True)
        self.sites = []
        parts = [g.roots[np.asarray(self.removed[g.index], dtype=np.int64)] for g in self.groups]
        roots = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        _surgery_verified(
            self.model, self.graph, roots, self.example_inputs, True, self.pin_outputs
        )
        if before is not None:
            after = _outputs(self.model, self.example_inputs)
            same = len(before) == len(after) and all(
                a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
                for a, b in zip(before, after, strict=False)
            )
            if not same:
                warnings.warn(
                    "prunekit: the model after surgery does not compute exactly what the masked "
                    "model computed (a removed unit takes part in a cross-channel computation "
                    "such as LayerNorm over a pruned hidden size); fine-tune briefly to recover",
                    stacklevel=3,
                )
        return self.model

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": [g.name for g in self.groups],
            "removed": [list(self.removed[g.index]) for g in self.groups],
            "scores": {str(i): torch.from_numpy(s.copy()) for i, s in self.scores.items()},
            "previous": {k: v.clone() for k, v in self.previous.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [g.name for g in self.groups]
        if list(state["groups"]) != names:
            raise ValueError(
                "the saved pruner state is for other units: saved groups "
                f"{list(state['groups'])}, this pruner's groups {names}"
            )
        self.clear()
        self.removed = {
            g.index: sorted(int(u) for u in units)
            for g, units in zip(self.groups, state["removed"], strict=True)
        }
        self.apply()
        self.scores = {int(k): v.double().numpy().copy() for k, v in state["scores"].items()}
        self.previous = {k: v.clone() for k, v in state["previous"].items()}


def _patterns(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


__all__ = ["STRUCTURED_UNITS", "StructuredMasks", "structured_units"]
