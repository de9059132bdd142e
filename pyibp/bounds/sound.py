"""Sound IBP: bounds that hold for the network computed in exact real arithmetic.

:class:`SoundBackend` carries the box as centre and radius ``(mu, rad)`` like the fused backend,
with one invariant: every real value the exact network (its stored float weights, real
arithmetic) takes at node i, for every real input of the box, lies in ``[mu - rad, mu + rad]``
evaluated exactly. The input box is rounded outward (ε up, the domain outward), and the final
``mu ∓ rad`` round outward, so the returned floats bound the exact network.

Error model (IEEE binary32 or binary64 with round-to-nearest, gradual underflow; u = 2^-24,
η = 2^-149 for float32, u = 2^-53, η = 2^-1074 for float64; Higham, *Accuracy and Stability of
Numerical Algorithms*, §2.2 and §3.1):

* one operation: ``fl(a ∘ b) = (a ∘ b)(1 + δ) + e``, ``|δ| <= u``, ``|e| <= η/2``, ``e = 0`` for
  + and -; ``torch.nextafter(fl(x), ±inf)`` is on the far side of the exact ``x``;
* a sum of n products in any order, with or without FMA, blocked or split:
  ``|fl(Σ a_i b_i) - Σ a_i b_i| <= γ_n Σ|a_i b_i| + n η``, ``γ_n = n u / (1 - n u)``; for terms
  >= 0, ``fl(Σ) >= (1 - γ_n) Σ - n η``.

A Linear/Conv layer ``W z + b`` keeps two products: the centre ``m = fl(W mu + b)`` and the
radius ``fl(A v + t)`` with ``v = fl(rad + c|mu|)``, ``c >= γ_n / (1 - u)``, ``A >= |W| / ((1 - u)
(1 - γ_n))`` (rounded up elementwise) and ``t >= (γ_n |b| + 2nη + n max|W| η / ((1-u)(1-γ_n))) / (1 - γ_n)``,
n = fan-in + 1. Expanding the bound above, ``fl(A v + t) >= |W| rad + γ_n (|W||mu| + |b|) + nη``:
the radius and the rounding error of both products in one product. Every elementwise step
(ReLU, BatchNorm/Normalize, constants, sums of boxes, pooling, the margin specification
``W_y - W_j``) rounds its radius up with ``nextafter`` or with constants scaled to cover it.
BatchNorm and Normalize maps are computed in float64 with an error bound, then enclosed in the
compute dtype. The ReLU and the radius operand ``v`` are single fused C++/CUDA passes
(:func:`pyibp.ops.sound_relu`, :func:`pyibp.ops.sound_radius_operand`, their per-element math in
``csrc/math/sound.h``); a ReLU after a Linear/Conv runs in place on the product's fresh outputs
(a fresh output of that size costs more in page faults than the ReLU's arithmetic).

The products must be computed by an algorithm the model covers: sums of products, as GEMM and
direct or im2col convolution do. Winograd and FFT convolutions (NNPACK on the CPU, cuDNN on CUDA)
and TF32 do not: products run inside :func:`pyibp.precision.full_precision` (TF32 and bf16
modes off) and :func:`sound_arithmetic` (NNPACK off; cuDNN off on CUDA, so convolutions run as
im2col + cuBLAS GEMM). On the CPU PyTorch's oneDNN float32 convolution is the direct algorithm.
Flush-to-zero breaks the η terms: :func:`sound_arithmetic` turns it off for the block when it
finds it on (and back on afterwards). A centre that overflows to ±inf marks its example, whose
bounds become (-inf, inf).

Ops without a sound rule (tanh, sigmoid, ELU, softplus, LeakyReLU: their float implementations
are not correctly rounded; log_softmax) raise TypeError naming the node: :func:`check_sound`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn import Normalize
from .graph import _BATCH_STATISTICS, BoundGraph, Node, affine_scale_shift

__all__ = ["SoundBackend", "check_sound", "sound_arithmetic", "ceil_to", "outward_eps", "gamma"]

Pair = Tuple[Tensor, Tensor]
_UNITS = {torch.float32: (2.0 ** -24, 2.0 ** -149), torch.float64: (2.0 ** -53, 2.0 ** -1074)}
_SLACK = 1 + 2.0 ** -40        # covers the float64 rounding of the constants computed here
_EXACT_MONOTONE = (nn.MaxPool2d, nn.Hardtanh)     # their float results are exact (max, clamp)


def units(dtype: torch.dtype) -> Tuple[float, float]:
    """``(u, η)``: the unit roundoff and the smallest subnormal of ``dtype`` (float32 or float64)."""
    if dtype not in _UNITS:
        raise ValueError(f"sound bounds are computed in float32 or float64, got {dtype}")
    return _UNITS[dtype]


def gamma(n: int, u: float) -> float:
    """An upper bound of ``γ_n = n u / (1 - n u)``, the relative error of a sum of n products."""
    if n * u >= 0.5:
        raise ValueError(f"a sum of {n} terms is beyond the error model (n u = {n * u} >= 1/2)")
    return n * u / (1 - n * u) * _SLACK


def _up_scalar(x: float, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` >= the float64 ``x``, as a Python float (exact in ``dtype``)."""
    if dtype == torch.float64:
        return x
    return float(ceil_to(torch.tensor(x, dtype=torch.float64), dtype))


