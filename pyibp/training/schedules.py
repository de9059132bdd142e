"""Every schedule of training, counted in optimizer steps (batches), not epochs.

* ε, κ and β of certified training: :class:`Constant`, :class:`LinearRamp`, :class:`SmoothRamp`,
  :class:`StepList`, each a callable ``sched(step) -> float`` with a ``final`` attribute (its value
  once the ramp is over); plain numbers work wherever a schedule is expected (a constant).
  :func:`eps_schedules` builds them from a recipe (:class:`pyibp.runs.TrainConfig`).
* the learning rate of "fast" FGSM training: :func:`cyclic_lr`.

A resumed run continues them exactly: each is a function of the global step.

Example:
    >>> eps = LinearRamp(0.0, 0.1, begin_step=100, ramp_steps=400)
    >>> eps(0), eps(300), eps(10_000)
    (0.0, 0.05, 0.1)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["Constant", "LinearRamp", "SmoothRamp", "StepList", "as_schedule", "Schedule", "cyclic_lr",
           "eps_schedules", "warmup_and_ramp", "eps_shortfall", "ScheduleWarning"]

Schedule = Callable[[int], float]


def _check_step(step: int) -> int:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def _check_counts(begin_step: int, ramp_steps: int) -> None:
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}")
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")


class Constant:
    """The same value at every step.

    Example:
        >>> Constant(0.5)(123)
        0.5
    """

    def __init__(self, value: float):
        self.value = self.final = float(value)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value})"


class LinearRamp:
    """``start`` until ``begin_step``, then linear to ``end`` over ``ramp_steps`` steps, then ``end``.

    Equals ``start + (end - start) * clamp((step - begin_step) / ramp_steps, 0, 1)``; with
    ``ramp_steps == 0`` it jumps to ``end`` at ``begin_step``. This is the ramp of Gowal et al. (2018)
    for ε (0 to the target) and κ (1 to 0.5), and of Zhang et al. (2020) for β (1 to 0).

    Example:
        >>> kappa = LinearRamp(1.0, 0.5, begin_step=0, ramp_steps=10)
        >>> [kappa(s) for s in (0, 5, 10, 20)]
        [1.0, 0.75, 0.5, 0.5]
    """

    def __init__(self, start: float, end: float, begin_step: int, ramp_steps: int):
        _check_counts(begin_step, ramp_steps)
        self.start, self.end, self.final = float(start), float(end), float(end)
        self.begin_step, self.ramp_steps = int(begin_step), int(ramp_steps)

    def __call__(self, step: int) -> float:
        t = _check_step(step) - self.begin_step
        if t < 0:
            return self.start
        if t >= self.ramp_steps:
            return self.end
        return self.start + (self.end - self.start) * t / self.ramp_steps

    def __repr__(self) -> str:
        return f"LinearRamp({self.start}, {self.end}, begin_step={self.begin_step}, ramp_steps={self.ramp_steps})"


class SmoothRamp:
    """Polynomial-then-linear ramp (auto_LiRPA's ``SmoothedScheduler``, used by Shi et al. 2021).

    ``start`` until ``begin_step``; for the first ``mid`` fraction of the ramp it grows as
    ``start + a * t**power`` (slowly at first, so the first, most fragile steps see tiny ε); then it
    continues linearly with the same slope, reaching ``end`` at ``begin_step + ramp_steps``. ``a``
    is chosen so that value and slope match at the switch::

        m = mid * ramp_steps
        a = (end - start) / (power * m**(power - 1) * (ramp_steps - m) + m**power)

    Example:
        >>> eps = SmoothRamp(0.0, 0.4, begin_step=0, ramp_steps=1000)
        >>> eps(0), round(eps(250), 4), round(eps(625), 4), eps(1000)
        (0.0, 0.0308, 0.2154, 0.4)
    """

    def __init__(self, start: float, end: float, begin_step: int, ramp_steps: int, *,
                 power: float = 4.0, mid: float = 0.25):
        _check_counts(begin_step, ramp_steps)
        if not power >= 1.0:
            raise ValueError(f"power must be >= 1, got {power}")
        if not 0.0 <= mid < 1.0:
            raise ValueError(f"mid must lie in [0, 1), got {mid}")
        self.start, self.end, self.final = float(start), float(end), float(end)
        self.begin_step, self.ramp_steps = int(begin_step), int(ramp_steps)
        self.power, self.mid = float(power), float(mid)
        self._m = mid * ramp_steps
        denom = power * self._m ** (power - 1) * (ramp_steps - self._m) + self._m ** power
        self._a = (self.end - self.start) / denom if denom > 0 else 0.0

    def __call__(self, step: int) -> float:
        t = _check_step(step) - self.begin_step
        if t <= 0:
            return self.start if t < 0 or self.ramp_steps > 0 else self.end
        if t >= self.ramp_steps:
            return self.end
        if t < self._m:
            return self.start + self._a * t ** self.power
        at_mid = self.start + self._a * self._m ** self.power
        return at_mid + (self.end - at_mid) * (t - self._m) / (self.ramp_steps - self._m)

    def __repr__(self) -> str:
        return (f"SmoothRamp({self.start}, {self.end}, begin_step={self.begin_step}, "
                f"ramp_steps={self.ramp_steps}, power={self.power}, mid={self.mid})")


class StepList:
    """One value per epoch from a list, held for the last epoch's value afterwards.

    This is how the tutorial ("Adversarial Robustness: Theory and Practice", chapter 4) writes its
    ε schedule, e.g. ``[0.0, 0.0001, 0.001, 0.01, 0.01, 0.05, ...] + 15 * [0.1]``. Equals
    ``values_per_epoch[min(step // steps_per_epoch, len(values_per_epoch) - 1)]``.

    Example:
        >>> eps = StepList([0.0, 0.01, 0.1], steps_per_epoch=40)
        >>> eps(39), eps(40), eps(10_000)
        (0.0, 0.01, 0.1)
    """

    def __init__(self, values_per_epoch: Sequence[float], steps_per_epoch: int):
        if len(values_per_epoch) == 0:
            raise ValueError("values_per_epoch must hold at least one value, got an empty sequence")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.values = [float(v) for v in values_per_epoch]
        self.steps_per_epoch = int(steps_per_epoch)
        self.final = self.values[-1]

    def __call__(self, step: int) -> float:
        return self.values[min(_check_step(step) // self.steps_per_epoch, len(self.values) - 1)]

    def __repr__(self) -> str:
        return f"StepList({self.values}, steps_per_epoch={self.steps_per_epoch})"


def as_schedule(value: Union[float, Schedule], name: str = "schedule") -> Schedule:
    """A schedule from a schedule (returned as is) or a number (:class:`Constant`).

    Example:
        >>> as_schedule(0.1)(7)
        0.1
    """
    if callable(value):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return Constant(value)
    raise ValueError(f"{name} must be a finite number or a callable step -> float, got {value!r}")


def cyclic_lr(optimizer: torch.optim.Optimizer, total_steps: int, *,
              peak: float = 0.4) -> torch.optim.lr_scheduler.LambdaLR:
    """The triangular one-cycle schedule of Wong et al. (2020), counted in optimizer steps.

    The learning rate rises linearly from 0 to the optimizer's lr at ``peak * total_steps`` and
    falls linearly back to 0 at ``total_steps``; call ``scheduler.step()`` after every
    optimizer step (pass it as ``scheduler=``). Step t trains with the rate at position t + 1, so
    the first step already moves and the last one is close to 0.

    Equivalent to ``lr(t) = np.interp(t + 1, [0, peak * T, T], [0, lr_max, 0])``.

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.2)
        >>> sched = cyclic_lr(opt, total_steps=1000)
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not 0 < peak <= 1:
        raise ValueError(f"peak must lie in (0, 1], got {peak!r}")
    knots = [0.0, peak * total_steps, float(total_steps)]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: float(np.interp(t + 1, knots, [0.0, 1.0, 0.0])))


# ---------------------------------------------------------------------------------------------
# the schedules of a recipe (a pyibp.runs.TrainConfig, read by its fields)

# The default warm-up (one epoch) takes at most this share of a short run, so that ε still reaches
# its target in a run of one or a few epochs.
MAX_DEFAULT_WARMUP = 0.15
DEFAULT_RAMP = 0.35


class ScheduleWarning(UserWarning):
    """A recipe whose ε never reaches the value it is trained for."""


def eps_schedules(config: Any, steps_per_epoch: int) -> Tuple[Schedule, Schedule, Schedule]:
    """``(ε, κ, β)`` of certified training as functions of the global step, for the recipe ``config``.

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


def warmup_and_ramp(config: Any, steps_per_epoch: int) -> Tuple[int, int]:
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


def eps_shortfall(config: Any, steps_per_epoch: int) -> Optional[str]:
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
