"""How channel labels flow through each torch operation (the tracer's rule book).

Every rule gets the tracer, the canonical op name, the call's arguments and its result. Rules
propagate the labelled dim of activations, join index sets that must stay aligned, tie parameter
dims to atoms, and record MACs. An operation without a rule that touches a labelled tensor makes
the tracer stop with :class:`~prunekit.graph.tracer.UnsupportedOperationError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from prunekit.graph.tracer import HEAD, INEXACT, KV, HeadSplit, LiteralUse, Tracer, iter_tensors

Rule = Callable[[Tracer, str, tuple, dict, Any], None]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def lookup(name: str) -> tuple[Rule | None, str]:
    """The rule for an op name (``add``, ``__radd__``, ``add_``, ``attr:T``) and its canonical name."""
    if name in RULES:
        return RULES[name], name
    if name == "__rmatmul__":
        return RULES["rmatmul"], "rmatmul"
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core in RULES:
            return RULES[core], core
        if core[:1] in ("r", "i") and core[1:] in RULES:
            return RULES[core[1:]], core[1:]
        return None, core
    if name.endswith("_") and name[:-1] in RULES:
        return RULES[name[:-1]], name[:-1]
    return None, name


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tensors(out: Any) -> list[torch.Tensor]:
    return list(iter_tensors(out))


# --------------------------------------------------------------------------- element-wise


ELEMENTWISE = (
    "add sub rsub mul multiply div divide true_divide floor_divide remainder fmod pow float_power "
    "maximum minimum fmax fmin where masked_fill eq ne lt le gt ge greater less equal not_equal "
    "logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor "
    "bitwise_not and or xor atan2 hypot lerp addcmul addcdiv copysign xlogy copy "
    "relu relu6 gelu silu sigmoid tanh hardtanh hardswish hardsigmoid leaky_relu elu selu celu "
    "mish softplus softsign logsigmoid tanhshrink threshold hardshrink softshrink rrelu "
    "neg negative abs absolute exp exp2 log log2 log10 log1p expm1 sqrt rsqrt square sin cos tan "
    "asin acos atan sinh cosh erf erfc erfinv sign sgn reciprocal clamp clip clamp_min clamp_max "
    "floor ceil round trunc frac nan_to_num isnan isinf isfinite isneginf isposinf sigmoid_ "
    "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout fill zero "
    "nonzero_static positive"
).split()


def elementwise_operands(
    tr: Tracer, op: str, operands: list[torch.Tensor], out: torch.Tensor
) -> None:
    """Broadcasting element-wise op: labelled dims must line up and are joined."""
    n = out.ndim
    labelled = []
    for t in operands:
        info = tr.info_of(t)
        if info is not None:
            labelled.append((t, info, info.dim + n - t.ndim))
    if not labelled:
        sources = []
        for t in operands:
            found = tr.sources_of(t)
            if not found:
                continue
            off = n - t.ndim
            for key, dims in found:
                mapped = tuple(
                    dims[i - off] if i >= off and t.shape[i - off] == out.shape[i] else None
                    for i in range(n)
                )
                sources.append((key, mapped))
        if sources and all(out is not t for t in operands):
            tr.set_sources(out, sources)
        return
    dims = {d for _, _, d in labelled}
    if len(dims) > 1:
        tr.error(op, "it combines tensors whose channel dimensions do not line up")
    od = dims.pop()
    size = out.shape[od]
    base = None
    for t, info, _ in labelled:
        if t.shape[info.dim] == size:
            if base is None:
                base = info.labels
            else:
                tr.union(base, info.labels, op)
        else:
            tr.pin(info.labels)  # a single channel broadcast over many
    if base is None:
        tr.clear_info(out)
        return
    for t in operands:
        if tr.info_of(t) is None:
            attach_fixed(tr, op, t, od, n, base)
    tr.set_info(out, od, base)


def attach_fixed(tr: Tracer, op: str, t: torch.Tensor, od: int, n: int, labels: np.ndarray) -> None:
    """An unlabelled operand meets labelled channels at output dim ``od``: slice it or pin."""
    k = od - (n - t.ndim)
    if k < 0 or t.shape[k] == 1:
        return  # broadcast: no constraint
    sources = tr.sources_of(t)
    if sources:
        tr.couple_sources(sources, k, labels, op)
    else:
        tr.pin(labels)
        tr.note(
            f"{op} in {tr.module or 'the top-level forward'}: a fixed-size tensor meets prunable "
            "channels, which are therefore kept"
        )


@rule(*ELEMENTWISE)
def elementwise(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    outs = _tensors(out)
    if len(outs) != 1:
        if any(tr.info_of(t) is not None for t in iter_tensors(args)):
            tr.error(op, "an element-wise op with several results")
        return
    operands = [t for t in iter_tensors((args, kwargs))]
    elementwise_operands(tr, op, operands, outs[0])


PASSTHROUGH = (
    "contiguous clone detach to float double half bfloat16 type type_as cpu cuda "
    "requires_grad_ zeros_like ones_like empty_like full_like rand_like randn_like attr:data "
    "as_strided_scatter coalesce pin_memory"
).split()


@rule(*PASSTHROUGH)
def passthrough(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0] if args else next(iter_tensors(kwargs), None)
    info = tr.info_of(x)
    sources = tr.sources_of(x)
    for o in _tensors(out):
        if tuple(o.shape) != tuple(x.shape):
            if info is not None:
                tr.error(op, "it changed the shape of a tensor with prunable channels")
            continue
        if info is not None:
            tr.set_info(o, info.dim, info.labels)
        elif sources and o is not x:
            tr.set_sources(o, sources)


@rule(
    "softmax", "log_softmax", "normalize", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"
)
def along_dim(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    default = 1 if op == "normalize" else None
    dim = _arg(args, kwargs, 2 if op == "normalize" else 1, "dim", default)
    if isinstance(dim, int) and dim % x.ndim == info.dim and op not in ("cumsum",):
        tr.flag(info.labels, INEXACT)
    for o in _tensors(out):
        if tuple(o.shape) == tuple(x.shape):
            tr.set_info(o, info.dim, info.labels)


@rule("prelu")
def prelu(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    info = tr.info_of(x)
    if info is None:
        return
    cdim = 1 if x.ndim > 1 else 0
    if w.numel() > 1:
        if info.dim != cdim:
            tr.error(op, "PReLU weights are per channel of dim 1")
        sources = tr.sources_of(w)
        if sources:
            tr.couple_sources(sources, 0, info.labels, op)
        else:
            tr.pin(info.labels)
    tr.set_info(out, info.dim, info.labels)


@rule("glu")
def glu(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    dim = _arg(args, kwargs, 1, "dim", -1) % x.ndim
    if dim == info.dim:
        half = len(info.labels) // 2
        tr.union(info.labels[:half], info.labels[half:], op)
        tr.set_info(out, dim, info.labels[:half])
    else:
        tr.set_info(out, info.dim, info.labels)


# --------------------------------------------------------------------------- reductions

REDUCTIONS = (
    "sum nansum mean nanmean amax amin max min std var norm logsumexp prod all any argmax argmin "
    "count_nonzero median nanmedian mode var_mean std_mean aminmax vector_norm"
).split()
EXACT_REDUCTIONS = {"sum", "nansum", "count_nonzero", "any", "all"}


def _reduced_dims(op: str, args: tuple, kwargs: dict, ndim: int) -> set[int]:
    if "dim" in kwargs or "axis" in kwargs:
        dim = kwargs.get("dim", kwargs.get("axis"))
    else:
        pos = 2 if op in ("norm", "vector_norm") else 1
        dim = args[pos] if len(args) > pos else None
        if isinstance(dim, bool) or not isinstance(dim, (int, tuple, list, torch.Size)):
            dim = None
    if dim is None:
        return set(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return set(range(ndim))
    return {d % ndim for d in dims} if ndim else set()


@rule(*REDUCTIONS)
def reduction(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    if op in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return elementwise(tr, op, args, kwargs, out)
    info = tr.info_of(x)
    if info is None:
        return
    dims = _reduced_dims(op, args, kwargs, x.ndim)
    if info.dim in dims:
        if op not in EXACT_REDUCTIONS:
            tr.flag(info.labels, INEXACT)
        return
    for o in _tensors(out):
        if o.ndim == x.ndim:
            tr.set_info(o, info.dim, info.labels)
        elif o.ndim == x.ndim - len(dims):
            tr.set_info(o, info.dim - sum(1 for d in dims if d < info.dim), info.labels)


# --------------------------------------------------------------------------- views


def _shape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims of ``a`` and ``b`` with equal products (the structure of a reshape)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ga: list[int] = []
        gb: list[int] = []
        pa = pb = 1
        if i < len(a):
            ga.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            gb.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gb.append(j)
                pb *= b[j]
                j += 1
            else:
                raise ValueError(f"cannot match shapes {a} and {b}")
        groups.append((ga, gb))
    return groups


def _requested_shape(op: str, args: tuple, kwargs: dict, out: torch.Tensor) -> list[int] | None:
    """The sizes the caller asked for (``-1`` where inferred), aligned with the output dims."""
    if op in ("view", "reshape"):
        shape = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size") or ())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = shape[0]
        shape = list(shape)
        return shape if len(shape) == out.ndim else None
    if op == "unflatten":
        dim = _arg(args, kwargs, 1, "dim") % args[0].ndim
        sizes = list(_arg(args, kwargs, 2, "sizes"))
        return [-1] * dim + sizes + [-1] * (out.ndim - dim - len(sizes))
    return None


@rule(
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "ravel",
)
def reshape(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    if not isinstance(out, torch.Tensor):
        return
    if op == "view" and len(args) == 2 and isinstance(args[1], torch.dtype):
        if tr.info_of(x) is not None:
            tr.error(op, "a dtype view of a tensor with prunable channels")
        return
    info = tr.info_of(x)
    a, b = tuple(x.shape), tuple(out.shape)
    groups = _shape_groups(a, b)
    if info is None:
        sources = tr.sources_of(x)
        if sources:
            mapping: list[int | None] = [None] * len(b)
            for ga, gb in groups:
                real_a = [k for k in ga if a[k] != 1]
                real_b = [k for k in gb if b[k] != 1]
                if len(real_a) == 1 and len(real_b) == 1:
                    mapping[real_b[0]] = real_a[0]
                elif real_a or real_b:
                    return  # a real reshape of a parameter: its result is untracked
            tr.set_sources(
                out,
                [
                    (key, tuple(dims[m] if m is not None else None for m in mapping))
                    for key, dims in sources
                ],
            )
        return
    requested = _requested_shape(op, args, kwargs, out)
    ga, gb = next((a, b) for a, b in groups if info.dim in a)
    if not gb:
        tr.pin(info.labels)
        return
    sizes_a = [a[k] for k in ga]
    pos = ga.index(info.dim)
    lab = info.labels.reshape([-1 if k == pos else 1 for k in range(len(ga))])
    flat = np.broadcast_to(lab, sizes_a).reshape(-1)
    mat = flat.reshape([b[k] for k in gb])
    roots = tr.uf.find(mat)
    chosen = None
    for idx, k in enumerate(gb):
        if b[k] == 1:
            continue
        m = np.moveaxis(roots, idx, 0).reshape(b[k], -1)
        if (m == m[:, :1]).all():
            chosen = idx
            break
    if chosen is None and all(b[k] == 1 for k in gb):
        chosen = 0
    if chosen is not None:
        labels = np.moveaxis(mat, chosen, 0).reshape(b[gb[chosen]], -1)[:, 0]
    else:
        # one index set split in two (heads x head_dim): whole rows become units
        inferred = [idx for idx, k in enumerate(gb) if requested is not None and requested[k] == -1]
        if len(inferred) == 1 and b[gb[inferred[0]]] > 1:
            chosen = inferred[0]
        else:
            chosen = next(idx for idx, k in enumerate(gb) if b[k] > 1)
        m = np.moveaxis(mat, chosen, 0).reshape(b[gb[chosen]], -1)
        tr.union(np.repeat(m[:, :1], m.shape[1] - 1, axis=1), m[:, 1:], op)
        labels = m[:, 0].copy()
        tr.flag(m, HEAD)
        tr.head_splits.append(HeadSplit(tr.module, labels, int(m.shape[1])))
    k = gb[chosen]
    if requested is not None and requested[k] != -1 and len(labels) > 1:
        tr.literals.append(LiteralUse(tr.module, f"{op}{tuple(requested)}", labels))
    tr.set_info(out, k, labels)


def _permutation(op: str, args: tuple, kwargs: dict, n: int) -> list[int]:
    perm = list(range(n))
    if op == "permute":
        dims = args[1:] if len(args) > 1 else kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        return [d % n for d in dims]
    if op in ("transpose", "swapaxes", "swapdims"):
        d0 = _arg(args, kwargs, 1, "dim0") % n
        d1 = _arg(args, kwargs, 2, "dim1") % n
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if op in ("t", "attr:H") and n == 2:
        return [1, 0]
    if op == "attr:T":
        return perm[::-1]
    if op in ("attr:mT", "attr:mH", "adjoint"):
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if op in ("movedim", "moveaxis"):
        src = _arg(args, kwargs, 1, "source")
        dst = _arg(args, kwargs, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [s % n for s in src]
        dst = [d % n for d in dst]
        rest = [d for d in range(n) if d not in src]
        result: list[int | None] = [None] * n
        for s, d in zip(src, dst, strict=True):
            result[d] = s
        it = iter(rest)
        return [r if r is not None else next(it) for r in result]
    return perm


@rule(
    "permute",
    "transpose",
    "swapaxes",
    "swapdims",
    "t",
    "attr:T",
    "attr:mT",
    "attr:H",
    "attr:mH",
    "adjoint",
    "movedim",
    "moveaxis",
)
def permute(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    perm = _permutation(op, args, kwargs, x.ndim)
    info = tr.info_of(x)
    if info is not None:
        tr.set_info(out, perm.index(info.dim), info.labels)
        return
    sources = tr.sources_of(x)
    if sources:
        tr.set_sources(out, [(key, tuple(dims[p] for p in perm)) for key, dims in sources])


@rule("expand", "expand_as", "broadcast_to")
def expand(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    off = out.ndim - x.ndim
    info = tr.info_of(x)
    if info is not None:
        nd = info.dim + off
        if x.shape[info.dim] == out.shape[nd]:
            tr.set_info(out, nd, info.labels)
        else:
            tr.pin(info.labels)
        return
    sources = tr.sources_of(x)
    if sources:
        tr.set_sources(
            out,
            [
                (
                    key,
                    (None,) * off
                    + tuple(
                        d if x.shape[i] == out.shape[i + off] else None for i, d in enumerate(dims)
                    ),
                )
                for key, dims in sources
            ],
        )


@rule("repeat", "tile")
def repeat(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    off = out.ndim - x.ndim
    nd = info.dim + off
    times = out.shape[nd] // max(x.shape[info.dim], 1)
    tr.set_info(out, nd, np.tile(info.labels, times))


@rule("repeat_interleave")
def repeat_interleave(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    repeats = _arg(args, kwargs, 1, "repeats")
    dim = _arg(args, kwargs, 2, "dim")
    if dim is None:
        tr.pin(info.labels)
        return
    dim %= x.ndim
    if dim != info.dim:
        tr.set_info(out, info.dim, info.labels)
    elif isinstance(repeats, int):
        tr.set_info(out, dim, np.repeat(info.labels, repeats))
    else:
        tr.pin(info.labels)
        tr.set_info(out, dim, np.repeat(info.labels, repeats.cpu().numpy()))


@rule("flip")
def flip(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    dims = _arg(args, kwargs, 1, "dims")
    dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    tr.set_info(out, info.dim, info.labels[::-1].copy() if info.dim in dims else info.labels)


@rule("roll", "sort", "topk", "argsort", "kthvalue", "msort")
def position_dependent(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Ops whose result depends on channel positions: channels are kept if they act on them."""
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    dim = _arg(args, kwargs, 2 if op in ("roll", "topk", "kthvalue") else 1, "dim", -1)
    if op == "roll" and dim is None:
        dim = info.dim
    dims = {d % x.ndim for d in ([dim] if isinstance(dim, int) else dim)}
    if info.dim in dims:
        tr.pin(info.labels)
    for o in _tensors(out):
        if o.ndim == x.ndim and o.shape[info.dim] == x.shape[info.dim]:
            tr.set_info(o, info.dim, info.labels)


