"""Vectorised union-find over integer "atoms" (one atom per prunable index of a tensor dim).

Atom 0 is the pin: anything joined with it can never be removed. Roots are always the smallest
atom of their class, so ``find(a) == 0`` means "pinned".
"""

from __future__ import annotations

import numpy as np

PIN = 0


class UnionFind:
    """Disjoint sets of atoms, grown on demand; all operations take and return numpy arrays."""

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self.size = 1  # atom 0 exists: the pin

    def new(self, n: int) -> np.ndarray:
        """``n`` fresh atoms, each in a class of its own."""
        start, end = self.size, self.size + n
        if end > len(self._parent):
            grown = np.arange(max(2 * len(self._parent), end), dtype=np.int64)
            grown[: self.size] = self._parent[: self.size]
            self._parent = grown
        self._parent[start:end] = np.arange(start, end)
        self.size = end
        return np.arange(start, end, dtype=np.int64)

    def find(self, atoms: np.ndarray) -> np.ndarray:
        """The root of every atom (same shape), with path compression."""
        atoms = np.asarray(atoms, dtype=np.int64)
        parent = self._parent
        roots = parent[atoms]
        while True:
            nxt = parent[roots]
            if np.array_equal(nxt, roots):
                break
            roots = nxt
        parent[atoms] = roots
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join ``a[i]`` with ``b[i]`` for every i (arrays of equal shape, or b a scalar)."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64)
        b = np.full(a.shape, b, dtype=np.int64) if b.ndim == 0 else b.ravel()
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            lo = np.minimum(ra[differ], rb[differ])
            hi = np.maximum(ra[differ], rb[differ])
            self._parent[hi] = lo  # conflicting writes are fixed by the next round

    def pin(self, atoms: np.ndarray) -> None:
        """Make every atom of ``atoms`` unremovable."""
        self.union(atoms, np.int64(PIN))

    def roots(self) -> np.ndarray:
        """The root of every atom allocated so far."""
        return self.find(np.arange(self.size))
