"""The train-time pruner inside a Hugging Face ``Trainer``, as a callback.

    from prunekit.train import PolynomialSchedule
    from prunekit.train.hf import PruningCallback

    callback = PruningCallback(PolynomialSchedule(final_sparsity=0.8, begin_step=100,
                                                  end_step=2000, frequency=100))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    callback.pruner.finalize()      # bake the zeros in before saving a plain model

The callback builds a :class:`~prunekit.train.GradualPruner` on the Trainer's model and optimizer
when training begins, and steps it right after every optimizer step (``on_optimizer_step``,
while the gradients are still there, which movement scores need). With checkpointing on, the
pruner's state is written into every checkpoint folder (``prunekit_pruner.safetensors`` +
``prunekit_pruner.json``, no pickle) and read back by ``trainer.train(resume_from_checkpoint=
...)``, so a resumed run prunes exactly as an uninterrupted one.

Needs ``transformers`` (and ``accelerate``, which its ``Trainer`` requires).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("prunekit.train.hf needs transformers: pip install 'prunekit[hf]'") from error

from prunekit.patterns import Pattern
from prunekit.scores import Criterion
from prunekit.train.pruner import GradualPruner
from prunekit.train.schedules import SupportsSparsityAt

STATE_TENSORS = "prunekit_pruner.safetensors"
STATE_JSON = "prunekit_pruner.json"
_TENSOR_GROUPS = ("masks", "scores", "previous")


def save_pruner_state(pruner: GradualPruner, folder: str | os.PathLike[str]) -> None:
    """Write ``pruner.state_dict()`` into ``folder`` as safetensors + JSON (no pickle).

    Each file is written to a temporary name and renamed into place.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = pruner.state_dict()
    tensors = {
        f"{group}/{name}": value.detach().contiguous().cpu()
        for group in _TENSOR_GROUPS
        for name, value in state[group].items()
    }
    meta = {k: v for k, v in state.items() if k not in _TENSOR_GROUPS}
    tmp_tensors = folder / (STATE_TENSORS + ".tmp")
    tmp_json = folder / (STATE_JSON + ".tmp")
    save_file(tensors, str(tmp_tensors))
    tmp_json.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_tensors, folder / STATE_TENSORS)
    os.replace(tmp_json, folder / STATE_JSON)


def load_pruner_state(pruner: GradualPruner, folder: str | os.PathLike[str]) -> None:
    """Read a state written by :func:`save_pruner_state` into ``pruner``."""
    folder = Path(folder)
    meta = json.loads((folder / STATE_JSON).read_text())
    tensors = load_file(str(folder / STATE_TENSORS))
    state: dict[str, Any] = dict(meta)
    for group in _TENSOR_GROUPS:
        prefix = group + "/"
        state[group] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    pruner.load_state_dict(state)


class PruningCallback(TrainerCallback):
    """Run a :class:`~prunekit.train.GradualPruner` inside a Hugging Face ``Trainer``.

    Args:
        schedule: the sparsity schedule (counted in optimizer steps, like ``global_step``).
        method, pattern, scope, targets, ignore: as for ``GradualPruner``.
        finalize_at_end: bake the masks in when training ends (the model then saves as a plain
            architecture; the pruner cannot step again).
        **pruner_kwargs: further ``GradualPruner`` keyword arguments (``data``, ``loss_fn``...).

    Attributes:
        pruner: the pruner, built when training begins (None before).

    Example:
        >>> from prunekit.train import PolynomialSchedule
        >>> callback = PruningCallback(PolynomialSchedule(final_sparsity=0.5, end_step=100))
    """

    def __init__(
        self,
        schedule: SupportsSparsityAt | float,
        method: str | Criterion = "magnitude",
        pattern: str | Pattern = "unstructured",
        scope: str = "global",
        targets: str | Iterable[str] | None = None,
        ignore: str | Iterable[str] | None = None,
        *,
        finalize_at_end: bool = False,
        **pruner_kwargs: Any,
    ) -> None:
        self.schedule = schedule
        self.options = dict(
            method=method, pattern=pattern, scope=scope, targets=targets, ignore=ignore
        )
        self.pruner_kwargs = pruner_kwargs
        self.finalize_at_end = finalize_at_end
        self.pruner: GradualPruner | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("PruningCallback: the Trainer passed no model to on_train_begin")
        if self.pruner is None or self.pruner.model is not model:
            self.pruner = GradualPruner(
                model, self.schedule, **self.options, optimizer=optimizer, **self.pruner_kwargs
            )
        elif optimizer is not None:
            self.pruner.optimizer = optimizer
        if state.global_step > 0 and self.pruner.step_count != state.global_step:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (folder / STATE_JSON).is_file():
                load_pruner_state(self.pruner, folder)
            else:
                warnings.warn(
                    f"prunekit: resuming at step {state.global_step} but {folder} has no pruner "
                    "state; the pruner starts counting from there with fresh scores",
                    stacklevel=2,
                )
                self.pruner.step_count = state.global_step
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.pruner is not None and args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                save_pruner_state(self.pruner, folder)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the applied sparsity to the logged row (and to ``state.log_history``)."""
        if self.pruner is None:
            return control
        if logs is not None:
            logs["sparsity"] = self.pruner.sparsity
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = self.pruner.sparsity
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is not None and self.finalize_at_end:
            self.pruner.finalize()
        return control