@rule(
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "bincount",
    "histc",
    "masked_select",
    "take",
    "gather",
    "index_select_all",
)
def pin_inputs(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    """The result no longer has channels; the channels it read are kept."""
    for t in iter_tensors((args, kwargs)):
        info = tr.info_of(t)
        if info is not None:
            tr.pin(info.labels)


@rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "attr:shape", "size")
def fresh(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    """New tensors with sizes the caller gives: nothing flows."""


# --------------------------------------------------------------------------- concat / split


@rule("cat", "concat", "concatenate")
def cat(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    seq = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", kwargs.get("axis", 0))
    n = out.ndim
    dim %= n
    seq = [t for t in seq if not (t.ndim == 1 and t.numel() == 0 and n > 1)]
    infos = [tr.info_of(t) for t in seq]
    labelled = [i for i in infos if i is not None]
    if not labelled:
        return
    if len({i.dim for i in labelled}) > 1:
        tr.error(op, "it concatenates tensors whose channel dims differ")
    ld = labelled[0].dim
    if ld == dim:
        parts = []
        for t, info in zip(seq, infos, strict=True):
            if info is not None:
                parts.append(info.labels)
            else:
                parts.append(np.zeros(t.shape[dim], dtype=np.int64))  # fixed channels: pinned
        tr.set_info(out, dim, np.concatenate(parts))
        return
    base = labelled[0].labels
    for info in labelled[1:]:
        tr.union(base, info.labels, op)
    for t, info in zip(seq, infos, strict=True):
        if info is None:
            attach_fixed(tr, op, t, ld, n, base)
    tr.set_info(out, ld, base)


@rule("stack")
def stack(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    seq = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0) % out.ndim
    infos = [tr.info_of(t) for t in seq]
    labelled = [i for i in infos if i is not None]
    if not labelled:
        return
    if len({i.dim for i in labelled}) > 1:
        tr.error(op, "it stacks tensors whose channel dims differ")
    ld = labelled[0].dim
    base = labelled[0].labels
    for info in labelled[1:]:
        tr.union(base, info.labels, op)
    od = ld + 1 if ld >= dim else ld
    for t, info in zip(seq, infos, strict=True):
        if info is None and t.ndim > ld and t.shape[ld] != 1:
            sources = tr.sources_of(t)
            if sources:
                tr.couple_sources(sources, ld, base, op)
            else:
                tr.pin(base)
    tr.set_info(out, od, base)


@rule("split", "split_with_sizes", "chunk", "tensor_split", "unbind", "hsplit", "vsplit")
def split(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    pieces = _tensors(out)
    if op == "unbind":
        dim = _arg(args, kwargs, 1, "dim", 0) % x.ndim
        if dim == info.dim:
            tr.pin(info.labels)
            return
        nd = info.dim - (1 if dim < info.dim else 0)
        for p in pieces:
            tr.set_info(p, nd, info.labels)
        return
    if op == "hsplit":
        dim = 1 if x.ndim > 1 else 0
    elif op == "vsplit":
        dim = 0
    else:
        dim = _arg(args, kwargs, 2, "dim", 0) % x.ndim
    if dim != info.dim:
        for p in pieces:
            tr.set_info(p, info.dim, info.labels)
        return
    slices, start = [], 0
    for p in pieces:
        slices.append(info.labels[start : start + p.shape[dim]])
        start += p.shape[dim]
    sizes = {len(s) for s in slices}
    equal_by_rule = op == "chunk" or (
        op == "split" and isinstance(_arg(args, kwargs, 1, "split_size"), int)
    )
    if equal_by_rule and len(slices) > 1:
        if len(sizes) == 1:
            for s in slices[1:]:
                tr.union(slices[0], s, op)  # pieces must stay equal: index i of each goes together
        else:
            tr.pin(info.labels)
    if op != "chunk":
        for s in slices:
            tr.literals.append(LiteralUse(tr.module, op, s))
    for p, s in zip(pieces, slices, strict=True):
        tr.set_info(p, dim, s)


@rule("narrow", "select", "index_select")
def narrow(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    dim = _arg(args, kwargs, 1, "dim") % x.ndim
    if op == "select":
        if dim == info.dim:
            tr.pin(info.labels)
            return
        tr.set_info(out, info.dim - (1 if dim < info.dim else 0), info.labels)
        return
    if dim != info.dim:
        tr.set_info(out, info.dim, info.labels)
        return
    tr.pin(info.labels)
    if op == "narrow":
        start = int(_arg(args, kwargs, 2, "start"))
        tr.set_info(out, dim, info.labels[start : start + out.shape[dim]])
    else:
        index = _arg(args, kwargs, 2, "index")
        tr.set_info(out, dim, info.labels[index.cpu().numpy()])


def probe_index(
    shape: tuple[int, ...], dim: int, index: Any
) -> tuple[int | None, np.ndarray | None, tuple]:
    """Where dim ``dim`` of a tensor goes under ``tensor[index]``: (output dim, positions, shape)."""
    n = shape[dim]
    view = [1] * len(shape)
    view[dim] = n
    probe = torch.arange(n).view(view).expand(shape)
    try:
        result = probe[index]
    except Exception:  # pragma: no cover - the real indexing succeeded, so this should too
        return None, None, ()
    if result.ndim == 0 or result.numel() == 0:
        return None, None, tuple(result.shape)
    varying = []
    for k in range(result.ndim):
        first = result.select(k, 0).unsqueeze(k)
        if not bool((result == first).all()):
            varying.append(k)
    if len(varying) != 1:
        if not varying and n == 1:
            for k in range(result.ndim):
                if result.shape[k] == 1:
                    return k, np.zeros(1, dtype=np.int64), tuple(result.shape)
        return None, None, tuple(result.shape)
    k = varying[0]
    idx = [0] * result.ndim
    idx[k] = slice(None)
    return k, result[tuple(idx)].numpy().astype(np.int64), tuple(result.shape)


@rule("getitem")
def getitem(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, index = args[0], args[1]
    if not isinstance(out, torch.Tensor):
        return
    info = tr.info_of(x)
    if info is not None:
        if isinstance(index, torch.Tensor) and tr.info_of(index) is not None:
            tr.pin(tr.info_of(index).labels)
        k, positions, _ = probe_index(tuple(x.shape), info.dim, index)
        if k is None:
            tr.pin(info.labels)
            return
        if len(positions) == len(info.labels) and np.array_equal(
            positions, np.arange(len(info.labels))
        ):
            tr.set_info(out, k, info.labels)
        else:
            tr.pin(info.labels)  # indices into the channels would shift after pruning
            tr.set_info(out, k, info.labels[positions])
        return
    sources = tr.sources_of(x)
    if sources:
        mapping: list[int | None] = [None] * out.ndim
        for d in range(x.ndim):
            if x.shape[d] == 1:
                continue
            k, positions, _ = probe_index(tuple(x.shape), d, index)
            if k is not None and np.array_equal(positions, np.arange(x.shape[d])):
                mapping[k] = d
        if any(m is not None for m in mapping):
            tr.set_sources(
                out,
                [
                    (key, tuple(dims[m] if m is not None else None for m in mapping))
                    for key, dims in sources
                ],
            )


@rule("setitem")
def setitem(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, index, value = args[0], args[1], args[2]
    xi = tr.info_of(x)
    vi = tr.info_of(value)
    if xi is None:
        if vi is not None:
            tr.pin(vi.labels)  # written into a tensor of fixed size
        return
    k, positions, region = probe_index(tuple(x.shape), xi.dim, index)
    full = positions is not None and np.array_equal(positions, np.arange(len(xi.labels)))
    if not full:
        tr.pin(xi.labels)
        if vi is not None:
            tr.pin(vi.labels)
        return
    if vi is not None:
        vd = vi.dim + len(region) - value.ndim
        if vd != k:
            tr.error(op, "it writes channels into a different dim")
        tr.union(xi.labels, vi.labels, op)
    elif isinstance(value, torch.Tensor):
        attach_fixed(tr, op, value, k, len(region), xi.labels)


@rule("iter")
def iterate(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    info = tr.info_of(args[0])
    if info is not None and info.dim == 0:
        tr.error(op, "iterating over the channel dim")
    if info is not None:
        tr.error(op, "iterating over a tensor with prunable channels (use unbind)")


# --------------------------------------------------------------------------- layers


@rule("linear")
def linear(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    w = _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    xi = tr.info_of(x)
    ws = tr.sources_of(w)
    n_out, n_in = (w.shape[0], w.shape[1]) if w.ndim == 2 else (1, w.shape[0])
    last = x.ndim - 1
    rows = x.numel() // max(n_in, 1)
    in_lab = None
    if xi is not None and xi.dim == last:
        in_lab = xi.labels
        if ws:
            tr.couple_sources(ws, w.ndim - 1, in_lab, op)
        else:
            tr.pin(in_lab)
        tr.consumer(-1, in_lab)
    if xi is not None and xi.dim != last:
        tr.set_info(out, xi.dim, xi.labels)
        tr.mac(op, rows / x.shape[xi.dim] * n_in * n_out, xi.labels)
        return
    out_lab = None
    if ws and w.ndim == 2:
        out_lab = tr.produce(ws, 0, n_out, op)
        if b is not None:
            bs = tr.sources_of(b)
            if bs:
                tr.couple_sources(bs, 0, out_lab, op)
            else:
                tr.pin(out_lab)
        tr.set_info(out, -1, out_lab)
    tr.mac(
        op,
        rows * (1 if in_lab is not None else n_in) * (1 if out_lab is not None else n_out),
        in_lab,
        out_lab,
    )


@rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    transposed = op.startswith("conv_transpose")
    xi, ws = tr.info_of(x), tr.sources_of(w)
    cdim = 0 if x.ndim == w.ndim - 1 else 1
    batch = 1 if cdim == 0 else x.shape[0]
    if xi is not None and xi.dim != cdim:
        tr.error(op, f"prunable channels on dim {xi.dim}, but convolutions mix dim {cdim}")
    c_in = x.shape[cdim]
    kernel = math.prod(w.shape[2:])
    if transposed:
        in_w, out_w, c_out = 0, 1, w.shape[1] * groups
        const = batch * math.prod(x.shape[cdim + 1 :]) * kernel
    else:
        in_w, out_w, c_out = 1, 0, w.shape[0]
        const = batch * math.prod(out.shape[cdim + 1 :]) * kernel
    in_lab = xi.labels if xi is not None else None
    out_lab = None
    if groups == 1:
        if in_lab is not None:
            if ws:
                tr.couple_sources(ws, in_w, in_lab, op)
            else:
                tr.pin(in_lab)
            tr.consumer(cdim, in_lab)
        if ws:
            out_lab = tr.produce(ws, out_w, c_out, op)
        tr.mac(
            op,
            const * (1 if in_lab is not None else c_in) * (1 if out_lab is not None else c_out),
            in_lab,
            out_lab,
        )
    else:
        ipg, opg = c_in // groups, c_out // groups
        lab = in_lab if in_lab is not None else np.zeros(c_in, dtype=np.int64)
        rows = lab.reshape(groups, ipg)
        if ipg > 1:
            tr.union(np.repeat(rows[:, :1], ipg - 1, axis=1), rows[:, 1:], op)
        out_lab = np.repeat(rows[:, 0], opg)
        if ws:
            if transposed:
                tr.couple_sources(ws, 0, lab, op)
            else:
                tr.couple_sources(ws, 0, out_lab, op)
            for key, dims in ws:
                tr.producers.add((key, dims[0]))
        else:
            tr.pin(lab)
        if in_lab is not None:
            tr.consumer(cdim, in_lab)
        per = opg if transposed else ipg
        tr.mac(op, const * per, out_lab if not transposed else lab)
    if out_lab is None:
        return
    if b is not None:
        bs = tr.sources_of(b)
        if bs:
            tr.couple_sources(bs, 0, out_lab, op)
        else:
            tr.pin(out_lab)
    tr.set_info(out, cdim, out_lab)


def _per_channel_vectors(tr: Tracer, op: str, labels: np.ndarray, tensors: list) -> None:
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        sources = tr.sources_of(t)
        if sources:
            tr.couple_sources(sources, 0, labels, op)
        else:
            tr.pin(labels)


@rule("batch_norm", "instance_norm")
def batch_norm(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    cdim = 1 if x.ndim > 1 else 0
    if info.dim != cdim:
        tr.error(
            op, f"prunable channels on dim {info.dim}, but {op} normalises per channel of dim 1"
        )
    vectors = [
        _arg(args, kwargs, i, n)
        for i, n in enumerate(("input", "running_mean", "running_var", "weight", "bias"))
    ][1:]
    _per_channel_vectors(tr, op, info.labels, vectors)
    if op == "instance_norm":
        tr.note(f"instance_norm in {tr.module}: normalised per channel")
    tr.set_info(out, info.dim, info.labels)


@rule("layer_norm", "rms_norm")
def layer_norm(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    shape = list(_arg(args, kwargs, 1, "normalized_shape"))
    if info.dim < x.ndim - len(shape):
        tr.set_info(out, info.dim, info.labels)
        return
    if len(shape) != 1 or info.dim != x.ndim - 1:
        tr.error(op, "it normalises prunable channels together with other dims")
    weight = _arg(args, kwargs, 2, "weight")
    bias = _arg(args, kwargs, 3, "bias") if op == "layer_norm" else None
    _per_channel_vectors(tr, op, info.labels, [weight, bias])
    tr.flag(info.labels, INEXACT)
    if tr.module:
        tr.attr_follow.append((tr.module, "normalized_shape", info.labels))
    tr.set_info(out, info.dim, info.labels)


@rule("group_norm")
def group_norm(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    if info.dim != 1:
        tr.error(op, "GroupNorm groups the channels of dim 1")
    groups = int(_arg(args, kwargs, 1, "num_groups"))
    per = x.shape[1] // groups
    rows = info.labels.reshape(groups, per)
    if per > 1:
        tr.union(np.repeat(rows[:, :1], per - 1, axis=1), rows[:, 1:], op)
    _per_channel_vectors(
        tr, op, info.labels, [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")]
    )
    tr.group_norms.append((tr.module, info.labels, per))
    tr.set_info(out, 1, info.labels)


@rule("embedding")
def embedding(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    idx, w = args[0], _arg(args, kwargs, 1, "weight")
    if tr.info_of(idx) is not None:
        tr.pin(tr.info_of(idx).labels)
    ws = tr.sources_of(w)
    if ws:
        tr.set_info(out, -1, tr.produce(ws, 1, w.shape[1], op))


def couple_batch(tr: Tracer, existing: np.ndarray, new: np.ndarray, op: str) -> np.ndarray:
    """Join two labellings of the same batch (head) dim; grouped-query heads are special."""
    if tr.gqa == "q":
        ra, rb = tr.uf.find(existing), tr.uf.find(new)
        dup_a = len(np.unique(ra)) < len(ra)
        dup_b = len(np.unique(rb)) < len(rb)
        if dup_a != dup_b:
            q, kv = (new, existing) if dup_a else (existing, new)
            tr.gqa_links.append((q.copy(), kv.copy()))
            tr.flag(kv, KV)
            return q
    tr.union(existing, new, op)
    return existing


def _matmul(tr: Tracer, op: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    ai, bi = tr.info_of(a), tr.info_of(b)
    asrc, bsrc = tr.sources_of(a), tr.sources_of(b)
    if a.ndim < 2 or b.ndim < 2:
        if ai is not None or bi is not None:
            tr.error(op, "matrix-vector products on prunable channels")
        return
    na, nb, no = a.ndim, b.ndim, out.ndim
    contraction = []
    if ai is not None and ai.dim == na - 1:
        contraction.append(ai.labels)
    if bi is not None and bi.dim == nb - 2:
        contraction.append(bi.labels)
    k_lab = None
    if contraction:
        k_lab = contraction[0]
        for other in contraction[1:]:
            tr.union(k_lab, other, op)
        if ai is None or ai.dim != na - 1:
            if asrc:
                tr.couple_sources(asrc, na - 1, k_lab, op)
            else:
                tr.pin(k_lab)
        if bi is None or bi.dim != nb - 2:
            if bsrc:
                tr.couple_sources(bsrc, nb - 2, k_lab, op)
                tr.consumer(-1, k_lab)
            else:
                tr.pin(k_lab)
    result: tuple[int, np.ndarray] | None = None
    if ai is not None and ai.dim <= na - 2:
        result = (ai.dim + no - na, ai.labels)
    if bi is not None and bi.dim != nb - 2:
        od = no - 1 if bi.dim == nb - 1 else bi.dim + no - nb
        if result is None:
            result = (od, bi.labels)
        elif result[0] == od:
            result = (od, couple_batch(tr, result[1], bi.labels, op))
        else:
            tr.error(op, "the product would carry prunable channels on two dims")
    if (
        result is None
        and bsrc
        and bi is None
        and nb == 2
        and all(d[1] is not None for _, d in bsrc)
    ):
        result = (no - 1, tr.produce(bsrc, 1, b.shape[1], op))
    if result is not None and result[0] < no - 2:
        # a labelled batch dim: the other operand's matching dim must follow it
        for t, info in ((a, ai), (b, bi)):
            if info is None or info.dim + no - t.ndim != result[0]:
                attach_fixed(tr, op, t, result[0], no, result[1])
    const = math.prod(out.shape[:-2]) * a.shape[-2] * a.shape[-1] * b.shape[-1]
    labels = []
    if k_lab is not None:
        const /= a.shape[-1]
        labels.append(k_lab)
    if result is not None:
        const /= out.shape[result[0]]
        labels.append(result[1])
        tr.set_info(out, result[0], result[1])
    tr.mac(op, const, *labels)


@rule("matmul", "mm", "bmm")
def matmul(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    _matmul(tr, op, args[0], _arg(args, kwargs, 1, "other", kwargs.get("mat2")), out)


@rule("rmatmul")
def rmatmul(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    _matmul(tr, "matmul", args[1], args[0], out)


@rule("addmm", "baddbmm", "addbmm")
def addmm(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    bias = _arg(args, kwargs, 0, "input")
    _matmul(
        tr,
        op,
        _arg(args, kwargs, 1, "mat1", kwargs.get("batch1")),
        _arg(args, kwargs, 2, "mat2", kwargs.get("batch2")),
        out,
    )
    info = tr.info_of(out)
    bi = tr.info_of(bias)
    if info is None:
        if bi is not None:
            tr.error(op, "the added term has prunable channels but the product has none")
        return
    if bi is not None:
        if bi.dim + out.ndim - bias.ndim != info.dim:
            tr.error(op, "the added term's channels do not line up with the product's")
        tr.union(info.labels, bi.labels, op)
    elif isinstance(bias, torch.Tensor):
        attach_fixed(tr, op, bias, info.dim, out.ndim, info.labels)


@rule(
    "einsum", "bilinear", "tensordot", "kron", "outer", "inner", "dot", "vdot", "mv", "chain_matmul"
)
def unsupported_product(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    if any(tr.info_of(t) is not None for t in iter_tensors((args, kwargs))):
        tr.error(op, f"{op} is not supported on prunable channels (use matmul / linear)")


@rule("scaled_dot_product_attention")
def sdpa(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    q = _arg(args, kwargs, 0, "query")
    k = _arg(args, kwargs, 1, "key")
    v = _arg(args, kwargs, 2, "value")
    mask = _arg(args, kwargs, 3, "attn_mask")
    qi, ki, vi = tr.info_of(q), tr.info_of(k), tr.info_of(v)
    if qi is None and ki is None and vi is None:
        return
    for t, info in ((q, qi), (k, ki), (v, vi)):
        if info is not None and info.dim not in (t.ndim - 3, t.ndim - 1):
            tr.error(op, "prunable channels on the sequence dim of attention")
    head = any(
        info is not None and info.dim == t.ndim - 3 for t, info in ((q, qi), (k, ki), (v, vi))
    )
    batch = math.prod(q.shape[:-3]) if q.ndim > 3 else 1
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    if head:
        Hq, Hk = q.shape[-3], k.shape[-3]

        def heads(t, info, n):
            if info is not None and info.dim == t.ndim - 3:
                return info.labels
            return np.zeros(n, dtype=np.int64)  # fixed heads: pinned

        kv = heads(k, ki, Hk)
        tr.union(kv, heads(v, vi, v.shape[-3]), op)
        rep = Hq // max(Hk, 1)
        kv_rep = np.repeat(kv, rep) if rep > 1 else kv
        qlab = couple_batch(tr, heads(q, qi, Hq), kv_rep, op)
        if isinstance(mask, torch.Tensor) and mask.ndim >= 3:
            attach_fixed(tr, op, mask, q.ndim - 3, q.ndim, qlab)
        tr.set_info(out, out.ndim - 3, qlab)
        tr.mac(op, batch * L * S * (E + Ev), qlab)
        return
    Hq = q.shape[-3] if q.ndim >= 3 else 1
    labs = [info.labels for info in (qi, ki) if info is not None]
    if labs:
        for other in labs[1:]:
            tr.union(labs[0], other, op)
        if qi is None or ki is None:
            tr.pin(labs[0])
    if vi is not None:
        tr.set_info(out, out.ndim - 1, vi.labels)
    tr.mac(op, batch * Hq * L * S * (E + Ev))


# --------------------------------------------------------------------------- spatial

SPATIAL = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
    "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3,
    "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3,
    "adaptive_max_pool1d_with_indices": 1, "adaptive_max_pool2d_with_indices": 2,
    "adaptive_max_pool3d_with_indices": 3, "lp_pool1d": 1, "lp_pool2d": 2, "lp_pool3d": 3,
    "fractional_max_pool2d": 2, "fractional_max_pool3d": 3, "max_unpool1d": 1, "max_unpool2d": 2,
    "max_unpool3d": 3,
}  # fmt: skip


@rule(
    *SPATIAL,
    "interpolate",
    "upsample",
    "upsample_nearest",
    "upsample_bilinear",
    "pad",
    "grid_sample",
)
def spatial(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    if op == "pad":
        pad = list(_arg(args, kwargs, 1, "pad"))
        touched = {x.ndim - 1 - i // 2 for i, p in enumerate(pad) if p}
        if info.dim in touched:
            # zero channels added on either side (ResNet "option A" shortcuts): fixed, pinned
            i = 2 * (x.ndim - 1 - info.dim)
            left, right = int(pad[i]), int(pad[i + 1])
            mode = _arg(args, kwargs, 2, "mode", "constant")
            if left < 0 or right < 0 or mode != "constant":
                tr.error(op, f"{mode} padding / cropping of the channel dim")
            labels = np.concatenate(
                [np.zeros(left, dtype=np.int64), info.labels, np.zeros(right, dtype=np.int64)]
            )
            tr.set_info(out, info.dim, labels)
            return
    else:
        k = SPATIAL.get(op, x.ndim - 2)
        if info.dim >= x.ndim - k:
            tr.error(op, "it acts on the channel dim")
    for o in _tensors(out):
        if o.ndim == x.ndim and o.shape[info.dim] == x.shape[info.dim]:
            tr.set_info(o, info.dim, info.labels)


@rule("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle")
def pixel_shuffle(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    info = tr.info_of(x)
    if info is None:
        return
    cdim = x.ndim - 3
    if info.dim != cdim:
        tr.set_info(out, info.dim if info.dim < cdim else info.dim, info.labels)
        return
    if op == "pixel_shuffle":
        r2 = x.shape[cdim] // out.shape[cdim]
        rows = info.labels.reshape(-1, r2)
        if r2 > 1:
            tr.union(np.repeat(rows[:, :1], r2 - 1, axis=1), rows[:, 1:], op)
        tr.set_info(out, cdim, rows[:, 0].copy())
    elif op == "pixel_unshuffle":
        r2 = out.shape[cdim] // x.shape[cdim]
        tr.set_info(out, cdim, np.repeat(info.labels, r2))
    else:
        tr.pin(info.labels)
        tr.set_info(out, cdim, info.labels)


@rule("cosine_similarity", "pairwise_distance")
def cosine_similarity(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    a, b = args[0], args[1]
    ai, bi = tr.info_of(a), tr.info_of(b)
    dim = _arg(args, kwargs, 2, "dim", 1 if op == "cosine_similarity" else -1)
    for t, info in ((a, ai), (b, bi)):
        if info is not None and info.dim == dim % t.ndim:
            tr.flag(info.labels, INEXACT)
    if ai is not None and bi is not None:
        tr.union(ai.labels, bi.labels, op)
    elif ai is not None or bi is not None:
        tr.pin((ai or bi).labels)


LOSSES = (
    "cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy "
    "binary_cross_entropy_with_logits kl_div cosine_embedding_loss margin_ranking_loss "
    "triplet_margin_loss ctc_loss poisson_nll_loss gaussian_nll_loss soft_margin_loss "
    "multilabel_soft_margin_loss multi_margin_loss hinge_embedding_loss"
).split()


@rule(*LOSSES)
def loss(tr: Tracer, op: str, args: tuple, kwargs: dict, out: Any) -> None:
    """A loss reads the model's output dims: they are kept."""
    pin_inputs(tr, op, args, kwargs, out)
