"""The Hugging Face Trainer callback: target sparsity reached, exact resume from a checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prunekit.masks import get_mask  # noqa: E402
from prunekit.train import PolynomialSchedule  # noqa: E402
from prunekit.train.hf import PruningCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x, labels=None):
        logits = self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


SCHEDULE = PolynomialSchedule(final_sparsity=0.8, begin_step=2, end_step=10, frequency=2)


def make_trainer(tmp_path, callbacks, max_steps: int = 14, save_steps: int | None = None):
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_strategy="steps",
        logging_steps=5,
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=Tiny(), args=args, train_dataset=dataset(), callbacks=callbacks)


def sparsity(model: nn.Module) -> float:
    weights = [model.fc1.weight, model.fc2.weight]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_trainer_callback_reaches_its_target_sparsity(tmp_path) -> None:
    callback = PruningCallback(SCHEDULE, method="movement")
    trainer = make_trainer(tmp_path, [callback])
    trainer.train()
    model = trainer.model
    assert callback.pruner.step_count == trainer.state.global_step == 14
    assert callback.pruner.sparsity == 0.8
    assert sparsity(model) == round(0.8 * (16 * 32 + 32 * 32)) / (16 * 32 + 32 * 32)
    assert get_mask(model.head) is None  # the head is not pruned by default
    logged = [row["sparsity"] for row in trainer.state.log_history if "sparsity" in row]
    assert logged and logged[-1] == 0.8
    assert callback.pruner.optimizer is trainer.optimizer


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_trainer_resume_prunes_like_an_uninterrupted_run(tmp_path) -> None:
    straight = make_trainer(tmp_path / "a", [PruningCallback(SCHEDULE, method="movement")])
    straight.train()

    first = make_trainer(
        tmp_path / "b", [PruningCallback(SCHEDULE, method="movement"), StopAt(6)], save_steps=6
    )
    first.train()
    assert (tmp_path / "b" / "checkpoint-6" / "prunekit_pruner.json").is_file()
    callback = PruningCallback(SCHEDULE, method="movement")
    resumed = make_trainer(tmp_path / "b", [callback], save_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    assert callback.pruner.step_count == 14
    expected = straight.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
