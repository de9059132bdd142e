"""Typed wrappers over the C++/CUDA operators ``torch.ops.pyibp.*``.

Each wrapper states what it equals in plain PyTorch; the readable twin of every operator is in
:mod:`pyibp.reference`. Beside each wrapper are its fake (meta) implementation, used by
``torch.compile`` and ``torch.library.opcheck``, and its autograd formula.

Interval tensors are carried in centre-radius form ``(mu, rad)``: the box ``[mu - rad, mu + rad]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the operator library)

__all__ = [
    "input_box", "interval_linear", "interval_conv2d", "interval_relu", "interval_affine",
    "center_to_interval", "interval_to_center", "margin_elision", "relu_relaxation", "crown_relu_step",
    "crown_relu_alpha_step", "sound_crown_relu_step", "sound_relu", "sound_relu_", "sound_radius_operand",
    "pgd_linf_step_", "pgd_l2_step_", "abs_weight",
]

_ops = torch.ops.pyibp
Pair = Tuple[Tensor, Tensor]


# The fakes below mirror the kernels' layout rules line by line (csrc/interval_products.h), so that
# torch.compile and opcheck see the strides the kernels really return.
def _is_channels_last(t: Tensor) -> bool:
    """``is_channels_last`` of the kernels: 4-d, not row-major, dense in channels-last order."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _same_dense_layout(a: Tensor, b: Tensor) -> Pair:
    """``same_dense_layout``: both as they are when they share a dense layout, else row-major."""
    if (a.is_contiguous() and b.is_contiguous()) or (_is_channels_last(a) and _is_channels_last(b)):
        return a, b
    return a.contiguous(), b.contiguous()


def _dense(t: Tensor) -> Tensor:
    """``dense``: t when row-major or channels-last, else a row-major copy."""
    return t if t.is_contiguous() or _is_channels_last(t) else t.contiguous()


def _dense_like(t: Tensor, like: Tensor) -> Tensor:
    """``dense_like``: t in the dense layout of ``like``."""
    return t.contiguous(memory_format=torch.channels_last) if _is_channels_last(like) else t.contiguous()


def _fresh_pair(a: Tensor, b: Tensor) -> Pair:
    """The outputs of an elementwise kernel over ``same_dense_layout(a, b)``."""
    a, b = _same_dense_layout(a, b)
    return torch.empty_like(a), torch.empty_like(b)


# ---------------------------------------------------------------------------------------------
# input_box
def input_box(x: Tensor, eps: Tensor, lower: float, upper: float) -> Pair:
    """Centre and radius of the box ``x ± eps`` intersected with ``[lower, upper]``.

    Args:
        x: (B, *) input.  eps: one value, or (B,) one per example.
    Returns:
        ``(mu, rad)`` of x's shape. Equivalent to::

            l = torch.maximum(x - eps, lower); u = torch.minimum(x + eps, upper)
            mu, rad = (u + l) / 2, (u - l) / 2

    Example:
        >>> mu, rad = input_box(torch.rand(2, 3), torch.tensor(0.1), 0.0, 1.0)
    """
    return _ops.input_box.default(x, eps, lower, upper)


@torch.library.register_fake("pyibp::input_box")
def _(x, eps, lower, upper):
    x = x.contiguous()
    return torch.empty_like(x), torch.empty_like(x)


def _input_box_setup(ctx, inputs, output):
    x, eps, lower, upper = inputs
    ctx.save_for_backward(x, eps)
    ctx.lower, ctx.upper = lower, upper


def _input_box_backward(ctx, grad_mu, grad_rad):
    x, eps = ctx.saved_tensors
    shared = eps.numel() == 1
    e = eps.reshape(()) if shared else eps.reshape((-1,) + (1,) * (x.dim() - 1))
    lo_free = (x - e > ctx.lower).to(x.dtype)   # lower end moves with x
    hi_free = (x + e < ctx.upper).to(x.dtype)   # upper end moves with x
    grad_x = grad_eps = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_mu * (lo_free + hi_free) + grad_rad * (hi_free - lo_free)) / 2
    if ctx.needs_input_grad[1]:
        g = (grad_mu * (hi_free - lo_free) + grad_rad * (hi_free + lo_free)) / 2
        g = g.sum() if shared else g.flatten(1).sum(1)
        grad_eps = g.reshape(eps.shape).to(eps.dtype)
    return grad_x, grad_eps, None, None


torch.library.register_autograd("pyibp::input_box", _input_box_backward, setup_context=_input_box_setup)


