"""Plain-PyTorch twins of pyibp's operators, and the tutorial's interval formulas.

Three kinds of reference live here:

* ``*_ref`` functions: the readable equivalent of each operator in :mod:`pyibp.ops`, used by the
  tests to check the C++/CUDA kernels value for value and gradient for gradient.
* :class:`TutorialBackend`: interval propagation exactly as written in "Adversarial Robustness:
  Theory and Practice", chapter 4 — lower/upper form with ``W⁺ l + W⁻ u`` and ``W⁺ u + W⁻ l``
  (four products per layer) and the margin specification folded into the last layer
  (``interval_based_bound``). It is ``backend="torch"`` of :func:`pyibp.interval_bounds` and the
  baseline of the benchmarks.
* :class:`Interval` / :func:`interval_forward_ref`: IBP of any model by running its own forward
  on interval values, independent of pyibp's graph capture; the tests' reference for graphs.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def crown_relu_alpha_step_ref(A: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor) -> Pair:
    _, upper_slope, intercept = (t[:, None] for t in relu_relaxation_ref(lower, upper))
    unstable = ((lower < 0) & (upper > 0))[:, None]
    lower_slope = torch.where(unstable, alpha, upper_slope)       # 1 (active), 0 (dead) or NaN elsewhere
    negative = A < 0                                              # A = 0 takes the lower line, as the kernels do
    out = torch.where(negative, A * upper_slope, A * lower_slope)
    return out, torch.where(negative, A * intercept, torch.zeros_like(A)).sum(-1)


def sound_crown_relu_step_ref(A: Tensor, alpha: Tensor, sigma: Tensor, tau: Tensor, m_in: Optional[Tensor],
                              m_out: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out = torch.where(A < 0, A * sigma[:, None], A * alpha[:, None])
    shift = (A.clamp(max=0) * tau[:, None]).sum(-1)
    zero = A.new_zeros(A.shape[:2])
    slack_in = zero if m_in is None else (A.abs() * m_in[:, None]).sum(-1)
    slack_out = zero if m_out is None else (out.abs() * m_out[:, None]).sum(-1)
    return out, shift, slack_in, slack_out


def sound_relu_ref(mu: Tensor, rad: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    s = (mu + rad).clamp(min=0)
    top = torch.where(s > 0, torch.nextafter(s, s.new_tensor(float("inf"))), s)
    half = top * 0.5
    active = mu >= rad
    finite = (mu + rad).isfinite().flatten(1).all(1) if mu.dim() > 1 else (mu + rad).isfinite()
    rest = top - half
    return torch.where(active, mu, half), torch.where(active, rad, torch.where(half < rest, rest, half)), finite


def sound_radius_operand_ref(mu: Tensor, rad: Tensor, c: float) -> Tensor:
    exact = torch.tensor(c, dtype=torch.float64)
    c_up = exact.to(mu.dtype)
    if c_up.double() < exact:
        c_up = torch.nextafter(c_up, c_up.new_tensor(float("inf")))
    return rad + c_up.to(mu.device) * mu.abs()


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

    def from_bounds(self, lower: Tensor, upper: Tensor) -> Pair:
        return lower, upper

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


# ---------------------------------------------------------------------------------------------
# An independent IBP of any model: its own forward run on interval values
class Interval:
    """A box ``[lo, hi]`` that runs through a model's own ``forward`` by interval arithmetic.

    Independent of :mod:`pyibp.bounds` (no graph capture, no fused operators): every torch
    function, tensor method and operator the forward applies is intercepted (``__torch_function__``
    and Python's operator protocol) and computed in lower/upper form, the tutorial's way —
    ``W⁺ l + W⁻ u`` for products, ``f(l), f(u)`` for monotone functions. The tests compare the
    bound engine with it in float64. Anything it does not know raises TypeError.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10).double().eval()
        >>> out = model(Interval(x - 0.01, x + 0.01))
        >>> out.lo.shape
        torch.Size([2, 10])
    """

    def __init__(self, lo: Tensor, hi: Tensor):
        self.lo, self.hi = lo, hi

    # monotone non-decreasing functions of one bounded argument: f(lo), f(hi)
    _MONOTONE = {F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.relu6, F.hardtanh, F.elu, F.softplus, torch.tanh, F.tanh,
                 torch.sigmoid, F.sigmoid, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean,
                 torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                 F.pad}
    _IDENTITY = {F.dropout, F.dropout2d}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        kwargs.pop("inplace", None)
        x, rest = args[0], args[1:]
        if func in cls._IDENTITY:
            return x
        if func in cls._MONOTONE or getattr(func, "__name__", "") == "fn":     # F.max_pool2d's dispatcher
            return Interval(func(x.lo, *rest, **kwargs), func(x.hi, *rest, **kwargs))
        if func in (F.linear, F.conv1d, F.conv2d):
            weight, bias, extra = rest[0], (rest[1] if len(rest) > 1 else kwargs.pop("bias", None)), rest[2:]
            pos, neg = weight.clamp(min=0), weight.clamp(max=0)
            lo = func(x.lo, pos, bias, *extra, **kwargs) + func(x.hi, neg, None, *extra, **kwargs)
            hi = func(x.hi, pos, bias, *extra, **kwargs) + func(x.lo, neg, None, *extra, **kwargs)
            return Interval(lo, hi)
        if func is F.batch_norm:
            mean, var, weight, bias = rest[0], rest[1], kwargs.get("weight", rest[2] if len(rest) > 2 else None), \
                kwargs.get("bias", rest[3] if len(rest) > 3 else None)
            eps = kwargs.get("eps", rest[6] if len(rest) > 6 else 1e-5)
            scale = (var + eps).rsqrt() * (weight if weight is not None else 1)
            shift = (bias if bias is not None else 0) - mean * scale
            shape = (1, -1) + (1,) * (x.lo.dim() - 2)
            return x._scale(scale.reshape(shape)) + shift.reshape(shape)
        if func in (torch.cat, torch.concat):
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return Interval(torch.cat([t.lo for t in x], dim), torch.cat([t.hi for t in x], dim))
        if func in (torch.add, torch.sub, torch.mul, torch.div):
            return {torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul,
                    torch.div: operator.truediv}[func](x, rest[0])
        raise TypeError(f"Interval does not know {func}")

    def _scale(self, c) -> "Interval":
        a, b = self.lo * c, self.hi * c
        return Interval(torch.minimum(a, b), torch.maximum(a, b))

    def __add__(self, other):
        if isinstance(other, Interval):
            return Interval(self.lo + other.lo, self.hi + other.hi)
        return Interval(self.lo + other, self.hi + other)

    __radd__ = __iadd__ = __add__

    def __sub__(self, other):
        if isinstance(other, Interval):
            return Interval(self.lo - other.hi, self.hi - other.lo)
        return Interval(self.lo - other, self.hi - other)

    __isub__ = __sub__

    def __rsub__(self, other):
        return Interval(other - self.hi, other - self.lo)

    def __mul__(self, other):
        if isinstance(other, Interval):
            raise TypeError("Interval * Interval")
        return self._scale(other)

    __rmul__ = __imul__ = __mul__

    def __truediv__(self, other):
        return self._scale(1.0 / other)

    __itruediv__ = __truediv__

    def __neg__(self):
        return Interval(-self.hi, -self.lo)

    add, sub, mul, div, neg = __add__, __sub__, __mul__, __truediv__, __neg__

    def __getitem__(self, index):
        return Interval(self.lo[index], self.hi[index])

    def _both(name):
        def method(self, *args, **kwargs):
            return Interval(getattr(self.lo, name)(*args, **kwargs), getattr(self.hi, name)(*args, **kwargs))
        return method

    # shape methods and monotone methods act on both ends alike
    view, reshape, flatten = _both("view"), _both("reshape"), _both("flatten")
    permute, transpose, contiguous = _both("permute"), _both("transpose"), _both("contiguous")
    squeeze, unsqueeze, mean = _both("squeeze"), _both("unsqueeze"), _both("mean")
    relu, sigmoid, tanh = _both("relu"), _both("sigmoid"), _both("tanh")
    del _both

    def size(self, *args):
        return self.lo.size(*args)

    def dim(self) -> int:
        return self.lo.dim()

    @property
    def shape(self):
        return self.lo.shape


def interval_forward_ref(model: nn.Module, x: Tensor, eps: float, lower: float = 0.0, upper: float = 1.0) -> Pair:
    """IBP bounds of ``model`` (eval mode) on the box ``x ± eps ∩ [lower, upper]`` by running its
    own forward on :class:`Interval` values; compute in the model's and x's dtype.

    Example:
        >>> lb, ub = interval_forward_ref(model.double(), x.double(), 0.01)
    """
    out = model((Interval((x - eps).clamp(min=lower), (x + eps).clamp(max=upper))))
    return out.lo, out.hi