def _down_scalar(x: float, dtype: torch.dtype) -> float:
    return -_up_scalar(-x, dtype)


def ceil_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` (float64) rounded up into ``dtype``: the smallest value of ``dtype`` >= each entry."""
    r = t.to(dtype)
    return torch.where(r.to(t.dtype) < t, torch.nextafter(r, r.new_tensor(math.inf)), r)


def _up(t: Tensor) -> Tensor:
    """In place: the next float above each entry of a fresh temporary (above the exact result it rounded)."""
    return t.nextafter_(t.new_tensor(math.inf))


def _down(t: Tensor) -> Tensor:
    return t.nextafter_(t.new_tensor(-math.inf))


def outward_eps(eps: Any, eps_t: Tensor, dtype: torch.dtype) -> Tensor:
    """The radius the user meant (a Python float, or a tensor of any dtype), rounded up into ``dtype``,
    in the shape ``eps_t`` (from :func:`~pyibp.bounds.checks.check_box`) has."""
    exact = torch.as_tensor(eps.detach() if isinstance(eps, Tensor) else eps, dtype=torch.float64,
                            device=eps_t.device)
    return ceil_to(exact.reshape(eps_t.shape), dtype)


def outward_domain(lower: Any, upper: Any, dtype: torch.dtype) -> Tuple[Any, Any]:
    """A float domain ``[lower, upper]`` rounded outward into ``dtype`` (tensors are already exact)."""
    lo = lower if isinstance(lower, Tensor) else _down_scalar(float(lower), dtype)
    hi = upper if isinstance(upper, Tensor) else _up_scalar(float(upper), dtype)
    return lo, hi


def check_sound(graph: BoundGraph, stop: Optional[int] = None) -> None:
    """TypeError naming the first node before ``stop`` that the sound mode cannot bound."""
    for node in graph.nodes[:stop]:
        if node.kind == "activation" and not isinstance(node.module, _EXACT_MONOTONE):
            raise TypeError(f"sound=True cannot bound {node.describe()}: the float implementation of "
                            f"{type(node.module).__name__} is not correctly rounded, so no error bound covers it; "
                            "sound mode supports ReLU, ReLU6, Hardtanh and MaxPool2d among the activations")
        if node.kind == "log_softmax":
            raise TypeError(f"sound=True cannot bound {node.describe()} (log and exp are not correctly rounded); "
                            "pyibp.margin_bounds bounds its input, the logits")


@contextlib.contextmanager
def sound_arithmetic(device_type: str) -> Iterator[None]:
    """Products by algorithms the error model covers, gradual underflow, no gradients.

    NNPACK (Winograd/FFT on the CPU) is disabled, and cuDNN on CUDA (its Winograd and FFT algorithms
    have norm-wise, not element-wise, error bounds); flush-to-zero, when found on, is turned off
    for the block and back on after it.
    """
    tiny = torch.tensor(2.0 ** -130, dtype=torch.float32)
    flushed = bool((tiny * 0.5) == 0)
    cudnn = torch.backends.cudnn.enabled
    if flushed:
        torch.set_flush_denormal(False)
    if device_type == "cuda":   # only this switch: cudnn.flags() would also write the TF32 settings
        torch.backends.cudnn.enabled = False
    try:
        with torch.no_grad(), torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn
        if flushed:
            torch.set_flush_denormal(True)


def _same_dense_layout(a: Tensor, b: Tensor) -> bool:
    """Both row-major, or both channels-last: what :func:`pyibp.ops.sound_relu_` writes in place."""
    last = torch.channels_last
    return (a.is_contiguous() and b.is_contiguous()) or (
        a.dim() == 4 and a.is_contiguous(memory_format=last) and b.is_contiguous(memory_format=last))


def _channel(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2)) if ndim > 1 else t


class SoundBackend:
    """Boxes as ``(mu, rad)`` enclosing the exact network's values (see the module docstring).

    One instance per call: it records which examples had a centre overflow (``ok``).
    """

    name = "sound"

    def __init__(self) -> None:
        self.ok: Optional[Tensor] = None
        self.batch: Optional[int] = None

    def _track(self, mu: Tensor) -> None:
        # a sum over each row is finite iff every term is (or it overflowed: trivial, still sound)
        self._mark(torch.isfinite(mu.flatten(1).sum(1)))

    def _mark(self, finite: Tensor) -> None:
        """AND per-row flags into ``ok``. A Linear over the last dimension of (B, ..., F) runs on
        (B·..., F) rows, example-major, so the rows of one example are consecutive."""
        if self.batch is not None and finite.shape[0] != self.batch:
            finite = finite.reshape(self.batch, -1).all(1)
        self.ok = finite if self.ok is None else self.ok & finite

    # -- the input box, conversions ------------------------------------------------------------
    def start(self, x: Tensor, eps: Tensor, lower: Any, upper: Any) -> Pair:
        self.batch = x.shape[0]
        e = eps.reshape((-1,) + (1,) * (x.dim() - 1)) if eps.dim() else eps
        lower, upper = outward_domain(lower, upper, x.dtype)
        return self.from_bounds(torch.clamp(_down(x - e), min=lower), torch.clamp(_up(x + e), max=upper))

    def from_bounds(self, lower: Tensor, upper: Tensor) -> Pair:
        mu = (lower + upper) * 0.5
        return mu, _up(torch.maximum(upper - mu, mu - lower))

    def bounds(self, s: Pair) -> Pair:
        mu, rad = s
        lower, upper = _down(mu - rad), _up(mu + rad)
        if self.ok is not None:
            bad = (~self.ok).reshape((-1,) + (1,) * (lower.dim() - 1))
            lower, upper = lower.masked_fill(bad, -math.inf), upper.masked_fill(bad, math.inf)
        return lower, upper

    # -- products --------------------------------------------------------------------------------
    def _product(self, s: Pair, op: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor], weight: Tensor,
                 bias: Optional[Tensor], fan_in: int, out_shape: Tuple[int, ...], relu: bool = False,
                 rad_scale: float = 1.0, extra: float = 0.0) -> Pair:
        """``op(z, W, b)``, linear in z and in W, with at most ``fan_in`` products per output, over the
        box; then the ReLU when ``relu``.

        ``rad_scale``, ``extra``: the specification's own rounding (:meth:`margins`): the exact weights
        are within ``extra |W|`` of ``W`` and ``|W_exact| <= rad_scale |W|``.
        """
        mu, rad = s
        dtype = mu.dtype
        u, eta = units(dtype)
        n = fan_in + 1
        g = gamma(n, u) + extra
        centre = op(mu, weight, bias)
        v = ops.sound_radius_operand(mu, rad, g / (1 - u) * _SLACK)
        scale = _up_scalar(rad_scale / ((1 - u) * (1 - gamma(n, u))) * _SLACK, dtype)
        abs_w = _up(weight.abs() * scale)
        max_w = float(weight.abs().max()) if weight.numel() else 0.0
        floor = (2 * n + n * max_w * scale) * eta / (1 - gamma(n, u)) * _SLACK
        if bias is None:
            t = torch.full(out_shape, _up_scalar(floor, dtype), dtype=dtype, device=mu.device)
        else:
            t = ceil_to((bias.detach().double().abs() * (g * _SLACK) + floor) / (1 - gamma(n, u)) * _SLACK, dtype)
        radius = op(v, abs_w, t)
        if not relu:
            self._track(centre)
            return centre, radius
        if _same_dense_layout(centre, radius):     # fresh outputs: the ReLU runs in place
            self._mark(ops.sound_relu_(centre, radius))
            return centre, radius
        return self.relu((centre, radius))

    def linear(self, s: Pair, weight: Tensor, bias: Optional[Tensor], relu: bool) -> Pair:
        return self._product(s, F.linear, weight, bias, weight.shape[1], (weight.shape[0],), relu)

    def conv2d(self, s: Pair, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups,
               relu: bool) -> Pair:
        op = lambda z, w, b: F.conv2d(z, w, b, stride, padding, dilation, groups)  # noqa: E731
        return self._product(s, op, weight, bias, weight[0].numel(), (weight.shape[0],), relu)

    def margins(self, s: Pair, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
        """Lower bounds of ``logit_y - logit_j`` through the last Linear, the specification folded in.

        ``C = W_y - W_j`` and ``d = b_y - b_j`` are computed in float: their rounding (``|C - fl(C)| <=
        u |fl(C)|``) enters the product's error terms."""
        u, _ = units(weight.dtype)
        labels = labels.long()
        spec = weight[labels][:, None, :] - weight[None]                        # (B, K, F)
        d = None if bias is None else bias[labels][:, None] - bias[None]        # (B, K)
        bmm = lambda z, w, b: (w @ z[..., None])[..., 0] + (0 if b is None else b)  # noqa: E731
        # the exact C, d are within u |fl(C)|, u |fl(d)| of the computed ones: extra = u, |C| <= (1 + u) |fl(C)|
        centre, rad = self._product(s, bmm, spec, d, spec.shape[2], spec.shape[:2], False, 1 + u, u)
        lower = _down(centre - rad)
        if self.ok is not None:
            lower = lower.masked_fill(~self.ok[:, None], -math.inf)
        return lower.scatter(1, labels[:, None], 0.0)

    # -- elementwise ---------------------------------------------------------------------------
    def relu(self, s: Pair) -> Pair:
        """:func:`pyibp.ops.sound_relu`: active boxes kept, the others enclosed in ``[0, top]``, top the
        float above ``fl(mu + rad)``; an example with a non-finite input is marked."""
        mu, rad, finite = ops.sound_relu(*s)
        self._mark(finite)
        return mu, rad

    def affine_map(self, node: Node, dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """BatchNorm/Normalize as an exact ``x * S + T``, enclosed: ``(S64, T64, |S - S64|, |T - T64|)``
        bounds in float64 (per channel)."""
        affine_scale_shift(node)            # its checks: training mode, no running statistics
        layer = node.module
        err = 2.0 ** -48      # several float64 roundings of var + eps, sqrt, division, product, sum
        if isinstance(layer, Normalize):
            mean, bias = layer.mean.double(), None
            scale = 1.0 / layer.std.double()
        else:
            stats = _BATCH_STATISTICS.get()
            mean, var = stats[layer] if stats is not None and layer in stats else (layer.running_mean,
                                                                                    layer.running_var)
            mean = mean.detach().double()
            scale = 1.0 / torch.sqrt(var.detach().double() + layer.eps)
            if layer.weight is not None:
                scale = scale * layer.weight.detach().double()
            bias = None if layer.bias is None else layer.bias.detach().double()
        shift = -mean * scale + (0 if bias is None else bias)
        shift_err = err * ((mean * scale).abs() + (0 if bias is None else bias.abs()))
        return scale, shift, err * scale.abs(), shift_err

    def affine(self, s: Pair, scale: Tensor, shift: Tensor, scale_err: Tensor, shift_err: Tensor) -> Pair:
        """``z * S + T`` per channel (dim 1) for exact S, T within ``scale_err``, ``shift_err`` of the
        float64 ``scale``, ``shift`` (C,): :meth:`affine_map`'s output."""
        ndim = s[0].dim()
        return self._elementwise(s, *(_channel(t, ndim) for t in (scale, shift, scale_err, shift_err)))

    def scale_shift(self, s: Pair, scale: Any, shift: Any) -> Pair:
        """``z * scale + shift`` for broadcastable constants (None: 1, 0). A scale may be ``1 / c``
        computed in the constant's dtype: a relative error of 2 ulps of that dtype covers it."""
        def exact(v: Any, default: float) -> Tuple[Tensor, Tensor]:
            t = torch.as_tensor(default if v is None else v, dtype=torch.float64, device=s[0].device)
            unit = units(v.dtype)[0] if isinstance(v, Tensor) and v.dtype in _UNITS else 2.0 ** -53
            return t, (0.0 if v is None else 2 * unit) * t.abs()
        (sc, sc_err), (sh, sh_err) = exact(scale, 1.0), exact(shift, 0.0)
        return self._elementwise(s, sc, sh, sc_err, sh_err)

    def _elementwise(self, s: Pair, scale64: Tensor, shift64: Tensor, scale_err: Tensor, shift_err: Tensor) -> Pair:
        mu, rad = s
        dtype = mu.dtype
        u, eta = units(dtype)
        sc, sh = scale64.to(dtype), shift64.to(dtype)
        e_s = scale_err + (scale64 - sc.double()).abs()
        e_t = shift_err + (shift64 - sh.double()).abs()
        g = gamma(2, u)
        centre = mu * sc + sh
        self._track(centre)
        # rad' >= (|S| + e_s) rad + (γ_2 |S| + e_s) |mu| + γ_2 |T| + e_t + 2η; the three roundings of
        # p rad + q |mu| + r are covered by scaling p, q by (1 - u)^-3 and r by (1 - u)^-1 (plus 4η)
        k = _SLACK / (1 - u) ** 3
        p = ceil_to((sc.double().abs() + e_s) * k, dtype)
        q = ceil_to((g * sc.double().abs() + e_s) * k, dtype)
        r = ceil_to((g * sh.double().abs() + e_t + 6 * eta) / (1 - u) * _SLACK, dtype)
        return centre, (rad * p + mu.abs() * q) + r

    def monotone(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        if not isinstance(fn, _EXACT_MONOTONE):
            raise TypeError(f"sound=True cannot bound {type(fn).__name__} (not correctly rounded)")
        lower, upper = self.bounds(s)
        return self.from_bounds(fn(lower), fn(upper))

    def positive_linear(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        """An average (AvgPool2d, AdaptiveAvgPool2d, mean): each output averages at most n inputs."""
        mu, rad = s
        dtype = mu.dtype
        u, eta = units(dtype)
        n = self._terms(fn, mu)
        g = gamma(n + 1, u)
        centre = fn(mu)
        v = ops.sound_radius_operand(mu, rad, g / (1 - u) * _SLACK)
        scale = _up_scalar(1 / ((1 - u) * (1 - g)) * _SLACK, dtype)
        return centre, _up(_up(fn(v) * scale) + _up_scalar((3 * n + 5) * eta, dtype))

    @staticmethod
    def _terms(fn: Any, mu: Tensor) -> int:
        if isinstance(fn, nn.AvgPool2d):
            k = fn.kernel_size
            return math.prod(k) if isinstance(k, (tuple, list)) else k * k
        if isinstance(fn, nn.AdaptiveAvgPool2d):
            out = fn.output_size if isinstance(fn.output_size, (tuple, list)) else (fn.output_size,) * 2
            sizes = mu.shape[-2:]
            return math.prod(math.ceil(i / (o or i)) + 1 for i, o in zip(sizes, out))
        # a mean over whole dimensions: every output averages the same number of inputs
        per_example = mu.shape[1:].numel()
        return max(1, per_example // max(1, fn(mu[:1]).shape[1:].numel()))

    def reshape(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        return fn(s[0]), fn(s[1])

    def add(self, s: Pair, t: Pair) -> Pair:
        return self._sum(s[0] + t[0], s[1], t[1])

    def sub(self, s: Pair, t: Pair) -> Pair:
        return self._sum(s[0] - t[0], s[1], t[1])

    def _sum(self, mu: Tensor, r1: Tensor, r2: Tensor) -> Pair:
        """The box of a sum of boxes, whose centres' float sum ``mu`` is within ``u |mu|`` of the exact."""
        u, _ = units(mu.dtype)
        self._track(mu)
        return mu, _up(_up(r1 + r2) + _up(mu.abs() * u))

    def pad(self, s: Pair, pad: List[int], value: float) -> Pair:
        mu = F.pad(s[0], pad, value=value)
        err = abs(float(torch.tensor(value, dtype=mu.dtype)) - value)
        return mu, F.pad(s[1], pad, value=_up_scalar(err, mu.dtype))
