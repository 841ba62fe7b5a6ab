"""Train-time pruning and recovery: schedules, the gradual pruner, lottery tickets, pruning at
initialisation, mask-preserving fine-tuning with distillation, and a Hugging Face callback.

>>> import torch
>>> from prunekit.train import GradualPruner, PolynomialSchedule
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> pruner = GradualPruner(net, PolynomialSchedule(final_sparsity=0.75, end_step=100))
>>> pruner.sparsity
0.0

``PruningCallback`` (in :mod:`prunekit.train.hf`) needs ``transformers`` and is imported on
first use.
"""

from typing import Any

from prunekit.train.distill import Capture, hidden_loss, kd_loss
from prunekit.train.finetune import FinetuneResult, finetune
from prunekit.train.init import prune_at_init
from prunekit.train.lottery import LotteryResult, Ticket, TicketRound, lottery_ticket
from prunekit.train.pruner import GradualPruner, clear_optimizer_state
from prunekit.train.schedules import (
    ConstantSchedule,
    FunctionSchedule,
    IterativeSchedule,
    PolynomialSchedule,
    Schedule,
    as_schedule,
)

__all__ = [
    "Capture",
    "ConstantSchedule",
    "FinetuneResult",
    "FunctionSchedule",
    "GradualPruner",
    "IterativeSchedule",
    "LotteryResult",
    "PolynomialSchedule",
    "PruningCallback",
    "Schedule",
    "Ticket",
    "TicketRound",
    "as_schedule",
    "clear_optimizer_state",
    "finetune",
    "hidden_loss",
    "kd_loss",
    "lottery_ticket",
    "prune_at_init",
]


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":
        from prunekit.train.hf import PruningCallback

        return PruningCallback
    raise AttributeError(f"module 'prunekit.train' has no attribute {name!r}")
