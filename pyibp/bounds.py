"""Interval bound propagation through an nn.Sequential: :func:`interval_bounds`, :func:`margin_bounds`.

The walk over the layers is written once (:func:`propagate`); *how* an interval passes through a
layer is a backend. The fused backend carries the box as centre and radius through pyibp's
C++/CUDA operators (two products per layer, bias and ReLU fused into the epilogue); the
``"torch"`` backend is the tutorial's lower/upper formulation in plain PyTorch
(:class:`pyibp.reference.TutorialBackend`), kept as the baseline.
"""
from __future__ import annotations

import math

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .layers import batchnorm_scale_shift, conv_padding, flatten_layers
from .nn import Normalize, Residual
from .precision import full_precision

__all__ = ["interval_bounds", "margin_bounds", "propagate", "FusedBackend", "get_backend"]

Pair = Tuple[Tensor, Tensor]
Eps = Union[float, Tensor]


class FusedBackend:
    """Boxes as ``(mu, rad)`` through the fused operators of :mod:`pyibp.ops`."""

    name = "fused"

    def start(self, x: Tensor, eps: Tensor, lower: float, upper: float) -> Pair:
        return ops.input_box(x, eps, lower, upper)

    def linear(self, s: Pair, weight: Tensor, bias: Optional[Tensor], relu: bool) -> Pair:
        return ops.interval_linear(s[0], s[1], weight, ops.abs_weight(weight), bias, relu)

    def conv2d(self, s: Pair, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups,
               relu: bool) -> Pair:
        return ops.interval_conv2d(s[0], s[1], weight, ops.abs_weight(weight), bias, stride, padding,
                                   dilation, groups, relu)

    def relu(self, s: Pair) -> Pair:
        return ops.interval_relu(*s)

    def affine(self, s: Pair, scale: Tensor, shift: Tensor) -> Pair:
        return ops.interval_affine(s[0], s[1], scale, shift)

    def monotone(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        lower, upper = ops.center_to_interval(*s)
        return ops.interval_to_center(fn(lower), fn(upper))

    def positive_linear(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        # A linear map with non-negative weights and no bias maps centre to centre, radius to radius.
        return fn(s[0]), fn(s[1])

    def reshape(self, s: Pair, fn: Callable[[Tensor], Tensor]) -> Pair:
        return fn(s[0]), fn(s[1])

    def add(self, s: Pair, t: Pair) -> Pair:
        return s[0] + t[0], s[1] + t[1]

    def bounds(self, s: Pair) -> Pair:
        return ops.center_to_interval(*s)

    def margins(self, s: Pair, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
        return ops.margin_elision(s[0], s[1], weight, bias, labels)


def get_backend(name: str):
    """The backend object for ``"fused"`` (pyibp's operators) or ``"torch"`` (the tutorial's formulas)."""
    if name == "fused":
        return FusedBackend()
    if name == "torch":
        from .reference import TutorialBackend
        return TutorialBackend()
    raise ValueError(f"backend must be 'fused' or 'torch', got {name!r}")


def _param(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return t if t is None or dtype is None else t.to(dtype)


def propagate(layers: List[nn.Module], state, backend, *, dtype: Optional[torch.dtype] = None,
              fuse_relu: bool = True, on_relu: Optional[Callable[[int, object], None]] = None):
    """Pushes an interval state through ``layers`` (the output of ``flatten_layers``).

    Args:
        state: the backend's box, e.g. ``(mu, rad)`` from ``backend.start``.
        dtype: compute in this dtype (weights are cast on the fly); None keeps the model's.
        fuse_relu: let Linear/Conv2d followed by ReLU run as one fused operator.
        on_relu: called as ``on_relu(index, pre_activation_state)`` before every ReLU (turns
            fusion off, since the pre-activation box is then needed).
    Returns:
        The backend's box at the output of the last layer.
    """
    fuse_relu = fuse_relu and on_relu is None
    i = 0
    while i < len(layers):
        layer = layers[i]
        relu = (fuse_relu and isinstance(layer, (nn.Linear, nn.Conv2d)) and i + 1 < len(layers)
                and isinstance(layers[i + 1], nn.ReLU))
        if isinstance(layer, nn.Linear):
            weight, bias = _param(layer.weight, dtype), _param(layer.bias, dtype)
            lead = state[0].shape[:-1]
            if len(lead) != 1:  # nn.Linear acts on the last dimension of any shape
                state = backend.reshape(state, lambda t: t.reshape(-1, t.shape[-1]))
            state = backend.linear(state, weight, bias, relu)
            if len(lead) != 1:
                state = backend.reshape(state, lambda t: t.reshape(*lead, t.shape[-1]))
        elif isinstance(layer, nn.Conv2d):
            state = backend.conv2d(state, _param(layer.weight, dtype), _param(layer.bias, dtype),
                                   list(layer.stride), conv_padding(i, layer), list(layer.dilation),
                                   layer.groups, relu)
        elif isinstance(layer, nn.ReLU):
            if on_relu is not None:
                on_relu(i, state)
            state = backend.relu(state)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = batchnorm_scale_shift(layer)
            state = backend.affine(state, _param(scale, dtype), _param(shift, dtype))
        elif isinstance(layer, Normalize):
            scale, shift = layer.scale_shift()
            state = backend.affine(state, _param(scale, dtype), _param(shift, dtype))
        elif isinstance(layer, nn.AvgPool2d):
            state = backend.positive_linear(state, layer)
        elif isinstance(layer, nn.MaxPool2d):
            state = backend.monotone(state, layer)
        elif isinstance(layer, nn.Flatten):
            state = backend.reshape(state, layer)
        elif isinstance(layer, Residual):
            branches = [propagate(flatten_layers(b), state, backend, dtype=dtype, fuse_relu=fuse_relu)
                        for b in (layer.body, layer.shortcut)]
            state = backend.add(*branches)
        # Identity and Dropout (the eval-mode function) leave the box unchanged.
        i += 2 if relu else 1
    return state


# ---------------------------------------------------------------------------------------------
# validation
def _finite_range(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = t[~torch.isfinite(t)].flatten()[:3].tolist()
        raise ValueError(f"{name} must be finite, got non-finite values such as {bad}")


def per_example_tensor(name: str, value: Eps, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A float or a tensor of one value per example of x's batch, as a tensor of shape () or (B,)
    on x's device; ValueError naming ``name`` for a wrong shape or device."""
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=dtype, device=x.device)
    batch = x.shape[0]
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; put both on one device")
    if value.numel() != 1 and tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must be a float or a tensor of shape () or ({batch},), "
                         f"got shape {tuple(value.shape)}")
    return value.detach().to(dtype).reshape(-1 if value.numel() != 1 else ())


def check_box(x: Tensor, eps: Eps, lower: float, upper: float) -> Tensor:
    """Validates an input box and returns eps as a tensor of x's dtype: shape () or (B,).

    Raises ValueError naming the bad value: non-floating x, NaN/inf, eps < 0, eps of the wrong
    shape or device, lower > upper, or x outside [lower, upper].
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, ...) with a batch dimension, got {tuple(x.shape)}")
    if not lower <= upper:
        raise ValueError(f"lower ({lower}) must be <= upper ({upper})")
    eps_t = per_example_tensor("eps", eps, x, x.dtype)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # data-dependent checks would break the graph
        _finite_range("eps", eps_t)
        if (eps_t < 0).any():
            raise ValueError(f"eps must be >= 0, got {eps_t.min().item()}")
        if x.numel():
            # One pass: min and max propagate NaN, so finite extremes mean every value is finite.
            x_min, x_max = (float(v) for v in torch.aminmax(x.detach()))
            if not (math.isfinite(x_min) and math.isfinite(x_max)):
                _finite_range("x", x)
            if x_min < lower or x_max > upper:
                raise ValueError(f"x has values in [{x_min:.4g}, {x_max:.4g}], outside the input domain "
                                 f"[{lower}, {upper}]; pass lower=/upper= matching your data (e.g. -inf, "
                                 "inf), or normalise inside the model with pyibp.nn.Normalize")
    return eps_t


def _check_model_device(model: nn.Module, x: Tensor) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device != x.device:
            raise ValueError(f"model parameter {name!r} is on {p.device} but x is on {x.device}; "
                             f"move one of them, e.g. model.to({str(x.device)!r})")
        break


def _check_labels(y: Tensor, x: Tensor, num_classes: Optional[int]) -> Tensor:
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = y.dtype if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be an integer tensor of class labels, got {got}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x's batch, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}; put both on one device")
    if num_classes is not None and y.numel() and not torch.compiler.is_compiling():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels y must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return y


def _full_precision(x: Tensor):
    """Bounds are never computed in reduced precision (autocast, TF32, bf16 fp32-modes): a bf16 or
    TF32 bound is not a bound of the float32 network (see :mod:`pyibp.precision`)."""
    return full_precision(x.device.type)


# ---------------------------------------------------------------------------------------------
# public API
def interval_bounds(model: nn.Module, x: Tensor, eps: Eps, *, lower: float = 0.0, upper: float = 1.0,
                    backend: str = "fused", dtype: Optional[torch.dtype] = None) -> Pair:
    """Guaranteed lower and upper bounds of ``model``'s output over the l∞ box around ``x``.

    The box is ``{x' : |x' - x| <= eps} ∩ [lower, upper]``. Gradients flow to the model's
    parameters (certified training back-propagates through this).

    Args:
        model: nn.Sequential (nested allowed) of Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d
            (eval), AvgPool2d, MaxPool2d, Dropout, Identity, pyibp.nn.Normalize.
        x: (B, *) inputs inside [lower, upper].
        eps: radius, a float or a tensor of shape () or (B,) (one per example).
        backend: ``"fused"`` (pyibp's operators) or ``"torch"`` (the tutorial's formulas).
        dtype: compute in this dtype (e.g. torch.float64 for verification); default x's dtype.
    Returns:
        ``(lb, ub)``, each of the model's output shape, e.g. (B, n_classes).

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
        >>> lb, ub = interval_bounds(model, torch.rand(8, 1, 28, 28), 0.1)
        >>> bool((lb <= ub).all())
        True
    """
    layers = flatten_layers(model)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    be = get_backend(backend)
    if dtype is not None:
        x, eps_t = x.to(dtype), eps_t.to(dtype)
    with _full_precision(x):
        state = propagate(layers, be.start(x, eps_t, float(lower), float(upper)), be, dtype=dtype)
        return be.bounds(state)


def _last_linear(layers: List[nn.Module]) -> Tuple[List[nn.Module], Optional[nn.Linear]]:
    """Splits off the final Linear (after trailing identities) for last-layer elision."""
    end = len(layers)
    while end > 0 and isinstance(layers[end - 1], (nn.Identity, nn.Dropout)):
        end -= 1
    if end > 0 and isinstance(layers[end - 1], nn.Linear):
        return layers[:end - 1], layers[end - 1]
    return layers, None


def margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: float = 0.0,
                  upper: float = 1.0, method: str = "ibp", backend: str = "fused",
                  dtype: Optional[torch.dtype] = None) -> Tensor:
    """Lower bounds of the margins ``logit_y - logit_j`` over the l∞ box around ``x``.

    A point is *verified* when every entry with ``j != y`` is > 0. With IBP, the margin
    specification is folded into the last Linear layer (last-layer elision), which is tighter
    than subtracting logit bounds. ``method="crown-ibp"`` uses :func:`pyibp.crown.crown_ibp_margin_bounds`
    (IBP for the intermediate layers, a CROWN backward pass for the margins): never looser.

    Args:
        x: (B, *) inputs in [lower, upper].  y: (B,) integer labels.  eps: float, () or (B,).
    Returns:
        (B, n_classes), 0 at j = y.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        >>> m = margin_bounds(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), 0.01)
        >>> verified = (m + torch.eye(10)[[0, 1, 2, 3]] * 1e9 > 0).all(1)
    """
    if method not in ("ibp", "crown-ibp"):
        raise ValueError(f"method must be 'ibp' or 'crown-ibp', got {method!r}")
    layers = flatten_layers(model)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    if method == "crown-ibp":
        from .crown import crown_ibp_margin_bounds
        return crown_ibp_margin_bounds(model, x, y, eps_t, lower=lower, upper=upper, dtype=dtype)
    be = get_backend(backend)
    if dtype is not None:
        x, eps_t = x.to(dtype), eps_t.to(dtype)
    body, last = _last_linear(layers)
    with _full_precision(x):
        return _margins_through(body, last, be, x, y, eps_t, lower, upper, dtype)


def _margins_through(body, last, be, x, y, eps_t, lower, upper, dtype) -> Tensor:
    state = propagate(body, be.start(x, eps_t, float(lower), float(upper)), be, dtype=dtype)
    if last is not None:
        _check_labels(y, x, last.out_features)
        state = be.reshape(state, lambda t: t.flatten(1))
        return be.margins(state, _param(last.weight, dtype), _param(last.bias, dtype), y)
    lb, ub = be.bounds(state)
    lb, ub = lb.flatten(1), ub.flatten(1)
    _check_labels(y, x, lb.shape[1])
    margins = lb.gather(1, y[:, None]) - ub
    return margins.scatter(1, y[:, None], 0.0)
