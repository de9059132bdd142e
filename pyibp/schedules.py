"""ε, κ and β schedules for certified training, counted in optimizer steps (batches), not epochs.

Each schedule is a callable ``sched(step) -> float`` with a ``final`` attribute (its value once
the ramp is over). Plain numbers work wherever a schedule is expected (a constant).

Example:
    >>> eps = LinearRamp(0.0, 0.1, begin_step=100, ramp_steps=400)
    >>> eps(0), eps(300), eps(10_000)
    (0.0, 0.05, 0.1)
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

__all__ = ["Constant", "LinearRamp", "SmoothRamp", "StepList", "as_schedule", "Schedule"]

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