# ---------------------------------------------------------------------------------------------
# interval_relu and its backward
def interval_relu(mu: Tensor, rad: Tensor) -> Pair:
    """Interval ReLU in centre-radius form, one pass over memory.

    Equivalent to ``l, u = relu(mu - rad), relu(mu + rad); return (u + l) / 2, (u - l) / 2``.

    Example:
        >>> interval_relu(torch.tensor([[0.5]]), torch.tensor([[1.0]]))
        (tensor([[0.7500]]), tensor([[0.7500]]))
    """
    return _ops.interval_relu.default(mu, rad)


@torch.library.register_fake("pyibp::interval_relu")
def _(mu, rad):
    return _fresh_pair(mu, rad)


def _relu_setup(ctx, inputs, output):
    ctx.save_for_backward(*output)


def _relu_backward(ctx, grad_mu, grad_rad):
    out_mu, out_rad = ctx.saved_tensors
    return _ops.interval_relu_backward.default(grad_mu, grad_rad, out_mu, out_rad)


torch.library.register_autograd("pyibp::interval_relu", _relu_backward, setup_context=_relu_setup)


@torch.library.register_fake("pyibp::interval_relu_backward")
def _(grad_mu, grad_rad, out_mu, out_rad):
    # All four in the outputs' layout: a channels-last box keeps channels-last gradients.
    layout = _dense(out_mu)
    return torch.empty_like(_dense_like(grad_mu, layout)), torch.empty_like(_dense_like(grad_rad, layout))


def _relu_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _relu_backward_backward(ctx, gg_mu, gg_rad):
    # The backward is linear in the incoming gradients and symmetric: it is its own adjoint.
    out_mu, out_rad = ctx.saved_tensors
    g_mu, g_rad = _ops.interval_relu_backward.default(gg_mu, gg_rad, out_mu, out_rad)
    return g_mu, g_rad, None, None


torch.library.register_autograd("pyibp::interval_relu_backward", _relu_backward_backward,
                                setup_context=_relu_backward_setup)


# ---------------------------------------------------------------------------------------------
# interval_linear / interval_conv2d
def interval_linear(mu: Tensor, rad: Tensor, weight: Tensor, abs_weight: Tensor,
                    bias: Optional[Tensor], relu: bool = False) -> Pair:
    """Interval image of ``x -> x W^T + b`` (then ReLU when ``relu``), two products per call.

    Args:
        mu, rad: (B, F).  weight, abs_weight: (K, F), abs_weight == weight.abs().  bias: (K,) or None.
    Returns:
        ``(mu', rad')`` of shape (B, K). Equivalent to
        ``mu' = F.linear(mu, weight, bias); rad' = F.linear(rad, abs_weight)`` followed by
        :func:`interval_relu` when ``relu``; bias and ReLU are fused into one epilogue pass.

    Example:
        >>> w = torch.randn(3, 4)
        >>> m, r = interval_linear(torch.rand(2, 4), torch.rand(2, 4), w, w.abs(), None, True)
    """
    return _ops.interval_linear.default(mu, rad, weight, abs_weight, bias, relu)


@torch.library.register_fake("pyibp::interval_linear")
def _(mu, rad, weight, abs_weight, bias, relu):
    shape = (mu.shape[0], weight.shape[0])
    return mu.new_empty(shape), rad.new_empty(shape)


def _affine_setup(ctx, inputs, output):
    mu, rad, weight, abs_weight, bias = inputs[:5]
    relu = inputs[-1]
    ctx.relu, ctx.has_bias = relu, bias is not None
    ctx.conv_args = inputs[5:-1]
    ctx.save_for_backward(mu, rad, weight, abs_weight, *(output if relu else ()))


def _through_relu(ctx, grad_mu, grad_rad):
    if ctx.relu:
        out_mu, out_rad = ctx.saved_tensors[4:6]
        return _ops.interval_relu_backward.default(grad_mu, grad_rad, out_mu, out_rad)
    return grad_mu, grad_rad


def _linear_backward(ctx, grad_mu, grad_rad):
    mu, rad, weight, abs_weight = ctx.saved_tensors[:4]
    grad_mu, grad_rad = _through_relu(ctx, grad_mu, grad_rad)
    need = ctx.needs_input_grad
    return (grad_mu @ weight if need[0] else None,
            grad_rad @ abs_weight if need[1] else None,
            grad_mu.t() @ mu if need[2] else None,
            grad_rad.t() @ rad if need[3] else None,
            grad_mu.sum(0) if ctx.has_bias and need[4] else None,
            None)


torch.library.register_autograd("pyibp::interval_linear", _linear_backward, setup_context=_affine_setup)


