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
* GELU, SiLU: *not monotone* (one minimum, at ``z* < 0``), convex on ``[-c, c]`` and concave outside
  (``c`` where ``f''`` vanishes). Tangent and chord on a box inside one region; elsewhere ``k``-lines
  through an end point with ``k`` the least or the greatest ``f'`` on the box (``f'`` falls, rises and
  falls again, with its turning points at ``±c``), whichever is closer to f at the box's middle.
* MaxPool2d (:func:`maxpool_relaxation`): below by the window's element with the largest lower
  bound, above by it when it dominates its window and by the window's largest upper bound otherwise.

:func:`activation_interval` is the IBP rule of every activation: ``f(l), f(u)`` for the monotone
ones, the minimum ``f(z*)`` where the box contains ``z*`` for GELU and SiLU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .. import ops

__all__ = ["relaxation", "activation_interval", "is_monotone", "maxpool_relaxation", "CURVED"]

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


@dataclass(frozen=True)
class Curved:
    """A smooth activation with one minimum ``f(z_min)`` and no maximum, convex on ``[-c, c]`` and
    concave outside, whose ``f'`` falls on ``(-inf, -c]``, rises on ``[-c, c]`` and falls on ``[c, inf)``
    (GELU and SiLU). ``f_min`` is rounded down a little, so that it stays below the float f."""

    f: Callable[[Tensor], Tensor]
    df: Callable[[Tensor], Tensor]
    c: float
    z_min: float
    f_min: float


def _float64_root(g: Callable[[float], float], a: float, b: float) -> float:
    """A zero of g on [a, b] (g(a), g(b) of opposite signs) by bisection in float64."""
    for _ in range(200):
        m = (a + b) / 2
        if (g(a) > 0) == (g(m) > 0):
            a = m
        else:
            b = m
    return (a + b) / 2


def _curved(f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor]) -> Curved:
    """The constants of :class:`Curved` found numerically in float64 (f' = 0 at z_min, f'' = 0 at c)."""
    d1 = lambda z: float(df(torch.tensor(z, dtype=torch.float64)))  # noqa: E731
    d2 = lambda z: (d1(z + 1e-6) - d1(z - 1e-6)) / 2e-6             # noqa: E731
    z_min = _float64_root(d1, -4.0, -0.1)
    f_min = float(f(torch.tensor(z_min, dtype=torch.float64)))
    return Curved(f, df, _float64_root(d2, 0.5, 4.0), z_min, f_min - 1e-6 * abs(f_min) - 1e-12)


def _gelu_df(z: Tensor) -> Tensor:
    return torch.special.ndtr(z) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


_K_TANH = math.sqrt(2 / math.pi)


