"""SparseGPT: prune one layer and update its surviving weights to compensate.

From "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (Frantar &
Alistarh, 2023). For a layer with weight W (out x in) and calibration inputs X, the layer
Hessian is H = 2 X X^T. Columns are processed left to right; removing weight w_q costs
w_q^2 / [H^-1]_qq (the optimal-brain-surgeon saliency), and the error it leaves is spread over
the not-yet-processed columns of the same row through the upper Cholesky factor of H^-1.
Columns are handled in blocks with lazy batched updates of the rest of the matrix, and the mask
is chosen adaptively per block (unstructured) or per group of M columns (N:M). Inside a block
the same laziness is applied once more: each sub-block of 16 columns is swept column by column
with rank-one updates of the sub-block only, then passes its errors to the rest of the block in
one matrix product. The arithmetic is the paper's; only the order of the additions changes
(weights agree with the plain column loop to ~1e-6), and the sweep reads and writes far less
memory, which is what bounds it on wide layers.

Numerical safety: inputs that never fire (zero Hessian diagonal) are treated as dead and their
weights pruned first; the Hessian is damped by ``damp`` times its mean diagonal, and when the
Cholesky factorisation still fails the damping grows tenfold (up to four times) with a warning.
If even that fails, or the result is not finite, :class:`SparseGPTFailure` is raised so the
caller can fall back to another method; NaN weights are never returned.

Determinism: on the CPU, LAPACK's Cholesky factorisation and inverse (MKL's ``potrf`` /
``potri``) round differently with different thread counts (1 vs 2 threads: factors off by up to
6e-7, then weights by 1e-6 and a few mask entries flipped). The factorisation therefore runs on
one thread of the calling Python thread (``torch.set_num_threads(1)``, restored afterwards);
everything else (matrix products, element-wise updates, top-k selection) gives the same bits for
any thread count. Masks and weights are then identical whatever ``torch.get_num_threads()`` is.
The cost is the factorisation's own speed-up from threads: it is O(in^3) once per layer, against
O(out * in^2) for the column sweep, about a tenth of the layer's time on one thread.
``deterministic=False`` lets LAPACK use every thread.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from prunekit.scope import count_to_remove, lowest_k


class SparseGPTFailure(RuntimeError):
    """The Hessian of a layer could not be factorised, or the update was not finite."""


@dataclass
class SparseGPTResult:
    weight: torch.Tensor
    """The updated weight (out x in), pruned entries exactly zero."""
    keep: torch.Tensor
    """Bool keep-mask (out x in)."""
    damp: float
    """The damping fraction that was finally used."""


@contextmanager
def fixed_threads(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run CPU linear algebra on one thread (of this Python thread), so it rounds the same way
    whatever ``torch.get_num_threads()`` is; no-op on other devices or when not ``enabled``.

    PyTorch's OpenMP and MKL thread counts are per Python thread, so other threads keep theirs;
    only a thread that makes its very first torch call inside this window starts with one
    thread (PyTorch initialises new threads from the last value set). The count is restored on
    exit, exceptions included."""
    before = torch.get_num_threads()
    if not enabled or device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_hessian_factor(
    hessian: torch.Tensor,
    damp: float,
    name: str = "layer",
    deterministic: bool = True,
    stacklevel: int = 3,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damping)^-1, raising the damping until it factorises.

    ``deterministic`` (default) factorises on one CPU thread, so the factor has the same bits
    for any thread count (see the module docstring).
    """
    diag_mean = torch.diagonal(hessian).mean().clamp_min(1e-12)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(5):
        fraction = damp * 10**attempt
        try:
            with fixed_threads(hessian.device, deterministic):
                lower = torch.linalg.cholesky(hessian + fraction * diag_mean * eye)
                inverse = torch.cholesky_inverse(lower)
                factor = torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
        if torch.isfinite(factor).all():
            if attempt:
                warnings.warn(
                    f"prunekit: SparseGPT raised the damping of {name} from {damp:g} to "
                    f"{fraction:g} to factorise its Hessian",
                    stacklevel=stacklevel,
                )
            return factor, fraction
    raise SparseGPTFailure(
        f"the Hessian of {name} does not factorise even with damping {fraction:g}"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    *,
    frozen: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "layer",
    deterministic: bool = True,
    sub_block: int = 16,
) -> SparseGPTResult:
    """Prune ``weight`` (out x in) with its Hessian (in x in); returns the updated weight.

    Args:
        sparsity: unstructured sparsity of the layer (exact: ``round(sparsity * numel)``
            entries are removed, spread over the column blocks); ignored when ``nm`` is given.
        nm: ``(N, M)`` to keep N of every M consecutive inputs in each row.
        frozen: bool mask of entries that must be pruned (already-zero weights stay zero).
        block_size: columns per lazy-update block (rounded down to a multiple of M).
        damp: damping as a fraction of the mean Hessian diagonal.
        deterministic: factorise the Hessian on one CPU thread so that masks and weights are
            identical for any ``torch.get_num_threads()`` (default); False uses every thread.
        sub_block: columns per inner block: rank-one updates within it, one matrix product
            for the rest of the column block (rounded down to a multiple of M); ``sub_block >=
            block_size`` is the plain column loop (the same result to float rounding).

    Example:
        >>> w, x = torch.randn(8, 16), torch.randn(64, 16)
        >>> out = sparsegpt_prune(w, 2 * x.T @ x / 64, 0.5)
        >>> int((out.weight == 0).sum())
        64
    """
    return _prune_stacked(
        [weight],
        hessian,
        sparsity,
        nm,
        frozen=None if frozen is None else [frozen],
        block_size=block_size,
        damp=damp,
        name=name,
        deterministic=deterministic,
        sub_block=sub_block,
    )[0]


def sparsegpt_prune_shared(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float | Sequence[float] = 0.5,
    nm: tuple[int, int] | None = None,
    *,
    frozen: Sequence[torch.Tensor | None] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "layer",
    deterministic: bool = True,
    sub_block: int = 16,
) -> list[SparseGPTResult]:
    """:func:`sparsegpt_prune` of several layers that read the same input (one Hessian), such
    as a Llama block's q / k / v projections: their rows are swept together, so the column loop
    runs once for all of them. Each layer keeps its own count of removed weights (``sparsity``:
    one value, or one per layer) and its own ``frozen`` mask; every row-mixing step (top-k
    choice, matrix products) runs per layer on the same shapes as a solve of that layer alone,
    so the results have the same bits as separate :func:`sparsegpt_prune` calls.

    Example:
        >>> x = torch.randn(64, 16)
        >>> q, k = torch.randn(8, 16), torch.randn(4, 16)
        >>> both = sparsegpt_prune_shared([q, k], 2 * x.T @ x / 64, 0.5)
        >>> torch.equal(both[1].weight, sparsegpt_prune(k, 2 * x.T @ x / 64, 0.5).weight)
        True
    """
    return _prune_stacked(
        weights,
        hessian,
        sparsity,
        nm,
        frozen=frozen,
        block_size=block_size,
        damp=damp,
        name=name,
        deterministic=deterministic,
        sub_block=sub_block,
    )


def _prune_stacked(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float | Sequence[float],
    nm: tuple[int, int] | None,
    *,
    frozen: Sequence[torch.Tensor | None] | None,
    block_size: int,
    damp: float,
    name: str,
    deterministic: bool,
    sub_block: int,
) -> list[SparseGPTResult]:
    """The body of both public entry points (one stack depth below either, so that a damping
    warning names their caller)."""
    with torch.no_grad():  # a with block, not the decorator: mutmut mutates the body
        if not weights:
            raise ValueError(f"{name}: no weights to prune")
        cols = weights[0].shape[1]
        if any(w.dim() != 2 or w.shape[1] != cols for w in weights):
            shapes = [tuple(w.shape) for w in weights]
            raise ValueError(f"{name}: the weights must be (out, {cols}) matrices, got {shapes}")
        levels = [sparsity] * len(weights) if isinstance(sparsity, (int, float)) else sparsity
        if len(levels) != len(weights):
            raise ValueError(f"{name}: {len(levels)} sparsities for {len(weights)} weights")
        frozen = [None] * len(weights) if frozen is None else frozen
        if len(frozen) != len(weights):
            raise ValueError(f"{name}: {len(frozen)} frozen masks for {len(weights)} weights")
        W = torch.cat([w.detach().float() for w in weights])  # a new tensor: the inputs stay
        H = hessian.detach().clone().float().to(W.device)
        if H.shape != (cols, cols):
            raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} inputs")
        must_prune = torch.cat(
            [
                torch.zeros(w.shape, dtype=torch.bool, device=W.device)
                if f is None
                else f.to(W.device).bool()
                for w, f in zip(weights, frozen, strict=True)
            ]
        )
        slices, row = [], 0
        for w, level in zip(weights, levels, strict=True):
            slices.append((row, row + w.shape[0], count_to_remove(level, w.numel())))
            row += w.shape[0]
        W, pruned, used_damp = _sweep(
            W, H, slices, nm, must_prune, block_size, damp, name, deterministic, sub_block
        )
        return [
            SparseGPTResult(W[r0:r1].to(w.dtype), ~pruned[r0:r1], used_damp)
            for (r0, r1, _), w in zip(slices, weights, strict=True)
        ]


def _sweep(
    W: torch.Tensor,
    H: torch.Tensor,
    slices: list[tuple[int, int, int]],
    nm: tuple[int, int] | None,
    must_prune: torch.Tensor,
    block_size: int,
    damp: float,
    name: str,
    deterministic: bool,
    sub_block: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The column sweep over the stacked rows ``W`` (changed in place): ``slices`` holds each
    layer's (first row, end row, weights to remove). Returns (W, pruned mask, damping used)."""
    cols = W.shape[1]
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])
        sub_block = max(nm[1], sub_block - sub_block % nm[1])  # N:M groups never straddle
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    must_prune[:, dead] = True  # inputs that never fire: their weights go first
    # the warning names the caller of sparsegpt_prune[_shared]: 5 frames up from the warn call
    factor, used_damp = inverse_hessian_factor(H, damp, name, deterministic, stacklevel=5)
    pruned = torch.zeros_like(W, dtype=torch.bool)

    zero = W.new_zeros(())
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Err1 = torch.empty_like(W1)
        F1 = factor[start:end, start:end]
        d1 = torch.diagonal(F1)
        frozen1 = must_prune[:, start:end]
        if nm is None:
            # frozen entries beyond the block's share go too, compensated like the chosen ones
            scores = (W1**2 / d1[None, :] ** 2).masked_fill(frozen1, float("-inf"))
            P1 = torch.empty_like(W1, dtype=torch.bool)
            for r0, r1, total in slices:  # each layer its own share of the block
                k = round(total * end / cols) - round(total * start / cols)
                P1[r0:r1] = lowest_k(scores[r0:r1], k)
            P1 |= frozen1
        else:
            P1 = torch.zeros_like(W1, dtype=torch.bool)
        width = end - start
        # the column loop works on the block transposed: each column a contiguous row, so
        # that a step is three small ops on contiguous memory (where, divide, rank-1 update)
        Wt, Et = W1.t().contiguous(), Err1.t()
        Pt = P1.t()
        for s0 in range(0, width, sub_block):
            s1 = min(s0 + sub_block, width)
            for i in range(s0, s1):
                if nm is not None and i % nm[1] == 0:
                    n, m = nm
                    group = (Wt[i : i + m].t() ** 2 / d1[None, i : i + m] ** 2).masked_fill(
                        frozen1[:, i : i + m], float("-inf")
                    )
                    drop = torch.topk(group, m - n, dim=1, largest=False).indices
                    P1[:, i : i + m].scatter_(1, drop, True)
                    P1[:, i : i + m] |= frozen1[:, i : i + m]
                # the pruned entries' error (w - q) / [H^-1]_ii, spread over the later columns
                # of the sub-block; column i itself keeps w, so Q1 is read off W1 at the end
                err = torch.where(Pt[i], Wt[i], zero).div_(F1[i, i])
                Et[i] = err
                Wt[i + 1 : s1] -= torch.outer(F1[i, i + 1 : s1], err)
            if s1 < width:  # the sub-block's errors reach the rest of the block at once
                for r0, r1, _ in slices:  # per layer: the products of a layer solved alone
                    Wt[s1:, r0:r1] -= (Err1[r0:r1, s0:s1] @ F1[s0:s1, s1:]).t()
        W1 = Wt.t()
        W[:, start:end] = W1.masked_fill(P1, 0.0)
        pruned[:, start:end] = P1 | frozen1
        for r0, r1, _ in slices:
            W[r0:r1, end:] -= Err1[r0:r1] @ factor[start:end, end:]

    W[pruned] = 0.0
    if not torch.isfinite(W).all():
        raise SparseGPTFailure(f"{name}: the SparseGPT update produced non-finite weights")
    return W, pruned, used_damp
