"""CROWN-IBP margin bounds (Zhang et al., "Towards Stable and Efficient Training of Verifiably
Robust Neural Networks", ICLR 2020).

Two passes over the bound graph (:mod:`pyibp.bounds.graph`):

1. **IBP forward** (:func:`pyibp.bounds.ibp.propagate`), recording the box in front of every ReLU,
   MaxPool and other activation: the pre-activation bounds ``[l, u]`` the relaxations need.
2. **One CROWN backward pass** (:func:`_backward`, one rule per node kind) from the margin
   specification. Row j of ``C`` is ``e_y - e_j``; it is
   folded into the last Linear (``A = W[y] - W[j]``) and pushed back to the input as a linear
   function ``Λ x + c`` that lower-bounds the margin on the whole box. Each layer maps ``A`` to
   ``A W`` (Linear), ``conv_transpose2d(A, W)`` (Conv2d), ``A⁺ s_low + A⁻ s_up`` (ReLU, with the
   intercept of the upper line added to ``c``), and so on.

The lower bound on the input box ``[mu - rad, mu + rad]`` is then ``Λ mu - |Λ| rad + c``.
Everything is differentiable, so the bounds can be trained through.

Cost: the backward pass carries K-1 specification rows per example (the row j = y is zero and
is skipped), so it costs about K-1 forward passes of the network without its last layer, on top
of the IBP pass; its tensors ``A`` are K-1 times the size of the activations (on CPU the pass runs
over chunks of examples that keep each ``A`` under 8 MiB, see ``coefficients._CPU_CHUNK_BYTES``). MaxPool2d has a
sound relaxation of its own (see ``_back_maxpool``), the other activations the lines of
:mod:`pyibp.bounds.relaxations`; a node with several users (a residual block's input, the
branches of a ``torch.cat``) receives the sum of the ``A`` its users send back.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .. import ops
from .checks import Bound, Eps, _check_labels, _check_model_device, check_box, compute_dtype, domain
from .graph import BoundGraph, affine_scale_shift, bound_graph, conv_params, linear_params, per_channel, resolve
from .ibp import (FusedBackend, Trace, _full_precision, _param, cat_dim, const_scale_shift, ibp_margin_bounds,
                  ibp_margins, mean_dims, no_nan, pad_args)
from .relaxations import maxpool_relaxation, relaxation
from .sound import outward_eps, sound_arithmetic
from .sound_crown import sound_crown_margins
from .coefficients import (_A_channels_last, _back_conv, _box_channels_last, _channels_last, _examples_per_chunk,
                           _flat_box, _flat_features, _other_classes, _spec_rows, _sum_over_features,
                           _unflatten_features)

__all__ = ["crown_ibp_margin_bounds", "crown_ibp_mixed_margins", "crown_ibp_robust_ce", "margin_pass", "MarginPass"]

Pair = Tuple[Tensor, Tensor]


class MarginPass(NamedTuple):
    """Everything one bound computation produces, for training losses, regularisers and metrics.

    Attributes:
        ibp: (B, K) IBP lower bounds of ``logit_y - logit_j`` (last-layer elision), 0 at j = y.
        crown: (B, K) CROWN-IBP lower bounds of the same margins (0 at j = y), or None when the
            backward pass was not asked for.
        input_box: ``(mu, rad)`` of the input box, each (B, *input_shape).
        pre_activations: ``(lower, upper)`` IBP bounds in front of each ReLU, in network order.
        fused_ce: (B,) the loss-fusion bound: an upper bound of the cross-entropy ``CE(f(x'), y)``
            over the box, from one CROWN row per example (see :func:`crown_ibp_robust_ce`), or None
            when not asked for.
    """

    ibp: Tensor
    crown: Optional[Tensor]
    input_box: Pair
    pre_activations: List[Pair]
    fused_ce: Optional[Tensor] = None


# ---------------------------------------------------------------------------------------------
# the backward pass, one function per layer type: A (B, K', *out_shape) -> (B, K', *in_shape)
class _ChannelsLastBackend(FusedBackend):
    """The fused backend with every convolution's box returned channels-last (a copy only after a
    convolution whose input layout is ambiguous, e.g. one channel). The CROWN pass runs its
    transposed convolutions channels-last (about twice as fast on CPU), and with the boxes in the
    same layout neither the ReLU steps nor the gradients need layout conversions; oneDNN's forward
    convolutions are also faster that way."""

    def start(self, x: Tensor, eps: Tensor, lower: Bound, upper: Bound) -> Pair:
        mu, rad = super().start(x, eps, lower, upper)
        if mu.dim() != 4:
            return mu, rad
        # Channels-last strides even for one channel (where .contiguous() keeps the row-major ones),
        # so that the first convolution already returns channels-last.
        return tuple(torch.empty_like(t, memory_format=torch.channels_last).copy_(t) for t in (mu, rad))

    def conv2d(self, s: Pair, *args) -> Pair:
        mu, rad = super().conv2d(s, *args)
        cl = torch.channels_last
        return mu.contiguous(memory_format=cl), rad.contiguous(memory_format=cl)


def _back_linear(A: Tensor, const: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if bias is not None:
        const = const + _sum_over_features(A @ bias[:, None])
    return A @ weight, const


def _back_relu(A: Tensor, const: Tensor, mu: Tensor, rad: Tensor) -> Tuple[Tensor, Tensor]:
    # slope_low * z <= relu(z) <= slope_up * z + intercept on the box (mu, rad): a lower bound of A relu(z)
    # takes the lower line where A >= 0 and the upper line where A < 0 (one fused pass, see ops).
    if A.dim() == 5 and _box_channels_last(mu) and not _channels_last(A):
        A = _A_channels_last(A)      # (after a Flatten) the next transposed convolution wants it so too
    cl = _channels_last(A)
    if A.dim() == 5 and _box_channels_last(mu) != cl:
        mu, rad = (t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                   for t in (mu, rad))
    out, shift = ops.crown_relu_step(_flat_features(A, cl), _flat_box(mu, cl), _flat_box(rad, cl))
    return _unflatten_features(out, A.shape, cl), const + shift


def _back_relu_alpha(A: Tensor, const: Tensor, mu: Tensor, rad: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor]:
    """Through a ReLU with the lower line ``alpha z`` on its unstable neurons (alpha-CROWN), the chord
    above: :func:`pyibp.ops.crown_relu_alpha_step` on A, the box and ``alpha`` (b or 1, R or 1, *shape),
    all in the features' natural order."""
    lower, upper = ops.center_to_interval(mu, rad)
    out, shift = ops.crown_relu_alpha_step(A.flatten(2), lower.flatten(1), upper.flatten(1), alpha.flatten(2))
    return out.view(A.shape), const + shift


def _back_affine(A: Tensor, const: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``z * scale + shift`` along the input's dim 1 (A's dim 2)."""
    scale, shift = per_channel((scale, shift), A.shape[2])
    sums = A.sum(tuple(range(3, A.dim()))) if A.dim() > 3 else A
    view = scale.reshape((-1,) + (1,) * (A.dim() - 3))
    return A * view, const + sums @ shift


def _back_avgpool(A: Tensor, layer: nn.Module, in_shape: Tuple[int, ...]) -> Tensor:
    """The adjoint of (adaptive) average pooling is its input gradient; the aten ops only read
    their input's shape."""
    batch, rows = A.shape[:2]
    g = A.flatten(0, 1)
    shape_only = g.new_zeros(()).expand((g.shape[0],) + tuple(in_shape))
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        out = torch.ops.aten._adaptive_avg_pool2d_backward(g, shape_only)
    else:
        out = torch.ops.aten.avg_pool2d_backward(g, shape_only, _pair(layer.kernel_size),
                                                 _pair(layer.stride if layer.stride is not None else layer.kernel_size),
                                                 _pair(layer.padding), layer.ceil_mode, layer.count_include_pad,
                                                 layer.divisor_override)
    return out.view(batch, rows, *in_shape)


def _back_activation(A: Tensor, const: Tensor, module: nn.Module, lower: Tensor, upper: Tensor
                     ) -> Tuple[Tensor, Tensor]:
    """A lower bound of ``A f(z)`` takes f's lower line where A >= 0 and its upper line where A < 0."""
    a_low, b_low, a_up, b_up = (t[:, None] for t in relaxation(module, lower, upper))
    A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
    return A_pos * a_low + A_neg * a_up, const + _sum_over_features(A_pos * b_low + A_neg * b_up)


def _lift(c, ndim: int):
    """A constant broadcastable to a value (B, *) as a tensor broadcastable to A (B, R, *)."""
    if not isinstance(c, Tensor):
        return c
    return c.reshape((1,) * (ndim - c.dim()) + tuple(c.shape)).unsqueeze(1)


def _unbroadcast(A: Tensor, in_shape: Tuple[int, ...]) -> Tensor:
    """A (B, R, *out) summed down to (B, R, *in_shape), the adjoint of broadcasting in_shape to out."""
    extra = A.dim() - 2 - len(in_shape)
    if extra:
        A = A.sum(tuple(range(2, 2 + extra)))
    dims = tuple(i + 2 for i, (n, m) in enumerate(zip(in_shape, A.shape[2:])) if n == 1 and m != 1)
    return A.sum(dims, keepdim=True) if dims else A


def _back_maxpool(A: Tensor, const: Tensor, layer: nn.MaxPool2d, lower: Tensor, upper: Tensor
                  ) -> Tuple[Tensor, Tensor]:
    """Through max pooling with the lines of :func:`~pyibp.bounds.relaxations.maxpool_relaxation`."""
    batch, rows, channels, out_h, out_w = A.shape
    height, width = lower.shape[2:]
    index, dominated, up_max = maxpool_relaxation(layer, lower, upper, (out_h, out_w))
    index = index[:, None].expand(batch, rows, channels, out_h * out_w)
    A = A.flatten(3)
    A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
    coef = A_pos + A_neg * dominated[:, None]
    const = const + _sum_over_features(A_neg * ((1 - dominated) * up_max)[:, None])
    A_in = A.new_zeros(batch, rows, channels, height * width).scatter_add(3, index, coef)
    return A_in.view(batch, rows, channels, height, width), const


# ---------------------------------------------------------------------------------------------
# the walker
def _backward(graph: BoundGraph, trace: Trace, A: Tensor, const: Tensor, start: int,
              dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    """Pushes ``A z + const`` (z: the value of node ``start``) back to the graph's input, node by
    node in reverse topological order; a node used twice receives the sum of its users' A.

    Returns ``(Λ, c)`` with ``A z + const >= Λ x + c`` for every input x of the box the trace's
    IBP boxes were computed on.
    """
    nodes = graph.nodes
    pending: Dict[int, Tensor] = {start: A}
    lam = None
    for i in range(start, -1, -1):
        A = pending.pop(i, None)
        if A is None:
            continue
        extra = trace.extra.get(i)
        if extra is not None:           # a Lagrangian term on this node's value (beta-CROWN's splits)
            A = A + extra
        node = nodes[i]
        if node.kind == "input":
            lam = A
            continue
        contributions, const = _BACK[node.kind](node, A, const, trace, dtype)
        for j, A_j in contributions:
            pending[j] = pending[j] + A_j if j in pending else A_j
    if lam is None:                 # the output does not depend on the input
        lam = A.new_zeros(A.shape[:2] + trace.shapes[0])
    return lam, const


def _in_shape(node, trace: Trace, k: int = 0) -> Tuple[int, ...]:
    return trace.shapes[node.inputs[k]]


def _b_linear(node, A, const, trace, dtype):
    weight, bias = linear_params(node, trace.constants)
    A, const = _back_linear(A, const, _param(weight, dtype), _param(bias, dtype))
    return [(node.inputs[0], A)], const


def _b_conv(node, A, const, trace, dtype):
    p = conv_params(node, trace.constants)
    p.weight, p.bias = _param(p.weight, dtype), _param(p.bias, dtype)
    A, const = _back_conv(A, const, p, _in_shape(node, trace))
    return [(node.inputs[0], A)], const


def _b_affine(node, A, const, trace, dtype):
    scale, shift = affine_scale_shift(node, dtype)
    A, const = _back_affine(A, const, scale, shift)
    return [(node.inputs[0], A)], const


def _b_relu(node, A, const, trace, dtype):
    alpha = trace.alphas.get(node.index)
    if alpha is None:
        A, const = _back_relu(A, const, *trace.boxes[node.index])
    else:
        A, const = _back_relu_alpha(A, const, *trace.boxes[node.index], alpha)
    return [(node.inputs[0], A)], const


def _b_activation(node, A, const, trace, dtype):
    A, const = _back_activation(A, const, node.module, *trace.boxes[node.index])
    return [(node.inputs[0], A)], const


def _b_maxpool(node, A, const, trace, dtype):
    A, const = _back_maxpool(A, const, node.module, *trace.boxes[node.index])
    return [(node.inputs[0], A)], const


def _b_pool(node, A, const, trace, dtype):
    return [(node.inputs[0], _back_avgpool(A, node.module, _in_shape(node, trace)))], const


def _b_mean(node, A, const, trace, dtype):
    in_shape = _in_shape(node, trace)
    dims, keepdim = mean_dims(node, trace.constants, len(in_shape) + 1)
    if not keepdim:
        for d in sorted(dims):
            A = A.unsqueeze(d + 1)
    count = math.prod(in_shape[d - 1] for d in dims)
    return [(node.inputs[0], A.expand(A.shape[:2] + in_shape) / count)], const


def _b_reshape(node, A, const, trace, dtype):
    return [(node.inputs[0], A.reshape(A.shape[:2] + _in_shape(node, trace)))], const


def _b_index(node, A, const, trace, dtype):
    """A permutation or selection of features: A's entries go back to the features they came from,
    found by applying the op to the features' indices (one example)."""
    in_shape = _in_shape(node, trace)
    args, kwargs = resolve(node.args[1:], trace.constants), resolve(node.kwargs, trace.constants)
    n = math.prod(in_shape)
    index = node.call(torch.arange(n, device=A.device).view((1,) + in_shape), *args, **kwargs)
    if tuple(index.shape[1:]) != tuple(A.shape[2:]):
        raise TypeError(f"{node.describe()} selects along the batch dimension; pyibp bounds each example alone")
    batch, rows = A.shape[:2]
    out = A.new_zeros(batch, rows, n).index_add_(2, index.flatten(), A.reshape(batch, rows, -1))
    return [(node.inputs[0], out.view(A.shape[:2] + in_shape))], const


def _b_identity(node, A, const, trace, dtype):
    return [(node.inputs[0], A)], const


def _b_pad(node, A, const, trace, dtype):
    pad, value = pad_args(node, trace.constants)
    A_in = F.pad(A, [-p for p in pad])          # cropping is the adjoint of zero padding
    if value:
        const = const + value * (_sum_over_features(A) - _sum_over_features(A_in))
    return [(node.inputs[0], A_in)], const


def _b_const_affine(node, A, const, trace, dtype):
    scale, shift = const_scale_shift(node, trace.constants, dtype)
    ndim = A.dim() - 1
    if shift is not None:
        const = const + (_sum_over_features(A * _lift(shift, ndim)) if isinstance(shift, Tensor)
                         else shift * _sum_over_features(A))
    if scale is not None:
        A = A * _lift(scale, ndim)
    return [(node.inputs[0], _unbroadcast(A, _in_shape(node, trace)))], const


def _b_add(node, A, const, trace, dtype):
    a, b = (r.index for r in node.args[:2])
    A_b = _unbroadcast(A, trace.shapes[b])
    return [(a, _unbroadcast(A, trace.shapes[a])), (b, A_b if node.kind == "add" else -A_b)], const


def _b_cat(node, A, const, trace, dtype):
    refs = node.args[0] if node.args else node.kwargs["tensors"]
    dim = cat_dim(node, trace.constants, len(trace.shapes[refs[0].index]) + 1)
    sizes = [trace.shapes[r.index][dim - 1] for r in refs]
    return list(zip((r.index for r in refs), A.split(sizes, dim + 1))), const


_BACK = {"linear": _b_linear, "conv": _b_conv, "affine": _b_affine, "relu": _b_relu, "activation": _b_activation,
         "maxpool": _b_maxpool, "avgpool": _b_pool, "adaptive_avgpool": _b_pool, "mean": _b_mean,
         "reshape": _b_reshape, "index": _b_index, "identity": _b_identity, "pad": _b_pad,
         "const_affine": _b_const_affine, "add": _b_add, "sub": _b_add, "cat": _b_cat}


def _margin_pass(graph: BoundGraph, x: Tensor, y: Tensor, eps_t: Tensor, lower: Bound, upper: Bound,
                 dtype: Optional[torch.dtype], crown: bool, fused: bool = False, boxes: bool = True) -> MarginPass:
    """The work behind :func:`margin_pass`, on validated arguments. ``fused``: compute the
    loss-fusion bound ``fused_ce`` instead of the CROWN-IBP margins. ``boxes``: fill in
    ``pre_activations`` (else it is empty). Never under autocast (see ``ibp._full_precision``)."""
    with _full_precision(x):
        return _margin_pass_full_precision(graph, x, y, eps_t, lower, upper, dtype, crown, fused, boxes)


def _margin_pass_full_precision(graph: BoundGraph, x: Tensor, y: Tensor, eps_t: Tensor, lower: Bound,
                                upper: Bound, dtype: Optional[torch.dtype], crown: bool, fused: bool,
                                boxes: bool) -> MarginPass:
    if dtype is not None:
        x, eps_t = x.to(dtype), eps_t.to(dtype)
    y = y.long()
    backend = _ChannelsLastBackend() if crown or fused else FusedBackend()
    box = backend.start(x, eps_t, *domain(x, lower, upper))
    trace = Trace()
    ibp, state, last = ibp_margins(graph, box, backend, y, dtype, trace)
    batch, num_classes = ibp.shape
    pre_activations = [ops.center_to_interval(*trace.boxes[n.index]) for n in graph.relus()
                       if n.index in trace.boxes] if boxes else []
    if not (crown or fused):
        return MarginPass(no_nan(ibp, -math.inf), None, box, pre_activations)

    others = _other_classes(y, num_classes)
    if last is not None:                     # C folded into the last Linear: rows W[y] - W[j]
        weight, bias = last
        start = graph.nodes[graph.last_linear].inputs[0]
        A = weight[y][:, None, :] - weight[others]
        const = (bias[y][:, None] - bias[others]) if bias is not None else A.new_zeros(others.shape)
    else:
        start = graph.logits
        A = _spec_rows(y, others, num_classes, ibp.dtype).reshape(others.shape + trace.shapes[start])
        const = A.new_zeros(others.shape)
    if fused:
        # Loss fusion: the K-1 rows collapse into one, weighted by the slopes of exp's chords.
        if last is not None:
            mu_out = state[0] @ weight.t() + (bias if bias is not None else 0.0)    # centre logits
            centre = mu_out.gather(1, y[:, None]) - mu_out.gather(1, others)
            diff_low = ibp.gather(1, others) - 2 * centre
        else:
            low, up = (t.flatten(1) for t in backend.bounds(state))
            diff_low = low.gather(1, others) - up.gather(1, y[:, None])
        diff_up = -ibp.gather(1, others)
        weights, offset, scale = _exp_chords(torch.minimum(diff_low, diff_up), diff_up)
        A = torch.bmm(weights[:, None, :], A.flatten(2)).view((batch, 1) + A.shape[2:])
        const = (weights * const).sum(1, keepdim=True)
        low_bound = _crown_bound(graph, trace, A, const, box, start, dtype)[:, 0]   # of sum_j w_j (z_y - z_j)
        # S <= e^scale (offset - low_bound), and S >= 1 (its j = y term), so the clamp only
        # removes rounding below the trivial bound.
        fused_ce = scale + torch.log(torch.maximum(offset - low_bound, torch.exp(-scale)))
        return MarginPass(no_nan(ibp, -math.inf), None, box, pre_activations, no_nan(fused_ce, math.inf))
    bounds = _crown_bound(graph, trace, A, const, box, start, dtype)
    margins = ibp.new_zeros(batch, num_classes).scatter(1, others, bounds)
    return MarginPass(no_nan(ibp, -math.inf), no_nan(margins, -math.inf), box, pre_activations)


def _crown_bound(graph: BoundGraph, trace: Trace, A: Tensor, const: Tensor, box: Pair, start: int,
                 dtype: Optional[torch.dtype]) -> Tensor:
    """(B, R): lower bounds of ``A z + const`` (A (B, R, *shape of node start), const (B, R)) over
    the input box, by one CROWN backward pass (in chunks of examples on CPU)."""
    mu, rad = box
    batch = A.shape[0]
    chunk = _examples_per_chunk(trace, A, batch)
    bounds = []
    if chunk >= batch:
        pieces: Iterable = [(trace, A, const, mu, rad)]
    else:
        count = -(-batch // chunk)
        pieces = zip(trace.split(chunk, count), *(t.split(chunk) for t in (A, const, mu, rad)))
    for part, A_part, const_part, mu_part, rad_part in pieces:
        lam, c = _backward(graph, part, A_part, const_part, start, dtype)
        cl = _channels_last(lam)                       # Λ (b, R, *input shape) and the box flattened alike
        lam, mu_part, rad_part = _flat_features(lam, cl), _flat_box(mu_part, cl), _flat_box(rad_part, cl)
        bounds.append(c + torch.bmm(lam, mu_part[:, :, None])[..., 0]
                      - torch.bmm(lam.abs(), rad_part[:, :, None])[..., 0])
    return torch.cat(bounds) if len(bounds) > 1 else bounds[0]


def _exp_chords(low: Tensor, up: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Linear upper bound of ``S = 1 + sum_j exp(d_j)`` for ``d_j`` in ``[low_j, up_j]`` (B, K-1).

    exp is convex, so on ``[l, u]`` it lies below its chord ``e^l + s (d - l)``,
    ``s = (e^u - e^l) / (u - l)``. Scaled by ``e^-M`` (``M = max(0, max_j u_j)``, so nothing
    overflows)::

        S e^-M <= offset - sum_j w_j (-d_j),   w_j = s_j e^-M >= 0,
        offset = e^-M + sum_j (e^(l_j - M) - w_j l_j).

    Returns ``(w (B, K-1), offset (B,), M (B,))``.
    """
    scale = torch.clamp(up.detach().amax(1), min=0.0) if up.shape[1] else up.new_zeros(up.shape[0])
    width = up - low
    wide = width > 1e-6
    safe = torch.where(wide, width, torch.ones_like(width))
    # w = e^(u - M) (1 - e^-width) / width: no factor overflows however wide the interval
    # (the series 1 - width/2 where width is too small to divide by).
    ratio = torch.where(wide, -torch.expm1(-safe) / safe, 1.0 - width / 2)
    weights = torch.exp(up - scale[:, None]) * ratio
    offset = torch.exp(-scale) + (torch.exp(low - scale[:, None]) - weights * low).sum(1)
    return weights, offset, scale


def _validated(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, lower: Bound, upper: Bound,
               dtype: Optional[torch.dtype]) -> Tuple[BoundGraph, Tensor, Optional[torch.dtype]]:
    graph = bound_graph(model)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    return graph, eps_t, compute_dtype(model, x, dtype)


# ---------------------------------------------------------------------------------------------
# public API
def margin_pass(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: Bound = 0.0, upper: Bound = 1.0,
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
    graph, eps_t, dtype = _validated(model, x, y, eps, lower, upper, dtype)
    return _margin_pass(graph, x, y, eps_t, lower, upper, dtype, crown)


def crown_ibp_margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: Bound = 0.0,
                            upper: Bound = 1.0, dtype: Optional[torch.dtype] = None, sound: bool = False) -> Tensor:
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
        sound: bounds of the network computed in exact real arithmetic on its stored weights, for
            every real input of the box, whatever the float rounding (:mod:`pyibp.bounds.sound_crown`;
            no gradients; ops without a sound backward rule raise TypeError naming the node).
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
    graph, eps_t, dtype = _validated(model, x, y, eps, lower, upper, dtype)
    if sound:
        x = x if dtype is None else x.to(dtype)
        with _full_precision(x), sound_arithmetic(x.device.type):
            return sound_crown_margins(graph, x, y, outward_eps(eps, eps_t, x.dtype), lower, upper, dtype)
    p = _margin_pass(graph, x, y, eps_t, lower, upper, dtype, crown=True, boxes=False)
    return torch.maximum(p.crown, p.ibp)


def crown_ibp_mixed_margins(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, beta: float, *,
                            lower: Bound = 0.0, upper: Bound = 1.0, dtype: Optional[torch.dtype] = None
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
        return ibp_margin_bounds(model, x, y, eps, lower=lower, upper=upper, dtype=dtype)
    graph, eps_t, dtype = _validated(model, x, y, eps, lower, upper, dtype)
    p = _margin_pass(graph, x, y, eps_t, lower, upper, dtype, crown=True, boxes=False)
    return p.crown if beta == 1.0 else beta * p.crown + (1.0 - beta) * p.ibp


def crown_ibp_robust_ce(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: Bound = 0.0,
                        upper: Bound = 1.0, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Upper bounds of the worst-case cross-entropy ``max_{x' in box} CE(model(x'), y)`` by CROWN-IBP
    with loss fusion (Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness
    and Beyond", NeurIPS 2020).

    ``CE(z, y) = log S`` with ``S = sum_j exp(z_j - z_y)``. IBP bounds every ``d_j = z_j - z_y``
    in ``[l_j, u_j]``; exp lies below its chord there, so ``S`` is bounded above by a *single*
    linear function of the logits, ``const + sum_j s_j (z_j - z_y)`` with chord slopes ``s_j >= 0``.
    One CROWN backward pass bounds that one row, where the margins of
    :func:`crown_ibp_margin_bounds` take K-1 rows: the pass costs about one backward pass of the
    network instead of K-1, which is what makes CROWN-IBP training affordable on many classes.

    The bound is sound but neither always tighter nor always looser than
    ``CE(-crown_ibp_margin_bounds(...), y)``; it is never below the true worst-case loss, and
    never below 0. Gradients flow to the parameters.

    Args:
        model: as for :func:`crown_ibp_margin_bounds`.
        x: (B, *) inputs in [lower, upper].  y: (B,) integer labels.  eps: float, () or (B,).
        dtype: compute in this dtype (e.g. torch.float64); default x's.
    Returns:
        (B,) upper bounds of the cross-entropy loss on the box. For the chord bound itself::

            l, u = IBP bounds of z_j - z_y;  M = max(0, max_j u_j)
            w_j = (e^u_j - e^l_j) / (u_j - l_j) * e^-M
            offset = e^-M + sum_j (e^(l_j - M) - w_j l_j)
            bound = M + log(offset - CROWN lower bound of sum_j w_j (z_y - z_j))

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> ce = crown_ibp_robust_ce(model, x, y, 0.01)
        >>> bool((ce >= F.cross_entropy(model(x), y, reduction="none") - 1e-6).all())
        True
    """
    graph, eps_t, dtype = _validated(model, x, y, eps, lower, upper, dtype)
    return _margin_pass(graph, x, y, eps_t, lower, upper, dtype, crown=False, fused=True, boxes=False).fused_ce
