"""Linear relaxations of activations on a box: lines ``a_low z + b_low <= f(z) <= a_up z + b_up``
for every ``z`` in ``[lower, upper]``, elementwise. CROWN's backward pass takes the lower line
where a coefficient is positive and the upper one where it is negative.

* ReLU (:func:`pyibp.ops.relu_relaxation`): the chord above, slope 0 or 1 below (whichever is closer).
* LeakyReLU, ReLU6, Hardtanh: written through ReLU, ``αz + (1-α) relu(z)`` and
  ``a + relu(z - a) - relu(z - b)``, each ReLU relaxed as above (exact on a linear piece).
* Softplus, ELU (α <= 1): convex, so the chord lies above and the tangent at the midpoint below.
* Tanh, Sigmoid: convex for z <= 0 and concave for z >= 0: chord and midpoint tangent on a box
  on one side; on a box across 0, the lines of slope ``k = min(f'(lower), f'(upper))`` through
  ``(upper, f(upper))`` (above) and ``(lower, f(lower))`` (below), sound because ``f' >= k``
  on the whole box (f' is unimodal with its maximum at 0).
* ELU with α > 1 (neither convex nor concave): the same ``k``-lines with ``k = min f'`` on the box.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["relaxation"]

Lines = Tuple[Tensor, Tensor, Tensor, Tensor]


def _relu_lines(lower: Tensor, upper: Tensor) -> Lines:
    s_low, s_up, t = ops.relu_relaxation(lower, upper)
    return s_low, torch.zeros_like(t), s_up, t


def _shifted_relu(lower: Tensor, upper: Tensor, at: float) -> Lines:
    """Lines of ``relu(z - at)`` as functions of z."""
    a_low, b_low, a_up, b_up = _relu_lines(lower - at, upper - at)
    return a_low, b_low - a_low * at, a_up, b_up - a_up * at


def _hardtanh(lower: Tensor, upper: Tensor, low: float, high: float) -> Lines:
    # clamp(z, low, high) = low + relu(z - low) - relu(z - high)
    p_low, q_low, p_up, q_up = _shifted_relu(lower, upper, low)
    r_low, s_low, r_up, s_up = _shifted_relu(lower, upper, high)
    return p_low - r_up, low + q_low - s_up, p_up - r_low, low + q_up - s_low


def _leaky(lower: Tensor, upper: Tensor, alpha: float) -> Lines:
    # alpha z + (1 - alpha) relu(z); a negative weight swaps the ReLU's lines
    a_low, b_low, a_up, b_up = _relu_lines(lower, upper)
    c = 1.0 - alpha
    if c < 0:
        a_low, b_low, a_up, b_up = a_up, b_up, a_low, b_low
    return alpha + c * a_low, c * b_low, alpha + c * a_up, c * b_up


def _chord(f: Callable, df: Callable, lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor]:
    width = upper - lower
    wide = width > 1e-6
    mid = (lower + upper) / 2
    f_low, f_up = f(lower), f(upper)
    slope = torch.where(wide, (f_up - f_low) / torch.where(wide, width, torch.ones_like(width)), df(mid))
    return slope, torch.where(wide, f_low - slope * lower, f(mid) - slope * mid)


def _tangent(f: Callable, df: Callable, at: Tensor) -> Tuple[Tensor, Tensor]:
    slope = df(at)
    return slope, f(at) - slope * at


def _convex(f: Callable, df: Callable, lower: Tensor, upper: Tensor) -> Lines:
    return (*_tangent(f, df, (lower + upper) / 2), *_chord(f, df, lower, upper))


def _k_lines(f: Callable, k: Tensor, lower: Tensor, upper: Tensor) -> Lines:
    return k, f(lower) - k * lower, k, f(upper) - k * upper


def _s_shaped(f: Callable, df: Callable, lower: Tensor, upper: Tensor) -> Lines:
    convex = _convex(f, df, lower, upper)                       # right for upper <= 0
    tangent, chord = convex[:2], convex[2:]
    concave = (*chord, *tangent)                                # right for lower >= 0
    across = _k_lines(f, torch.minimum(df(lower), df(upper)), lower, upper)
    left, right = upper <= 0, lower >= 0
    return tuple(torch.where(left, v, torch.where(right, c, a)) for v, c, a in zip(convex, concave, across))


def relaxation(module: nn.Module, lower: Tensor, upper: Tensor) -> Lines:
    """``(a_low, b_low, a_up, b_up)``, each of ``lower``'s shape, with
    ``a_low z + b_low <= module(z) <= a_up z + b_up`` for every z in ``[lower, upper]``.

    Args:
        module: one of nn.ReLU, LeakyReLU (slope >= 0), ReLU6, Hardtanh, ELU, Softplus, Tanh, Sigmoid.
        lower, upper: (B, *) the pre-activation box.
    Example:
        >>> a_low, b_low, a_up, b_up = relaxation(nn.Tanh(), torch.tensor([-1.0]), torch.tensor([2.0]))
        >>> z = torch.linspace(-1, 2, 50)
        >>> bool((a_low * z + b_low <= torch.tanh(z) + 1e-6).all() and (torch.tanh(z) <= a_up * z + b_up + 1e-6).all())
        True
    """
    if isinstance(module, nn.ReLU):
        return _relu_lines(lower, upper)
    if isinstance(module, nn.LeakyReLU):
        return _leaky(lower, upper, float(module.negative_slope))
    if isinstance(module, nn.Hardtanh):           # ReLU6 is Hardtanh(0, 6)
        return _hardtanh(lower, upper, float(module.min_val), float(module.max_val))
    if isinstance(module, nn.Softplus):
        beta = float(module.beta)
        return _convex(module, lambda z: torch.sigmoid(beta * z), lower, upper)
    if isinstance(module, nn.ELU):
        alpha = float(module.alpha)
        df = lambda z: torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(torch.clamp(z, max=0)))  # noqa: E731
        if alpha <= 1:
            return _convex(module, df, lower, upper)
        return _k_lines(module, torch.minimum(df(lower), torch.ones_like(lower)), lower, upper)
    if isinstance(module, nn.Tanh):
        return _s_shaped(torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, lower, upper)
    if isinstance(module, nn.Sigmoid):
        return _s_shaped(torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), lower, upper)
    raise TypeError(f"no linear relaxation for {type(module).__name__}")
