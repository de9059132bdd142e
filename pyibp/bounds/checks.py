"""Validation of what the user passes to a bound: the input box, labels, devices."""
from __future__ import annotations

import itertools
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

Eps = Union[float, Tensor]
Bound = Union[float, Tensor]
_REDUCED = (torch.float16, torch.bfloat16)


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


def _domain_side(name: str, value: Bound, x: Tensor) -> Bound:
    if not isinstance(value, Tensor):
        return float(value)
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; put both on one device")
    value = value.detach().to(x.dtype)
    if value.dim() == 1 and x.dim() > 2 and value.shape[0] == x.shape[1]:
        value = value.reshape((1, -1) + (1,) * (x.dim() - 2))        # one value per channel
    try:
        fits = torch.broadcast_shapes(value.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} must be a float, a tensor of one value per channel ({x.shape[1]},) or a tensor "
                         f"broadcastable to x's shape {tuple(x.shape)}, got shape {tuple(value.shape)}")
    return value


def domain(x: Tensor, lower: Bound, upper: Bound) -> Tuple[Bound, Bound]:
    """The input domain ``[lower, upper]`` as floats, or as tensors broadcastable to x (of x's
    dtype and device): a 1-d tensor with one value per channel of x (dim 1) is viewed as
    (1, C, 1, ...), so the domain of normalised data is ``lower=(0 - mean) / std`` per channel.

    Example:
        >>> lo, hi = domain(torch.rand(2, 3, 4, 4), -torch.tensor([0.4, 0.5, 0.6]) / 0.2, 3.0)
        >>> lo.shape, hi
        (torch.Size([1, 3, 1, 1]), 3.0)
    """
    return _domain_side("lower", lower, x), _domain_side("upper", upper, x)


def compute_dtype(model: nn.Module, x: Tensor, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype a bound is computed in: ``dtype`` when given; float32 (float64 for a float64 x)
    when x or the model is half or bfloat16, as under autocast; else None (the model's own).

    Raises ValueError when x and the model's parameters have different full-precision dtypes.
    """
    if dtype is not None:
        return dtype
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    model_dtype = param.dtype if param is not None else x.dtype
    if x.dtype in _REDUCED or model_dtype in _REDUCED:
        return torch.float64 if torch.float64 in (x.dtype, model_dtype) else torch.float32
    if x.dtype != model_dtype:
        raise ValueError(f"x is {x.dtype} but the model's parameters are {model_dtype}; pass x.to({model_dtype}), "
                         f"or dtype=torch.float64 to compute the bounds in float64 whatever the model's dtype")
    return None


def check_box(x: Tensor, eps: Eps, lower: Bound, upper: Bound) -> Tensor:
    """Validates an input box and returns eps as a tensor of x's dtype: shape () or (B,).

    ``lower``/``upper``: floats, or tensors as :func:`domain` takes them.
    Raises ValueError naming the bad value: non-floating x, NaN/inf, eps < 0, eps of the wrong
    shape or device, a domain of the wrong shape or device, lower > upper, or x outside [lower, upper].
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, ...) with a batch dimension, got {tuple(x.shape)}")
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        return _check_tensor_box(x, eps, *domain(x, lower, upper))
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


def _check_tensor_box(x: Tensor, eps: Eps, lower: Bound, upper: Bound) -> Tensor:
    """check_box for a domain given as tensors (see :func:`domain`)."""
    eps_t = per_example_tensor("eps", eps, x, x.dtype)
    if torch.compiler.is_compiling():
        return eps_t
    lo, hi = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (lower, upper))
    if torch.isnan(lo).any() or torch.isnan(hi).any():
        raise ValueError("lower and upper must not be NaN")
    if (lo > hi).any():
        raise ValueError(f"lower must be <= upper everywhere, got lower {lo.flatten().tolist()[:6]} and "
                         f"upper {hi.flatten().tolist()[:6]}")
    _finite_range("eps", eps_t)
    if (eps_t < 0).any():
        raise ValueError(f"eps must be >= 0, got {eps_t.min().item()}")
    _finite_range("x", x)
    outside = (x < lo) | (x > hi)
    if outside.any():
        raise ValueError(f"x has {int(outside.sum())} values outside the input domain [lower, upper] (e.g. "
                         f"{float(x[outside][0]):.4g}); pass lower=/upper= matching your data")
    return eps_t


def _check_model_device(model: nn.Module, x: Tensor) -> None:
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
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