def interval_conv2d(mu: Tensor, rad: Tensor, weight: Tensor, abs_weight: Tensor, bias: Optional[Tensor],
                    stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                    dilation: Sequence[int] = (1, 1), groups: int = 1, relu: bool = False) -> Pair:
    """Interval image of a 2-d convolution (then ReLU when ``relu``), two convolutions per call.

    Args:
        mu, rad: (B, C, H, W), row-major or channels_last.  weight, abs_weight: (C', C/groups, kh, kw).
        bias: (C',) or None.
    Returns:
        ``(mu', rad')`` of shape (B, C', H', W'). Equivalent to
        ``F.conv2d(mu, weight, bias, ...)`` and ``F.conv2d(rad, abs_weight, None, ...)``, then
        :func:`interval_relu` when ``relu``; bias and ReLU are fused into one epilogue pass.

    Example:
        >>> w = torch.randn(8, 1, 3, 3)
        >>> m, r = interval_conv2d(torch.rand(2, 1, 28, 28), torch.full((2, 1, 28, 28), 0.1),
        ...                        w, w.abs(), None, (1, 1), (1, 1), (1, 1), 1, True)
    """
    return _ops.interval_conv2d.default(mu, rad, weight, abs_weight, bias, list(stride), list(padding),
                                        list(dilation), groups, relu)


@torch.library.register_fake("pyibp::interval_conv2d")
def _(mu, rad, weight, abs_weight, bias, stride, padding, dilation, groups, relu):
    conv = torch.ops.aten.convolution.default
    m = conv(mu, weight, None, stride, padding, dilation, False, [0, 0], groups)
    r = conv(rad, abs_weight, None, stride, padding, dilation, False, [0, 0], groups)
    return _fresh_pair(m, r) if relu else (m, r)


def _conv_backward(ctx, grad_mu, grad_rad):
    mu, rad, weight, abs_weight = ctx.saved_tensors[:4]
    stride, padding, dilation, groups = ctx.conv_args
    grad_mu, grad_rad = _through_relu(ctx, grad_mu, grad_rad)
    need = ctx.needs_input_grad
    conv_backward = torch.ops.aten.convolution_backward.default
    g_mu, g_w, g_b = conv_backward(grad_mu, mu, weight, [weight.shape[0]], stride, padding, dilation,
                                   False, [0, 0], groups, [need[0], need[2], ctx.has_bias and need[4]])
    g_rad, g_aw, _ = conv_backward(grad_rad, rad, abs_weight, None, stride, padding, dilation,
                                   False, [0, 0], groups, [need[1], need[3], False])
    return g_mu, g_rad, g_w, g_aw, g_b, None, None, None, None, None


torch.library.register_autograd("pyibp::interval_conv2d", _conv_backward, setup_context=_affine_setup)


# ---------------------------------------------------------------------------------------------
# interval_affine (BatchNorm in eval mode, input normalisation)
def interval_affine(mu: Tensor, rad: Tensor, scale: Tensor, shift: Tensor) -> Pair:
    """Per-channel affine map along dim 1: ``mu * scale + shift``, ``rad * |scale|``.

    Args:
        mu, rad: (B, C, *).  scale, shift: (C,).
    Example:
        >>> interval_affine(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([2., -3.]), torch.ones(2))
        (tensor([[1., 1.]]), tensor([[2., 3.]]))
    """
    return _ops.interval_affine.default(mu, rad, scale, shift)


@torch.library.register_fake("pyibp::interval_affine")
def _(mu, rad, scale, shift):
    return _fresh_pair(mu, rad)


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def _affine_map_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affine_map_backward(ctx, grad_mu, grad_rad):
    mu, rad, scale, shift = ctx.saved_tensors
    s = _channel_view(scale, mu)
    reduce = [d for d in range(mu.dim()) if d != 1]
    need = ctx.needs_input_grad
    return (grad_mu * s if need[0] else None,
            grad_rad * s.abs() if need[1] else None,
            (grad_mu * mu + grad_rad * rad * s.sign()).sum(reduce).reshape(scale.shape) if need[2] else None,
            grad_mu.sum(reduce).reshape(shift.shape) if need[3] else None)


torch.library.register_autograd("pyibp::interval_affine", _affine_map_backward,
                                setup_context=_affine_map_setup)


# ---------------------------------------------------------------------------------------------
# conversions
def center_to_interval(mu: Tensor, rad: Tensor) -> Pair:
    """``(mu, rad) -> (mu - rad, mu + rad)`` in one pass.

    Example:
        >>> center_to_interval(torch.ones(1, 2), torch.ones(1, 2))
        (tensor([[0., 0.]]), tensor([[2., 2.]]))
    """
    return _ops.center_to_interval.default(mu, rad)


def interval_to_center(lower: Tensor, upper: Tensor) -> Pair:
    """``(lower, upper) -> ((upper + lower) / 2, (upper - lower) / 2)`` in one pass.

    Example:
        >>> interval_to_center(torch.zeros(1, 2), torch.full((1, 2), 2.0))
        (tensor([[1., 1.]]), tensor([[1., 1.]]))
    """
    return _ops.interval_to_center.default(lower, upper)


