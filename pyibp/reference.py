"""Plain-PyTorch twins of pyibp's operators, and the tutorial's interval formulas.

Two kinds of reference live here:

* ``*_ref`` functions: the readable equivalent of each operator in :mod:`pyibp.ops`, used by the
  tests to check the C++/CUDA kernels value for value and gradient for gradient.
* :class:`TutorialBackend`: interval propagation exactly as written in "Adversarial Robustness:
  Theory and Practice", chapter 4 — lower/upper form with ``W⁺ l + W⁻ u`` and ``W⁺ u + W⁻ l``
  (four products per layer) and the margin specification folded into the last layer
  (``interval_based_bound``). It is ``backend="torch"`` of :func:`pyibp.interval_bounds` and the
  baseline of the benchmarks.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = Tuple[Tensor, Tensor]


def _per_example(p: Tensor, like: Tensor) -> Tensor:
    return p.reshape(()) if p.numel() == 1 else p.reshape((-1,) + (1,) * (like.dim() - 1))


def input_box_ref(x: Tensor, eps: Tensor, lower: float, upper: float) -> Pair:
    e = _per_example(eps.to(x.dtype), x)
    lo = torch.clamp(x - e, min=lower)
    hi = torch.clamp(x + e, max=upper)
    return (hi + lo) / 2, (hi - lo) / 2


def interval_relu_ref(mu: Tensor, rad: Tensor) -> Pair:
    lo, hi = F.relu(mu - rad), F.relu(mu + rad)
    return (hi + lo) / 2, (hi - lo) / 2


def interval_linear_ref(mu: Tensor, rad: Tensor, weight: Tensor, abs_weight: Tensor,
                        bias: Optional[Tensor], relu: bool = False) -> Pair:
    out = F.linear(mu, weight, bias), F.linear(rad, abs_weight)
    return interval_relu_ref(*out) if relu else out


def interval_conv2d_ref(mu: Tensor, rad: Tensor, weight: Tensor, abs_weight: Tensor, bias: Optional[Tensor],
                        stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                        relu: bool = False) -> Pair:
    out = (F.conv2d(mu, weight, bias, stride, padding, dilation, groups),
           F.conv2d(rad, abs_weight, None, stride, padding, dilation, groups))
    return interval_relu_ref(*out) if relu else out


def interval_affine_ref(mu: Tensor, rad: Tensor, scale: Tensor, shift: Tensor) -> Pair:
    shape = (1, -1) + (1,) * (mu.dim() - 2)
    s, t = scale.reshape(shape), shift.reshape(shape)
    return mu * s + t, rad * s.abs()


def center_to_interval_ref(mu: Tensor, rad: Tensor) -> Pair:
    return mu - rad, mu + rad


def interval_to_center_ref(lower: Tensor, upper: Tensor) -> Pair:
    return (upper + lower) / 2, (upper - lower) / 2


def margin_elision_ref(mu: Tensor, rad: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
    diff = weight[labels][:, None, :] - weight[None]                  # rows of C W: (B, K, F)
    out = (diff @ mu[..., None] - diff.abs() @ rad[..., None])[..., 0]
    if bias is not None:
        out = out + bias[labels][:, None] - bias[None]
    return out.scatter(1, labels[:, None].long(), 0.0)


def relu_relaxation_ref(lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    active, inactive = lower >= 0, upper <= 0
    unstable = ~active & ~inactive
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    chord = torch.where(unstable, upper / width, active.to(lower.dtype))
    upper_slope = torch.where(inactive, torch.zeros_like(lower), chord)
    upper_intercept = torch.where(unstable, -chord * lower, torch.zeros_like(lower))
    lower_slope = torch.where(unstable, (upper > -lower).to(lower.dtype), upper_slope)
    return lower_slope, upper_slope, upper_intercept


def crown_relu_step_ref(A: Tensor, mu: Tensor, rad: Tensor) -> Pair:
    lower_slope, upper_slope, intercept = (t[:, None] for t in relu_relaxation_ref(mu - rad, mu + rad))
    A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
    return A_pos * lower_slope.detach() + A_neg * upper_slope, (A_neg * intercept).sum(-1)


def pgd_linf_step_ref(delta: Tensor, grad: Tensor, x: Tensor, eps: Tensor, alpha: Tensor,
                      lower: float, upper: float) -> Tensor:
    e, a = _per_example(eps.to(x.dtype), x), _per_example(alpha.to(x.dtype), x)
    d = torch.maximum(torch.minimum(delta + a * grad.sign(), e), -e)
    return torch.clamp(d, lower - x, upper - x)


def pgd_l2_step_ref(delta: Tensor, grad: Tensor, x: Tensor, eps: Tensor, alpha: Tensor,
                    lower: float, upper: float) -> Tensor:
    flat = lambda t: t.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))  # noqa: E731
    e, a = _per_example(eps.to(x.dtype), x), _per_example(alpha.to(x.dtype), x)
    g_norm = flat(grad)
    d = delta + torch.where(g_norm > 0, a * grad / g_norm.clamp_min(1e-30), torch.zeros_like(grad))
    d_norm = flat(d)
    d = d * torch.where(d_norm > e, e / d_norm.clamp_min(1e-30), torch.ones_like(d_norm))
    return torch.clamp(d, lower - x, upper - x)


class TutorialBackend:
    """Boxes as ``(lower, upper)``, with the tutorial's four-product formulas in plain PyTorch."""

    name = "torch"

    def start(self, x: Tensor, eps: Tensor, lower: float, upper: float) -> Pair:
        e = _per_example(eps, x)
        return (x - e).clamp(min=lower), (x + e).clamp(max=upper)

    def linear(self, s: Pair, weight: Tensor, bias: Optional[Tensor], relu: bool) -> Pair:
        l, u = s
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        lo = l @ w_pos.t() + u @ w_neg.t()
        hi = u @ w_pos.t() + l @ w_neg.t()
        if bias is not None:
            lo, hi = lo + bias, hi + bias
        return self.relu((lo, hi)) if relu else (lo, hi)

    def conv2d(self, s: Pair, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups,
               relu: bool) -> Pair:
        l, u = s
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        conv = lambda t, w: F.conv2d(t, w, None, stride, padding, dilation, groups)  # noqa: E731
        lo = conv(l, w_pos) + conv(u, w_neg)
        hi = conv(u, w_pos) + conv(l, w_neg)
        if bias is not None:
            lo, hi = lo + bias[None, :, None, None], hi + bias[None, :, None, None]
        return self.relu((lo, hi)) if relu else (lo, hi)

    def relu(self, s: Pair) -> Pair:
        return s[0].clamp(min=0), s[1].clamp(min=0)

    def affine(self, s: Pair, scale: Tensor, shift: Tensor) -> Pair:
        shape = (1, -1) + (1,) * (s[0].dim() - 2)
        sc, sh = scale.reshape(shape), shift.reshape(shape)
        s_pos, s_neg = sc.clamp(min=0), sc.clamp(max=0)
        return s[0] * s_pos + s[1] * s_neg + sh, s[1] * s_pos + s[0] * s_neg + sh

    def monotone(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        return fn(s[0]), fn(s[1])

    positive_linear = monotone

    def reshape(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        return fn(s[0]), fn(s[1])

    def add(self, s: Pair, t: Pair) -> Pair:
        return s[0] + t[0], s[1] + t[1]

    def bounds(self, s: Pair) -> Pair:
        return s

    def margins(self, s: Pair, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
        """The tutorial's ``interval_based_bound``, with one specification C per example."""
        l, u = s
        c_w = weight[labels][:, None, :] - weight[None]              # (B, K, F)
        lb = (c_w.clamp(min=0) @ l[..., None] + c_w.clamp(max=0) @ u[..., None])[..., 0]
        if bias is not None:
            lb = lb + bias[labels][:, None] - bias[None]
        return lb.scatter(1, labels[:, None].long(), 0.0)


def _apgd_project(d: Tensor, x: Tensor, e: Tensor, norm: str, lower: Tensor, upper: Tensor) -> Tensor:
    """The ball (box clamp for l∞, scaling for l2), then the domain."""
    if norm == "linf":
        d = torch.maximum(torch.minimum(d, e), -e)
    else:
        n = d.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))
        d = d * torch.where(n > e, e / n.clamp_min(1e-30), torch.ones_like(n))
    return torch.maximum(torch.minimum(d, upper - x), lower - x)


def apgd_step_ref(delta: Tensor, previous: Tensor, grad: Tensor, x: Tensor, eps: Tensor, step: Tensor,
                  momentum: float, lower: Tensor, upper: Tensor, norm: str) -> Pair:
    """Twin of ``apgd_{linf,l2}_step_`` (not in place): returns the new ``(delta, previous)``."""
    e, s = _per_example(eps.to(x.dtype), x), _per_example(step.to(x.dtype), x)
    if norm == "linf":
        direction = grad.sign()
    else:
        g_norm = grad.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))
        direction = torch.where(g_norm > 0, grad / g_norm.clamp_min(1e-30), torch.zeros_like(grad))
    z = _apgd_project(delta + s * direction, x, e, norm, lower, upper)
    moved = delta + momentum * (z - delta) + (1 - momentum) * (delta - previous)
    return _apgd_project(moved, x, e, norm, lower, upper), delta.clone()
