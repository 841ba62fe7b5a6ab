"""Repair after structured pruning, without training: refit the layers that read removed units.

When ``prune_structured`` removes FFN neurons, attention heads or conv channels, the layer that
*consumes* them (BERT ``output.dense`` / Llama ``down_proj`` for neurons, ``o_proj`` for heads,
the next conv for channels) loses some of its inputs. Two repairs, both computed from that
layer's inputs on calibration data:

* ``"bias"``: compensate the removed inputs' mean contribution in the bias,
  ``b += W[:, removed] @ mean(x[removed])`` (FLAP, An et al. 2024). Exact when the removed inputs
  are constant; needs only the input means; cheap.
* ``"lstsq"``: least-squares refit of the kept columns and the bias so that the pruned layer's
  output matches the unpruned layer's output on the calibration inputs,
  ``min ||W' x[kept] + b' - (W x + b)||^2`` with ridge damping ``damp * mean(diag(cov))`` on the
  kept inputs' covariance. Uses the inputs' mean and covariance (a ``n x n`` matrix per layer);
  reduces to ``"bias"`` when kept and removed inputs are uncorrelated.

Layers are refit one after another in forward order (``sequential=True``, the default): each
layer's statistics are collected on the model whose earlier layers were already pruned and
refit, so that later layers correct for earlier changes. When every such layer sits in the
model's repeated blocks (a transformer's layers), this runs block by block like the one-shot
runner (:mod:`prunekit.calibrate.sequential`): the inputs of the first block are captured once,
each block runs on its cached inputs, and its outputs (after the refit) feed the next block;
otherwise each layer gets a forward pass of the whole model, stopped at that layer. Removed units are emulated by zeroing
the consumer's removed columns, so everything happens before surgery and surgery then cuts out
columns that are zero. Padding tokens are left out of the statistics when a batch is a dict with
a 2-D ``attention_mask`` that matches the layer input's leading dims.

Consumers handled: ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Conv2d`` (``groups=1``, zero
padding; its input patches are unfolded). A group is repaired only when its units reach the rest
of the model through such layers alone: groups that also run through a normalisation over the
channel dim or an embedding (a residual stream) are left as they are, with a note.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibrate.sequential import call_block, capture_block_inputs, find_blocks
from prunekit.graph.groups import Group
from prunekit.graph.importance import batch_input
from prunekit.graph.trace import Graph, call_model

METHODS = ("bias", "lstsq")
MATCHES = ("layer", "dense")

_CROSS_CHANNEL = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.EmbeddingBag) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


@dataclass(frozen=True)
class ReconstructConfig:
    """How :func:`prunekit.prune_structured` repairs the layers that read removed units.

    Args:
        method: ``"lstsq"`` (refit kept columns and bias, ridge-damped least squares) or
            ``"bias"`` (add the removed inputs' mean contribution to the bias).
        damp: ridge damping of ``"lstsq"``, a fraction of the mean diagonal of the kept inputs'
            covariance (>= 0; 0 is plain least squares).
        sequential: refit layer by layer in forward order, each on the already repaired model
            (one calibration pass per layer, stopped at that layer); False: one pass for all.
        calib: calibration batches for the statistics (tensor, dict of model kwargs or a tuple
            whose first item is the model input); None: ``prune_structured``'s ``calib``.
        match: what a refit layer's output should match: ``"layer"`` (default) the unpruned
            layer on the inputs it gets now (after the earlier refits); ``"dense"`` the dense
            model's layer on the dense model's inputs, which also corrects the drift of the
            earlier layers (block by block only; twice the forward passes).

    Example:
        >>> from prunekit.graph.reconstruct import ReconstructConfig
        >>> ReconstructConfig("bias").method
        'bias'
    """

    method: str = "lstsq"
    damp: float = 0.01
    sequential: bool = True
    calib: Iterable[Any] | None = None
    match: str = "layer"

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise ValueError(
                f"unknown match {self.match!r}; accepted: {', '.join(map(repr, MATCHES))}"
            )
        if self.method not in METHODS:
            raise ValueError(
                f"unknown reconstruct method {self.method!r}; accepted: "
                f"{', '.join(map(repr, METHODS))} (or None for no repair)"
            )
        if (
            isinstance(self.damp, bool)
            or not isinstance(self.damp, numbers.Real)
            or not np.isfinite(self.damp)
            or self.damp < 0
        ):
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}")


def resolve(value: str | ReconstructConfig | None) -> ReconstructConfig | None:
    """``None``, a method name or a :class:`ReconstructConfig` -> a config (or None)."""
    if value is None or isinstance(value, ReconstructConfig):
        return value
    if isinstance(value, str):
        return ReconstructConfig(method=value)
    raise ValueError(
        f"reconstruct must be None, one of {', '.join(map(repr, METHODS))} or a "
        f"prunekit.graph.reconstruct.ReconstructConfig, got {value!r}"
    )


# --------------------------------------------------------------------------- consumers


@dataclass
class Consumer:
    """A layer that reads removed units, and which of its input channels go."""

    module: str
    kind: str  # "linear", "conv1d" (Hugging Face, weight in x out) or "conv2d"
    removed: np.ndarray  # input channel indices
    order: int = 0


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _is_cross_channel(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, _CROSS_CHANNEL) or name.endswith(("LayerNorm", "RMSNorm"))


def _consumer_kind(module: nn.Module, dim: int) -> str | None:
    if isinstance(module, nn.Linear) and dim == 1:
        return "linear"
    if _is_hf_conv1d(module) and dim == 0:
        return "conv1d"
    if (
        type(module) is nn.Conv2d
        and dim == 1
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv2d"
    return None


def find_consumers(
    model: nn.Module, graph: Graph, groups: list[Group], removed: dict[int, np.ndarray]
) -> tuple[list[Consumer], list[str]]:
    """The layers to refit (in forward order) and notes on groups that cannot be repaired."""
    modules = dict(model.named_modules())
    order = {key: i for i, key in enumerate(graph.tensors)}
    by_module: dict[str, Consumer] = {}
    notes = []
    for g in groups:
        idx = removed.get(g.index)
        if idx is None or not len(idx):
            continue
        producers = set(g.producers)
        found: list[tuple[str, str, np.ndarray]] = []
        blocker = None
        for member in g.members:
            key, dim = member
            mname, _, pname = key.rpartition(".")
            module = modules.get(mname)
            if module is None:
                blocker = f"{key} is not a module parameter"
                break
            if _is_cross_channel(module):
                blocker = f"its units pass through {type(module).__name__} {mname!r}"
                break
            if member in producers or pname != "weight":
                continue
            kind = _consumer_kind(module, dim)
            if kind is None:
                continue  # another kind of reader: it loses the units as it would anyway
            cols = np.concatenate([g.slices[member][int(u)] for u in idx])
            found.append((mname, kind, cols))
        if blocker is None and not found:
            blocker = "no Linear / Conv1D / Conv2d layer reads its units"
        if blocker is not None:
            notes.append(f"reconstruct: group {g.name} left as pruned ({blocker})")
            continue
        for mname, kind, cols in found:
            c = by_module.setdefault(
                mname,
                Consumer(mname, kind, np.zeros(0, dtype=np.int64), order.get(mname + ".weight", 0)),
            )
            c.removed = np.union1d(c.removed, cols).astype(np.int64)
    return sorted(by_module.values(), key=lambda c: c.order), notes


# --------------------------------------------------------------------------- statistics


def _matrix(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as (out, inputs) in float64, inputs in the order of :func:`_rows` columns."""
    w = module.weight.detach().double()
    if kind == "conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def _set_matrix(module: nn.Module, kind: str, value: torch.Tensor) -> None:
    w = module.weight
    if kind == "conv1d":
        value = value.t()
    with torch.no_grad():
        w.copy_(value.reshape(w.shape).to(w.dtype))


def _span(module: nn.Module, kind: str) -> int:
    """Columns of the weight matrix per input channel (kh * kw for a conv)."""
    if kind == "conv2d":
        return int(np.prod(module.kernel_size))
    return 1


def _columns(module: nn.Module, kind: str, channels: np.ndarray) -> np.ndarray:
    span = _span(module, kind)
    if span == 1:
        return np.asarray(channels, dtype=np.int64)
    return (np.asarray(channels, dtype=np.int64)[:, None] * span + np.arange(span)).reshape(-1)


def _rows(module: nn.Module, kind: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as a (samples, columns) design matrix."""
    x = x.detach()
    if kind == "conv2d":
        if x.ndim == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(
            x.float(),
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    if mask is not None and x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).double()


class _Stats:
    """Running sum, count and (for lstsq) second moment of a layer's input columns."""

    def __init__(self, gram: bool) -> None:
        self.gram = gram
        self.n = 0
        self.s: torch.Tensor | None = None
        self.a: torch.Tensor | None = None
        self.s_ref: torch.Tensor | None = None  # with reference rows (match="dense")
        self.c: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        if self.s is None:
            self.s = torch.zeros(rows.shape[1], dtype=torch.float64)
            if self.gram:
                self.a = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
        self.n += rows.shape[0]
        self.s += rows.sum(0)
        if self.gram:
            self.a += rows.t() @ rows
        if ref is not None:
            if self.s_ref is None:
                self.s_ref = torch.zeros_like(self.s)
                if self.gram:
                    self.c = torch.zeros_like(self.a)
            self.s_ref += ref.sum(0)
            if self.gram:
                self.c += ref.t() @ rows

    def ref_mean(self) -> torch.Tensor | None:
        return None if self.s_ref is None else self.s_ref / max(self.n, 1)

    def cross(self) -> torch.Tensor | None:
        """Covariance of reference rows (dim 0) with these rows (dim 1)."""
        if self.c is None:
            return None
        return self.c / max(self.n, 1) - torch.outer(self.ref_mean(), self.mean())

    def mean(self) -> torch.Tensor:
        return self.s / max(self.n, 1)

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        return self.a / max(self.n, 1) - torch.outer(mu, mu)


class _Stop(Exception):
    pass


def _mask_of(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, dict):
        m = inputs.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.ndim == 2:
            return m
    return None


def collect_stats(
    model: nn.Module,
    consumers: list[Consumer],
    calib: list[Any],
    gram: bool,
    stop: bool = False,
    progress: bool = False,
    desc: str = "layer inputs",
) -> dict[str, _Stats]:
    """Mean (and, with ``gram``, second moment) of every consumer's input on ``calib``; with
    ``stop`` each forward pass ends at the first consumer reached."""
    modules = dict(model.named_modules())
    stats = {c.module: _Stats(gram) for c in consumers}
    state: dict[str, Any] = {"mask": None}
    handles = []
    for c in consumers:

        def hook(module, args, kwargs, c=c):
            x = args[0] if args else next(iter(kwargs.values()))
            stats[c.module].add(_rows(module, c.kind, x, state["mask"]))
            if stop:
                raise _Stop

        handles.append(modules[c.module].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in tqdm(calib, desc=desc, disable=not progress, leave=False):
                inputs = batch_input(batch)
                state["mask"] = _mask_of(inputs)
                try:
                    call_model(model, inputs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return stats


# --------------------------------------------------------------------------- the refit


def refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    cov: torch.Tensor | None,
    removed: np.ndarray,
    *,
    method: str = "lstsq",
    damp: float = 0.01,
    target_mean: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (out, in) weight (removed columns zero) and bias of a layer that loses ``removed``
    input columns, from its inputs' mean and covariance (float64 in, float64 out).

    ``"bias"``: ``W[:, kept]`` unchanged, ``b + W[:, removed] @ mean[removed]``. ``"lstsq"``:
    ``W' = W cov[:, kept] (cov[kept, kept] + damp * mean(diag) * I)^-1`` and
    ``b' = b + W mean - W' mean[kept]``: the least-squares fit (with an unpenalised intercept)
    of the layer's dense output from its kept inputs. Without a bias, ``"bias"`` changes
    nothing and ``"lstsq"`` fits the kept columns alone (on uncentred second moments).

    With ``target_mean`` / ``cross`` (the mean of other inputs ``x_ref`` and their covariance
    with these, ``ref x inputs``) the target is ``W x_ref + b`` instead of ``W x + b``: the
    ``"dense"`` match, where ``x_ref`` are the dense model's inputs of this layer.

    Example:
        >>> import numpy as np, torch
        >>> w, b = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        >>> mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> refit(w, b, mean, None, np.array([2]), method="bias")[1].tolist()
        [3.0, 3.0]
    """
    n = weight.shape[1]
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[removed] = False
    kept = torch.as_tensor(np.nonzero(keep_mask)[0])
    new_w = torch.zeros_like(weight)
    ref_mean = mean if target_mean is None else target_mean
    if method == "bias":
        new_w[:, kept] = weight[:, kept]
        if bias is None:
            return new_w, None
        return new_w, bias + weight @ ref_mean - weight[:, kept] @ mean[kept]
    if cov is None:
        raise ValueError("lstsq needs the input covariance")
    if cross is None:
        cross = cov
    if bias is None:  # no intercept: fit on the uncentred second moments
        cov = cov + torch.outer(mean, mean)
        cross = cross + torch.outer(ref_mean, mean)
    h = cov[kept][:, kept].clone()
    diag = torch.diagonal(h)
    lam = damp * float(diag.mean()) if len(diag) else 0.0
    dead = diag <= 1e-12 * max(float(diag.max()) if len(diag) else 0.0, 1e-300)
    diag += lam
    diag[dead] += 1.0  # constant inputs: their column is set by the intercept, keep it finite
    rhs = weight @ cross[:, kept]  # (out, k)
    try:
        chol = torch.linalg.cholesky(h)
        w_k = torch.cholesky_solve(rhs.t(), chol).t()
    except torch.linalg.LinAlgError:
        w_k = torch.linalg.lstsq(h, rhs.t()).solution.t()
    new_w[:, kept] = w_k
    if bias is None:
        return new_w, None
    return new_w, bias + weight @ ref_mean - w_k @ mean[kept]


def reconstruct_(
    model: nn.Module,
    graph: Graph,
    groups: list[Group],
    removed: dict[int, np.ndarray],
    calib: list[Any],
    config: ReconstructConfig,
    *,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Refit, in place, the layers of ``model`` (dense shapes) that read the units about to be
    removed; their removed input columns become zero. Returns the changed tensors by parameter
    name (to repeat the change on another copy) and notes.

    Example:
        >>> import torch
        >>> from prunekit.graph.trace import trace
        >>> from prunekit.graph.groups import build_groups
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> graph = trace(net, torch.randn(1, 4)); groups = build_groups(graph)
        >>> import numpy as np
        >>> changed, notes = reconstruct_(net, graph, groups, {0: np.array([0, 1])},
        ...     [torch.randn(16, 4)], ReconstructConfig("bias"), progress=False)
        >>> sorted(changed), float(net[2].weight[:, :2].abs().sum())
        (['2.bias', '2.weight'], 0.0)
    """
    consumers, notes = find_consumers(model, graph, groups, removed)
    changed: dict[str, torch.Tensor] = {}
    if not consumers:
        return changed, notes
    modules = dict(model.named_modules())
    gram = config.method == "lstsq"
    plan = _block_plan(model, consumers) if config.sequential else None
    if plan is not None:
        try:
            _by_blocks(model, plan, calib, config, changed, notes, progress)
            return changed, notes
        except _NotBlockwise:
            pass  # the model does not call its first block as expected: whole-model passes
    if config.match == "dense":
        notes.append(
            "reconstruct: match='dense' needs the refit layers inside the model's repeated "
            "blocks, run block by block; matched each layer's unpruned output instead"
        )
    stages = [[c] for c in consumers] if config.sequential else [consumers]
    was = model.training
    model.eval()
    try:
        for i, stage in enumerate(
            tqdm(stages, desc=f"reconstruct ({config.method})", disable=not progress, leave=False)
        ):
            stats = collect_stats(
                model,
                stage,
                calib,
                gram,
                stop=config.sequential,
                progress=False,
                desc=f"layer {i + 1}/{len(stages)}",
            )
            for c in stage:
                module = modules[c.module]
                note = refit_consumer(module, c, stats[c.module], config)
                if note:
                    notes.append(note)
                    if "left as pruned" in note or "not finite" in note:
                        continue
                changed[c.module + ".weight"] = module.weight.detach().clone()
                if module.bias is not None:
                    changed[c.module + ".bias"] = module.bias.detach().clone()
    finally:
        model.train(was)
    return changed, notes


def zero_columns(module: nn.Module, consumer: Consumer) -> None:
    """Zero the consumer's removed input columns: the layer then computes what it will compute
    after surgery, without any repair."""
    with torch.no_grad():
        w = _matrix(module, consumer.kind)
        w[:, _columns(module, consumer.kind, consumer.removed)] = 0.0
        _set_matrix(module, consumer.kind, w)


class _NotBlockwise(Exception):
    pass


def _block_plan(
    model: nn.Module, consumers: list[Consumer]
) -> tuple[nn.ModuleList, list[list[Consumer]], list[str]] | None:
    """The model's repeated blocks, the consumers in each and each block's name prefix (None
    if some consumer lies outside the blocks)."""
    found = find_blocks(model)
    if found is None:
        return None
    name, blocks = found
    prefixes = [f"{name}.{local}." if name else f"{local}." for local in blocks._modules]
    per: list[list[Consumer]] = [[] for _ in blocks]
    for c in consumers:
        for i, prefix in enumerate(prefixes):
            if c.module.startswith(prefix):
                per[i].append(c)
                break
        else:
            return None
    return blocks, per, prefixes


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _by_blocks(
    model: nn.Module,
    plan: tuple[nn.ModuleList, list[list[Consumer]], list[str]],
    calib: list[Any],
    config: ReconstructConfig,
    changed: dict[str, torch.Tensor],
    notes: list[str],
    progress: bool,
) -> None:
    """Sequential refit block by block on cached block inputs (the one-shot runner's way)."""
    blocks, per, prefixes = plan
    modules = dict(model.named_modules())
    samples = [batch_input(b) for b in calib]
    masks = [_mask_of(s) for s in samples]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                inputs = capture_block_inputs(model, blocks, samples)
            except ValueError as exc:
                raise _NotBlockwise from exc
            last = max(i for i, cs in enumerate(per) if cs)
            bar = tqdm(
                total=sum(len(cs) for cs in per),
                desc=f"reconstruct ({config.method})",
                disable=not progress,
                leave=False,
            )
            dense_inputs = inputs if config.match == "dense" else None
            for i in range(last + 1):
                block = blocks[i]
                # match="dense": the block as it is now (dense weights) runs on the dense inputs
                ref = copy.deepcopy(block) if dense_inputs is not None else None
                ref_modules = dict(ref.named_modules()) if ref is not None else {}
                for c in per[i]:
                    stats = _Stats(config.method == "lstsq")
                    state: dict[str, Any] = {"mask": None, "ref": None}

                    def hook(module, args, kwargs, c=c, stats=stats, state=state):
                        x = args[0] if args else next(iter(kwargs.values()))
                        stats.add(_rows(module, c.kind, x, state["mask"]), state["ref"])
                        raise _Stop

                    def ref_hook(module, args, kwargs, c=c, state=state):
                        x = args[0] if args else next(iter(kwargs.values()))
                        state["ref"] = _rows(module, c.kind, x, state["mask"])
                        raise _Stop

                    handles = [modules[c.module].register_forward_pre_hook(hook, with_kwargs=True)]
                    if ref is not None:
                        local = c.module[len(prefixes[i]) :]
                        handles.append(
                            ref_modules[local].register_forward_pre_hook(ref_hook, with_kwargs=True)
                        )
                    try:
                        for j, ((args, kwargs), mask) in enumerate(zip(inputs, masks, strict=True)):
                            state["mask"] = mask
                            if ref is not None:
                                try:
                                    call_block(ref, *dense_inputs[j])
                                except _Stop:
                                    pass
                            try:
                                call_block(block, args, kwargs)
                            except _Stop:
                                pass
                    finally:
                        for h in handles:
                            h.remove()
                    note = refit_consumer(modules[c.module], c, stats, config)
                    bar.update(1)
                    if note:
                        notes.append(note)
                        if "left as pruned" in note:
                            continue
                    changed[c.module + ".weight"] = modules[c.module].weight.detach().clone()
                    if modules[c.module].bias is not None:
                        changed[c.module + ".bias"] = modules[c.module].bias.detach().clone()
                if i < last:
                    inputs = [
                        _with_hidden(args, kwargs, call_block(block, args, kwargs))
                        for args, kwargs in inputs
                    ]
                    if ref is not None:
                        dense_inputs = [
                            _with_hidden(args, kwargs, call_block(ref, args, kwargs))
                            for args, kwargs in dense_inputs
                        ]
                del ref
            bar.close()
    finally:
        model.train(was)


def refit_consumer(
    module: nn.Module, consumer: Consumer, stats: _Stats, config: ReconstructConfig
) -> str | None:
    """Refit one layer in place from its input statistics (removed columns become zero); a
    note when something was left undone."""
    if stats.n == 0:
        zero_columns(module, consumer)
        return (
            f"reconstruct: {consumer.module} was not called as a module on the calibration "
            "data (its weight is used directly): left as pruned"
        )
    w = _matrix(module, consumer.kind)
    b = module.bias.detach().double() if module.bias is not None else None
    new_w, new_b = refit(
        w,
        b,
        stats.mean(),
        stats.cov() if config.method == "lstsq" else None,
        _columns(module, consumer.kind, consumer.removed),
        method=config.method,
        damp=config.damp,
        target_mean=stats.ref_mean(),
        cross=stats.cross() if config.method == "lstsq" else None,
    )
    if not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all()):
        zero_columns(module, consumer)
        return f"reconstruct: the refit of {consumer.module} is not finite: left as pruned"
    with torch.no_grad():
        _set_matrix(module, consumer.kind, new_w)
        if new_b is not None:
            module.bias.copy_(new_b.to(module.bias.dtype))
    if new_b is None and config.method == "bias":
        return f"reconstruct: {consumer.module} has no bias: nothing to compensate"
    return None


def copy_changed(model: nn.Module, changed: dict[str, torch.Tensor]) -> None:
    """Write tensors returned by :func:`reconstruct_` into another copy of the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in changed.items():
            params[key].copy_(value)
