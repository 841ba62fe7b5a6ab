"""Importance of the units of a dependency group.

Each criterion scores every unit of a group from all the slices the unit would remove (the
producing rows, the next layers' columns, norm vectors, biases), reduced across the group's
members with ``reduce`` (``"sum"``, ``"mean"`` or ``"max"``). Scores are then normalised per
group (``normalize``) so that one global ranking across layers is fair.

A new criterion is a small subclass of :class:`GroupImportance` registered with
:func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.graph.groups import Group, Member
from prunekit.graph.trace import Graph, call_model

REDUCTIONS = ("sum", "mean", "max")
NORMALIZATIONS = ("mean", "max", "l2", "none")


@dataclass
class Context:
    """What a criterion may read: the model's tensors, the trace, collected statistics."""

    model: nn.Module
    graph: Graph
    tensors: dict[str, torch.Tensor]
    reduce: str = "sum"
    generator: torch.Generator | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    module_types: dict[str, type] = field(default_factory=dict)

    def is_param(self, key: str) -> bool:
        return self.graph.tensors[key][0] == "param"


class GroupImportance:
    """Base class: ``score(group, context) -> array of one score per unit (higher = keep)``."""

    name = "base"
    needs_data = False
    needs_loss = False

    def collect(self, model, graph, groups, calib, loss_fn, progress) -> dict[str, Any]:
        return {}

    def score(self, group: Group, ctx: Context) -> np.ndarray | None:
        raise NotImplementedError


REGISTRY: dict[str, GroupImportance] = {}


def register(criterion: GroupImportance) -> GroupImportance:
    REGISTRY[criterion.name] = criterion
    return criterion


def get_importance(name: str | GroupImportance) -> GroupImportance:
    if isinstance(name, GroupImportance):
        return name
    if name not in REGISTRY:
        raise ValueError(
            f"unknown importance {name!r}; accepted: {', '.join(map(repr, sorted(REGISTRY)))} "
            "or a prunekit.graph.importance.GroupImportance instance"
        )
    return REGISTRY[name]


def _reduce(values: list[np.ndarray], how: str) -> np.ndarray:
    stacked = np.stack(values)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0)
    return stacked.sum(0)


def per_index(
    tensor: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> np.ndarray:
    """``fn`` applied element-wise, summed over every dim except ``dim``."""
    t = fn(tensor.detach().float())
    if t.ndim == 0:
        return t.reshape(1).numpy()
    dims = [d for d in range(t.ndim) if d != dim]
    return (t.sum(dim=dims) if dims else t).cpu().numpy().astype(np.float64)


def unit_sums(group: Group, member: Member, values: np.ndarray) -> np.ndarray:
    return np.array([values[pos].sum() for pos in group.slices[member]], dtype=np.float64)


class Magnitude(GroupImportance):
    """Lp norm of everything a unit would remove: L1 = sum of |w|, L2 = root of the sum of w^2
    over all its slices (with ``reduce="sum"``, the norm of the concatenated slices)."""

    def __init__(self, p: int) -> None:
        self.p = p
        self.name = f"l{p}"

    def score(self, group: Group, ctx: Context) -> np.ndarray:
        values = []
        for member in group.members:
            key, dim = member
            if not ctx.is_param(key):
                continue
            fn = torch.abs if self.p == 1 else torch.square
            values.append(unit_sums(group, member, per_index(ctx.tensors[key], dim, fn)))
        reduced = _reduce(values, ctx.reduce)
        return reduced if self.p == 1 else np.sqrt(reduced)


class Random(GroupImportance):
    name = "random"

    def score(self, group: Group, ctx: Context) -> np.ndarray:
        return torch.rand(group.n_units, generator=ctx.generator, dtype=torch.float64).numpy()


class BNScale(GroupImportance):
    """|gamma| of the BatchNorm layers in the group (Network Slimming); None without BatchNorm."""

    name = "bn_scale"

    def score(self, group: Group, ctx: Context) -> np.ndarray | None:
        values = []
        for member in group.members:
            key, dim = member
            module, _, pname = key.rpartition(".")
            cls = ctx.module_types.get(module)
            if (
                pname == "weight"
                and cls is not None
                and issubclass(cls, nn.modules.batchnorm._BatchNorm)
            ):
                values.append(unit_sums(group, member, per_index(ctx.tensors[key], dim, torch.abs)))
        return _reduce(values, ctx.reduce) if values else None


def batch_input(batch: Any) -> Any:
    """The model input of a calibration batch: tensor, dict, or the first item of a tuple."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's own loss (Hugging Face models given ``labels``)."""
    out = call_model(model, batch_input(batch))
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            "this importance needs a loss: pass loss_fn=<callable(model, batch) -> scalar loss> "
            "(the model's output has no .loss)"
        )
    return loss


