"""Recovery after pruning: a small training loop that keeps the mask, with distillation.

``finetune(model, data, loss_fn)`` trains with the task loss; add ``teacher=dense_model`` for
knowledge distillation (KL on temperature-softened logits, and ``hidden_layers=`` for
hidden-state matching). Pruned weights stay exactly zero throughout: masked weights get zero
gradient and are re-zeroed after every step, and a model whose zeros were baked in
(``prunekit.finalize``) is masked at its zeros for the run (and unmasked again at the end).

The loop is plain PyTorch and meant to be read (and copied): for each batch, compute the loss,
``backward``, optional gradient clipping, ``optimizer.step()``, then ``pruner.step()`` if a
:class:`~prunekit.train.GradualPruner` runs inside it. ``evaluate(model) -> float`` is called
before training and after each epoch (or every ``eval_every`` steps), with early stopping after
``patience`` evaluations without improvement and the best weights restored at the end.
Ctrl-C stops the run cleanly: the result says ``interrupted=True`` and holds the model as it was
(or its best evaluated state).

Defaults that work without tuning (measured in ``benchmarks/mnist_finetune_defaults.py``):
AdamW at a learning rate found by a short range test (:func:`prunekit.train.lr.find_lr`),
linear warm-up over the first 5 % of the steps and cosine decay to zero, distillation at
temperature 2. With a :class:`~prunekit.train.GradualPruner` inside, the rate stays at its peak
until the pruner's schedule ends and decays over the recovery that follows, and the temperature
is 4 (``GRADUAL_TEMPERATURE``). ``checkpoint=DIR``
saves the run after every epoch (safetensors + JSON, written atomically) and the same call
resumes from the last finished epoch.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.distributed import barrier, is_distributed, is_main, world_size
from prunekit.distributed.reduce import broadcast_object
from prunekit.distributed.train import (
    average_gradients_,
    broadcast_module_,
    broadcast_rng_,
    check_same_batch,
    per_rank_data,
    split_batch,
)
from prunekit.masks import apply_mask, is_masked, reapply_masks, remove_mask
from prunekit.prune import refuse_nonfinite_parameters
from prunekit.runtime.accelerated import refuse_accelerated
from prunekit.runtime.copies import copy_model
from prunekit.targets import all_prunable
from prunekit.train.checkpoint import latest_point, write_point
from prunekit.train.distill import (
    Capture,
    default_logits,
    hidden_loss,
    kd_loss,
    resolve_modules,
)
from prunekit.train.lr import SCHEDULES, RangeTest, WarmupSchedule, find_lr
from prunekit.train.pruner import GradualPruner

LossFn = Callable[[nn.Module, Any], torch.Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]
LABEL_KEYS = ("labels", "label")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the trained model (the one passed in when ``inplace=True``, else a copy).
        steps: optimizer steps taken.
        history: one row per evaluation (``step``, ``epoch``, ``train_loss`` since the previous
            row, ``metric``, ``sparsity`` when a pruner runs), the first before training.
        best_metric / best_step: the best evaluation (at the final sparsity, with a pruner).
        stopped_early: early stopping ended the run.
        interrupted: Ctrl-C ended the run.
        lr: the peak learning rate of the default optimizer (found by the range test with
            ``lr="auto"``); None with an optimizer passed in.
        lr_test: the range test's measurements (``lr="auto"`` only, not on a resumed run).
        resumed_epoch: the finished epochs loaded from ``checkpoint`` (None: a fresh run).
    """

    model: nn.Module
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    interrupted: bool = False
    lr: float | None = None
    lr_test: RangeTest | None = None
    resumed_epoch: int | None = None

    def __repr__(self) -> str:
        best = "none" if self.best_metric is None else f"{self.best_metric:.6g}"
        return (
            f"FinetuneResult(steps={self.steps}, best_metric={best}, best_step={self.best_step}, "
            f"stopped_early={self.stopped_early}, interrupted={self.interrupted}, lr={self.lr!r})"
        )


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call the model on a batch: ``model(**batch)`` without labels for a mapping,
    ``model(batch[0])`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (tensor, tuple, list or mapping) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _target_of(batch: Any, loss: nn.Module) -> Any:
    """The target of a batch for a torch loss module: ``batch[1]`` of an ``(input, target)``
    pair, or a mapping's ``"labels"`` / ``"label"``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
    shape = f"a {type(batch).__name__}"
    if isinstance(batch, (tuple, list)):
        shape = f"a {len(batch)}-item {type(batch).__name__}"
    elif isinstance(batch, Mapping):
        shape += f" with keys {sorted(map(str, batch))}"
    raise TypeError(
        f"loss_fn={type(loss).__name__}() is called as loss(output, target), with the target "
        "taken from an (input, target) batch or a mapping batch's 'labels' / 'label'; this "
        f"batch is {shape}. Pass loss_fn=<callable(model, batch) -> scalar loss> instead."
    )


def _module_loss(loss: nn.Module, forward: ForwardFn, logits_of: Callable[[Any], Any]) -> LossFn:
    """Adapt a torch loss module (``nn.CrossEntropyLoss()``, ``loss(output, target)``) to
    ``loss_fn(model, batch)``: ``loss(logits_of(forward(model, batch)), target)``."""

    def task(model: nn.Module, batch: Any) -> torch.Tensor:
        target = _target_of(batch, loss)
        return loss(logits_of(forward(model, batch)), target)

    return task


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_number(name: str, value: Any, minimum: float = 0.0, positive: bool = False) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > minimum if positive else value >= minimum)
    )
    if not ok:
        sign = ">" if positive else ">="
        raise ValueError(f"{name} must be a finite number {sign} {minimum:g}, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}"
        )
    return int(value)


def _mask_zeros(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Mask the zeros of every unmasked prunable weight that has some; return what was masked."""
    added = []
    for t in all_prunable(model):
        if is_masked(t.module, t.param_name):
            continue
        weight = t.weight()
        if bool((weight == 0).any()):
            apply_mask(t.module, t.param_name, weight != 0)
            added.append((t.module, t.param_name))
    return added


def _make_optimizer(
    optimizer: Any, model: nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if isinstance(optimizer, torch.optim.Optimizer):
        mine = {id(p) for p in model.parameters()}
        theirs = [p for g in optimizer.param_groups for p in g["params"]]
        if not theirs or any(id(p) not in mine for p in theirs):
            raise ValueError(
                "the optimizer passed does not train this model's parameters (with "
                "inplace=False finetune trains a copy): pass a factory, e.g. "
                "optimizer=lambda params: torch.optim.SGD(params, lr=0.01), or inplace=True"
            )
        return optimizer
    if callable(optimizer):
        built = optimizer(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(built).__name__}, not an Optimizer")
        return built
    raise TypeError(
        "optimizer must be None (AdamW), a torch.optim.Optimizer, or a callable "
        f"params -> Optimizer; got {optimizer!r}"
    )


RANGE_TEST_STEPS = 100
"""Optimizer steps of the learning-rate range test run by ``lr="auto"`` (at most a quarter of
the run's steps, at least 20)."""
AUTO_LR_DIVISOR = 1.0
"""``lr="auto"`` peaks at the range test's rate of lowest loss divided by this. 1: the peak of
Smith's one-cycle policy is the range test's maximum itself, and the warm-up + cosine decay to
zero is that one-cycle shape (it passes the peak once and averages half of it). On the
character Llama (``benchmarks/llm_finetune_defaults.py``, seed 0) the recovered perplexity fell
from the max / 3 peak to the max (50 % one-shot: 5.247 -> 5.209; 70 %: 5.252 -> 5.205);
on the MNIST CNN the max is clipped to the ``AUTO_LR_BOUNDS`` ceiling, and 98 % / 99 % one-shot
recovery went from 99.23 / 99.11 to 99.18 / 99.08 (3 seeds, within their noise)."""
HELD_LR_DIVISOR = 3.0
"""The divisor when a ``GradualPruner`` holds the rate at its peak until its schedule ends: a
rate sustained that long is Smith's "max / 3" (the base rate of his cyclical schedules), not the
one-cycle peak. Measured: gradual magnitude to 70 % on the character Llama (seed 0) recovered to
5.224 at max / 3 and 5.258 at the max."""
AUTO_LR_BOUNDS = (1e-5, 1e-2)
"""The range test's suggestion is clipped into this band (AdamW fine-tuning rates)."""


DEFAULT_TEMPERATURE = 2.0
"""Distillation temperature of ``finetune`` without a pruner (classifiers and LMs alike)."""
GRADUAL_TEMPERATURE = 4.0
"""Distillation temperature of ``finetune`` with a ``GradualPruner`` inside (the student starts
as the teacher and is pruned along the way): measured better than 2 for gradual magnitude
pruning of the MNIST CNN at 98 % and 99 % (``benchmarks/mnist_finetune_defaults.py``)."""


def _pruning_steps(pruner: GradualPruner | None) -> int:
    """Optimizer steps of this run until the pruner's schedule ends (0: no pruner, or a
    schedule without an ``end_step``, such as a constant or a callable)."""
    end = getattr(pruner.schedule, "end_step", None) if pruner is not None else None
    if isinstance(end, bool) or not isinstance(end, int):
        return 0
    return max(0, end - pruner.step_count)


def _check_lr(lr: Any) -> float | str:
    if isinstance(lr, str):
        if lr != "auto":
            raise ValueError(f"lr must be a positive number or 'auto', got {lr!r}")
        return lr
    return _check_number("lr", lr, positive=True)


def _check_scheduler(scheduler: Any) -> Any:
    if scheduler is None or callable(scheduler) or scheduler in SCHEDULES:
        return scheduler
    raise ValueError(
        f"scheduler must be one of {', '.join(map(repr, SCHEDULES))}, None (constant), or a "
        f"callable optimizer -> torch lr scheduler; got {scheduler!r}"
    )


def _data_generators(data: Any) -> list[torch.Generator]:
    """The torch generators that shuffle ``data`` (a DataLoader's and its samplers')."""
    found: list[torch.Generator] = []
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not f for f in found):
            found.append(gen)
    return found


def _rng_state(data: Any) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            *(float(v) if isinstance(v, float) else int(v) for v in np_state[2:]),
        ],
        "data": [g.get_state() for g in _data_generators(data)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], data: Any) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    gens = _data_generators(data)
    if len(gens) == len(state["data"]):
        for gen, saved in zip(gens, state["data"], strict=True):
            gen.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _at_final_sparsity(
    model: nn.Module, pruner: GradualPruner, total_steps: int | None
) -> nn.Module:
    """A copy of ``model`` pruned by a copy of ``pruner`` as its schedule stands at the run's
    last step: the model the learning rate has to suit (a dense start would ask for a rate too
    small to recover from the pruning to come). ``model`` itself when that fails."""
    last = total_steps if total_steps is not None else getattr(pruner.schedule, "end_step", None)
    if last is None:
        return model
    shared = [getattr(pruner, "data", None), getattr(pruner, "loss_fn", None), pruner.optimizer]
    memo: dict[int, Any] = {id(obj): obj for obj in shared if obj is not None}
    try:
        twin = copy.deepcopy({"model": model, "pruner": pruner}, memo)
        twin_pruner: GradualPruner = twin["pruner"]
        twin_pruner.optimizer = None
        twin_pruner.step_count = max(twin_pruner.step_count, last - 1)
        twin_pruner.step()
    except Exception as exc:  # noqa: BLE001 - any failure: test the rate on the model as it is
        warnings.warn(
            f"prunekit: finetune tests the learning rate on the model as it is, not at the "
            f"pruner's final sparsity ({type(exc).__name__}: {exc})",
            stacklevel=3,
        )
        return model
    return twin["model"]


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], folder: Any) -> None:
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, this call {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key != "parameters" and saved.get(key) != current.get(key)
    ]
    if saved.get("parameters") != current.get("parameters"):
        diffs.append("the model's parameters (names or shapes) differ")
    if diffs:
        raise ValueError(
            f"checkpoint {os.fspath(folder)!r} is of another run ("
            + "; ".join(diffs[:6])
            + "): call finetune with the same arguments to resume, or pass another checkpoint "
            "folder (or delete this one) to start afresh"
        )


def finetune(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float | str = "auto",
    weight_decay: float = 0.0,
    optimizer: Any = None,
    scheduler: str | Callable[[torch.optim.Optimizer], Any] | None = "cosine",
    warmup: float = 0.05,
    temperature: float | None = None,
    task_weight: float = 1.0,
    kd_weight: float = 1.0,
    hidden_layers: str | Iterable[str] | None = None,
    hidden_weight: float = 1.0,
    forward_fn: ForwardFn | None = None,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every: int | None = None,
    mode: str = "max",
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = True,
    pruner: GradualPruner | None = None,
    grad_clip: float | None = None,
    keep_zeros: bool = True,
    checkpoint: str | os.PathLike | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a (pruned) model without reviving its zeros, optionally distilling a teacher.

    Args:
        model: the model to train.
        data: an iterable of batches (a ``DataLoader``, a list), re-iterated every epoch.
            Tensors in a batch are moved to the model's device.
        loss_fn: ``loss_fn(model, batch) -> scalar`` task loss (as in ``prunekit.prune``), or
            a torch loss module such as ``nn.CrossEntropyLoss()`` (any ``nn.*Loss``), which
            is called as ``loss_fn(logits, target)``: the logits of ``forward_fn(model,
            batch)`` (through ``logits_fn``) and the target ``batch[1]`` of an ``(input,
            target)`` batch or ``batch["labels"]`` (or ``"label"``) of a mapping batch; other
            batches raise a ``TypeError``. Optional with a teacher (pure distillation).
        teacher: the dense model to distil from (run in eval mode, without gradients).
        epochs: passes over ``data``; ``max_steps`` stops earlier.
        lr: peak learning rate of the default optimizer (AdamW), or ``"auto"`` (the default):
            a range test of up to ``RANGE_TEST_STEPS`` steps on ``data`` with this loss
            (:func:`prunekit.train.lr.find_lr`; the model is restored after it) picks the rate
            of lowest loss (``AUTO_LR_DIVISOR`` = 1: the one-cycle peak), clipped to
            ``AUTO_LR_BOUNDS``. With a ``pruner``, the test runs on a copy pruned to the
            sparsity the pruner's schedule reaches at the last step, and the rate is a third
            of that (``HELD_LR_DIVISOR``: the run holds it until the schedule ends). Ignored when
            ``optimizer`` is given (its own rate is the peak).
        weight_decay: of the default optimizer.
        optimizer: an optimizer factory ``params -> Optimizer`` (or, with ``inplace=True``, an
            optimizer over the model's parameters).
        scheduler: ``"cosine"`` (default) or ``"linear"`` decay to zero at the last step, or
            ``"constant"``, each after a linear warm-up over the first ``warmup`` fraction of
            the steps (applied to any optimizer's rates); ``None`` keeps the rate constant with
            no warm-up; or a factory ``optimizer -> scheduler`` (a torch lr scheduler), stepped
            after every optimizer step, with no warm-up added. With a ``pruner`` whose schedule
            has an ``end_step`` inside the run, ``"cosine"`` and ``"linear"`` hold the peak
            until that step and decay over the rest (the model recovers at its final sparsity
            over a whole decay instead of at a rate already halved). The steps of the run are
            ``epochs * len(data)`` (or ``max_steps``); without either, the rate stays constant.
        warmup: fraction of the steps spent warming up (``0 <= warmup < 1``).
        temperature, task_weight, kd_weight, hidden_weight: the loss is ``task_weight * task +
            kd_weight * T**2 * KL(teacher || student) + hidden_weight * MSE(hidden states)``;
            ``kd_weight=0`` turns the logit term off. ``temperature=None`` (the default) is
            ``DEFAULT_TEMPERATURE`` (2), or ``GRADUAL_TEMPERATURE`` (4) when a ``pruner``
            runs.
        hidden_layers: name patterns of submodules whose outputs are matched (student and
            teacher must have the same module names, as a pruned copy does).
        forward_fn: ``forward_fn(model, batch) -> output``; default :func:`default_forward`.
            The student's output comes from the call ``loss_fn`` makes when there is one.
        logits_fn: ``logits_fn(output) -> logits``; default: a tensor output, ``.logits``, or
            the first element.
        evaluate: ``evaluate(model) -> float``, called before training, after every epoch (or
            every ``eval_every`` steps) and at the end; ``mode`` ``"max"`` or ``"min"`` says
            which is better.
        patience: stop after this many evaluations without an improvement above ``min_delta``.
        restore_best: load the best evaluated weights at the end (only states at the pruner's
            final sparsity compete when a pruner runs).
        pruner: a :class:`GradualPruner` built on ``model``; stepped after every optimizer step
            (needs ``inplace=True``: it prunes the model it was built on).
        grad_clip: clip the gradient norm to this value.
        keep_zeros: mask the zeros of unmasked prunable weights for the run, so a finalized
            sparse model stays sparse (masks added this way are removed at the end).
        checkpoint: a folder; the run's state (model, optimizer, schedule, pruner, random
            generators, history, best state) is written there after every finished epoch
            (``epoch-NNNNNN/`` with safetensors + JSON, atomically, older points removed).
            Called again with the same arguments and the same starting model, ``finetune``
            resumes after the last finished epoch (a finished run is only loaded), giving the
            same weights as an uninterrupted run when ``data`` shuffles with a
            ``DataLoader(generator=...)`` or the global torch generator. Different arguments
            raise an error naming them.
        inplace: train ``model`` itself; by default a deep copy is trained.
        progress: show a progress bar.

    Returns:
        A :class:`FinetuneResult` with the trained model in ``.model``.

    Example:
        >>> import torch, prunekit
        >>> from prunekit.train import finetune
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> pruned = prunekit.prune(net, 0.8, scope="local").model
        >>> data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
        >>> ce = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        >>> result = finetune(pruned, data, ce, teacher=net, epochs=2, lr=1e-2, progress=False)
        >>> int((result.model[0].weight == 0).sum())  # the 80 % zeros of the first layer stay
        102
    """
    refuse_accelerated(model, "finetune")  # sparse-kernel weights are buffers: nothing trains
    refuse_nonfinite_parameters(model, "finetune")  # one NaN spreads to every weight in a step
    epochs = _check_count("epochs", epochs, allow_none=False)
    max_steps = _check_count("max_steps", max_steps)
    eval_every = _check_count("eval_every", eval_every)
    patience = _check_count("patience", patience)
    lr = _check_lr(lr)
    scheduler = _check_scheduler(scheduler)
    warmup = _check_number("warmup", warmup)
    if warmup >= 1:
        raise ValueError(f"warmup is a fraction of the steps, 0 <= warmup < 1; got {warmup!r}")
    weight_decay = _check_number("weight_decay", weight_decay)
    if temperature is None:
        temperature = GRADUAL_TEMPERATURE if pruner is not None else DEFAULT_TEMPERATURE
    temperature = _check_number("temperature", temperature, positive=True)
    task_weight = _check_number("task_weight", task_weight)
    kd_weight = _check_number("kd_weight", kd_weight)
    hidden_weight = _check_number("hidden_weight", hidden_weight)
    min_delta = _check_number("min_delta", min_delta)
    if grad_clip is not None:
        grad_clip = _check_number("grad_clip", grad_clip, positive=True)
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if loss_fn is None and teacher is None:
        raise ValueError(
            "finetune needs loss_fn=<callable(model, batch) -> loss>, teacher=, or both"
        )
    if patience is not None and evaluate is None:
        raise ValueError("patience (early stopping) needs evaluate=<callable(model) -> float>")
    if teacher is None and hidden_layers is not None:
        raise ValueError("hidden_layers needs a teacher= to match against")
    if teacher is not None and teacher is model:
        raise ValueError("the teacher must be a separate model (e.g. the dense original)")
    if pruner is not None:
        if not isinstance(pruner, GradualPruner):
            raise TypeError(f"pruner must be a GradualPruner, got {type(pruner).__name__}")
        if pruner.model is not model:
            raise ValueError("the pruner was built on another model; build it on `model`")
        if not inplace:
            raise ValueError("with a pruner, pass inplace=True: the pruner prunes its own model")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a folder path, got {type(checkpoint).__name__}")

    if not inplace:
        model = copy_model(model, "finetune")
    use_kd = teacher is not None and kd_weight > 0
    hidden_names: list[str] = []
    teacher_was_training = False
    if teacher is not None:
        if hidden_layers is not None and hidden_weight > 0:
            hidden_names = resolve_modules(model, hidden_layers)
            Capture(teacher, hidden_names)  # checks the teacher has the same submodules
        teacher_was_training = teacher.training
    forward = forward_fn or default_forward
    logits_of = logits_fn or default_logits
    if isinstance(loss_fn, nn.modules.loss._Loss):  # nn.CrossEntropyLoss(): (output, target)
        loss_fn = _module_loss(loss_fn, forward, logits_of)
    device = _model_device(model)
    was_training = model.training
    sign = 1.0 if mode == "max" else -1.0
    try:
        per_epoch: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    total_steps = epochs * per_epoch if per_epoch is not None else None
    if max_steps is not None:
        total_steps = min(total_steps or max_steps, max_steps)

    def compute_loss(batch: Any, net: nn.Module | None = None) -> torch.Tensor:
        net = model if net is None else net
        batch = to_device(batch, device)
        total = torch.zeros((), device=device)
        student_out: list[Any] = []
        with Capture(net, hidden_names) as student_hidden:
            if loss_fn is not None:
                hook = net.register_forward_hook(lambda m, a, out: student_out.append(out))
                try:
                    task = loss_fn(net, batch)
                finally:
                    hook.remove()
                if not isinstance(task, torch.Tensor) or task.dim() != 0:
                    raise TypeError("loss_fn(model, batch) must return a scalar tensor")
                total = total + task_weight * task
            if (use_kd or hidden_names) and not student_out:
                student_out.append(forward(net, batch))
        if teacher is not None:
            with torch.no_grad(), Capture(teacher, hidden_names) as teacher_hidden:
                teacher_out = forward(teacher, batch)
            if use_kd:
                total = total + kd_weight * kd_loss(
                    logits_of(student_out[-1]), logits_of(teacher_out).detach(), temperature
                )
            if hidden_names:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                parts = [
                    hidden_loss(student_hidden.outputs[n], teacher_hidden.outputs[n], mask)
                    for n in hidden_names
                ]
                total = total + hidden_weight * torch.stack(parts).mean()
        return total

    settings: dict[str, Any] = {
        "epochs": epochs,
        "max_steps": max_steps,
        "batches_per_epoch": per_epoch,
        "lr": lr,
        "weight_decay": weight_decay,
        "optimizer": "AdamW" if optimizer is None else type(optimizer).__name__,
        "scheduler": scheduler if scheduler is None or isinstance(scheduler, str) else "callable",
        "warmup": warmup,
        "temperature": temperature,
        "task_weight": task_weight,
        "kd_weight": kd_weight,
        "hidden_layers": hidden_names,
        "hidden_weight": hidden_weight,
        "loss_fn": loss_fn is not None,
        "teacher": teacher is not None,
        "pruner": pruner is not None,
        "eval_every": eval_every,
        "mode": mode,
        "patience": patience,
        "min_delta": min_delta,
        "restore_best": restore_best,
        "grad_clip": grad_clip,
        "keep_zeros": keep_zeros,
        "parameters": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    resume: tuple[int, dict[str, Any]] | None = None
    if checkpoint is not None:
        resume = latest_point(checkpoint)
        if resume is not None:
            _check_same_run(resume[1]["settings"], settings, checkpoint)

    result = FinetuneResult(model=model)
    best_state: dict[str, torch.Tensor] | None = None
    best_sparsity = pruner.sparsity if pruner is not None else None
    waited = 0
    running, counted = 0.0, 0
    epoch_float = 0.0
    start_epoch = 0
    finished = False
    added_masks: list[tuple[nn.Module, str]] = []
    bar = None
    parallel = is_distributed()  # data parallel: rank 0's start, the same steps everywhere
    split = parallel and not per_rank_data(data)
    try:
        if parallel:
            broadcast_module_(model)
            if teacher is not None:
                broadcast_module_(teacher)
            broadcast_rng_(_data_generators(data))
        added_masks = _mask_zeros(model) if keep_zeros else []
        if teacher is not None:
            teacher.eval()
        peak = lr
        if resume is not None:
            peak = resume[1]["lr"]
        elif optimizer is None and lr == "auto":
            probe = model if pruner is None else _at_final_sparsity(model, pruner, total_steps)
            result.lr_test = find_lr(
                probe,
                data,
                lambda batch: compute_loss(batch, probe),
                lambda params, rate: torch.optim.AdamW(params, lr=rate, weight_decay=weight_decay),
                steps=RANGE_TEST_STEPS
                if total_steps is None
                else min(RANGE_TEST_STEPS, max(20, total_steps // 4)),
                divisor=AUTO_LR_DIVISOR if pruner is None else HELD_LR_DIVISOR,
                after_step=lambda: reapply_masks(probe),
            )
            del probe
            low, high = AUTO_LR_BOUNDS
            peak = broadcast_object(min(max(result.lr_test.lr, low), high))
        result.lr = float(peak) if optimizer is None else None
        opt = _make_optimizer(optimizer, model, result.lr or 0.0, weight_decay)
        if pruner is not None and pruner.optimizer is None:
            pruner.optimizer = opt
        if callable(scheduler):
            sched, warm = scheduler(opt), None
        else:
            sched = None
            kind = scheduler or "constant"
            warm = WarmupSchedule(
                opt, kind, total_steps, warmup if scheduler else 0.0, hold=_pruning_steps(pruner)
            )
            if total_steps is None and (kind != "constant" or warmup > 0) and scheduler:
                warnings.warn(
                    f"prunekit: finetune cannot size the {kind!r} schedule: data has no len() "
                    "and max_steps is not set; the learning rate stays constant",
                    stacklevel=2,
                )

        if resume is not None:
            done_epochs, state = resume
            if pruner is not None:
                pruner.load_state_dict(state["pruner"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None and state.get("scheduler") is not None:
                sched.load_state_dict(state["scheduler"])
            result.steps = state["steps"]
            result.history = state["history"]
            result.best_metric = state["best_metric"]
            result.best_step = state["best_step"]
            result.stopped_early = state["stopped_early"]
            result.resumed_epoch = done_epochs
            best_state = state.get("best_state")
            best_sparsity = state["best_sparsity"]
            waited, running, counted = state["waited"], state["running"], state["counted"]
            epoch_float = state["epoch_float"]
            finished = state["finished"]
            start_epoch = done_epochs
            _set_rng_state(state["rng"], data)

        def save_point(epoch_done: int, is_finished: bool) -> None:
            if checkpoint is None:
                return
            state = {
                "settings": settings,
                "lr": result.lr if optimizer is None else lr,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "pruner": pruner.state_dict() if pruner is not None else None,
                "steps": result.steps,
                "history": result.history,
                "best_metric": result.best_metric,
                "best_step": result.best_step,
                "best_state": best_state,
                "best_sparsity": best_sparsity,
                "stopped_early": result.stopped_early,
                "waited": waited,
                "running": running,
                "counted": counted,
                "epoch_float": epoch_float,
                "finished": is_finished,
                "rng": _rng_state(data),
            }
            if is_main():  # under torch.distributed: written once, by rank 0
                write_point(checkpoint, epoch_done, state)
            barrier()

        def run_evaluation() -> bool:
            """Evaluate, update the best state; True when early stopping should end the run."""
            nonlocal best_state, best_sparsity, waited, running, counted
            row: dict[str, float] = {"step": result.steps, "epoch": epoch_float}
            row["train_loss"] = running / counted if counted else float("nan")
            running, counted = 0.0, 0
            if pruner is not None:
                row["sparsity"] = pruner.sparsity
            if evaluate is None:
                result.history.append(row)
                return False
            was = model.training
            metric = float(broadcast_object(float(evaluate(model))))  # rank 0's decides
            model.train(was)
            row["metric"] = metric
            result.history.append(row)
            if pruner is not None and pruner.sparsity != best_sparsity:
                result.best_metric, result.best_step, best_state = None, None, None
                best_sparsity, waited = pruner.sparsity, 0
            if result.best_metric is None or sign * (metric - result.best_metric) > min_delta:
                result.best_metric, result.best_step, waited = metric, result.steps, 0
                if restore_best:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                return False
            waited += 1
            return patience is not None and waited >= patience

        bar = tqdm(
            total=total_steps,
            initial=result.steps,
            desc="finetune",
            unit="step",
            disable=not progress or not is_main(),
        )
        if evaluate is not None and resume is None:
            run_evaluation()
        model.train()
        done = finished
        trained = [p for p in model.parameters() if p.requires_grad]
        checked = not split
        for epoch in range(start_epoch, epochs):
            if done:
                break
            seen = 0
            for batch in data:
                share = 1.0 / world_size()
                if split:  # every rank holds the global batch and trains on its rows
                    if not checked:
                        check_same_batch(batch)
                        checked = True
                    batch, share = split_batch(batch)
                loss = compute_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                step_loss = average_gradients_(trained, share, loss) if parallel else None
                value = float(loss.detach()) if step_loss is None else step_loss
                if not math.isfinite(value):  # every rank sees the same averaged loss
                    for module, name in added_masks:
                        remove_mask(module, name)
                    model.train(was_training)
                    raise ValueError(
                        f"finetune: the training loss is {value} at step {result.steps + 1}, so "
                        "the run stopped before that step changed any weight ("
                        + ("the model keeps the weights of the steps before; " if inplace else "")
                        + f"lr={result.lr}). Lower lr, set grad_clip=, or check the data and "
                        "loss_fn for NaN / inf."
                    )
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if warm is not None:
                    warm.set_step(result.steps)
                opt.step()
                if sched is not None:
                    sched.step()
                if pruner is not None:
                    pruner.step()
                else:
                    reapply_masks(model)
                result.steps += 1
                seen += 1
                running += float(loss.detach()) if step_loss is None else step_loss
                counted += 1
                epoch_float = epoch + seen / per_epoch if per_epoch else float(epoch)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
                if eval_every is not None and result.steps % eval_every == 0:
                    if run_evaluation():
                        result.stopped_early = done = True
                if done or (max_steps is not None and result.steps >= max_steps):
                    done = True
                    break
            if per_epoch is None and not done:
                epoch_float = float(epoch + 1)
            if eval_every is None and not result.stopped_early:
                if run_evaluation():
                    result.stopped_early = done = True
            if done or epoch + 1 == epochs:
                if eval_every is not None and evaluate is not None and counted:
                    run_evaluation()
                done = True
            save_point(epoch + 1, done)
    except KeyboardInterrupt:
        result.interrupted = True
        warnings.warn(f"prunekit: finetune interrupted after {result.steps} steps", stacklevel=2)
    finally:
        if bar is not None:
            bar.close()
        if teacher is not None:
            teacher.train(teacher_was_training)
    if restore_best and best_state is not None:
        if pruner is not None and pruner.sparsity != best_sparsity:
            warnings.warn(
                "prunekit: the pruner raised sparsity after the last evaluation; the final "
                "weights are kept (evaluate after the schedule ends to restore the best state)",
                stacklevel=2,
            )
        else:
            model.load_state_dict(best_state)
    for module, name in added_masks:
        remove_mask(module, name)
    model.train(was_training)
    return result
