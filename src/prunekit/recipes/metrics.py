"""Built-in quality measures for the pipeline, so a run is measured without user code.

Each returns a :class:`Metric`: a callable ``metric(model) -> float`` that knows its name and
whether higher is better. ``fidelity`` compares with the dense model, which the pipeline binds.

* :func:`accuracy` for classifiers with a labelled set;
* :func:`perplexity` on token ids for causal LMs (lower is better);
* :func:`fidelity`: mean cosine of pooled outputs (embeddings) with the dense model's;
* :func:`sts_spearman`: Spearman correlation (x100) of cosine similarity with gold scores on
  sentence pairs (STS-B style) for sentence encoders.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.train.finetune import _model_device, default_forward


@dataclass
class Metric:
    """A named quality measure: ``metric(model) -> float``."""

    fn: Callable[..., float]
    name: str = "quality"
    higher_is_better: bool = True
    needs_reference: bool = False
    reference: nn.Module | None = None

    def __call__(self, model: nn.Module) -> float:
        if self.needs_reference:
            if self.reference is None:
                raise ValueError(f"{self.name} compares with the dense model: bind it first")
            return float(self.fn(model, self.reference))
        return float(self.fn(model))

    def bind(self, reference: nn.Module) -> Metric:
        bound = copy.copy(self)
        bound.reference = reference
        return bound


def as_metric(evaluate: Any) -> Metric | None:
    """A user callable, a :class:`Metric`, or None."""
    if evaluate is None or isinstance(evaluate, Metric):
        return evaluate
    if not callable(evaluate):
        raise TypeError(
            f"evaluate must be a callable model -> float or a prunekit.recipes.metrics.Metric, "
            f"got {type(evaluate).__name__}"
        )
    return Metric(evaluate, name=getattr(evaluate, "__name__", "quality"))


def _labelled_batches(data: Any) -> list[tuple[Any, torch.Tensor]]:
    """``(inputs, labels)`` batches from batches, a map-style ``Dataset`` of samples (batched
    here; listing it would give single samples, run without their batch dimension) or one
    ``(inputs, labels)`` pair of tensors."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=ACCURACY_BATCH)
    elif isinstance(data, tuple) and len(data) == 2 and all(map(torch.is_tensor, data)):
        data = [data]
    batches = list(data)
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                f"accuracy needs (inputs, labels) batches; item {i} is a "
                f"{type(batch).__name__}. Accepted: an iterable of (inputs, labels) batches (a "
                "DataLoader, a list), a map-style Dataset of (input, label) samples, or one "
                "(inputs, labels) pair of tensors"
            )
    return batches


ACCURACY_BATCH = 256  # batch size when accuracy() is given a Dataset of single samples


def accuracy(batches: Any) -> Metric:
    """Top-1 accuracy over ``(inputs, labels)`` batches: a ``DataLoader`` or list of batches,
    a map-style ``Dataset`` of ``(input, label)`` samples (batched 256 at a time), or one
    ``(inputs, labels)`` pair of tensors.

    Example:
        >>> metric = accuracy([(torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))])
        >>> 0.0 <= metric(torch.nn.Linear(8, 2)) <= 1.0
        True
    """
    batches = _labelled_batches(batches)

    @torch.no_grad()
    def fn(model: nn.Module) -> float:
        device = _model_device(model)
        right = total = 0
        for x, y in batches:
            logits = default_forward(model, x.to(device) if torch.is_tensor(x) else x)
            logits = getattr(logits, "logits", logits)
            right += int((logits.argmax(-1).cpu() == y).sum())
            total += len(y)
        return right / max(total, 1)

    return Metric(fn, "accuracy", higher_is_better=True)


def perplexity(token_ids: torch.Tensor | Sequence[int], seq_len: int = 128) -> Metric:
    """Perplexity of a causal LM on ``token_ids`` (non-overlapping windows of ``seq_len``)."""
    from prunekit.eval import perplexity as ppl

    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()

    def fn(model: nn.Module) -> float:
        return ppl(model, ids, seq_len=seq_len, progress=False)

    return Metric(fn, "perplexity", higher_is_better=False)


def _pooled(model: nn.Module, batch: Any) -> torch.Tensor:
    output = default_forward(model, batch)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
    if hidden.dim() == 3:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return hidden.flatten(1)


def fidelity(batches: Iterable[Any]) -> Metric:
    """Mean cosine similarity of the model's pooled outputs with the dense model's (1.0 = same).

    Outputs with a ``last_hidden_state`` are mean-pooled over the attention mask (sentence
    embeddings); other outputs are flattened per sample.

    It asks whether the model's embeddings can stand in for the dense model's, which STS does
    not: a model whose embeddings moved as a whole (a new common direction, a rotation) scores
    low here while it still ranks similarities as before (the shipped ``encoder-small`` on
    MiniLM: fidelity 0.31 at 92.5 % of the dense STS Spearman; docs/recipes.md).
    """
    batches = list(batches)

    @torch.no_grad()
    def fn(model: nn.Module, reference: nn.Module) -> float:
        reference.eval()
        sims = []
        for batch in batches:
            a, b = _pooled(model, batch), _pooled(reference, batch)
            sims.append(F.cosine_similarity(a.float(), b.float(), dim=-1))
        return float(torch.cat(sims).mean())

    return Metric(fn, "fidelity", higher_is_better=True, needs_reference=True)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values: Sequence[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="mergesort")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # average the ranks of ties
            where = values == value
            if where.sum() > 1:
                ranked[where] = ranked[where].mean()
        return ranked

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom else 0.0


def sts_spearman(
    pairs: Sequence[tuple[str, str, float]],
    tokenizer: Any,
    batch_size: int = 64,
    max_length: int = 128,
) -> Metric:
    """Spearman x100 between cosine similarity of mean-pooled embeddings and gold scores."""
    pairs = list(pairs)
    gold = [float(p[2]) for p in pairs]

    @torch.no_grad()
    def embed(model: nn.Module, sentences: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(
                sentences[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out.append(_pooled(model, dict(batch)))
        return torch.cat(out)

    def fn(model: nn.Module) -> float:
        a = embed(model, [p[0] for p in pairs])
        b = embed(model, [p[1] for p in pairs])
        return 100 * spearman(F.cosine_similarity(a, b, dim=-1).tolist(), gold)

    return Metric(fn, "sts_spearman", higher_is_better=True)


def read_sts(path: str, limit: int | None = None) -> list[tuple[str, str, float]]:
    """STS-B style pairs from a tab-separated file (genre, file, year, id, score, s1, s2, ...)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 7:
                continue
            try:
                score = float(cols[4])
            except ValueError:
                continue  # a header
            pairs.append((cols[5], cols[6], score))
            if limit and len(pairs) >= limit:
                break
    if not pairs:
        raise ValueError(f"{path}: no STS pairs found (expected tab-separated rows with 7 columns)")
    return pairs
