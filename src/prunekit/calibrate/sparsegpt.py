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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from prunekit.scope import count_to_remove


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
    hessian: torch.Tensor, damp: float, name: str = "layer", deterministic: bool = True
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
                    stacklevel=3,
                )
            return factor, fraction
    raise SparseGPTFailure(
        f"the Hessian of {name} does not factorise even with damping {fraction:g}"
    )


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    prune = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        prune[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return prune.reshape(scores.shape)


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
    with torch.no_grad():  # a with block, not the decorator: mutmut mutates the body
        W = weight.detach().clone().float()
        H = hessian.detach().clone().float().to(W.device)
        rows, cols = W.shape
        if H.shape != (cols, cols):
            raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} inputs")
        if nm is not None:
            block_size = max(nm[1], block_size - block_size % nm[1])
            sub_block = max(nm[1], sub_block - sub_block % nm[1])  # N:M groups never straddle
        must_prune = (
            torch.zeros_like(W, dtype=torch.bool) if frozen is None else frozen.clone().bool()
        )

        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        must_prune[:, dead] = True  # inputs that never fire: their weights go first
        factor, used_damp = inverse_hessian_factor(H, damp, name, deterministic)
        pruned = torch.zeros_like(W, dtype=torch.bool)
        total = count_to_remove(sparsity, W.numel())

        zero = W.new_zeros(())
        for start in range(0, cols, block_size):
            end = min(start + block_size, cols)
            W1 = W[:, start:end].clone()
            Err1 = torch.empty_like(W1)
            F1 = factor[start:end, start:end]
            d1 = torch.diagonal(F1)
            frozen1 = must_prune[:, start:end]
            if nm is None:
                k = round(total * end / cols) - round(total * start / cols)
                # frozen entries beyond the block's share go too, compensated like the chosen ones
                P1 = _lowest((W1**2 / d1[None, :] ** 2).masked_fill(frozen1, float("-inf")), k)
                P1 |= frozen1
            else:
                P1 = torch.zeros_like(W1, dtype=torch.bool)
            width = end - start
            for s0 in range(0, width, sub_block):
                s1 = min(s0 + sub_block, width)
                for i in range(s0, s1):
                    if nm is not None and i % nm[1] == 0:
                        n, m = nm
                        group = (W1[:, i : i + m] ** 2 / d1[None, i : i + m] ** 2).masked_fill(
                            frozen1[:, i : i + m], float("-inf")
                        )
                        drop = torch.topk(group, m - n, dim=1, largest=False).indices
                        P1[:, i : i + m].scatter_(1, drop, True)
                        P1[:, i : i + m] |= frozen1[:, i : i + m]
                    # the pruned entries' error (w - q) / [H^-1]_ii, spread over the later columns
                    # of the sub-block; column i itself keeps w, so Q1 is read off W1 at the end
                    err = torch.where(P1[:, i], W1[:, i], zero) / F1[i, i]
                    Err1[:, i] = err
                    W1[:, i + 1 : s1] -= torch.outer(err, F1[i, i + 1 : s1])
                if s1 < width:  # the sub-block's errors reach the rest of the block at once
                    W1[:, s1:] -= Err1[:, s0:s1] @ F1[s0:s1, s1:]
            W[:, start:end] = W1.masked_fill(P1, 0.0)
            pruned[:, start:end] = P1 | frozen1
            W[:, end:] -= Err1 @ factor[start:end, end:]

        W[pruned] = 0.0
        if not torch.isfinite(W).all():
            raise SparseGPTFailure(f"{name}: the SparseGPT update produced non-finite weights")
        return SparseGPTResult(W.to(weight.dtype), ~pruned, used_damp)