for _name in ("center_to_interval", "interval_to_center"):
    torch.library.register_fake(f"pyibp::{_name}")(_fresh_pair)


def _save_nothing(ctx, inputs, output):
    pass


def _center_to_interval_backward(ctx, grad_lower, grad_upper):
    return grad_lower + grad_upper, grad_upper - grad_lower


def _interval_to_center_backward(ctx, grad_mu, grad_rad):
    return (grad_mu - grad_rad) / 2, (grad_mu + grad_rad) / 2


torch.library.register_autograd("pyibp::center_to_interval", _center_to_interval_backward,
                                setup_context=_save_nothing)
torch.library.register_autograd("pyibp::interval_to_center", _interval_to_center_backward,
                                setup_context=_save_nothing)


# ---------------------------------------------------------------------------------------------
# margin_elision
def margin_elision(mu: Tensor, rad: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
    """Lower bounds of ``logit_y - logit_j`` through the last Linear, for all j (0 at j = y).

    The specification ``C`` (row j: e_y - e_j) is folded into the layer, so the bound is that of
    ``C W`` rather than of ``W`` followed by ``C`` (tighter), without materialising ``C W``.

    Args:
        mu, rad: (B, F) input interval of the last Linear.  weight: (K, F).  bias: (K,) or None.
        labels: (B,) integers in [0, K).
    Returns:
        (B, K). Equivalent to::

            d = weight[labels][:, None, :] - weight[None]            # (B, K, F)
            (d @ mu[..., None] - d.abs() @ rad[..., None])[..., 0] + bias[labels][:, None] - bias

    Example:
        >>> w = torch.randn(10, 5)
        >>> margin_elision(torch.rand(2, 5), torch.zeros(2, 5), w, None, torch.tensor([3, 7])).shape
        torch.Size([2, 10])
    """
    return _ops.margin_elision.default(mu, rad, weight, bias, labels)


@torch.library.register_fake("pyibp::margin_elision")
def _(mu, rad, weight, bias, labels):
    return mu.new_empty((mu.shape[0], weight.shape[0]))


def _margin_setup(ctx, inputs, output):
    mu, rad, weight, bias, labels = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(mu, rad, weight, labels)


def _margin_backward(ctx, grad):
    mu, rad, weight, labels = ctx.saved_tensors
    labels = labels.long()
    g = grad.scatter(1, labels[:, None], 0.0)          # the j = y entry is the constant 0
    w_y = weight[labels]                                # (B, F)
    diff = w_y[:, None, :] - weight[None, :, :]         # (B, K, F)
    need = ctx.needs_input_grad
    grad_mu = g.sum(1, keepdim=True) * w_y - g @ weight if need[0] else None
    grad_rad = -torch.einsum("bk,bkf->bf", g, diff.abs()) if need[1] else None
    grad_w = grad_b = None
    if need[2]:
        per_pair = g[:, :, None] * (mu[:, None, :] - diff.sign() * rad[:, None, :])
        grad_w = (-per_pair.sum(0)).index_add(0, labels, per_pair.sum(1))
    if ctx.has_bias and need[3]:
        grad_b = (-g.sum(0)).index_add(0, labels, g.sum(1))
    return grad_mu, grad_rad, grad_w, grad_b, None


torch.library.register_autograd("pyibp::margin_elision", _margin_backward, setup_context=_margin_setup)


# ---------------------------------------------------------------------------------------------
# relu_relaxation (CROWN)
def relu_relaxation(lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Linear relaxation of ReLU on ``[lower, upper]`` as used by CROWN-IBP.

    Returns ``(lower_slope, upper_slope, upper_intercept)`` with
    ``lower_slope * x <= relu(x) <= upper_slope * x + upper_intercept`` on the interval:
    inactive neurons (u <= 0) get zeros, active ones (l >= 0) the identity, unstable ones the
    chord ``u / (u - l) * (x - l)`` above and the adaptive slope ``1 if u > -l else 0`` below.

    Example:
        >>> relu_relaxation(torch.tensor([-1.0]), torch.tensor([3.0]))
        (tensor([1.]), tensor([0.7500]), tensor([0.7500]))
    """
    return _ops.relu_relaxation.default(lower, upper)


@torch.library.register_fake("pyibp::relu_relaxation")
def _(lower, upper):
    lower, _ = _same_dense_layout(lower, upper)
    return torch.empty_like(lower), torch.empty_like(lower), torch.empty_like(lower)


def _relaxation_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _relaxation_backward(ctx, grad_lower_slope, grad_upper_slope, grad_upper_intercept):
    lower, upper = ctx.saved_tensors
    unstable = (lower < 0) & (upper > 0)
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    inv2 = unstable.to(lower.dtype) / (width * width)
    # s = u / (u - l), b = -l u / (u - l); the lower slope is piecewise constant.
    grad_l = (grad_upper_slope * upper - grad_upper_intercept * upper * upper) * inv2
    grad_u = (-grad_upper_slope * lower + grad_upper_intercept * lower * lower) * inv2
    return grad_l, grad_u


torch.library.register_autograd("pyibp::relu_relaxation", _relaxation_backward,
                                setup_context=_relaxation_setup)


def crown_relu_step(A: Tensor, mu: Tensor, rad: Tensor) -> Tuple[Tensor, Tensor]:
    """One CROWN step back through a ReLU whose pre-activation box is ``(mu, rad)``, in one pass.

    With ``(s_low, s_up, t) = relu_relaxation(mu - rad, mu + rad)`` computed on the fly, a lower
    bound ``A relu(z)`` over the box is ``A⁺ s_low z + A⁻ (s_up z + t)``; this returns the new
    coefficients and the constant it adds::

        A⁺ * s_low + A⁻ * s_up,   (A⁻ * t).sum(-1)          # (B, R, N), (B, R)

    with ``A⁺ = max(A, 0)``, ``A⁻ = min(A, 0)``. Differentiable in ``A``, ``mu`` and ``rad``
    (the lower slope is piecewise constant and gets no gradient); once differentiable.

    Args:
        A: (B, R, N) — R specification rows per example over N features.
        mu, rad: (B, N) centre and radius of the pre-activation box, the features in A's order.
    Returns:
        ``(A', shift)``: (B, R, N) contiguous and (B, R).

    Example:
        >>> A = torch.tensor([[[1.0, -2.0]]])
        >>> crown_relu_step(A, torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 3.0]]))
        (tensor([[[ 1.0000, -1.3333]]]), tensor([[-2.6667]]))
    """
    return _ops.crown_relu_step.default(A, mu, rad)


@torch.library.register_fake("pyibp::crown_relu_step")
def _(A, mu, rad):
    return torch.empty_like(A.contiguous()), A.new_empty(A.shape[:2])


@torch.library.register_fake("pyibp::crown_relu_step_backward")
def _(grad_out, grad_shift, A, mu, rad):
    mu = mu.contiguous()
    return torch.empty_like(A.contiguous()), torch.empty_like(mu), torch.empty_like(mu)


def _crown_relu_step_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _crown_relu_step_backward(ctx, grad_out, grad_shift):
    A, mu, rad = ctx.saved_tensors
    grad_A, grad_mu, grad_rad = _ops.crown_relu_step_backward.default(grad_out, grad_shift, A, mu, rad)
    need = ctx.needs_input_grad
    return grad_A if need[0] else None, grad_mu if need[1] else None, grad_rad if need[2] else None


torch.library.register_autograd("pyibp::crown_relu_step", _crown_relu_step_backward,
                                setup_context=_crown_relu_step_setup)


def crown_relu_alpha_step(A: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor]:
    """One α-CROWN step back through a ReLU with given lower slopes ``alpha``, in one pass over ``A``.

    Per neuron of the pre-activation box ``[lower, upper]``: dead (``upper <= 0``) ``s_low = s_up =
    t = 0``; active (``lower >= 0``) ``s_low = s_up = 1, t = 0``; unstable (``lower < 0 < upper``)
    ``s_low = alpha``, ``s_up = upper / (upper - lower)``, ``t = -lower * s_up``. Then, as
    :func:`crown_relu_step` does with CROWN's slopes::

        out = A⁺ * s_low + A⁻ * s_up            # (B, R, N), A⁺ = max(A, 0), A⁻ = min(A, 0)
        shift = (A⁻ * t).sum(-1)                # (B, R)

    Equivalent to :func:`pyibp.reference.crown_relu_alpha_step_ref`. ``alpha`` is used as given
    (the caller projects it onto [0, 1], where every slope gives a valid bound) and read on
    unstable neurons only; NaN bounds give NaN coefficients. Differentiable in ``A``, ``lower``,
    ``upper`` and ``alpha`` (once): ``d out / d alpha = A⁺`` on unstable neurons, summed over what
    ``alpha`` shares; ``lower`` and ``upper`` get gradients through ``s_up`` and ``t``. At ``A = 0``
    the derivative in ``A`` is the one from the side of ``A⁺`` (``s_low``, no intercept term).

    Args:
        A: (B, R, N) — R specification rows per example over N neurons.
        lower, upper: (B, N) pre-activation bounds, ``lower <= upper``.
        alpha: (Ba, Ra, N) lower slopes, ``Ba`` in {1, B} and ``Ra`` in {1, R}: one per row and
            neuron, or shared over the rows (``Ra = 1``) and/or the examples (``Ba = 1``).
    Returns:
        ``(out, shift)``: (B, R, N) contiguous and (B, R).

    Example:
        >>> A = torch.tensor([[[1.0, -2.0]]])
        >>> crown_relu_alpha_step(A, torch.tensor([[-2.0, -2.0]]), torch.tensor([[4.0, 4.0]]),
        ...                       torch.tensor([[[0.25, 0.25]]]))
        (tensor([[[ 0.2500, -1.3333]]]), tensor([[-2.6667]]))
    """
    return _ops.crown_relu_alpha_step.default(A, lower, upper, alpha)


@torch.library.register_fake("pyibp::crown_relu_alpha_step")
def _(A, lower, upper, alpha):
    return torch.empty_like(A.contiguous()), A.new_empty(A.shape[:2])


@torch.library.register_fake("pyibp::crown_relu_alpha_step_backward")
def _(grad_out, grad_shift, A, lower, upper, alpha):
    lower = lower.contiguous()
    return (torch.empty_like(A.contiguous()), torch.empty_like(lower), torch.empty_like(lower),
            torch.empty_like(alpha.contiguous()))


def _crown_relu_alpha_step_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _crown_relu_alpha_step_backward(ctx, grad_out, grad_shift):
    grads = _ops.crown_relu_alpha_step_backward.default(grad_out, grad_shift, *ctx.saved_tensors)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


torch.library.register_autograd("pyibp::crown_relu_alpha_step", _crown_relu_alpha_step_backward,
                                setup_context=_crown_relu_alpha_step_setup)


def sound_crown_relu_step(A: Tensor, alpha: Tensor, sigma: Tensor, tau: Tensor, m_in: Optional[Tensor] = None,
                          m_out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of sound CROWN back through ReLUs with given lines, in one pass over ``A``.

    The caller rounds the lines ``alpha z <= relu(z) <= sigma z + tau`` outward (``alpha`` 0 or 1,
    ``tau >= 0``); ``m_in`` / ``m_out >= 0`` are the error weights of the coefficients before and
    after the step (see :mod:`pyibp.bounds.sound_crown`). Equivalent to::

        out = torch.where(A < 0, A * sigma, A * alpha)          # alpha, sigma, tau broadcast over R
        shift = (A.clamp(max=0) * tau).sum(-1)                  # terms <= 0
        slack_in = (A.abs() * m_in).sum(-1)                     # terms >= 0; 0 without m_in
        slack_out = (out.abs() * m_out).sum(-1)                 # terms >= 0; 0 without m_out

    with every product rounded once and each sum of N terms accumulated in the dtype in some
    order (so within the ``γ_N`` bound of the error model). No autograd: certificates only.

    Args:
        A: (B, R, N) float32 or float64 — R specification rows per example over N features.
        alpha, sigma, tau: (B, N) the ReLU lines, A's dtype.
        m_in, m_out: (B, N) or None.
    Returns:
        ``(out, shift, slack_in, slack_out)``: (B, R, N) contiguous and three (B, R).

    Example:
        >>> A = torch.tensor([[[1.0, -2.0]]])
        >>> line = torch.tensor([[1.0, 0.5]])
        >>> sound_crown_relu_step(A, torch.tensor([[1.0, 0.0]]), line, line, torch.ones(1, 2))
        (tensor([[[ 1., -1.]]]), tensor([[-1.]]), tensor([[3.]]), tensor([[0.]]))
    """
    return _ops.sound_crown_relu_step.default(A, alpha, sigma, tau, m_in, m_out)


