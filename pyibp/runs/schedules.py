"""The optimiser of a recipe and its schedules, all functions of the global step (the batch
count), so that a resumed run continues them exactly: learning rate, ε, κ and β."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn

from ..schedules import LinearRamp, Schedule, SmoothRamp, StepList
from ..train import cyclic_lr
from .recipe import TrainConfig

__all__ = ["make_optimizer", "make_scheduler", "lr_factor", "eps_schedules"]


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


def eps_schedules(config: TrainConfig, steps_per_epoch: int) -> Tuple[Schedule, Schedule, Schedule]:
    """``(ε, κ, β)`` of certified training as functions of the global step.

    ε is 0 for ``warmup_steps`` (default one epoch), then ramps to ``target_eps`` over
    ``ramp_steps`` (default 35 % of all steps); κ and β ramp linearly over the same steps.
    With ``eps_list`` ε is one value per epoch instead, as in the tutorial.
    """
    total = config.epochs * steps_per_epoch
    warmup = steps_per_epoch if config.warmup_steps is None else config.warmup_steps
    ramp = round(0.35 * total) if config.ramp_steps is None else config.ramp_steps
    if config.eps_list is not None:
        eps: Schedule = StepList(config.eps_list, steps_per_epoch)
    elif config.eps_ramp == "smooth":
        eps = SmoothRamp(0.0, config.target_eps, warmup, ramp)
    else:
        eps = LinearRamp(0.0, config.target_eps, warmup, ramp)
    kappa = LinearRamp(config.kappa_start, config.kappa_end, warmup, ramp)
    beta = LinearRamp(config.beta_start, config.beta_end, warmup, ramp)
    return eps, kappa, beta

