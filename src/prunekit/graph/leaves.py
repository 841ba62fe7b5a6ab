"""Modules the tracer treats as opaque leaves, with their channel rules.

* LSTM / GRU / RNN: one unit is hidden index j, in every gate, layer and direction at once (the
  module has a single ``hidden_size``), so all gates of unit j are removed together.
* ``nn.MultiheadAttention``: whole heads (q, k, v rows and out_proj columns of a head), its input
  columns and its output rows. After surgery the module becomes a
  :class:`~prunekit.graph.modules.PrunableMultiheadAttention`, which allows an inner width
  (heads x head_dim) different from the embedding width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.graph.tracer import HEAD, Tracer, iter_tensors

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def leaf_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.RNNBase):
        return "rnn"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    return None


def handle_leaf(
    tr: Tracer, module: nn.Module, name: str, args: tuple, kwargs: dict, output: Any
) -> None:
    if isinstance(module, nn.RNNBase):
        _rnn(tr, module, name, args, kwargs, output)
    elif isinstance(module, nn.MultiheadAttention):
        _mha(tr, module, name, args, kwargs, output)


def _key(tr: Tracer, tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    return tr.sources.get(id(tensor))


def _rnn(tr: Tracer, m: nn.RNNBase, name: str, args: tuple, kwargs: dict, output: Any) -> None:
    x = args[0] if args else kwargs.get("input")
    if isinstance(x, nn.utils.rnn.PackedSequence):
        if tr.info_of(x.data) is not None:
            tr.error(type(m).__name__, "packed sequences with prunable channels are not supported")
        x = x.data
    if getattr(m, "proj_size", 0):
        tr.error(type(m).__name__, "LSTM with proj_size is not supported")
    xi = tr.info_of(x)
    if xi is not None and xi.dim != x.ndim - 1:
        tr.error(type(m).__name__, "prunable channels must be the feature (last) dim")
    gates = GATES[m.mode]
    dirs = 2 if m.bidirectional else 1
    hid = tr.new(m.hidden_size)
    steps = x.numel() // x.shape[-1]
    for layer in range(m.num_layers):
        for sfx in ("", "_reverse")[:dirs]:
            w_ih = _key(tr, getattr(m, f"weight_ih_l{layer}{sfx}"))
            w_hh = _key(tr, getattr(m, f"weight_hh_l{layer}{sfx}"))
            tr.couple(w_ih, 0, np.tile(hid, gates))
            tr.producers.add((w_ih, 0))
            tr.couple(w_hh, 0, np.tile(hid, gates))
            tr.couple(w_hh, 1, hid)
            if m.bias:
                for b in ("bias_ih", "bias_hh"):
                    tr.couple(_key(tr, getattr(m, f"{b}_l{layer}{sfx}")), 0, np.tile(hid, gates))
            if layer == 0:
                if xi is not None:
                    tr.couple(w_ih, 1, xi.labels)
                    tr.mac("rnn", steps * gates, hid, xi.labels)
                else:
                    tr.mac("rnn", steps * gates * x.shape[-1], hid)
            else:
                tr.couple(w_ih, 1, np.tile(hid, dirs))
                tr.mac("rnn", steps * gates * dirs, hid, hid)
            tr.mac("rnn", steps * gates, hid, hid)
    if xi is not None:
        tr.consumers.append((name, -1, xi.labels))
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    for h in iter_tensors(hx):
        info = tr.info_of(h)
        if info is not None and info.dim == h.ndim - 1:
            tr.union(info.labels, hid)
        else:
            tr.pin(hid)  # a given initial state has a fixed size
    outs = list(iter_tensors(output))
    if isinstance(output, tuple) and isinstance(output[0], nn.utils.rnn.PackedSequence):
        tr.set_info(output[0].data, -1, np.tile(hid, dirs))
        outs = list(iter_tensors(output[1:]))
    else:
        tr.set_info(outs[0], -1, np.tile(hid, dirs))
        outs = outs[1:]
    for h in outs:
        tr.set_info(h, -1, hid)


def _mha(
    tr: Tracer, m: nn.MultiheadAttention, name: str, args: tuple, kwargs: dict, output: Any
) -> None:
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
    if getattr(m, "add_zero_attn", False):
        tr.error("MultiheadAttention", "add_zero_attn=True is not supported")
    heads, head_dim = m.num_heads, m.head_dim
    head_atoms = tr.new(heads)
    tr.flag(head_atoms, HEAD)
    inner = np.repeat(head_atoms, head_dim)
    infos = [tr.info_of(t) for t in (q, k, v)]
    for t, info in zip((q, k, v), infos, strict=True):
        if info is not None and info.dim != t.ndim - 1:
            tr.error("MultiheadAttention", "prunable channels must be the embedding (last) dim")
    if m._qkv_same_embed_dim:
        w = _key(tr, m.in_proj_weight)
        tr.couple(w, 0, np.tile(inner, 3))
        tr.producers.add((w, 0))
        present = [i.labels for i in infos if i is not None]
        if present:
            cols = present[0]
            for other in present[1:]:
                tr.union(cols, other)
            if len(present) < 3:
                tr.pin(cols)
            tr.couple(w, 1, cols)
    else:
        for info, pname in zip(
            infos, ("q_proj_weight", "k_proj_weight", "v_proj_weight"), strict=True
        ):
            key = _key(tr, getattr(m, pname))
            tr.couple(key, 0, inner)
            tr.producers.add((key, 0))
            if info is not None:
                tr.couple(key, 1, info.labels)
    if m.in_proj_bias is not None:
        tr.couple(_key(tr, m.in_proj_bias), 0, np.tile(inner, 3))
    for extra in ("bias_k", "bias_v"):
        t = getattr(m, extra, None)
        if t is not None:
            tr.couple(_key(tr, t), 2, inner)
    out_w = _key(tr, m.out_proj.weight)
    tr.couple(out_w, 1, inner)
    out_atoms = tr.produce([(out_w, (0, 1))], 0, m.out_proj.weight.shape[0])
    if m.out_proj.bias is not None:
        tr.couple(_key(tr, m.out_proj.bias), 0, out_atoms)
    for info in infos:
        if info is not None:
            tr.consumers.append((name, -1, info.labels))
    attn, weights = (output[0], output[1]) if isinstance(output, tuple) else (output, None)
    tr.set_info(attn, -1, out_atoms)
    if isinstance(weights, torch.Tensor) and weights.ndim >= 3 and weights.shape[-3] == heads:
        tr.set_info(weights, weights.ndim - 3, head_atoms)
    # MACs: projections, the two attention products, the output projection
    batch_first = m.batch_first and q.ndim == 3
    lq = q.shape[1] if batch_first else q.shape[0]
    ls = k.shape[1] if batch_first else k.shape[0]
    n = q.shape[0] if batch_first else (q.shape[1] if q.ndim == 3 else 1)

    def cols_of(info, t):
        return (info.labels, 1) if info is not None else (None, t.shape[-1])

    for t, info, length in ((q, infos[0], lq), (k, infos[1], ls), (v, infos[2], ls)):
        lab, const = cols_of(info, t)
        tr.mac("mha", n * length * const * head_dim, lab, head_atoms)
    tr.mac("mha", 2 * n * lq * ls * head_dim, head_atoms)
    tr.mac("mha", n * lq * head_dim, head_atoms, out_atoms)