class Taylor(GroupImportance):
    """First-order Taylor on data. ``"taylor"``: per batch, the sum over the unit's weights of
    |w * dL/dw|, summed over batches. ``"taylor_group"``: per batch, (sum over the unit's weights
    of w * dL/dw)^2, the squared first-order change of the loss when the whole unit goes
    (Molchanov et al. 2019), summed over batches."""

    needs_data = True
    needs_loss = True

    def __init__(self, name: str = "taylor") -> None:
        self.name = name

    def collect(self, model, graph, groups, calib, loss_fn, progress) -> dict[str, Any]:
        # Gradients come from torch.autograd.grad: the caller's .grad fields stay as they were.
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        names = list(params)
        scores = {g.index: np.zeros(g.n_units) for g in groups}
        grouped = self.name == "taylor_group"
        fn = (lambda t: t) if grouped else torch.abs
        was_training = model.training
        model.eval()
        try:
            for batch in tqdm(list(calib), desc=self.name, disable=not progress, leave=False):
                loss = (loss_fn or default_loss)(model, batch)
                grads = dict(
                    zip(
                        names,
                        torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True),
                        strict=True,
                    )
                )
                cache: dict[Member, np.ndarray] = {}
                for g in groups:
                    s = np.zeros(g.n_units)
                    for member in g.members:
                        key, dim = member
                        p, grad = params.get(key), grads.get(key)
                        if p is None or grad is None:
                            continue
                        if member not in cache:
                            cache[member] = per_index(p.detach() * grad, dim, fn)
                        s += unit_sums(g, member, cache[member])
                    scores[g.index] += s**2 if grouped else s
        finally:
            model.train(was_training)
        return {self.name: scores}

    def score(self, group: Group, ctx: Context) -> np.ndarray:
        return ctx.stats[self.name][group.index]


