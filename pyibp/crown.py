"""CROWN-IBP margin bounds (Zhang et al., "Towards Stable and Efficient Training of Verifiably
Robust Neural Networks", ICLR 2020).

Two passes over the network:

1. **IBP forward**, recording the box in front of every ReLU (and MaxPool): the pre-activation
   bounds ``[l, u]`` that the relaxations need.
2. **One CROWN backward pass** from the margin specification. Row j of ``C`` is ``e_y - e_j``; it is
   folded into the last Linear (``A = W[y] - W[j]``) and pushed back to the input as a linear
   function ``Λ x + c`` that lower-bounds the margin on the whole box. Each layer maps ``A`` to
   ``A W`` (Linear), ``conv_transpose2d(A, W)`` (Conv2d), ``A⁺ s_low + A⁻ s_up`` (ReLU, with the
   intercept of the upper line added to ``c``), and so on.

The lower bound on the input box ``[mu - rad, mu + rad]`` is then ``Λ mu - |Λ| rad + c``.
Everything is differentiable, so the bounds can be trained through.

Cost: the backward pass carries K-1 specification rows per example (the row j = y is zero and
is skipped), so it costs about K-1 forward passes of the network without its last layer, on top
of the IBP pass; its tensors ``A`` are K-1 times the size of the activations (on CPU the pass runs
over chunks of examples that keep each ``A`` under 8 MiB, see ``_CPU_CHUNK_BYTES``). MaxPool2d has a
sound relaxation of its own (see ``_back_maxpool``); a :class:`pyibp.nn.Residual` block sends
``A`` through both branches and adds the results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import ops
from .bounds import FusedBackend, _check_labels, _check_model_device, _last_linear, _param, check_box, propagate
from .layers import batchnorm_scale_shift, conv_padding, flatten_layers
from .nn import Normalize, Residual

__all__ = ["crown_ibp_margin_bounds", "crown_ibp_mixed_margins", "margin_pass", "MarginPass"]

Pair = Tuple[Tensor, Tensor]
Eps = Union[float, Tensor]


class MarginPass(NamedTuple):
    """Everything one bound computation produces, for training losses, regularisers and metrics.

    Attributes:
        ibp: (B, K) IBP lower bounds of ``logit_y - logit_j`` (last-layer elision), 0 at j = y.
        crown: (B, K) CROWN-IBP lower bounds of the same margins (0 at j = y), or None when the
            backward pass was not asked for.
        input_box: ``(mu, rad)`` of the input box, each (B, *input_shape).
        pre_activations: ``(lower, upper)`` IBP bounds in front of each ReLU, in network order.
    """

    ibp: Tensor
    crown: Optional[Tensor]
    input_box: Pair
    pre_activations: List[Pair]


# ---------------------------------------------------------------------------------------------
# shapes
def _input_shapes(layers: Sequence[nn.Module], shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    """The per-example input shape of every layer, worked out on the meta device (no arithmetic)."""
    shapes = []
    t = torch.empty((1,) + tuple(shape), device="meta")
    for i, layer in enumerate(layers):
        shapes.append(tuple(t.shape[1:]))
        if isinstance(layer, nn.Linear):
            t = t.new_empty(t.shape[:-1] + (layer.out_features,))
        elif isinstance(layer, nn.Conv2d):
            w = torch.empty(layer.weight.shape, device="meta")
            t = F.conv2d(t, w, None, layer.stride, conv_padding(i, layer), layer.dilation, layer.groups)
        elif isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)):
            t = layer(t)
        elif isinstance(layer, Residual):
            t = t.new_empty((1,) + _input_shapes(flatten_layers(layer.body), t.shape[1:])[-1])
    shapes.append(tuple(t.shape[1:]))
    return shapes


@dataclass
class _Trace:
    """What the backward pass needs of one chain of layers, recorded by the IBP pass.

    ``shapes[i]``: the per-example input shape of ``layers[i]`` (one more entry: the output's).
    ``boxes[i]``: ``(lower, upper)`` in front of a ReLU or MaxPool layer i; for a Residual layer
    the traces of its two branches ``(body, shortcut)``.
    """

    layers: List[nn.Module]
    shapes: List[Tuple[int, ...]]
    boxes: Dict[int, Union[Pair, Tuple["_Trace", "_Trace"]]] = field(default_factory=dict)

    def rows(self, index: slice) -> "_Trace":
        """The trace of the examples ``index`` (the boxes sliced along the batch dimension)."""
        boxes = {i: tuple(b.rows(index) if isinstance(b, _Trace) else b[index] for b in box)
                 for i, box in self.boxes.items()}
        return _Trace(self.layers, self.shapes, boxes)

    def largest_shape(self) -> int:
        """The largest per-example number of features in front of or behind any layer, branches included."""
        sizes = [math.prod(shape) for shape in self.shapes]
        sizes += [b.largest_shape() for box in self.boxes.values() for b in box if isinstance(b, _Trace)]
        return max(sizes)

    def pre_activations(self) -> Iterator[Pair]:
        """The boxes in front of every ReLU, in network order (branches: body, then shortcut)."""
        for i in sorted(self.boxes):
            if isinstance(self.layers[i], nn.ReLU):
                yield self.boxes[i]
            elif isinstance(self.layers[i], Residual):
                for branch in self.boxes[i]:
                    yield from branch.pre_activations()


# ---------------------------------------------------------------------------------------------
# the backward pass, one function per layer type: A (B, K', *out_shape) -> (B, K', *in_shape)
def _feature_dims(t: Tensor) -> Tuple[int, ...]:
    return tuple(range(2, t.dim()))


def _sum_over_features(t: Tensor) -> Tensor:
    """(B, K', *) -> (B, K')."""
    return t.sum(_feature_dims(t)) if t.dim() > 2 else t


def _channels_last(A: Tensor) -> bool:
    """Whether A (B, K', C, H, W) is laid out channels-last, as conv_transpose2d leaves it."""
    return A.dim() == 5 and A.stride(2) == 1 and A.shape[2] > 1


def _layout_like(t: Tensor, A: Tensor) -> Tensor:
    """t (B, *features) in A's memory layout (channels-last or row-major), so that elementwise
    ops with A run at full speed and both flatten alike (:func:`_flat_features`)."""
    return t.contiguous(memory_format=torch.channels_last) if _channels_last(A) else t.contiguous()


def _back_linear(A: Tensor, const: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if bias is not None:
        const = const + _sum_over_features(A @ bias[:, None])
    return A @ weight, const


def _back_conv2d(A: Tensor, const: Tensor, layer: nn.Conv2d, index: int, weight: Tensor,
                 bias: Optional[Tensor], in_shape: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    batch, rows = A.shape[:2]
    if bias is not None:
        const = const + A.sum((3, 4)) @ bias
    padding = conv_padding(index, layer)
    # conv_transpose2d cannot know how many rows/columns a strided convolution dropped at the end.
    out_padding = [size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                   for size, o, s, p, d, k in zip(in_shape[1:], A.shape[3:], layer.stride, padding,
                                                  layer.dilation, layer.kernel_size)]
    # Channels-last: the transposed convolution runs about twice as fast on CPU (oneDNN) that way.
    A = A.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    A = F.conv_transpose2d(A, weight, None, layer.stride, padding, out_padding, layer.groups, layer.dilation)
    return A.view(batch, rows, *in_shape), const


def _flat_features(t: Tensor, channels_last: bool) -> Tensor:
    """(B, R, *features) -> (B, R, n), features in the order (H, W, C) when ``channels_last``
    (a view when t is laid out that way), else in their natural order."""
    return t.permute(0, 1, 3, 4, 2).flatten(2) if channels_last else t.flatten(2)


def _unflatten_features(flat: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """The inverse of :func:`_flat_features`, for a tensor of ``shape``."""
    if channels_last:
        b, r, c, h, w = shape
        return flat.view(b, r, h, w, c).permute(0, 1, 4, 2, 3)
    return flat.view(shape)


class _ReluStep(torch.autograd.Function):
    """One CROWN step through a ReLU, written to allocate as few tensors of A's size as possible
    (on CPU each fresh allocation of that size costs more than the arithmetic on it).

    For A (B, K', *shape) and the relaxation (B, 1, *shape) it returns, with A⁺ = max(A, 0) and
    A⁻ = min(A, 0)::

        A⁺ * slope_low + A⁻ * slope_up,   (A⁻ * intercept).sum(over *shape)      # (B, K', *shape), (B, K')

    computed as ``A * slope_up + A⁺ * (slope_low - slope_up)``. ``slope_low`` is piecewise
    constant in the pre-activation bounds (0 or 1), so it gets no gradient.
    """

    @staticmethod
    def forward(ctx, A: Tensor, slope_low: Tensor, slope_up: Tensor, intercept: Tensor) -> Tuple[Tensor, Tensor]:
        cl = ctx.channels_last = _channels_last(A)
        A_pos = A.clamp(min=0)
        out = (A * slope_up).addcmul_(A_pos, slope_low - slope_up)
        column = _flat_features(intercept, cl).transpose(1, 2)
        const = (torch.bmm(_flat_features(A, cl), column) - torch.bmm(_flat_features(A_pos, cl), column))[..., 0]
        ctx.save_for_backward(A, A_pos, slope_low, slope_up, intercept)
        return out, const

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, grad_const: Tensor):
        A, A_pos, slope_low, slope_up, intercept = ctx.saved_tensors
        grad_const = grad_const.reshape(grad_const.shape + (1,) * (A.dim() - 2))
        # d/dA: slope_up * g + intercept * g_const where A < 0, slope_low * g where A > 0.
        grad_in = (grad_out * slope_up).addcmul_(intercept, grad_const)
        positive_part = (grad_out * (slope_low - slope_up)).addcmul_(intercept, grad_const, value=-1)
        grad_in.addcmul_(A_pos.sign(), positive_part)
        A_neg = A - A_pos
        grad_intercept = grad_up = None
        if ctx.needs_input_grad[3]:
            flat = torch.bmm(grad_const.flatten(1)[:, None, :], _flat_features(A_neg, ctx.channels_last))
            grad_intercept = _unflatten_features(flat, intercept.shape, ctx.channels_last)
        if ctx.needs_input_grad[2]:
            grad_up = A_neg.mul_(grad_out).sum(1, keepdim=True)
        return grad_in, None, grad_up, grad_intercept


def _back_relu(A: Tensor, const: Tensor, lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor]:
    # slope_low * z <= relu(z) <= slope_up * z + intercept on [lower, upper]: a lower bound of A relu(z)
    # takes the lower line where A >= 0 and the upper line where A < 0: A⁺ slope_low + A⁻ slope_up.
    slope_low, slope_up, intercept = (_layout_like(t, A).unsqueeze(1) for t in ops.relu_relaxation(lower, upper))
    A, shift = _ReluStep.apply(A, slope_low.detach(), slope_up, intercept)
    return A, const + shift


def _back_affine(A: Tensor, const: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``z * scale + shift`` along the input's dim 1 (A's dim 2)."""
    per_channel = A.sum(tuple(range(3, A.dim()))) if A.dim() > 3 else A
    view = scale.reshape((-1,) + (1,) * (A.dim() - 3))
    return A * view, const + per_channel @ shift


def _back_avgpool(A: Tensor, layer: nn.AvgPool2d, in_shape: Tuple[int, ...]) -> Tensor:
    # The adjoint of average pooling is its input gradient; the aten op only reads `self`'s shape.
    batch, rows = A.shape[:2]
    g = A.flatten(0, 1)
    shape_only = g.new_zeros(()).expand((g.shape[0],) + tuple(in_shape))
    out = torch.ops.aten.avg_pool2d_backward(g, shape_only, _pair(layer.kernel_size), _pair(layer.stride),
                                             _pair(layer.padding), layer.ceil_mode,
                                             layer.count_include_pad, layer.divisor_override)
    return out.view(batch, rows, *in_shape)


def _back_maxpool(A: Tensor, const: Tensor, layer: nn.MaxPool2d, lower: Tensor, upper: Tensor
                  ) -> Tuple[Tensor, Tensor]:
    """Sound linear relaxation of max pooling on the input box ``[lower, upper]`` (B, C, H, W).

    In each window let k* be the element with the largest lower bound. Then
    ``x_k* <= max_j x_j``; above, ``max_j x_j = x_k*`` when k* dominates the window
    (``lower_k* >= upper_j`` for every other j), and ``max_j x_j <= max_j upper_j`` otherwise.
    """
    batch, rows, channels, out_h, out_w = A.shape
    height, width = lower.shape[2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (layer.kernel_size, layer.stride,
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
    dominated = (low_max >= up_others).to(A.dtype)
    # Flat position of k* in the unpadded input plane: every window holds a real element.
    pos = torch.arange(out_h * out_w, device=A.device)
    row = (pos // out_w) * sh - ph + (k_star // kw) * dh
    col = (pos % out_w) * sw - pw + (k_star % kw) * dw
    index = (row * width + col)[:, None].expand(batch, rows, channels, out_h * out_w)
    A = A.flatten(3)
    A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
    coef = A_pos + A_neg * dominated[:, None]
    const = const + _sum_over_features(A_neg * ((1 - dominated) * up_max)[:, None])
    A_in = A.new_zeros(batch, rows, channels, height * width).scatter_add(3, index, coef)
    return A_in.view(batch, rows, channels, height, width), const


def _backward(trace: _Trace, A: Tensor, const: Tensor, dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    """Pushes ``A z + const`` (z: the output of ``trace.layers``) back to their input.

    Returns ``(Λ, c)`` with ``A z + const >= Λ x + c`` for every input x of the box the trace's
    IBP boxes were computed on.
    """
    for i in reversed(range(len(trace.layers))):
        layer, in_shape = trace.layers[i], trace.shapes[i]
        if isinstance(layer, nn.Linear):
            A, const = _back_linear(A, const, _param(layer.weight, dtype), _param(layer.bias, dtype))
        elif isinstance(layer, nn.Conv2d):
            A, const = _back_conv2d(A, const, layer, i, _param(layer.weight, dtype),
                                    _param(layer.bias, dtype), in_shape)
        elif isinstance(layer, nn.ReLU):
            A, const = _back_relu(A, const, *trace.boxes[i])
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, Normalize)):
            scale, shift = (layer.scale_shift() if isinstance(layer, Normalize)
                            else batchnorm_scale_shift(layer))
            A, const = _back_affine(A, const, _param(scale, dtype), _param(shift, dtype))
        elif isinstance(layer, nn.AvgPool2d):
            A = _back_avgpool(A, layer, in_shape)
        elif isinstance(layer, nn.MaxPool2d):
            A, const = _back_maxpool(A, const, layer, *trace.boxes[i])
        elif isinstance(layer, nn.Flatten):
            A = A.reshape(A.shape[:2] + in_shape)
        elif isinstance(layer, Residual):
            body, shortcut = trace.boxes[i]
            A_body, const = _backward(body, A, const, dtype)
            A_shortcut, const = _backward(shortcut, A, const, dtype)
            A = A_body + A_shortcut
        # Identity and Dropout (eval) are the identity map.
    return A, const


# ---------------------------------------------------------------------------------------------
# the IBP pass that records the boxes
def _ibp_pass(layers: List[nn.Module], shapes: List[Tuple[int, ...]], state: Pair, backend: FusedBackend,
              dtype: Optional[torch.dtype]) -> Tuple[Pair, _Trace]:
    """IBP through ``layers`` (input shapes ``shapes``, from :func:`_input_shapes`); returns the
    output box and the :class:`_Trace` of the layers.

    :func:`pyibp.bounds.propagate` runs the layers between MaxPool and Residual layers, reporting the
    box in front of each ReLU; the boxes in front of a MaxPool are taken here, and a Residual's
    branches are traced recursively.
    """
    trace = _Trace(layers, shapes)
    start = 0
    stops = [i for i, layer in enumerate(layers) if isinstance(layer, (nn.MaxPool2d, Residual))]
    for stop in stops + [len(layers)]:
        def record(i: int, s: Pair, offset: int = start) -> None:
            trace.boxes[offset + i] = backend.bounds(s)
        state = propagate(layers[start:stop], state, backend, dtype=dtype, on_relu=record)
        if stop == len(layers):
            break
        layer = layers[stop]
        if isinstance(layer, nn.MaxPool2d):
            trace.boxes[stop] = backend.bounds(state)
            state = propagate([layer], state, backend, dtype=dtype)
        else:
            branches = [flatten_layers(branch) for branch in (layer.body, layer.shortcut)]
            (body_state, body), (shortcut_state, shortcut) = (
                _ibp_pass(branch, _input_shapes(branch, shapes[stop]), state, backend, dtype)
                for branch in branches)
            trace.boxes[stop] = (body, shortcut)
            state = backend.add(body_state, shortcut_state)
        start = stop + 1
    return state, trace


# Larger CPU tensors are mmapped afresh by glibc's allocator at every allocation and page-faulted in,
# which costs more than the arithmetic on them (its dynamic mmap threshold stops at 32 MiB).
_CPU_CHUNK_BYTES = 8 * 2**20


def _examples_per_chunk(trace: _Trace, A: Tensor, batch: int) -> int:
    """How many examples the backward pass takes at a time: on CPU, as many as keep every A tensor
    under ``_CPU_CHUNK_BYTES``; elsewhere (CUDA's caching allocator) the whole batch."""
    if A.device.type != "cpu":
        return max(batch, 1)
    per_example = A.shape[1] * trace.largest_shape() * A.element_size()
    return max(1, min(batch, _CPU_CHUNK_BYTES // max(per_example, 1)))


def _other_classes(y: Tensor, num_classes: int) -> Tensor:
    """(B, K-1): for each example the classes j != y in increasing order (no host sync)."""
    j = torch.arange(num_classes - 1, device=y.device)[None]
    return j + (j >= y[:, None]).to(j.dtype)


def _spec_rows(y: Tensor, others: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """The specification C: (B, K-1, K) with rows ``e_y - e_j``."""
    rows = torch.zeros(others.shape + (num_classes,), dtype=dtype, device=y.device)
    rows.scatter_(2, y[:, None, None].expand(-1, others.shape[1], 1), 1.0)
    return rows.scatter_(2, others[..., None], -1.0)


def _margin_pass(layers: List[nn.Module], x: Tensor, y: Tensor, eps_t: Tensor, lower: float, upper: float,
                 dtype: Optional[torch.dtype], crown: bool) -> MarginPass:
    """The work behind :func:`margin_pass`, on validated arguments."""
    if dtype is not None:
        x, eps_t = x.to(dtype), eps_t.to(dtype)
    y = y.long()
    backend = FusedBackend()
    box = backend.start(x, eps_t, float(lower), float(upper))
    shapes = _input_shapes(layers, tuple(x.shape[1:]))
    body, last = _last_linear(layers)
    if last is not None and len(shapes[len(body)]) != 1:
        body, last = layers, None       # a Linear over extra dimensions: C acts on the flat output
    state, trace = _ibp_pass(body, shapes[:len(body) + 1], box, backend, dtype)
    batch = x.shape[0]
    if last is not None:
        weight, bias = _param(last.weight, dtype), _param(last.bias, dtype)
        num_classes = weight.shape[0]
        _check_labels(y, x, num_classes)
        ibp = backend.margins(state, weight, bias, y)
    else:
        low, up = (t.flatten(1) for t in backend.bounds(state))
        num_classes = low.shape[1]
        _check_labels(y, x, num_classes)
        ibp = (low.gather(1, y[:, None]) - up).scatter(1, y[:, None], 0.0)
    pre_activations = list(trace.pre_activations())
    if not crown:
        return MarginPass(ibp, None, box, pre_activations)

    others = _other_classes(y, num_classes)
    if last is not None:                     # C folded into the last Linear: rows W[y] - W[j]
        A = weight[y][:, None, :] - weight[others]
        const = (bias[y][:, None] - bias[others]) if bias is not None else A.new_zeros(others.shape)
    else:
        A = _spec_rows(y, others, num_classes, ibp.dtype).reshape(others.shape + trace.shapes[-1])
        const = A.new_zeros(others.shape)
    mu, rad = box
    chunk = _examples_per_chunk(trace, A, batch)
    bounds = []
    for start in range(0, batch, chunk) or [0]:
        rows = slice(start, start + chunk)
        lam, c = _backward(trace.rows(rows), A[rows], const[rows], dtype)
        lam = lam.flatten(2)                                                # Λ: (b, K-1, n_in)
        bounds.append(c + torch.bmm(lam, mu[rows].flatten(1)[:, :, None])[..., 0]
                      - torch.bmm(lam.abs(), rad[rows].flatten(1)[:, :, None])[..., 0])
    margins = ibp.new_zeros(batch, num_classes).scatter(1, others, torch.cat(bounds))
    return MarginPass(ibp, margins, box, pre_activations)


def _validated(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, lower: float, upper: float
               ) -> Tuple[List[nn.Module], Tensor]:
    layers = flatten_layers(model)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    return layers, eps_t


# ---------------------------------------------------------------------------------------------
# public API
def margin_pass(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: float = 0.0, upper: float = 1.0,
                dtype: Optional[torch.dtype] = None, crown: bool = True) -> MarginPass:
    """IBP margins, CROWN-IBP margins (when ``crown``) and the recorded boxes, from one IBP pass.

    This is the building block of :func:`crown_ibp_margin_bounds`, :func:`crown_ibp_mixed_margins`
    and certified training (whose regularisers read the pre-activation boxes). The ``crown``
    margins are the raw CROWN-IBP bounds of Zhang et al.: sound, but not always tighter than IBP.

    Args:
        model: nn.Sequential of the layers :data:`pyibp.SUPPORTED_LAYERS` lists.
        x: (B, *) inputs in [lower, upper].  y: (B,) integer labels.  eps: float, () or (B,).
        dtype: compute in this dtype (e.g. torch.float64); default x's.
        crown: also run the CROWN backward pass.
    Returns:
        :class:`MarginPass` ``(ibp, crown, input_box, pre_activations)``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
        >>> p = margin_pass(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), 0.01)
        >>> p.ibp.shape, p.crown.shape, len(p.pre_activations)
        (torch.Size([4, 10]), torch.Size([4, 10]), 1)
    """
    layers, eps_t = _validated(model, x, y, eps, lower, upper)
    return _margin_pass(layers, x, y, eps_t, lower, upper, dtype, crown)


def crown_ibp_margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: float = 0.0,
                            upper: float = 1.0, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Lower bounds of ``logit_y - logit_j`` over the l∞ box around ``x`` by CROWN-IBP.

    IBP bounds the pre-activations of every ReLU; one CROWN backward pass from the specification
    (rows ``e_y - e_j``, folded into the last Linear) bounds the margins, concretised on the input
    box ``x ± eps ∩ [lower, upper]`` as ``Λ mu - |Λ| rad + c``. The result is the elementwise maximum
    of that bound and the IBP bound from the same pass (both are sound), so it is never looser
    than :func:`pyibp.margin_bounds` with ``method="ibp"``. MaxPool2d layers are relaxed soundly
    (see ``_back_maxpool``): below by the element with the largest lower bound, above by it when it
    dominates its window and by the window's largest upper bound otherwise. Gradients flow to the
    parameters; for training use :func:`crown_ibp_mixed_margins`, which keeps the raw CROWN-IBP bound.

    Args:
        model: nn.Sequential of Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d (eval), AvgPool2d,
            MaxPool2d, Dropout, Identity, pyibp.nn.Normalize, pyibp.nn.Residual.
        x: (B, *) inputs in [lower, upper].  y: (B,) integer labels.  eps: float, () or (B,).
        dtype: compute in this dtype (e.g. torch.float64 for verification); default x's.
    Returns:
        (B, n_classes), 0 at j = y. For ``model = Sequential(Linear(W1, b1), ReLU(), Linear(W2, b2))``
        this equals::

            l, u = IBP bounds of x -> W1 x + b1 on the box
            s_low, s_up, t = pyibp.ops.relu_relaxation(l, u)
            A = W2[y] - W2[j]                                    # (B, K-1, hidden), j != y
            Λ = (A⁺ s_low + A⁻ s_up) @ W1
            c = A⁻ @ t + (A⁺ s_low + A⁻ s_up) @ b1 + b2[y] - b2[j]
            bound = Λ mu - |Λ| rad + c                          # then max with the IBP bound

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> m = crown_ibp_margin_bounds(model, x, y, 0.01)
        >>> bool((m >= pyibp.margin_bounds(model, x, y, 0.01) - 1e-6).all())
        True
    """
    layers, eps_t = _validated(model, x, y, eps, lower, upper)
    p = _margin_pass(layers, x, y, eps_t, lower, upper, dtype, crown=True)
    return torch.maximum(p.crown, p.ibp)


def crown_ibp_mixed_margins(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, beta: float, *,
                            lower: float = 0.0, upper: float = 1.0, dtype: Optional[torch.dtype] = None
                            ) -> Tensor:
    """The CROWN-IBP training bound ``beta * CROWN-IBP + (1 - beta) * IBP`` (Zhang et al. 2020, eq. 9).

    A convex combination of two lower bounds is a lower bound. Training ramps ``beta`` from 1 to 0
    (CROWN-IBP early, when IBP bounds are loose; pure IBP at the end). At ``beta == 0`` the CROWN
    pass is skipped and this is :func:`pyibp.margin_bounds` (fused IBP).

    Args:
        x: (B, *).  y: (B,).  eps: float, () or (B,).  beta: in [0, 1].
    Returns:
        (B, n_classes), 0 at j = y. Equals
        ``beta * margin_pass(...).crown + (1 - beta) * margin_bounds(model, x, y, eps)``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
        >>> m = crown_ibp_mixed_margins(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), 0.01, 0.5)
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        from .bounds import margin_bounds
        return margin_bounds(model, x, y, eps, lower=lower, upper=upper, dtype=dtype)
    p = margin_pass(model, x, y, eps, lower=lower, upper=upper, dtype=dtype)
    return p.crown if beta == 1.0 else beta * p.crown + (1.0 - beta) * p.ibp
