"""Sparsity patterns: what is removed together, and how scores become keep-masks.

* ``"unstructured"``: single weights.
* ``"N:M"`` (``"2:4"``, ``"4:8"``, any 1 <= N < M): at most N non-zeros in every group of M
  consecutive weights along the input dimension. Conv kernels are viewed as out x (in*kh*kw).
  The sparsity is implied (1 - N/M).
* ``"block:RxC"`` (``"block:4x4"``): whole R x C tiles of the (out, in) weight matrix are zeroed,
  each tile scored by the L2 norm of its element scores (for magnitude: the tile's norm).

Unstructured and block patterns select *units* (weights or tiles) by count, so they take a
sparsity and a scope; N:M decides inside each group and needs neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class Pattern:
    """Base of the patterns. Subclasses are small frozen dataclasses."""

    selects_by_count = True
    """True when the pattern picks its lowest-scored units up to a sparsity (scope applies)."""

    unit_size = 1
    """Weights per unit, for counting."""

    def skip_reason(self, matrix_shape: tuple[int, int]) -> str | None:
        """Why a layer of this (out, in) shape cannot take the pattern, or None.

        An empty weight (a dimension of size 0) has nothing to prune under any pattern;
        subclasses call this first.
        """
        if 0 in matrix_shape:
            return f"the weight is empty (shape {matrix_shape[0]}x{matrix_shape[1]})"
        return None

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Flat per-unit scores from an (out, in) score matrix."""
        return scores.reshape(-1)

    def expand(self, unit_keep: torch.Tensor, matrix_shape: tuple[int, int]) -> torch.Tensor:
        """(out, in) keep-mask from a flat per-unit keep vector."""
        return unit_keep.reshape(matrix_shape)

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:  # pragma: no cover - N:M only
        raise NotImplementedError


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Single weights."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` non-zeros in every ``m`` consecutive weights along the input dimension."""

    n: int
    m: int
    selects_by_count = False

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n < self.m):
            raise ValueError(
                f"N:M pattern {self.n}:{self.m} needs 1 <= N < M (integers); accepted: {ACCEPTED}"
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def skip_reason(self, matrix_shape: tuple[int, int]) -> str | None:
        empty = super().skip_reason(matrix_shape)
        if empty:
            return empty
        if matrix_shape[1] % self.m:
            return f"input size {matrix_shape[1]} is not a multiple of M={self.m}"
        return None

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the ``n`` highest scores of every group of ``m``."""
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // self.m, self.m)
        keep_idx = torch.topk(groups, self.n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, keep_idx, True)
        return keep.reshape(rows, cols)


@dataclass(frozen=True)
class Block(Pattern):
    """Whole ``r`` x ``c`` tiles of the (out, in) weight matrix."""

    r: int
    c: int

    def __post_init__(self) -> None:
        if not (
            isinstance(self.r, int) and isinstance(self.c, int) and self.r >= 1 and self.c >= 1
        ):
            raise ValueError(
                f"block pattern {self.r}x{self.c} needs R, C >= 1 (integers); accepted: {ACCEPTED}"
            )

    @property
    def unit_size(self) -> int:  # type: ignore[override]
        return self.r * self.c

    def __str__(self) -> str:
        return f"block:{self.r}x{self.c}"

    def skip_reason(self, matrix_shape: tuple[int, int]) -> str | None:
        empty = super().skip_reason(matrix_shape)
        if empty:
            return empty
        out, inp = matrix_shape
        if out % self.r or inp % self.c:
            return f"shape {out}x{inp} is not divisible into {self.r}x{self.c} blocks"
        return None

    def _tiles(self, matrix: torch.Tensor) -> torch.Tensor:
        out, inp = matrix.shape
        tiles = matrix.reshape(out // self.r, self.r, inp // self.c, self.c)
        return tiles.permute(0, 2, 1, 3).reshape(out // self.r, inp // self.c, self.r * self.c)

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Tile scores: the L2 norm of non-negative element scores (for magnitude, the tile's
        norm); the sum when scores are signed (movement), so a negative tile is pruned first."""
        tiles = self._tiles(scores)
        dead = torch.isneginf(tiles).all(dim=-1)
        finite = torch.where(torch.isneginf(tiles), 0.0, tiles)
        if bool((finite < 0).any()):
            pooled = finite.sum(-1)
        else:
            pooled = finite.pow(2).sum(-1).sqrt()
        return torch.where(dead, float("-inf"), pooled).reshape(-1)

    def expand(self, unit_keep: torch.Tensor, matrix_shape: tuple[int, int]) -> torch.Tensor:
        out, inp = matrix_shape
        grid = unit_keep.reshape(out // self.r, inp // self.c)
        return grid.repeat_interleave(self.r, 0).repeat_interleave(self.c, 1)


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*block\s*:\s*(\d+)\s*x\s*(\d+)\s*$", re.IGNORECASE)
ACCEPTED = (
    "'unstructured', 'N:M' with integers 1 <= N < M (e.g. '2:4'), or 'block:RxC' (e.g. 'block:4x4')"
)


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse a pattern string; a :class:`Pattern` passes through.

    Example:
        >>> parse_pattern("2:4")
        NM(n=2, m=4)
    """
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, got {pattern!r}; accepted: {ACCEPTED}")
    if pattern.strip().lower() in ("unstructured", "element"):
        return Unstructured()
    nm = _NM_RE.match(pattern)
    if nm:
        return NM(int(nm.group(1)), int(nm.group(2)))
    block = _BLOCK_RE.match(pattern)
    if block:
        return Block(int(block.group(1)), int(block.group(2)))
    raise ValueError(f"unknown pattern {pattern!r}; accepted: {ACCEPTED}")