@torch.library.register_fake("pyibp::sound_crown_relu_step")
def _(A, alpha, sigma, tau, m_in, m_out):
    rows = A.new_empty(A.shape[:2])
    return torch.empty_like(A.contiguous()), rows, torch.empty_like(rows), torch.empty_like(rows)


def sound_relu(mu: Tensor, rad: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The sound interval ReLU, rounded outward, in one pass; and which examples are finite.

    Where ``mu >= rad`` (the box is active: exactly ``mu - rad >= 0``) the box is kept; elsewhere
    the image ``[0, max(mu + rad, 0)]`` is enclosed in ``[0, top]``: ``top`` is 0 where
    ``fl(mu + rad) <= 0`` (then the exact sum is <= 0) and the float above ``fl(mu + rad)``
    otherwise, returned as centre ``top / 2`` and radius ``max(top / 2, top - top / 2)`` (which
    differ only where halving a subnormal rounds). Equivalent to::

        s = (mu + rad).clamp(min=0)
        top = torch.where(s > 0, torch.nextafter(s, inf), s)
        half = top * 0.5
        rest = top - half          # exact; NaN only where top is inf, and then the radius is inf
        out = torch.where(mu >= rad, mu, half), torch.where(mu >= rad, rad, torch.where(half < rest, rest, half))
        finite = (mu + rad).isfinite().flatten(1).all(1)

    ``finite`` is False for an example with an infinite or NaN value, or whose ``mu + rad``
    overflows: the caller voids its bounds. NaN stays NaN. No autograd: certificates only
    (:mod:`pyibp.bounds.sound`).

    Args:
        mu, rad: (B, ...) float32 or float64, one shape.
    Returns:
        ``(mu', rad', finite)``: two tensors of the input's shape (its dense layout: row-major or
        channels-last) and ``finite`` (B,) bool.

    Example:
        >>> sound_relu(torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.5, 0.5, 1.5]]))
        (tensor([[1.0000, 0.0000, 1.0000]]), tensor([[0.5000, 0.0000, 1.0000]]), tensor([True]))

        (the last box: centre and radius the float above 1, so [0, 2 + 1 ulp] contains [0, 2])
    """
    return _ops.sound_relu.default(mu, rad)


@torch.library.register_fake("pyibp::sound_relu")
def _(mu, rad):
    mu_out, rad_out = _fresh_pair(mu, rad)
    return mu_out, rad_out, mu.new_empty(mu.shape[:1], dtype=torch.bool)


def sound_relu_(mu: Tensor, rad: Tensor) -> Tensor:
    """:func:`sound_relu` in place, for a box nothing else reads (a product's fresh outputs): no new
    memory. ``mu`` and ``rad`` must both be row-major or both channels-last, and not overlap.

    Returns:
        ``finite`` (B,) bool; ``mu`` and ``rad`` hold the ReLU's box.

    Example:
        >>> mu, rad = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 0.5]])
        >>> sound_relu_(mu, rad), mu, rad
        (tensor([True]), tensor([[1., 0.]]), tensor([[0.5000, 0.0000]]))
    """
    finite = _ops.sound_relu_.default(mu, rad)
    _bump_version(mu)
    _bump_version(rad)
    return finite


@torch.library.register_fake("pyibp::sound_relu_")
def _(mu, rad):
    return mu.new_empty(mu.shape[:1], dtype=torch.bool)


def sound_radius_operand(mu: Tensor, rad: Tensor, c: float) -> Tensor:
    """``rad + c |mu|`` in one pass, ``c`` rounded up into the dtype: the radius operand of a sound
    product, which carries the centre product's rounding error into the radius product.

    Equivalent to ``rad + c_up * mu.abs()`` with ``c_up`` the smallest value of the dtype >= c.

    Args:
        mu, rad: (B, ...) float32 or float64, one shape.  c: a finite float >= 0.
    Returns:
        (B, ...) in the dense layout of the inputs.

    Example:
        >>> sound_radius_operand(torch.tensor([[-2.0, 1.0]]), torch.tensor([[0.5, 0.0]]), 0.25)
        tensor([[1.0000, 0.2500]])
    """
    return _ops.sound_radius_operand.default(mu, rad, c)


@torch.library.register_fake("pyibp::sound_radius_operand")
def _(mu, rad, c):
    return _fresh_pair(mu, rad)[1]


# ---------------------------------------------------------------------------------------------
# PGD steps (in place, no autograd: attacks run them under no_grad)
def _bump_version(t: Tensor) -> None:
    # The in-place kernels write through data pointers; bumping the version counter makes autograd
    # raise, as for any in-place op, if `t` was saved for a backward pass that has not run yet.
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(t)


def pgd_linf_step_(delta: Tensor, grad: Tensor, x: Tensor, eps: Tensor, alpha: Tensor,
                   lower: float, upper: float) -> Tensor:
    """One l∞ PGD step in place, one pass over memory; returns ``delta``.

    Equivalent to::

        delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
        delta = torch.clamp(delta, lower - x, upper - x)

    and then guarantees ``|delta| <= eps`` and ``lower <= x + delta <= upper`` exactly in the
    tensor's dtype (values that rounding would push out are moved one ulp towards zero).
    ``eps`` and ``alpha``: one value or (B,) one per example. x must lie in [lower, upper].

    Example:
        >>> d = torch.zeros(2, 3); x = torch.rand(2, 3)
        >>> _ = pgd_linf_step_(d, torch.randn(2, 3), x, torch.tensor(0.1), torch.tensor(0.05), 0., 1.)
    """
    _ops.pgd_linf_step_.default(delta, grad, x, eps, alpha, lower, upper)
    _bump_version(delta)
    return delta


def pgd_l2_step_(delta: Tensor, grad: Tensor, x: Tensor, eps: Tensor, alpha: Tensor,
                 lower: float, upper: float) -> Tensor:
    """One l2 PGD step in place; returns ``delta``.

    Equivalent to (per example, norms over all but the batch dimension)::

        delta = delta + alpha * grad / grad.norm()        # zero gradient: no move
        delta = delta * min(1, eps / delta.norm())
        delta = torch.clamp(delta, lower - x, upper - x)

    with the result guaranteed inside the ball and the domain despite rounding.

    Example:
        >>> d = torch.zeros(2, 3); x = torch.rand(2, 3)
        >>> _ = pgd_l2_step_(d, torch.randn(2, 3), x, torch.tensor(0.5), torch.tensor(0.1), 0., 1.)
    """
    _ops.pgd_l2_step_.default(delta, grad, x, eps, alpha, lower, upper)
    _bump_version(delta)
    return delta


for _name in ("pgd_linf_step_", "pgd_l2_step_"):
    torch.library.register_fake(f"pyibp::{_name}")(lambda delta, grad, x, eps, alpha, lower, upper: None)


# ---------------------------------------------------------------------------------------------
# |W|
def abs_weight(weight: Tensor) -> Tensor:
    """``weight.abs()``, the second operand of every interval product.

    Computed afresh on every call. A cache keyed on the weight's version counter returned a stale
    ``|W|`` after changes that bypass the counter (``weight.data.mul_(3)``,
    ``nn.utils.vector_to_parameters``), which made bounds wrong; ``|W|`` costs one pass over the
    weights, far less than the products it feeds.

    Example:
        >>> abs_weight(torch.tensor([[-1.0, 2.0]]))
        tensor([[1., 2.]])
    """
    return weight.abs()


# ---------------------------------------------------------------------------------------------
# APGD steps (in place, no autograd: attacks run them outside the graph)
def apgd_linf_step_(delta: Tensor, previous: Tensor, grad: Tensor, x: Tensor, eps: Tensor, step: Tensor,
                    momentum: float, lower: Tensor, upper: Tensor) -> Tensor:
    """One l∞ APGD update (Croce & Hein 2020) in place, one pass over memory; returns ``delta``.

    Args:
        delta, previous: (B, *) the current and the previous perturbation, both updated in place
            (``previous`` receives the current ``delta``).  grad: (B, *) the loss gradient at ``x + delta``.
        x: (B, *) the clean input, inside ``[lower, upper]``.  eps, step: one value or (B,).
        momentum: the weight of the new step, in [0, 1] (0.75 in APGD, 1 on its first step).
        lower, upper: the domain, of x's dtype: one value or one per element of x.
    Equivalent to (``P`` clamps onto ``[-eps, eps]`` and then onto ``[lower - x, upper - x]``)::

        z = P(delta + step * grad.sign())
        previous, delta = delta, P(delta + momentum * (z - delta) + (1 - momentum) * (delta - previous))

    and then guarantees ``|delta| <= eps`` and ``lower <= x + delta <= upper`` exactly in the
    tensor's dtype. With ``momentum=1`` it is the PGD step :func:`pgd_linf_step_` with a tensor domain.

    Example:
        >>> x = torch.rand(2, 3); d, p = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> lo, hi = torch.tensor(0.0), torch.tensor(1.0)
        >>> _ = apgd_linf_step_(d, p, torch.randn(2, 3), x, torch.tensor(0.1), torch.tensor(0.2), 1.0, lo, hi)
    """
    _ops.apgd_linf_step_.default(delta, previous, grad, x, eps, step, momentum, lower, upper)
    _bump_version(delta)
    _bump_version(previous)
    return delta


def apgd_l2_step_(delta: Tensor, previous: Tensor, grad: Tensor, x: Tensor, eps: Tensor, step: Tensor,
                  momentum: float, lower: Tensor, upper: Tensor) -> Tensor:
    """One l2 APGD update in place; returns ``delta``. Arguments as in :func:`apgd_linf_step_`.

    Equivalent to (per example, norms over all but the batch dimension; ``P`` scales into the
    ball ``delta * min(1, eps / ||delta||)`` and then clamps onto ``[lower - x, upper - x]``)::

        z = P(delta + step * grad / grad.norm())            # zero gradient: no move
        previous, delta = delta, P(delta + momentum * (z - delta) + (1 - momentum) * (delta - previous))

    with the result guaranteed inside the ball and the domain despite rounding.

    Example:
        >>> x = torch.rand(2, 3); d, p = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> lo, hi = torch.tensor(0.0), torch.tensor(1.0)
        >>> _ = apgd_l2_step_(d, p, torch.randn(2, 3), x, torch.tensor(0.5), torch.tensor(1.0), 0.75, lo, hi)
    """
    _ops.apgd_l2_step_.default(delta, previous, grad, x, eps, step, momentum, lower, upper)
    _bump_version(delta)
    _bump_version(previous)
    return delta


for _name in ("apgd_linf_step_", "apgd_l2_step_"):
    torch.library.register_fake(f"pyibp::{_name}")(
        lambda delta, previous, grad, x, eps, step, momentum, lower, upper: None)
__all__ += ["apgd_linf_step_", "apgd_l2_step_"]