def _gelu_tanh_df(z: Tensor) -> Tensor:
    t = torch.tanh(_K_TANH * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _K_TANH * (1 + 3 * 0.044715 * z * z)


def _silu_df(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


# (module type, GELU's approximate) -> its constants
CURVED = {
    (nn.GELU, "none"): _curved(F.gelu, _gelu_df),
    (nn.GELU, "tanh"): _curved(lambda z: F.gelu(z, approximate="tanh"), _gelu_tanh_df),
    (nn.SiLU, None): _curved(F.silu, _silu_df),
}


def _curved_of(module: nn.Module) -> Curved:
    return CURVED[(type(module), getattr(module, "approximate", None))]


def is_monotone(module: nn.Module) -> bool:
    """Whether the activation ``module`` is non-decreasing (its IBP rule is ``f(l), f(u)``)."""
    return not isinstance(module, (nn.GELU, nn.SiLU))


def activation_interval(module: nn.Module, lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor]:
    """``(lo, hi)`` with ``lo <= module(z) <= hi`` for every z in ``[lower, upper]``, elementwise.

    Example:
        >>> activation_interval(nn.GELU(), torch.tensor([-2.0]), torch.tensor([1.0]))[0]
        tensor([-0.1700])
    """
    if is_monotone(module):
        return module(lower), module(upper)
    a = _curved_of(module)
    f_low, f_up = a.f(lower), a.f(upper)
    inside = (lower <= a.z_min) & (upper >= a.z_min)
    return torch.where(inside, torch.full_like(f_low, a.f_min), torch.minimum(f_low, f_up)), torch.maximum(f_low, f_up)


def _curved_lines(a: Curved, lower: Tensor, upper: Tensor) -> Lines:
    f, df, c = a.f, a.df, a.c
    convex = _convex(f, df, lower, upper)                       # right on [-c, c]
    concave = (*convex[2:], *convex[:2])                        # right outside
    d_low, d_up = df(lower), df(upper)
    at_minus, at_plus = df(lower.new_tensor(-c)), df(lower.new_tensor(c))
    k_min = torch.minimum(torch.minimum(d_low, d_up), torch.where((lower < -c) & (upper > -c), at_minus, d_low))
    k_max = torch.maximum(torch.maximum(d_low, d_up), torch.where((lower < c) & (upper > c), at_plus, d_low))
    # f' >= k_min: f(z) >= f(l) + k_min (z - l) and f(z) <= f(u) + k_min (z - u); f' <= k_max: the other way.
    f_low, f_up = f(lower), f(upper)
    mid = (lower + upper) / 2
    low_l, low_u = (k_min, f_low - k_min * lower), (k_max, f_up - k_max * upper)
    up_u, up_l = (k_min, f_up - k_min * upper), (k_max, f_low - k_max * lower)
    use_l = low_l[0] * mid + low_l[1] >= low_u[0] * mid + low_u[1]
    use_u = up_u[0] * mid + up_u[1] <= up_l[0] * mid + up_l[1]
    mixed = (torch.where(use_l, low_l[0], low_u[0]), torch.where(use_l, low_l[1], low_u[1]),
             torch.where(use_u, up_u[0], up_l[0]), torch.where(use_u, up_u[1], up_l[1]))
    in_convex = (lower >= -c) & (upper <= c)
    in_concave = (lower >= c) | (upper <= -c)
    return tuple(torch.where(in_convex, v, torch.where(in_concave, w, m)) for v, w, m in zip(convex, concave, mixed))


def maxpool_relaxation(layer: nn.MaxPool2d, lower: Tensor, upper: Tensor, out_hw: Tuple[int, int]
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """Lines of max pooling over the input box ``[lower, upper]`` (B, C, H, W).

    In each window let k* be the element with the largest lower bound. Then
    ``x_k* <= max_j x_j``; above, ``max_j x_j = x_k*`` when k* dominates the window
    (``lower_k* >= upper_j`` for every other j), and ``max_j x_j <= max_j upper_j`` otherwise.

    Returns:
        ``(index, dominated, up_max)``, each (B, C, out_h * out_w): the flat position of k* in its
        input plane (H * W), whether it dominates (1.0) or not (0.0), and the window's largest upper bound.
    Example:
        >>> index, dominated, up_max = maxpool_relaxation(nn.MaxPool2d(2), torch.zeros(1, 1, 2, 2),
        ...                                               torch.ones(1, 1, 2, 2), (1, 1))
    """
    batch, channels, height, width = lower.shape
    out_h, out_w = out_hw
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (layer.kernel_size, layer.stride or layer.kernel_size,
                                                                 layer.padding, layer.dilation))
    # Pad with -inf (ceil_mode windows may overhang at the end; negative padding crops) and unfold.
    pad_b = (out_h - 1) * sh + dh * (kh - 1) + 1 - height - ph
    pad_r = (out_w - 1) * sw + dw * (kw - 1) + 1 - width - pw

    def windows(t: Tensor) -> Tensor:
        t = F.pad(t, (pw, pad_r, ph, pad_b), value=-math.inf)
        return F.unfold(t, (kh, kw), (dh, dw), 0, (sh, sw)).view(batch, channels, kh * kw, out_h * out_w)

    low_w, up_w = windows(lower), windows(upper)
    low_max, k_star = low_w.max(2)                                            # (B, C, L)
    up_max = up_w.max(2).values
    up_others = up_w.scatter(2, k_star[:, :, None], -math.inf).max(2).values
    dominated = (low_max >= up_others).to(lower.dtype)
    # Flat position of k* in the unpadded input plane: every window holds a real element.
    pos = torch.arange(out_h * out_w, device=lower.device)
    row = (pos // out_w) * sh - ph + (k_star // kw) * dh
    col = (pos % out_w) * sw - pw + (k_star % kw) * dw
    return row * width + col, dominated, up_max


def relaxation(module: nn.Module, lower: Tensor, upper: Tensor) -> Lines:
    """``(a_low, b_low, a_up, b_up)``, each of ``lower``'s shape, with
    ``a_low z + b_low <= module(z) <= a_up z + b_up`` for every z in ``[lower, upper]``.

    Args:
        module: one of nn.ReLU, LeakyReLU (slope >= 0), ReLU6, Hardtanh, ELU, Softplus, Tanh, Sigmoid,
            GELU, SiLU.
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
    if isinstance(module, (nn.GELU, nn.SiLU)):
        return _curved_lines(_curved_of(module), lower, upper)
    raise TypeError(f"no linear relaxation for {type(module).__name__}")
