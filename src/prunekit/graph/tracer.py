"""Trace a model with example inputs and record which parameter slices must be removed together.

How it works: the model runs once, eagerly, under a :class:`torch.overrides.TorchFunctionMode`
that sees every torch call (``F.linear``, ``torch.cat``, ``Tensor.view``, ``+``, ...) with its
real arguments and results, plus forward hooks that keep the stack of running modules (for error
messages) and handle a few modules as opaque leaves (LSTM / GRU / RNN, ``nn.MultiheadAttention``).

Every prunable index of a tensor dimension is an *atom*. A layer's output rows are fresh atoms;
the atoms flow with the activations (through views, permutes, concatenations, splits, ...); an
operation that requires two index sets to stay aligned (a residual add, the input columns of
the next layer, a BatchNorm's vectors) joins them in a union-find. After the run, each class of
atoms is one removable *unit*: every parameter slice labelled with one of its atoms goes at once.
Atoms that meet the model's inputs or outputs, or a fixed-size tensor the tracer cannot slice,
join atom 0 (the pin) and are never removed.

An activation carries labels on at most one dimension (its "channel" dimension). Anything the
tracer cannot follow on a labelled tensor raises :class:`UnsupportedOperationError` naming the
operation and the module, before any weight is touched.

Why this and not torch.fx / torch.export / the autograd graph: the model runs for real, so
data-dependent Python control flow, Hugging Face models, tuple / dict / ModelOutput results and
keyword inputs work as they do for the user; every call comes with concrete shapes and the exact
arguments (cat dims, split sizes, the ``-1`` in a view), which the autograd graph does not keep;
and calls stay at the level the user wrote (``F.scaled_dot_product_attention``, not its aten
decomposition), with the module that made them known for error messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from prunekit.graph.unionfind import UnionFind

# per-atom flags
HEAD = 1  # the atom belongs to an attention head (whole heads are units)
INEXACT = 2  # removing the unit changes values even when its weights are zero (norm statistics)
KV = 4  # key / value group of a grouped-query attention (GQA) layer


class UnsupportedOperationError(RuntimeError):
    """The tracer met an operation on prunable channels that it cannot follow."""

    def __init__(self, op: str, module: str, detail: str) -> None:
        self.op, self.module, self.detail = op, module, detail
        where = f"module {module!r}" if module else "the model's top-level forward"
        super().__init__(
            f"structured pruning cannot follow {op!r} in {where}: {detail}. Nothing was changed. "
            "Leave this module's channels alone with ignore=[...], or rewrite the operation with "
            "supported ones (see docs/structured.md)."
        )


@dataclass
class Info:
    """The labelled (channel) dimension of an activation and the atom of each of its indices."""

    dim: int
    labels: np.ndarray


@dataclass
class MacTerm:
    """MACs of one multiply op: ``const * prod(kept count of each label array)``."""

    module: str
    op: str
    const: float
    labels: list[np.ndarray]


@dataclass
class LiteralUse:
    """An operation that hard-codes the size of a labelled dim (a view, a split)."""

    module: str
    op: str
    labels: np.ndarray


@dataclass
class HeadSplit:
    """A view that split a labelled dim into (heads, head_dim) inside ``module``."""

    module: str
    labels: np.ndarray  # one atom per head
    head_dim: int


@dataclass
class Graph:
    """What a trace found: atom classes, parameter labels and the records surgery needs."""

    uf: UnionFind
    flags: np.ndarray
    param_labels: dict[str, dict[int, np.ndarray]]
    producers: set[tuple[str, int]]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # key -> ("param" | "buffer", shape)
    macs: list[MacTerm]
    literals: list[LiteralUse]
    head_splits: list[HeadSplit]
    gqa_links: list[tuple[np.ndarray, np.ndarray]]
    attr_follow: list[tuple[str, str, np.ndarray]]
    group_norms: list[tuple[str, np.ndarray, int]]
    notes: list[str]
    leaves: dict[str, str]
    module_types: dict[str, str]
    consumers: list[tuple[str, int, np.ndarray]]  # (module, input dim, labels) for activations
    calls: dict[str, list[tuple[tuple[int, ...] | None, tuple[int, ...] | None]]]
    gqa: str = "kv"

    def module_of(self, key: str) -> str:
        return key.rpartition(".")[0]


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of tuples, lists, dicts and dataclass-like model outputs."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_tensors(item)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs: a tensor, a tuple / list of positional args, or a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "attr:" + str(getattr(owner, "__name__", "?"))
    return name


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tracer.suppress == 0:
            self.tracer.handle(func, args, kwargs, out)
        return out


class Tracer:
    """Runs the model once and builds a :class:`Graph`. Use :func:`prunekit.graph.trace.trace`,
    which hands it the op rules (``graph/ops.py``) and the leaf modules' rules
    (``graph/leaves.py``); they import this module, never the other way round."""

    def __init__(
        self,
        model: nn.Module,
        gqa: str = "kv",
        *,
        lookup: Callable[[str], tuple[Callable | None, str]],
        leaf_kind: Callable[[nn.Module], str | None],
        handle_leaf: Callable[..., None],
    ) -> None:
        self.model = model
        self.gqa = gqa
        self.lookup = lookup  # op name -> (rule, canonical name); the rules live in graph/ops.py
        self.leaf_kind = leaf_kind  # opaque modules and their rules live in graph/leaves.py
        self.handle_leaf = handle_leaf
        self.uf = UnionFind()
        self._flags = np.zeros(1024, dtype=np.int64)
        self.info: dict[int, tuple[torch.Tensor, Info]] = {}
        self.derived: dict[int, tuple[torch.Tensor, list[tuple[str, tuple[int | None, ...]]]]] = {}
        self.param_labels: dict[str, dict[int, np.ndarray]] = {}
        self.producers: set[tuple[str, int]] = set()
        self.macs: list[MacTerm] = []
        self.literals: list[LiteralUse] = []
        self.head_splits: list[HeadSplit] = []
        self.gqa_links: list[tuple[np.ndarray, np.ndarray]] = []
        self.attr_follow: list[tuple[str, str, np.ndarray]] = []
        self.group_norms: list[tuple[str, np.ndarray, int]] = []
        self.notes: list[str] = []
        self.consumers: list[tuple[str, int, np.ndarray]] = []
        self.leaves: dict[str, str] = {}
        self.calls: dict[str, list] = {}
        self.suppress = 0
        self.stack: list[str] = []
        self.sources: dict[int, str] = {}
        self.tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, p in model.named_parameters():
            self.sources[id(p)] = name
            self.tensors[name] = ("param", tuple(p.shape))
        for name, b in model.named_buffers():
            if id(b) not in self.sources:
                self.sources[id(b)] = name
                self.tensors[name] = ("buffer", tuple(b.shape))
        self.module_names = {}
        for name, module in model.named_modules():
            self.module_names.setdefault(id(module), name)
        self.module_types = {
            name: f"{type(m).__module__}.{type(m).__qualname__}"
            for name, m in model.named_modules()
        }

    # ------------------------------------------------------------------ atoms and labels

    @property
    def module(self) -> str:
        return self.stack[-1] if self.stack else ""

    def new(self, n: int) -> np.ndarray:
        atoms = self.uf.new(n)
        if self.uf.size > len(self._flags):
            grown = np.zeros(max(2 * len(self._flags), self.uf.size), dtype=np.int64)
            grown[: len(self._flags)] = self._flags
            self._flags = grown
        return atoms

    def flag(self, labels: np.ndarray, bit: int) -> None:
        self._flags[np.asarray(labels, dtype=np.int64)] |= bit

    def union(self, a: np.ndarray, b: np.ndarray, op: str = "") -> None:
        if np.shape(a) != np.shape(b):
            self.error(op or "?", f"index sets of sizes {np.size(a)} and {np.size(b)} must align")
        self.uf.union(a, b)

    def pin(self, labels: np.ndarray) -> None:
        self.uf.pin(labels)

    def error(self, op: str, detail: str) -> None:
        raise UnsupportedOperationError(op, self.module, detail)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def info_of(self, t: Any) -> Info | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.info.get(id(t))
        if entry is None or entry[0] is not t:
            return None
        return entry[1]

    def set_info(self, t: torch.Tensor, dim: int, labels: np.ndarray) -> None:
        dim = dim % t.ndim if t.ndim else 0
        if t.ndim == 0 or t.shape[dim] != len(labels):
            self.error(
                "?", f"internal: labels of size {len(labels)} for dim {dim} of {tuple(t.shape)}"
            )
        self.info[id(t)] = (t, Info(dim, np.asarray(labels, dtype=np.int64)))

    def clear_info(self, t: torch.Tensor) -> None:
        self.info.pop(id(t), None)

    def sources_of(self, t: Any) -> list[tuple[str, tuple[int | None, ...]]] | None:
        """Parameters / buffers a tensor is (a view or elementwise function of), with dim maps."""
        if not isinstance(t, torch.Tensor):
            return None
        key = self.sources.get(id(t))
        if key is not None and tuple(t.shape) == self.tensors[key][1]:
            return [(key, tuple(range(t.ndim)))]
        entry = self.derived.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        return None

    def set_sources(self, t: torch.Tensor, sources: list) -> None:
        if sources:
            self.derived[id(t)] = (t, sources)

    def couple(self, key: str, dim: int, labels: np.ndarray, op: str = "") -> None:
        """Tie index i of dim ``dim`` of parameter ``key`` to atom ``labels[i]``."""
        shape = self.tensors[key][1]
        if shape[dim] != len(labels):
            self.error(op, f"{key} dim {dim} has size {shape[dim]}, labels {len(labels)}")
        dims = self.param_labels.setdefault(key, {})
        if dim in dims:
            self.uf.union(dims[dim], labels)
        else:
            dims[dim] = np.array(labels, dtype=np.int64)

    def couple_sources(self, sources, tensor_dim: int, labels: np.ndarray, op: str = "") -> None:
        for key, dims in sources:
            if dims[tensor_dim] is not None:
                self.couple(key, dims[tensor_dim], labels, op)
            else:  # a broadcast dim of the source: a fixed-size use
                self.pin(labels)

    def produce(self, sources, tensor_dim: int, n: int, op: str = "") -> np.ndarray:
        """Atoms for the output indices of a weight (existing ones if it was seen before)."""
        labels = None
        for key, dims in sources:
            d = dims[tensor_dim]
            if d is not None and d in self.param_labels.get(key, {}):
                labels = self.param_labels[key][d]
                break
        if labels is None:
            labels = self.new(n)
        for key, dims in sources:
            d = dims[tensor_dim]
            if d is not None:
                self.producers.add((key, d))
        self.couple_sources(sources, tensor_dim, labels, op)
        return labels

    def mac(self, op: str, const: float, *labels: np.ndarray | None) -> None:
        self.macs.append(
            MacTerm(self.module, op, float(const), [lab for lab in labels if lab is not None])
        )

    def consumer(self, dim: int, labels: np.ndarray) -> None:
        """Record that the running module reads these labelled channels (activation scores)."""
        if self.module:
            self.consumers.append((self.module, dim, labels))

    # ------------------------------------------------------------------ dispatch

    def any_tracked(self, args: Any, kwargs: Any) -> bool:
        for t in iter_tensors((args, kwargs)):
            if self.info_of(t) is not None or self.sources_of(t) is not None:
                return True
        return False

    def handle(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        name = op_name(func)
        if not self.any_tracked(args, kwargs):
            return
        if not any(True for _ in iter_tensors(out)):
            return  # sizes, dtypes, booleans: nothing flows on
        handler, canonical = self.lookup(name)
        labelled = any(self.info_of(t) is not None for t in iter_tensors((args, kwargs)))
        if handler is None:
            if labelled:
                self.error(name, "this operation is not supported on prunable channels")
            return  # an unknown function of parameters only: its result is untracked
        handler(self, canonical, args, kwargs, out)

    # ------------------------------------------------------------------ module hooks

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = self.module_names.get(id(module), "?")
        self.stack.append(name)
        kind = self.leaf_kind(module)
        if kind is not None:
            if self.suppress == 0:
                self.leaves[name] = kind
            self.suppress += 1

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = self.stack.pop() if self.stack else ""
        first_in = next(iter_tensors((args, kwargs)), None)
        first_out = next(iter_tensors(output), None)
        self.calls.setdefault(name, []).append(
            (
                tuple(first_in.shape) if first_in is not None else None,
                tuple(first_out.shape) if first_out is not None else None,
            )
        )
        if self.leaf_kind(module) is not None:
            self.suppress -= 1
            if self.suppress == 0:
                self.stack.append(name)
                try:
                    self.handle_leaf(self, module, name, args, kwargs, output)
                finally:
                    self.stack.pop()

    def run(self, inputs: Any, pin_outputs: bool = True) -> Graph:
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            handles.append(
                module.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
            )
        training = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad(), _Mode(self):
                outputs = call_model(self.model, inputs)
        finally:
            for h in handles:
                h.remove()
            for m, flag in training.items():
                m.train(flag)
        if pin_outputs:
            for t in iter_tensors(_plain(outputs)):
                info = self.info_of(t)
                if info is not None:
                    self.pin(info.labels)
        self.flags_final = self._flags[: self.uf.size]
        return Graph(
            uf=self.uf,
            flags=self._flags[: self.uf.size].copy(),
            param_labels=self.param_labels,
            producers=self.producers,
            tensors=self.tensors,
            macs=self.macs,
            literals=self.literals,
            head_splits=self.head_splits,
            gqa_links=self.gqa_links,
            attr_follow=self.attr_follow,
            group_norms=self.group_norms,
            notes=self.notes,
            leaves=self.leaves,
            module_types=self.module_types,
            consumers=self.consumers,
            calls=self.calls,
            gqa=self.gqa,
        )


def _plain(outputs: Any) -> Any:
    """Model outputs as nested tuples / dicts of tensors (Hugging Face ModelOutput is a dict)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return {k: _plain(v) for k, v in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return [_plain(v) for v in outputs]
    return None  # caches and other objects are not model outputs whose shape is fixed
