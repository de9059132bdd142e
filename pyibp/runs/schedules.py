"""The optimiser of a recipe and its schedules, all functions of the global step (the batch
count), so that a resumed run continues them exactly: learning rate, ε, κ and β."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..schedules import LinearRamp, Schedule, SmoothRamp, StepList
from ..train import cyclic_lr
from .recipe import TrainConfig

__all__ = ["make_optimizer", "make_scheduler", "lr_factor", "eps_schedules", "warmup_and_ramp", "eps_shortfall",
           "ScheduleWarning"]

# The default warm-up (one epoch) takes at most this share of a short run, so that ε still reaches
# its target in a run of one or a few epochs.
MAX_DEFAULT_WARMUP = 0.15
DEFAULT_RAMP = 0.35


class ScheduleWarning(UserWarning):
    """A recipe whose ε never reaches the value it is trained for."""


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

    ε is 0 for ``warmup_steps``, then ramps to ``target_eps`` over ``ramp_steps`` (defaults:
    :func:`warmup_and_ramp`); κ and β ramp linearly over the same steps. With ``eps_list`` ε is
    one value per epoch instead, as in the tutorial.
    """
    warmup, ramp = warmup_and_ramp(config, steps_per_epoch)
    if config.eps_list is not None:
        eps: Schedule = StepList(config.eps_list, steps_per_epoch)
    elif config.eps_ramp == "smooth":
        eps = SmoothRamp(0.0, config.target_eps, warmup, ramp)
    else:
        eps = LinearRamp(0.0, config.target_eps, warmup, ramp)
    kappa = LinearRamp(config.kappa_start, config.kappa_end, warmup, ramp)
    beta = LinearRamp(config.beta_start, config.beta_end, warmup, ramp)
    return eps, kappa, beta


def warmup_and_ramp(config: TrainConfig, steps_per_epoch: int) -> Tuple[int, int]:
    """``(warm-up steps, ramp steps)`` of a run: the recipe's, or by default one epoch of warm-up
    (at most 15 % of all steps) and a ramp over 35 % of all steps.

    Example:
        >>> warmup_and_ramp(TrainConfig.for_method("ibp", epochs=30), steps_per_epoch=40)
        (40, 420)
        >>> warmup_and_ramp(TrainConfig.for_method("ibp", epochs=1), steps_per_epoch=40)
        (6, 14)
    """
    total = config.epochs * steps_per_epoch
    warmup = (min(steps_per_epoch, round(MAX_DEFAULT_WARMUP * total)) if config.warmup_steps is None
              else config.warmup_steps)
    ramp = round(DEFAULT_RAMP * total) if config.ramp_steps is None else config.ramp_steps
    return warmup, ramp


def eps_shortfall(config: TrainConfig, steps_per_epoch: int) -> Optional[str]:
    """Why ε stays below ``target_eps`` at the run's last step, or None when it gets there.

    Certified training only; a run that is stopped at the end of its warm-up or ramp trains a
    network for a smaller ε than the one it is evaluated at, which must not go unnoticed.
    """
    total = config.epochs * steps_per_epoch
    target = config.target_eps
    reached = eps_schedules(config, steps_per_epoch)[0](total - 1)
    if target == 0 or reached >= target * (1 - 1e-6):
        return None
    if config.eps_list is not None:
        why = f"eps_list gives {reached:g} to epoch {config.epochs}"
        fix = "longer eps_list values or more epochs"
    else:
        warmup, ramp = warmup_and_ramp(config, steps_per_epoch)
        why = f"{warmup} warm-up and {ramp} ramp steps, of the run's {total}"
        fix = "more epochs, or fewer warmup_steps / ramp_steps"
    return (f"ε never reaches its target {target:g}: it is {reached:.4g} at the last step ({why}); "
            f"the network is trained for a smaller ε than it is evaluated at (give {fix})")
