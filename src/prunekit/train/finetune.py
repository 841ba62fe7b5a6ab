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
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.masks import apply_mask, is_masked, reapply_masks, remove_mask
from prunekit.targets import all_prunable
from prunekit.train.distill import (
    Capture,
    default_logits,
    hidden_loss,
    kd_loss,
    resolve_modules,
)
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
    """

    model: nn.Module
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    interrupted: bool = False

    def __repr__(self) -> str:
        best = "none" if self.best_metric is None else f"{self.best_metric:.6g}"
        return (
            f"FinetuneResult(steps={self.steps}, best_metric={best}, best_step={self.best_step}, "
            f"stopped_early={self.stopped_early}, interrupted={self.interrupted})"
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


def finetune(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    optimizer: Any = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    temperature: float = 2.0,
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
    inplace: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a (pruned) model without reviving its zeros, optionally distilling a teacher.

    Args:
        model: the model to train.
        data: an iterable of batches (a ``DataLoader``, a list), re-iterated every epoch.
            Tensors in a batch are moved to the model's device.
        loss_fn: ``loss_fn(model, batch) -> scalar`` task loss (as in ``prunekit.prune``).
            Optional with a teacher (pure distillation).
        teacher: the dense model to distil from (run in eval mode, without gradients).
        epochs: passes over ``data``; ``max_steps`` stops earlier.
        lr, weight_decay: of the default optimizer, AdamW.
        optimizer: an optimizer factory ``params -> Optimizer`` (or, with ``inplace=True``, an
            optimizer over the model's parameters).
        scheduler: a learning-rate scheduler factory ``optimizer -> scheduler``, stepped after
            every optimizer step.
        temperature, task_weight, kd_weight, hidden_weight: the loss is ``task_weight * task +
            kd_weight * T**2 * KL(teacher || student) + hidden_weight * MSE(hidden states)``;
            ``kd_weight=0`` turns the logit term off.
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
    epochs = _check_count("epochs", epochs, allow_none=False)
    max_steps = _check_count("max_steps", max_steps)
    eval_every = _check_count("eval_every", eval_every)
    patience = _check_count("patience", patience)
    lr = _check_number("lr", lr, positive=True)
    weight_decay = _check_number("weight_decay", weight_decay)
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

    if not inplace:
        model = copy.deepcopy(model)
    use_kd = teacher is not None and kd_weight > 0
    hidden_names: list[str] = []
    if teacher is not None:
        if hidden_layers is not None and hidden_weight > 0:
            hidden_names = resolve_modules(model, hidden_layers)
            Capture(teacher, hidden_names)  # checks the teacher has the same submodules
        teacher_was_training = teacher.training
        teacher.eval()
    forward = forward_fn or default_forward
    logits_of = logits_fn or default_logits
    device = _model_device(model)
    added_masks = _mask_zeros(model) if keep_zeros else []
    opt = _make_optimizer(optimizer, model, lr, weight_decay)
    if pruner is not None and pruner.optimizer is None:
        pruner.optimizer = opt
    sched = scheduler(opt) if scheduler is not None else None
    sign = 1.0 if mode == "max" else -1.0

    result = FinetuneResult(model=model)
    best_state: dict[str, torch.Tensor] | None = None
    best_sparsity = pruner.sparsity if pruner is not None else None
    waited = 0
    running, counted = 0.0, 0
    epoch_float = 0.0

    def compute_loss(batch: Any) -> torch.Tensor:
        batch = to_device(batch, device)
        total = torch.zeros((), device=device)
        student_out: list[Any] = []
        with Capture(model, hidden_names) as student_hidden:
            if loss_fn is not None:
                hook = model.register_forward_hook(lambda m, a, out: student_out.append(out))
                try:
                    task = loss_fn(model, batch)
                finally:
                    hook.remove()
                if not isinstance(task, torch.Tensor) or task.dim() != 0:
                    raise TypeError("loss_fn(model, batch) must return a scalar tensor")
                total = total + task_weight * task
            if (use_kd or hidden_names) and not student_out:
                student_out.append(forward(model, batch))
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
        was_training = model.training
        metric = float(evaluate(model))
        model.train(was_training)
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

    try:
        per_epoch: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    total_steps = epochs * per_epoch if per_epoch is not None else None
    if max_steps is not None:
        total_steps = min(total_steps or max_steps, max_steps)
    was_training = model.training
    bar = tqdm(total=total_steps, desc="finetune", unit="step", disable=not progress)
    try:
        if evaluate is not None:
            run_evaluation()
        model.train()
        done = False
        for epoch in range(epochs):
            seen = 0
            for batch in data:
                loss = compute_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                if pruner is not None:
                    pruner.step()
                else:
                    reapply_masks(model)
                result.steps += 1
                seen += 1
                running += float(loss.detach())
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
            if done:
                break
        if eval_every is not None and evaluate is not None and counted:
            run_evaluation()
    except KeyboardInterrupt:
        result.interrupted = True
        warnings.warn(f"prunekit: finetune interrupted after {result.steps} steps", stacklevel=2)
    finally:
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
