"""Evaluation: perplexity of causal language models, and a hook for any other metric.

Perplexity protocol (documented so figures can be compared): the token stream is cut into
windows of ``seq_len`` tokens. By default the windows do not overlap (``stride = seq_len``) and
every token but the first of each window is predicted from the tokens before it in the same
window; the perplexity is exp(total negative log-likelihood / number of predicted tokens). With
``stride < seq_len`` windows overlap, and only the last ``stride`` tokens of each window (all
tokens of the first) are scored, so each token is predicted once with more context. A trailing
piece shorter than two tokens is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

_NOT_CAUSAL = (
    "perplexity needs a causal language model that returns next-token logits of shape "
    "(batch, seq_len, vocab), such as transformers' AutoModelForCausalLM (GPT-2, Llama, ...)"
)
_INSTEAD = (
    "For an encoder (BERT, sentence-transformers) measure quality with a task metric instead: "
    "prunekit.eval.accuracy for a classifier, or prunekit.eval.evaluate(model, {name: fn}) with "
    "your own metric (e.g. the STS-B correlation of the embeddings, or the agreement of the "
    "pruned model's outputs with the dense model's)"
)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        if isinstance(output, dict):  # a Hugging Face ModelOutput is a dict
            got = f"{type(output).__name__} with {', '.join(map(str, output.keys()))}"
        else:
            got = type(output).__name__
        raise TypeError(
            "the model must return logits: a tensor, a tuple starting with one, or an object "
            f"with .logits; it returned {got}"
        )
    return logits


def _check_causal_lm(model: nn.Module) -> None:
    """Refuse, before any work, a Hugging Face model that cannot be a causal LM."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not callable(can_generate):
        return
    try:
        causal = bool(can_generate())
    except Exception:  # an old or custom class: let the output check decide
        return
    if not causal:
        raise TypeError(
            f"{_NOT_CAUSAL}; {type(model).__name__} "
            f"({getattr(config, 'model_type', 'unknown')}) is not one: it cannot generate, so "
            f"its outputs are not next-token predictions. {_INSTEAD}"
        )


def _windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of every window; each token is scored once."""
    out, start, scored_until = [], 0, 0
    while True:
        end = min(start + seq_len, n_tokens)
        if end - start < 2:
            break
        first = max(scored_until, start + 1)
        if first < end:
            out.append((start, end, first))
        scored_until = end
        if end == n_tokens:
            break
        start += stride
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Perplexity of a causal LM over a 1-D token tensor (see the module docstring).

    ``model(ids)`` must return next-token logits of shape (batch, seq_len, vocab) (a tensor, a
    tuple starting with one, or an object with ``.logits``); an encoder such as BERT, a masked
    LM or a classifier is refused with a ``TypeError`` that says what to use instead.

    Example:
        >>> ppl = prunekit.eval.perplexity(model, val_ids, seq_len=256)  # doctest: +SKIP
    """
    if isinstance(tokens, Mapping):  # a tokenizer's output
        keys = ", ".join(map(str, tokens.keys()))
        raise TypeError(
            f"tokens must be the token ids (a 1-D tensor or list of ints), got a mapping with "
            f"keys {keys}: pass encoding['input_ids'] (and a causal LM as the model)"
        )
    try:
        tokens = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"tokens must be the token ids (a 1-D tensor or list of ints), got "
            f"{type(tokens).__name__}: {exc}"
        ) from exc
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    tokens = tokens.reshape(-1).long()
    _check_causal_lm(model)
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len; got {seq_len}, {stride}")
    windows = _windows(tokens.numel(), seq_len, stride)
    if not windows:
        raise ValueError(f"{tokens.numel()} tokens are too few for a window")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
            by_length: dict[int, list] = {}
            for w in batch:
                by_length.setdefault(w[1] - w[0], []).append(w)
            for group in by_length.values():
                ids = torch.stack([tokens[s:e] for s, e, _ in group]).to(device)
                output = model(ids)
                try:
                    logits = _logits(output).float()
                except TypeError as exc:
                    raise TypeError(f"{_NOT_CAUSAL}; {exc}. {_INSTEAD}") from None
                if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                    raise TypeError(
                        f"{_NOT_CAUSAL}; for input ids of shape {tuple(ids.shape)} the model "
                        f"returned logits of shape {tuple(logits.shape)}. {_INSTEAD}"
                    )
                losses = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    ids[:, 1:].reshape(-1),
                    reduction="none",
                ).view(len(group), -1)
                for row, (start, _, first) in zip(losses, group, strict=True):
                    scored = row[first - start - 1 :]
                    nll += float(scored.sum())
                    count += scored.numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def evaluate(
    model: nn.Module, metrics: dict[str, Callable[[nn.Module], float]]
) -> dict[str, float]:
    """Run named metric functions on ``model`` in eval mode without gradients.

    Any metric plugs in: a metric is ``fn(model) -> float``.

    Example:
        >>> evaluate(model, {"ppl": lambda m: perplexity(m, val_ids, 256)})  # doctest: +SKIP
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {name: float(fn(model)) for name, fn in metrics.items()}
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of a classifier over ``(inputs, labels)`` batches."""
    correct = total = 0
    for inputs, labels in batches:
        correct += int((_logits(model(inputs)).argmax(-1) == labels).sum())
        total += labels.numel()
    return correct / total
