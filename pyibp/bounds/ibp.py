"""Interval bound propagation over a bound graph: :func:`interval_bounds`, :func:`ibp_margin_bounds`.

The walk over the graph is written once (:func:`propagate`), one rule per node kind; *how* an
interval passes through an op is a backend. The fused backend carries the box as centre and
radius through pyibp's C++/CUDA operators (two products per layer, bias and ReLU fused into the
epilogue); the ``"torch"`` backend is the tutorial's lower/upper formulation in plain PyTorch
(:class:`pyibp.reference.TutorialBackend`), kept as the baseline.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..precision import full_precision
from .checks import Bound, Eps, _check_labels, _check_model_device, check_box, compute_dtype, domain
from .graph import (BoundGraph, Node, Ref, affine_scale_shift, bound_graph, conv_params, linear_params, per_channel,
                    resolve)
from .relaxations import activation_interval, is_monotone
from .sound import SoundBackend, check_sound, outward_eps, sound_arithmetic

__all__ = ["interval_bounds", "ibp_margin_bounds", "propagate", "FusedBackend", "get_backend", "Trace"]

Pair = Tuple[Tensor, Tensor]


class FusedBackend:
    """Boxes as ``(mu, rad)`` through the fused operators of :mod:`pyibp.ops`."""

    name = "fused"

    def start(self, x: Tensor, eps: Tensor, lower: Bound, upper: Bound) -> Pair:
        if isinstance(lower, Tensor) or isinstance(upper, Tensor):     # a domain per channel or element
            e = eps.reshape((-1,) + (1,) * (x.dim() - 1)) if eps.dim() else eps
            return ops.interval_to_center(torch.clamp(x - e, min=lower), torch.clamp(x + e, max=upper))
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
        return ops.interval_affine(s[0], s[1], *per_channel((scale, shift), s[0].shape[1]))

    def scale_shift(self, s: Pair, scale: Any, shift: Any) -> Pair:
        """``z * scale + shift`` elementwise, scale and shift broadcastable constants (None: 1, 0)."""
        mu, rad = s
        if scale is not None:
            mu, rad = mu * scale, rad * (scale.abs() if isinstance(scale, Tensor) else abs(scale))
        return (mu if shift is None else mu + shift), rad

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

    def sub(self, s: Pair, t: Pair) -> Pair:
        return s[0] - t[0], s[1] + t[1]

    def pad(self, s: Pair, pad: List[int], value: float) -> Pair:
        return F.pad(s[0], pad, value=value), F.pad(s[1], pad)

    def bounds(self, s: Pair) -> Pair:
        return ops.center_to_interval(*s)

    def from_bounds(self, lower: Tensor, upper: Tensor) -> Pair:
        return ops.interval_to_center(lower, upper)

    def margins(self, s: Pair, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
        return ops.margin_elision(s[0], s[1], weight, bias, labels)


def get_backend(name: str):
    """The backend object for ``"fused"`` (pyibp's operators) or ``"torch"`` (the tutorial's formulas)."""
    if name == "fused":
        return FusedBackend()
    if name == "torch":
        from ..reference import TutorialBackend
        return TutorialBackend()
    raise ValueError(f"backend must be 'fused' or 'torch', got {name!r}")


def _sound_setup(graph: BoundGraph, backend: str, sound: bool, eps: Eps, eps_t: Tensor, x: Tensor,
                 stop: Optional[int] = None):
    """``(backend object, eps, context)`` of a bound call: with ``sound``, the
    :class:`~pyibp.bounds.sound.SoundBackend`, eps rounded up and :func:`~pyibp.bounds.sound.sound_arithmetic`."""
    if not sound:
        return get_backend(backend), eps_t, contextlib.nullcontext()
    if backend != "fused":
        raise ValueError(f"sound=True computes with its own backend; pass backend='fused' (the default), "
                         f"got {backend!r}")
    check_sound(graph, stop)
    return SoundBackend(), outward_eps(eps, eps_t, x.dtype), sound_arithmetic(x.device.type)


def _param(t: Any, dtype: Optional[torch.dtype]) -> Any:
    return t.to(dtype) if dtype is not None and isinstance(t, Tensor) and t.is_floating_point() else t


@dataclass
class Trace:
    """What a CROWN pass needs of one IBP pass (see :func:`propagate`).

    ``shapes[i]``: the per-example shape of node i's value, for every bounded node.
    ``boxes[i]``: the box in front of node i: ``(mu, rad)`` for a ReLU, ``(lower, upper)`` for
    MaxPool and the other activations. ``constants[i]``: the value of constant node i.
    ``inputs[i]``: with ``keep_inputs``, the box of the input of every Linear, Conv and affine node i
    (the sound CROWN pass bounds its rounding errors with the magnitudes there).
    ``alphas[i]``: the lower slopes of ReLU node i's unstable neurons for a backward pass
    (alpha-CROWN), (b or 1, R or 1, *shape of its input); a ReLU without one takes CROWN's.
    ``extra[i]``: coefficients (b or 1, R or 1, *shape of node i) added to those a backward pass
    brings to node i: the Lagrangian term ``-β s z_i`` of split constraints ``s z_i >= 0`` (beta-CROWN).
    """

    shapes: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    boxes: Dict[int, Pair] = field(default_factory=dict)
    constants: Dict[int, Any] = field(default_factory=dict)
    keep_inputs: bool = False
    inputs: Dict[int, Pair] = field(default_factory=dict)
    alphas: Dict[int, Tensor] = field(default_factory=dict)
    extra: Dict[int, Tensor] = field(default_factory=dict)

    def split(self, size: int, count: int) -> List["Trace"]:
        """The traces of ``count`` consecutive chunks of ``size`` examples. The boxes are cut with
        ``torch.split``, whose backward pass is one concatenation (slicing would cost a zero-filled
        copy of every box per chunk); slopes shared by the batch (batch dimension 1) are shared."""
        parts = {i: [b.split(size) for b in box] for i, box in self.boxes.items()}
        cut = lambda d: {i: a.split(size) if a.shape[0] > 1 else [a] * count for i, a in d.items()}  # noqa: E731
        alphas, extra = cut(self.alphas), cut(self.extra)
        return [Trace(self.shapes, {i: tuple(piece[k] for piece in pieces) for i, pieces in parts.items()},
                      self.constants, alphas={i: a[k] for i, a in alphas.items()},
                      extra={i: e[k] for i, e in extra.items()}) for k in range(count)]

    def select(self, index: Tensor) -> "Trace":
        """The trace of the examples ``index`` (a 1-d index tensor), slopes included."""
        pick = lambda t: t if t.shape[0] == 1 else t.index_select(0, index)  # noqa: E731
        return Trace(self.shapes, {i: tuple(pick(t) for t in box) for i, box in self.boxes.items()},
                     self.constants, alphas={i: pick(a) for i, a in self.alphas.items()},
                     extra={i: pick(e) for i, e in self.extra.items()})


# ---------------------------------------------------------------------------------------------
# the walker
def propagate(graph: BoundGraph, box: Pair, backend, *, dtype: Optional[torch.dtype] = None,
              trace: Optional[Trace] = None, stop: Optional[int] = None,
              refine: Optional[Callable[[Node, Any], Any]] = None) -> List[Any]:
    """Pushes the input box through ``graph``'s nodes (those before index ``stop``, default all).

    Args:
        box: the backend's box of the input, e.g. ``(mu, rad)`` from ``backend.start``.
        dtype: compute in this dtype (parameters and constants are cast on the fly); None keeps theirs.
        trace: fill this :class:`Trace` (the boxes in front of every ReLU, MaxPool and activation,
            every shape); Linear/Conv and ReLU then run as two operators, since the
            pre-activation box is needed.
        refine: ``refine(node, box) -> box``, called on every bounded node's box before its users
            read it (with ``trace``, whose shapes then include the node): a tighter box of the same
            values, e.g. CROWN's (:mod:`pyibp.bounds.intermediate`).
    Returns:
        The value of every node, by index: a backend box for the bounded ones; a box is dropped
        once its last user has run (memory), except the last node's inputs and the output.
    """
    nodes, frees = graph.nodes, graph.frees
    env: List[Any] = [None] * len(nodes)
    fuse = trace is None
    for node in nodes[:stop]:
        kind = node.kind
        if kind == "input":
            value = box
        elif kind == "const":
            value = _evaluate(node, env)
            if trace is not None:
                trace.constants[node.index] = value
        else:
            if trace is not None and trace.keep_inputs and kind in ("linear", "conv", "affine"):
                trace.inputs[node.index] = env[node.inputs[0]]
            value = _RULES[kind](node, env, backend, dtype, fuse, trace)
        if trace is not None and kind != "const":
            trace.shapes[node.index] = tuple(value[0].shape[1:])
        if refine is not None and kind not in ("const", "input"):
            value = refine(node, value)
        env[node.index] = value
        for j in frees[node.index]:
            env[j] = None
    return env


def _evaluate(node: Node, env: List[Any]) -> Any:
    """A node with no bounded input, computed as PyTorch would (metadata of a box read off its first tensor)."""
    if node.op == "get_attr":
        return getattr(node.module, node.call)
    args, kwargs = resolve(node.args, env), resolve(node.kwargs, env)
    if node.inputs:                       # size(), dim(), .shape of a bounded tensor
        args = (env[node.inputs[0]][0],) + tuple(args[1:])
    if node.call is not None:
        return node.call(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.module(*args, **kwargs)


def _input(node: Node, env: List[Any]) -> Any:
    return env[node.inputs[0]]


def _rest(node: Node, env: List[Any]) -> Tuple[tuple, dict]:
    """The arguments after the bounded input, resolved."""
    return resolve(node.args[1:], env), resolve(node.kwargs, env)


def _expects(node: Node, shape: Tuple[int, ...], expected: str, unbatched: bool) -> ValueError:
    hint = "; was x passed without its batch dimension? Pass x.unsqueeze(0)" if unbatched else ""
    return ValueError(f"{node.describe()} expects inputs of shape {expected}, got a box of shape {shape}{hint}")


def _linear(node, env, backend, dtype, fuse, trace):
    weight, bias = linear_params(node, env)
    weight, bias = _param(weight, dtype), _param(bias, dtype)
    state = _input(node, env)
    if state[0].shape[-1] != weight.shape[1]:
        raise _expects(node, tuple(state[0].shape), f"(B, ..., {weight.shape[1]})",
                       state[0].shape[1:].numel() * state[0].shape[0] == weight.shape[1])
    lead = state[0].shape[:-1]
    if len(lead) != 1:  # a Linear acts on the last dimension of any shape
        state = backend.reshape(state, lambda t: t.reshape(-1, t.shape[-1]))
    state = backend.linear(state, weight, bias, fuse and node.fuse_relu)
    if len(lead) != 1:
        state = backend.reshape(state, lambda t: t.reshape(*lead, t.shape[-1]))
    return state


def _conv(node, env, backend, dtype, fuse, trace):
    p = conv_params(node, env)
    weight, bias, state = _param(p.weight, dtype), _param(p.bias, dtype), _input(node, env)
    stride, padding, dilation = p.stride, p.padding, p.dilation
    if state[0].dim() != weight.dim() or state[0].shape[1] != weight.shape[1] * p.groups:
        spatial = "H, W" if weight.dim() == 4 else "L"
        raise _expects(node, tuple(state[0].shape), f"(B, {weight.shape[1] * p.groups}, {spatial})",
                       state[0].dim() == weight.dim() - 1)
    one_d = weight.dim() == 3
    if one_d:     # Conv1d as a Conv2d over a height of 1
        state = backend.reshape(state, lambda t: t.unsqueeze(2))
        weight, stride, padding, dilation = weight.unsqueeze(2), [1] + stride, [0] + padding, [1] + dilation
    state = backend.conv2d(state, weight, bias, stride, padding, dilation, p.groups, fuse and node.fuse_relu)
    return backend.reshape(state, lambda t: t.squeeze(2)) if one_d else state


def _affine(node, env, backend, dtype, fuse, trace):
    # the sound backend takes the map in its own form (float64, with error bounds)
    affine_map = getattr(backend, "affine_map", affine_scale_shift)
    return backend.affine(_input(node, env), *affine_map(node, dtype))


def _relu(node, env, backend, dtype, fuse, trace):
    state = _input(node, env)
    if fuse and node.fused:         # its producer applied it
        return state
    if trace is not None:
        trace.boxes[node.index] = state
    return backend.relu(state)


def _activation(node, env, backend, dtype, fuse, trace):
    state = _input(node, env)
    bounds = backend.bounds(state)
    if trace is not None:
        trace.boxes[node.index] = bounds
    if is_monotone(node.module):
        return backend.monotone(state, node.module)
    return backend.from_bounds(*activation_interval(node.module, *bounds))


def _maxpool(node, env, backend, dtype, fuse, trace):
    state = _input(node, env)
    if trace is not None:
        trace.boxes[node.index] = backend.bounds(state)
    return backend.monotone(state, node.module)       # the max is non-decreasing in every input


def _pool(node, env, backend, dtype, fuse, trace):
    return backend.positive_linear(_input(node, env), node.module)


def mean_dims(node: Node, env: List[Any], ndim: int) -> Tuple[List[int], bool]:
    """The dimensions a ``mean`` node reduces (non-negative) and its keepdim, checked to spare the batch."""
    args, kwargs = _rest(node, env)
    dims = args[0] if args else kwargs.get("dim")
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    if dims is None or kwargs.get("dtype") is not None:
        raise TypeError(f"{node.describe()}: mean over every dimension (or with dtype=) would mix the examples "
                        "of a batch; pass the feature dimensions, e.g. x.mean((2, 3))")
    dims = [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]
    if 0 in dims:
        raise TypeError(f"{node.describe()} averages over the batch dimension; pyibp bounds each example alone")
    return dims, bool(keepdim)


def _mean(node, env, backend, dtype, fuse, trace):
    state = _input(node, env)
    dims, keepdim = mean_dims(node, env, state[0].dim())
    return backend.positive_linear(state, lambda t: t.mean(dims, keepdim=keepdim))


def _same_batch(node: Node, state: Pair, out: Pair) -> Pair:
    """``out``, checked to keep the examples of ``state`` apart (reshapes and broadcasts could mix them)."""
    batch = state[0].shape[0]
    if out[0].dim() == 0 or out[0].shape[0] != batch:
        raise TypeError(f"{node.describe()} changes the batch dimension (size {batch} to "
                        f"{tuple(out[0].shape)}); pyibp bounds ops that act on each example alone")
    return out


def _reshape(node, env, backend, dtype, fuse, trace):
    args, kwargs = _rest(node, env)
    state = _input(node, env)
    return _same_batch(node, state, backend.reshape(state, lambda t: node.call(t, *args, **kwargs)))


def _identity(node, env, backend, dtype, fuse, trace):
    return _input(node, env)


def pad_args(node: Node, env: List[Any]) -> Tuple[List[int], float]:
    args, kwargs = _rest(node, env)
    pad = args[0] if args else kwargs["pad"]
    value = args[2] if len(args) > 2 else kwargs.get("value", 0.0)
    return list(pad), float(value or 0.0)


def _pad(node, env, backend, dtype, fuse, trace):
    return backend.pad(_input(node, env), *pad_args(node, env))


def const_scale_shift(node: Node, env: List[Any], dtype: Optional[torch.dtype]) -> Tuple[Any, Any]:
    """``(scale, shift)`` of an elementwise ``z * scale + shift`` node (None: 1, 0)."""
    constants = [resolve(a, env) for a in node.args if not (type(a) is Ref and a.index == node.inputs[0])]
    scale, shift = node.call(*constants)
    return _param(scale, dtype), _param(shift, dtype)


def _const_affine(node, env, backend, dtype, fuse, trace):
    state = _input(node, env)
    return _same_batch(node, state, backend.scale_shift(state, *const_scale_shift(node, env, dtype)))


def _add(node, env, backend, dtype, fuse, trace):
    a, b = (env[r.index] for r in node.args[:2])
    return backend.add(a, b) if node.kind == "add" else backend.sub(a, b)


def cat_dim(node: Node, env: List[Any], ndim: int) -> int:
    args, kwargs = _rest(node, env)
    dim = (args[0] if args else kwargs.get("dim", 0)) % ndim
    if dim == 0:
        raise TypeError(f"{node.describe()} concatenates along the batch dimension; pyibp bounds each example alone")
    return dim


def _cat(node, env, backend, dtype, fuse, trace):
    states = [env[r.index] for r in (node.args[0] if node.args else node.kwargs["tensors"])]
    dim = cat_dim(node, env, states[0][0].dim())
    return tuple(torch.cat([s[k] for s in states], dim) for k in range(2))


def _log_softmax(node, env, backend, dtype, fuse, trace):
    # log_softmax(z)_i = -log sum_j exp(z_j - z_i) falls in z_j (j != i) and rises in z_i:
    # its lower end takes z_i = l_i and z_j = u_j, its upper end the other way round.
    state = _input(node, env)
    args, kwargs = _rest(node, env)
    dim = node.module.dim if node.module is not None else (args[0] if args else kwargs.get("dim"))
    lower, upper = backend.bounds(state)
    if lower.dim() != 2 or dim is None or dim % 2 != 1:
        raise TypeError(f"{node.describe()}: log_softmax is supported over the classes of a (B, K) output "
                        f"(dim=1), got dim={dim} of a box of shape {tuple(lower.shape)}")
    eye = torch.eye(lower.shape[1], dtype=torch.bool, device=lower.device)
    low = lower - torch.logsumexp(torch.where(eye, lower[:, :, None], upper[:, None, :]), 2)
    up = upper - torch.logsumexp(torch.where(eye, upper[:, :, None], lower[:, None, :]), 2)
    return backend.from_bounds(low, up)


_RULES = {"linear": _linear, "conv": _conv, "affine": _affine, "relu": _relu, "activation": _activation,
          "maxpool": _maxpool, "avgpool": _pool, "adaptive_avgpool": _pool, "mean": _mean, "reshape": _reshape,
          "index": _reshape, "identity": _identity, "pad": _pad, "const_affine": _const_affine, "add": _add,
          "sub": _add, "cat": _cat, "log_softmax": _log_softmax}


# ---------------------------------------------------------------------------------------------
# public API
def no_nan(t: Tensor, fill: float) -> Tensor:
    """``t`` with NaN replaced by ``fill`` (-inf for a lower bound, +inf for an upper one): where the
    arithmetic overflowed (an unbounded domain with a huge eps: inf - inf), the sound bound is the
    trivial one, never NaN."""
    return torch.nan_to_num(t, nan=fill, posinf=math.inf, neginf=-math.inf)


def _full_precision(x: Tensor):
    """Bounds are never computed in reduced precision (autocast, TF32, bf16 fp32-modes): a bf16 or
    TF32 bound is not a bound of the float32 network (see :mod:`pyibp.precision`)."""
    return full_precision(x.device.type)


def interval_bounds(model: nn.Module, x: Tensor, eps: Eps, *, lower: Bound = 0.0, upper: Bound = 1.0,
                    backend: str = "fused", dtype: Optional[torch.dtype] = None, sound: bool = False) -> Pair:
    """Guaranteed lower and upper bounds of ``model``'s output over the l∞ box around ``x``.

    The box is ``{x' : |x' - x| <= eps} ∩ [lower, upper]``. Gradients flow to the model's
    parameters (certified training back-propagates through this).

    Args:
        model: any nn.Module whose forward torch.fx can trace, built of the ops
            :mod:`pyibp.bounds.graph` lists (nn.Sequential, a forward calling ``F.relu``,
            ``torch.cat``, residual ``+``, torchvision's ResNets, ...), in eval mode.
        x: (B, *) inputs inside [lower, upper].
        eps: radius, a float or a tensor of shape () or (B,) (one per example).
        lower, upper: the input domain: floats, or tensors of one value per channel (C,) or
            broadcastable to x (the domain of normalised data).
        backend: ``"fused"`` (pyibp's operators) or ``"torch"`` (the tutorial's formulas).
        dtype: compute in this dtype (e.g. torch.float64 for verification); default the model's
            (float32 for a half or bfloat16 model or x, as under autocast).
        sound: bounds of the network computed in exact real arithmetic on its stored weights, for
            every real input of the box, whatever the float rounding (:mod:`pyibp.bounds.sound`;
            no gradients; ops without a sound rule raise TypeError naming the node).
    Returns:
        ``(lb, ub)``, each of the model's output shape, e.g. (B, n_classes).

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> lb, ub = interval_bounds(model, torch.rand(2, 3, 32, 32), 1 / 255)
        >>> bool((lb <= ub).all())
        True
    """
    graph = bound_graph(model)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    dtype = compute_dtype(model, x, dtype)
    if dtype is not None:
        x, eps_t = x.to(dtype), eps_t.to(dtype)
    be, eps_t, arithmetic = _sound_setup(graph, backend, sound, eps, eps_t, x)
    with _full_precision(x), arithmetic:
        env = propagate(graph, be.start(x, eps_t, *domain(x, lower, upper)), be, dtype=dtype)
        lb, ub = be.bounds(env[graph.output])
        return no_nan(lb, -math.inf), no_nan(ub, math.inf)


def ibp_margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: Bound = 0.0,
                      upper: Bound = 1.0, backend: str = "fused", dtype: Optional[torch.dtype] = None,
                      sound: bool = False) -> Tensor:
    """Lower bounds of the margins ``logit_y - logit_j`` over the l∞ box around ``x``, by IBP:
    :func:`pyibp.margin_bounds` with ``method="ibp"``.

    The margin specification is folded into a final Linear layer (last-layer elision), which is
    tighter than subtracting logit bounds.

    Args:
        model, lower, upper, backend, dtype, sound: as for :func:`interval_bounds`.
        x: (B, *) inputs in [lower, upper].  y: (B,) integer labels.  eps: float, () or (B,).
    Returns:
        (B, n_classes), 0 at j = y.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        >>> m = ibp_margin_bounds(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), 0.01)
        >>> verified = (m + torch.eye(10)[[0, 1, 2, 3]] * 1e9 > 0).all(1)
    """
    graph = bound_graph(model)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    dtype = compute_dtype(model, x, dtype)
    if dtype is not None:
        x, eps_t = x.to(dtype), eps_t.to(dtype)
    be, eps_t, arithmetic = _sound_setup(graph, backend, sound, eps, eps_t, x, graph.logits + 1)
    with _full_precision(x), arithmetic:
        box = be.start(x, eps_t, *domain(x, lower, upper))
        return no_nan(ibp_margins(graph, box, be, y, dtype)[0], -math.inf)


def ibp_margins(graph: BoundGraph, box: Pair, backend, y: Tensor, dtype: Optional[torch.dtype],
                trace: Optional[Trace] = None, refine: Optional[Callable[[Node, Any], Any]] = None
                ) -> Tuple[Tensor, Any, Optional[Tuple[Tensor, Optional[Tensor]]]]:
    """IBP margins (B, K) of the graph's logits, with the specification folded into a final Linear
    when the logits come from one over flat features. Returns ``(margins, box in front of that
    Linear or of the logits, (weight, bias) of that Linear or None)``. ``trace``, ``refine``: as for
    :func:`propagate`."""
    last = graph.last_linear
    stop = last if last is not None else graph.logits + 1
    env = propagate(graph, box, backend, dtype=dtype, trace=trace, stop=stop, refine=refine)
    if last is not None:
        state = env[graph.nodes[last].inputs[0]]
        if state[0].dim() == 2:
            weight, bias = linear_params(graph.nodes[last], env)
            weight, bias = _param(weight, dtype), _param(bias, dtype)
            _check_labels(y, state[0], weight.shape[0])
            return backend.margins(state, weight, bias, y), state, (weight, bias)
        if trace is not None:
            trace.boxes.clear()
        env = propagate(graph, box, backend, dtype=dtype, trace=trace, stop=graph.logits + 1, refine=refine)
    state = env[graph.logits]
    lb, ub = (t.flatten(1) for t in backend.bounds(state))
    _check_labels(y, lb, lb.shape[1])
    return (lb.gather(1, y[:, None]) - ub).scatter(1, y[:, None], 0.0), state, None
