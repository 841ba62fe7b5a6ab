"""Count parameters and multiply-accumulates (MACs) per layer, by running the model once.

MACs cover the products that dominate inference: convolutions (and transposed ones), linear
layers (and Hugging Face ``Conv1D``), matrix products (``matmul``, ``bmm``, ``addmm``, ...,
attention's QK^T and AV), ``scaled_dot_product_attention``, ``einsum``, ``nn.MultiheadAttention``
and LSTM / GRU / RNN gates. Element-wise ops, norms and pooling are not counted. MACs are
attributed to the innermost module running when the product happens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from prunekit.graph.leaves import GATES
from prunekit.graph.trace import call_model, iter_tensors, op_name
from prunekit.runtime.accelerated import accelerated_as_dense, accelerated_layers


@dataclass
class LayerCount:
    """One module: its own parameters and the MACs it ran."""

    name: str
    type: str
    params: int
    macs: int


@dataclass
class CountReport:
    """Per-layer and total parameters and MACs. ``print(report)`` shows a table."""

    layers: list[LayerCount]
    params: int
    macs: int
    inputs: str = ""
    by_op: dict[str, int] = field(default_factory=dict)

    def layer(self, name: str) -> LayerCount:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "inputs": self.inputs,
            "layers": [vars(r).copy() for r in self.layers],
        }

    def __str__(self) -> str:
        header = ("layer", "type", "params", "MACs")
        rows = [(r.name or "<root>", r.type, f"{r.params:,}", f"{r.macs:,}") for r in self.layers]
        total = ("total", "", f"{self.params:,}", f"{self.macs:,}")
        widths = [max(len(row[i]) for row in [header, *rows, total]) for i in range(4)]

        def line(row):
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )

        rule = "  ".join("-" * w for w in widths)
        title = "prunekit count" + (f" ({self.inputs})" if self.inputs else "")
        return "\n".join([title, line(header), rule, *map(line, rows), rule, line(total)])

    def __repr__(self) -> str:
        return f"CountReport(params={self.params}, macs={self.macs}, layers={len(self.layers)})"


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _matmul_macs(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> int:
    if a.ndim == 1 and b.ndim == 1:
        return a.shape[0]
    k = a.shape[-1]
    return out.numel() * k


def _einsum_macs(equation: str, operands: list[torch.Tensor]) -> int:
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for spec, t in zip(inputs, operands, strict=False):
        if "..." in spec:
            return 0
        for letter, size in zip(spec, t.shape, strict=False):
            sizes[letter] = size
    return math.prod(sizes.values()) if len(operands) > 1 else 0


def op_macs(name: str, args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of one torch call (0 for ops that are not counted)."""
    core = name.strip("_").removeprefix("r") if name in ("__matmul__", "__rmatmul__") else name
    if core in ("linear",):
        x, w = args[0], _arg(args, kwargs, 1, "weight")
        return (x.numel() // max(w.shape[-1], 1)) * w.numel()
    if core.startswith("conv_transpose"):
        x, w = args[0], _arg(args, kwargs, 1, "weight")
        return x.numel() * w.shape[1] * math.prod(w.shape[2:])
    if core in ("conv1d", "conv2d", "conv3d"):
        w = _arg(args, kwargs, 1, "weight")
        return out.numel() * math.prod(w.shape[1:])
    if core in ("matmul", "mm", "bmm"):
        a, b = (
            (args[1], args[0])
            if name == "__rmatmul__"
            else (args[0], _arg(args, kwargs, 1, "other", kwargs.get("mat2")))
        )
        return _matmul_macs(a, b, out)
    if core in ("addmm", "baddbmm", "addbmm"):
        a = _arg(args, kwargs, 1, "mat1", kwargs.get("batch1"))
        b = _arg(args, kwargs, 2, "mat2", kwargs.get("batch2"))
        if core == "addbmm":
            return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return _matmul_macs(a, b, out)
    if core in ("mv", "dot", "vdot", "inner", "outer"):
        return max(out.numel(), 1) * (
            args[0].shape[-1] if core in ("mv", "dot", "vdot", "inner") else 1
        )
    if core == "scaled_dot_product_attention":
        q, k, v = args[0], _arg(args, kwargs, 1, "key"), _arg(args, kwargs, 2, "value")
        return q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if core == "einsum":
        ops = args[1:] if len(args) > 1 else []
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return _einsum_macs(args[0], list(ops))
    return 0


def rnn_macs(m: nn.RNNBase, x: torch.Tensor) -> int:
    if isinstance(x, nn.utils.rnn.PackedSequence):
        x = x.data
    steps = x.numel() // x.shape[-1]
    gates, dirs, h = GATES[m.mode], 2 if m.bidirectional else 1, m.hidden_size
    total = 0
    for layer in range(m.num_layers):
        inp = x.shape[-1] if layer == 0 else dirs * h
        total += dirs * steps * gates * h * (inp + h)
    return total


def mha_macs(m: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    batch_first = m.batch_first and q.ndim == 3
    lq = q.shape[1] if batch_first else q.shape[0]
    ls = k.shape[1] if batch_first else k.shape[0]
    n = q.shape[0] if batch_first else (q.shape[1] if q.ndim == 3 else 1)
    inner = m.num_heads * m.head_dim
    proj = n * (lq * q.shape[-1] + ls * k.shape[-1] + ls * v.shape[-1]) * inner
    attn = 2 * n * lq * ls * inner
    out = n * lq * inner * m.out_proj.weight.shape[0]
    return proj + attn + out


class _CountMode(TorchFunctionMode):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.counter.suppress == 0:
            name = op_name(func)
            macs = op_macs(name, args, kwargs, out) if isinstance(out, torch.Tensor) else 0
            if macs:
                self.counter.add(name, macs)
        return out


class _Counter:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[str] = []
        self.suppress = 0
        self.macs: dict[str, int] = defaultdict(int)
        self.by_op: dict[str, int] = defaultdict(int)
        self.names = {}
        for name, module in model.named_modules():
            self.names.setdefault(id(module), name)

    def add(self, op: str, macs: int) -> None:
        self.macs[self.stack[-1] if self.stack else ""] += int(macs)
        self.by_op[op.strip("_")] += int(macs)

    def pre(self, module, args, kwargs):
        self.stack.append(self.names.get(id(module), "?"))
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            self.suppress += 1

    def post(self, module, args, kwargs, output):
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            self.suppress -= 1
            if self.suppress == 0:
                tensors = list(iter_tensors((args, kwargs)))
                if isinstance(module, nn.RNNBase):
                    x = args[0] if args else kwargs.get("input")
                    self.add("rnn", rnn_macs(module, x))
                else:
                    q, k, v = (
                        args[i] if len(args) > i else kwargs.get(n)
                        for i, n in enumerate(("query", "key", "value"))
                    )
                    self.add("mha", mha_macs(module, q, k, v))
                del tensors
        if self.stack:
            self.stack.pop()


def count(model: nn.Module, example_inputs: Any) -> CountReport:
    """Parameters and MACs per layer and in total, for one forward pass on ``example_inputs``
    (a tensor, a tuple of positional inputs, or a dict of keyword inputs).

    Example:
        >>> import torch, prunekit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> report = prunekit.count(net, torch.randn(3, 8))
        >>> report.params, report.macs  # 3 rows x (8x4 + 4x2)
        (46, 120)

    Layers swapped in by ``prunekit.accelerate`` are counted as the dense layers they encode.
    """
    if accelerated_layers(model):
        with accelerated_as_dense(model):
            return count(model, example_inputs)
    counter = _Counter(model)
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(counter.pre, with_kwargs=True))
        handles.append(
            module.register_forward_hook(counter.post, with_kwargs=True, always_call=True)
        )
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), _CountMode(counter):
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.train(flag)
    rows = []
    seen: set[int] = set()
    total_params = 0
    for name, module in model.named_modules():
        own = 0
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                own += p.numel()
        total_params += own
        macs = counter.macs.get(name, 0)
        if own or macs:
            rows.append(LayerCount(name, type(module).__name__, own, macs))
    shapes = [tuple(t.shape) for t in iter_tensors(example_inputs)]
    described = ", ".join("x".join(map(str, s)) for s in shapes)
    return CountReport(
        rows, total_params, sum(counter.macs.values()), described, dict(counter.by_op)
    )
