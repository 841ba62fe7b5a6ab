"""Knowledge distillation pieces: the losses, and capturing hidden states with forward hooks.

* :func:`kd_loss`: KL divergence between temperature-softened teacher and student
  distributions, times ``T**2`` (Hinton et al., 2015), so its gradients keep their scale as the
  temperature changes.
* :func:`hidden_loss`: mean squared error between hidden states, ignoring padding when an
  attention mask is given.
* :class:`Capture`: records the outputs of named submodules during a forward pass.

Example:
    >>> import torch
    >>> from prunekit.train.distill import kd_loss
    >>> logits = torch.randn(4, 10)
    >>> float(kd_loss(logits, logits, temperature=2.0))
    0.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.targets import matches


def first_tensor(output: Any, what: str = "module") -> torch.Tensor:
    """The main tensor of a module output: itself, ``last_hidden_state``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a tensor in the output of {what} ({type(output).__name__})")


def default_logits(output: Any) -> torch.Tensor:
    """Logits of a model output: a tensor, ``.logits``, ``["logits"]``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in the model output ({type(output).__name__}); pass "
        "logits_fn=<callable(output) -> logits tensor>, or kd_weight=0 to distil hidden states only"
    )


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over examples.

    Works on (batch, classes) and on (batch, ..., classes) logits (every position counts as an
    example). Log-probabilities work as logits (softmax of ``log_softmax(z) / T`` equals that
    of ``z / T``).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    classes = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def hidden_loss(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between hidden states; padding positions are left out when
    ``attention_mask`` (batch, sequence) matches the leading dimensions."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"hidden states differ in shape: student {tuple(student.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )
    diff = (student.float() - teacher.float()).pow(2)
    if (
        attention_mask is not None
        and diff.dim() >= 3
        and tuple(attention_mask.shape) == tuple(diff.shape[:2])
    ):
        weight = attention_mask.to(diff.dtype).reshape(*attention_mask.shape, 1)
        per_position = diff.reshape(*diff.shape[:2], -1).mean(-1, keepdim=True)
        return (per_position * weight).sum() / weight.sum().clamp_min(1.0)
    return diff.mean()


def resolve_modules(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Names of the submodules matching any of the name patterns (globs or ``re:`` regexes)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [n for n, _ in model.named_modules() if n]
    chosen = [n for n in names if any(matches(p, n) for p in patterns)]
    for p in patterns:
        if not any(matches(p, n) for n in names):
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(
                f"hidden_layers pattern {p!r} matches no submodule. Submodules: {shown}. "
                "Patterns are globs (where * also matches dots), or regular expressions with "
                "a 're:' prefix, e.g. 're:encoder\\.layer\\.\\d+'"
            )
    return chosen


class Capture:
    """Record the output of named submodules during forward passes (a context manager).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> with Capture(net, ["0"]) as seen:
        ...     _ = net(torch.randn(2, 4))
        >>> tuple(seen.outputs["0"].shape)
        (2, 3)
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"{type(model).__name__} has no submodule named {missing}")
        self._modules = [modules[n] for n in self.names]
        self._handles: list[Any] = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Capture:
        for name, module in zip(self.names, self._modules, strict=True):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = first_tensor(output, name)

        return hook