class Activation(GroupImportance):
    """Statistics of what the unit feeds the next layers, on calibration data: ``"activation"``
    = mean |x| of the consumers' input channels, ``"apoz"`` = 1 - the average percentage of zeros
    (APoZ, Hu et al.). Groups whose channels no module reads get None."""

    needs_data = True

    def __init__(self, name: str) -> None:
        self.name = name

    def collect(self, model, graph, groups, calib, loss_fn, progress) -> dict[str, Any]:
        modules = dict(model.named_modules())
        stats: dict[tuple[str, int], list] = {}
        handles = []
        for module_name, dim, labels in graph.consumers:
            key = (module_name, dim)
            if key in stats or module_name not in modules:
                continue
            stats[key] = [None, 0, len(labels)]

            def hook(module, args, kwargs, key=key):
                x = args[0] if args else next(iter(kwargs.values()), None)
                if not isinstance(x, torch.Tensor):
                    return
                d = key[1] % x.ndim
                entry = stats[key]
                if x.shape[d] != entry[2]:
                    return
                dims = [i for i in range(x.ndim) if i != d]
                x = x.detach().float()
                val = (x.abs() if self.name == "activation" else (x == 0).float()).sum(dims)
                entry[0] = val if entry[0] is None else entry[0] + val
                entry[1] += x.numel() // x.shape[d]

            handles.append(modules[module_name].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                for batch in tqdm(list(calib), desc=self.name, disable=not progress, leave=False):
                    call_model(model, batch_input(batch))
        finally:
            for h in handles:
                h.remove()
        uf = graph.uf
        per_root: dict[int, list[float]] = {}
        for module_name, dim, labels in graph.consumers:
            entry = stats.get((module_name, dim))
            if entry is None or entry[0] is None:
                continue
            mean = (entry[0] / max(entry[1], 1)).numpy()
            if self.name == "apoz":
                mean = 1.0 - mean
            for root, value in zip(uf.find(labels), mean, strict=True):
                per_root.setdefault(int(root), []).append(float(value))
        return {self.name: per_root}

    def score(self, group: Group, ctx: Context) -> np.ndarray | None:
        per_root = ctx.stats[self.name]
        if not all(int(r) in per_root for r in group.roots):
            return None
        return np.array([np.mean(per_root[int(r)]) for r in group.roots])


class Fluctuation(GroupImportance):
    """How much a unit's contribution to the next layers *varies* on calibration data (FLAP's
    fluctuation metric, An et al. 2024): the sum over the consumers' input columns j it feeds
    of ``Var(x_j) * ||W[:, j]||^2``. This is the output error left after the removed unit's mean
    contribution is moved into the bias (``reconstruct="bias"``): a unit that is nearly
    constant costs nothing. Padding tokens are left out when a batch is a dict with a 2-D
    ``attention_mask``. Groups no Linear / conv layer reads get None."""

    name = "fluctuation"
    needs_data = True

    def collect(self, model, graph, groups, calib, loss_fn, progress) -> dict[str, Any]:
        modules = dict(model.named_modules())
        wanted: dict[str, set[int]] = {}
        for g in groups:
            for key, dim in g.members:
                mname, _, pname = key.rpartition(".")
                m = modules.get(mname)
                if pname == "weight" and dim == 1 and isinstance(m, (nn.Linear, nn.Conv2d)):
                    wanted.setdefault(mname, set())
        moments: dict[str, list] = {}
        state: dict[str, Any] = {"mask": None}
        handles = []
        for mname in wanted:

            def hook(module, args, kwargs, mname=mname):
                x = args[0] if args else next(iter(kwargs.values()), None)
                if not isinstance(x, torch.Tensor):
                    return
                x = x.detach().float()
                if isinstance(module, nn.Conv2d):
                    x = x.movedim(1, -1) if x.ndim == 4 else x
                else:
                    mask = state["mask"]
                    if mask is not None and x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                        x = x[mask.bool()]
                x = x.reshape(-1, x.shape[-1]).double()
                entry = moments.setdefault(mname, [0, 0.0, 0.0])
                entry[0] += x.shape[0]
                entry[1] = entry[1] + x.sum(0)
                entry[2] = entry[2] + (x * x).sum(0)

            handles.append(modules[mname].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                for batch in tqdm(list(calib), desc=self.name, disable=not progress, leave=False):
                    inputs = batch_input(batch)
                    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                    state["mask"] = (
                        mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
                    )
                    call_model(model, inputs)
        finally:
            for h in handles:
                h.remove()
        var = {}
        for mname, (n, s1, s2) in moments.items():
            mean = s1 / max(n, 1)
            var[mname] = (s2 / max(n, 1) - mean * mean).clamp(min=0).numpy()
        return {self.name: var}

    def score(self, group: Group, ctx: Context) -> np.ndarray | None:
        var = ctx.stats[self.name]
        values = []
        for member in group.members:
            key, dim = member
            mname, _, pname = key.rpartition(".")
            if pname != "weight" or dim != 1 or mname not in var:
                continue
            w = ctx.tensors[key].detach().float()
            col = (w * w).sum(dim=[d for d in range(w.ndim) if d != 1]).double().numpy()
            values.append(unit_sums(group, member, col * var[mname]))
        return _reduce(values, ctx.reduce) if values else None


for _criterion in (
    Magnitude(1),
    Magnitude(2),
    Random(),
    BNScale(),
    Taylor(),
    Activation("activation"),
    Activation("apoz"),
    Fluctuation(),
):
    register(_criterion)


def normalize(scores: np.ndarray, how: str) -> np.ndarray:
    """Divide a group's scores by their mean / max / L2 norm, for a global ranking."""
    if how == "none":
        return scores
    if how == "mean":
        d = np.abs(scores).mean()
    elif how == "max":
        d = np.abs(scores).max()
    else:
        d = np.sqrt((scores**2).sum())
    return scores / d if d > 0 else scores


def score_groups(
    criterion: GroupImportance,
    model: nn.Module,
    graph: Graph,
    groups: list[Group],
    *,
    reduce: str = "sum",
    calib: Iterable[Any] | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[int, np.ndarray], list[str]]:
    """Scores of every group's units (groups a criterion cannot score are left out, with a note)."""
    stats = (
        criterion.collect(model, graph, groups, calib, loss_fn, progress)
        if criterion.needs_data
        else {}
    )
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    ctx = Context(
        model=model,
        graph=graph,
        tensors=tensors,
        reduce=reduce,
        generator=torch.Generator().manual_seed(seed),
        stats=stats,
        module_types={n: type(m) for n, m in model.named_modules()},
    )
    scores, notes = {}, []
    for g in groups:
        s = criterion.score(g, ctx)
        if s is None:
            notes.append(f"{criterion.name} cannot score group {g.name}: left whole")
            continue
        scores[g.index] = np.asarray(s, dtype=np.float64)
    return scores, notes
