"""The optimiser of a recipe and its learning-rate schedule, a function of the global step (the
batch count), so that a resumed run continues it exactly (ε, κ and β: :mod:`pyibp.training.schedules`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..training.schedules import cyclic_lr
from .recipe import TrainConfig

__all__ = ["make_optimizer", "make_scheduler", "lr_factor"]


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the global step (``step`` or ``constant``).

    ``step``: multiplied by ``lr_decay`` at each fraction ``lr_decay_at`` of ``total_steps``.
    Equals ``lr_decay ** sum(step >= round(f * total_steps) for f in lr_decay_at)``.
    """
    milestones = sorted(round(f * total_steps) for f in config.lr_decay_at)
    decay = config.lr_decay if config.lr_schedule == "step" else 1.0

    def factor(step: int) -> float:
        return decay ** sum(step >= m for m in milestones)
    return factor


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per batch (its state_dict holds only numbers, so it checkpoints)."""
    if config.lr_schedule == "cyclic":
        return cyclic_lr(optimizer, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total_steps))
