"""Bounds of any linear specification ``C f(x) + d`` over any input box, by IBP, CROWN-IBP, CROWN or
alpha-CROWN: :func:`spec_bounds`, and the margin bounds of the two CROWN methods.

A specification row ``c`` is folded into a final Linear ``W z + b`` (``c W`` and ``c b``: last-layer
elision) and pushed back from there; without a final Linear it starts at the logits. Methods:

* ``"ibp"``: the IBP box in front of the final Linear, elided: ``(C W) mu - |C W| rad + C b + d``.
* ``"crown-ibp"``: IBP boxes in front of every activation, one CROWN pass for the rows.
* ``"crown"``: CROWN boxes in front of every activation (:mod:`pyibp.bounds.intermediate`), one
  CROWN pass for the rows.
* ``"alpha-crown"``: CROWN's boxes, the rows' ReLU slopes optimised (:mod:`pyibp.bounds.alpha`).

Each method returns the elementwise maximum of its bound and those of the cheaper methods it
computes on the way (all are sound), so ``alpha-crown >= crown >= crown-ibp >= ibp`` row by row.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .alpha import AlphaOptions, optimize_slopes
from .checks import Bound, Eps, _check_labels, _check_model_device, check_box, compute_dtype, domain
from .crown import _ChannelsLastBackend, _crown_bound, _full_precision, _other_classes, _spec_rows
from .graph import BoundGraph, bound_graph, linear_params
from .ibp import Trace, _param, no_nan, propagate
from .intermediate import crown_trace
from .sound import outward_eps, sound_arithmetic
from .sound_crown import sound_crown_margins

__all__ = ["spec_bounds", "margin_spec_bounds", "METHODS", "SpecResult", "bound_spec"]

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
Pair = Tuple[Tensor, Tensor]


class SpecResult(NamedTuple):
    """What :func:`bound_spec` computes.

    Attributes:
        bounds: (B, R) lower bounds of the rows.
        trace: the trace of the boxes the CROWN passes relaxed (None for IBP).
        slopes: alpha-CROWN's best ReLU slopes per node (B, R, *shape), else None.
    """

    bounds: Tensor
    trace: Optional[Trace]
    slopes: Optional[Dict[int, Tensor]]


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


def _start(graph: BoundGraph, env: List[Any], C: Tensor, d: Optional[Tensor], dtype: Optional[torch.dtype]
           ) -> Tuple[int, Tensor, Tensor]:
    """``(start node, A, const)``: the rows folded into a final Linear over flat features, else at the logits."""
    batch, rows = C.shape[:2]
    const = C.new_zeros(batch, rows) if d is None else d.to(C.dtype).expand(batch, rows)
    last = graph.last_linear
    if last is not None and env[graph.nodes[last].inputs[0]] is not None \
            and env[graph.nodes[last].inputs[0]][0].dim() == 2:
        weight, bias = (_param(t, dtype) for t in linear_params(graph.nodes[last], env))
        if C.shape[2] != weight.shape[0]:
            raise ValueError(f"C must have one column per output of the model ({weight.shape[0]}), "
                             f"got shape {tuple(C.shape)}")
        if bias is not None:
            const = const + C @ bias
        return graph.nodes[last].inputs[0], C @ weight, const
    shape = tuple(env[graph.logits][0].shape[1:])
    if C.shape[2] != math.prod(shape):
        raise ValueError(f"C must have one column per output of the model ({math.prod(shape)}, its output "
                         f"being of shape {shape}), got shape {tuple(C.shape)}")
    return graph.logits, C.reshape((batch, rows) + shape), const


def _elided(A: Tensor, const: Tensor, state: Pair) -> Tensor:
    """(B, R): ``A mu - |A| rad + const`` over the box ``state`` of the node A acts on."""
    mu, rad = (t.flatten(1)[:, :, None] for t in state)
    flat = A.flatten(2)
    return (torch.bmm(flat, mu) - torch.bmm(flat.abs(), rad))[..., 0] + const


def _walk(graph: BoundGraph, box: Pair, backend, dtype: Optional[torch.dtype], refine: bool,
          trace: Optional[Trace]) -> Tuple[Optional[Trace], List[Any]]:
    """The forward walk up to the final Linear (or past the logits when its input is not flat)."""
    stops = [graph.last_linear, graph.logits + 1] if graph.last_linear is not None else [graph.logits + 1]
    for stop in stops:
        if refine:
            trace, env = crown_trace(graph, box, backend, dtype, stop)
        else:
            env = propagate(graph, box, backend, dtype=dtype, trace=trace, stop=stop)
        if stop != graph.last_linear or env[graph.nodes[stop].inputs[0]][0].dim() == 2:
            return trace, env
        trace = Trace() if trace is not None else None
    raise AssertionError("unreachable")


def bound_spec(graph: BoundGraph, box: Pair, C: Tensor, d: Optional[Tensor], method: str,
               dtype: Optional[torch.dtype], options: AlphaOptions = AlphaOptions()) -> SpecResult:
    """Lower bounds of ``C f(x) + d`` over the box ``(mu, rad)`` on validated arguments (see :func:`spec_bounds`).

    C: (B, R, K) in the compute dtype; d: (B, R) or None. Never under autocast.
    """
    with _full_precision(box[0]):
        backend = _ChannelsLastBackend()
        if method == "ibp":
            _, env = _walk(graph, box, backend, dtype, False, None)
            start, A, const = _start(graph, env, C, d, dtype)
            return SpecResult(no_nan(_elided(A, const, env[start]), -math.inf), None, None)
        # CROWN-IBP first: its boxes are IBP's (and it is the floor of the tighter methods)
        trace_ibp, env = _walk(graph, box, backend, dtype, False, Trace())
        start, A, const = _start(graph, env, C, d, dtype)
        bounds = torch.fmax(_crown_bound(graph, trace_ibp, A, const, box, start, dtype), _elided(A, const, env[start]))
        if method == "crown-ibp":
            return SpecResult(no_nan(bounds, -math.inf), trace_ibp, None)
        # CROWN's boxes take one backward pass per unstable neuron: no autograd graph is kept for them
        with torch.no_grad():
            trace, env = _walk(graph, box, backend, dtype, True, None)
            start, A, const = _start(graph, env, C, d, dtype)
            bounds = torch.fmax(bounds, _crown_bound(graph, trace, A, const, box, start, dtype))
        bounds = no_nan(bounds, -math.inf)
        if method == "crown":
            return SpecResult(bounds, trace, None)
        best, slopes = optimize_slopes(graph, trace, A.detach(), const.detach(), tuple(t.detach() for t in box),
                                       start, dtype, bounds, options)
        return SpecResult(best, trace, slopes)


def _check_spec(lower: Tensor, upper: Tensor, C: Tensor, d: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    for name, t in (("lower", lower), ("upper", upper)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (B, *input shape), got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if lower.shape != upper.shape or lower.dim() < 2:
        raise ValueError(f"lower and upper must have one shape (B, *input shape), got {tuple(lower.shape)} and "
                         f"{tuple(upper.shape)}")
    if lower.device != upper.device:
        raise ValueError(f"lower is on {lower.device} but upper is on {upper.device}; put both on one device")
    if torch.isnan(lower).any() or torch.isnan(upper).any():
        raise ValueError("lower and upper must not contain NaN")
    if (lower > upper).any():
        bad = int((lower > upper).sum())
        raise ValueError(f"lower must be <= upper everywhere; {bad} elements have lower > upper")
    batch = lower.shape[0]
    if not isinstance(C, Tensor) or not C.is_floating_point() or C.dim() not in (2, 3):
        raise ValueError(f"C must be a floating-point tensor (R, K) or (B, R, K), got "
                         f"{tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__}")
    if C.dim() == 3 and C.shape[0] != batch:
        raise ValueError(f"C of shape {tuple(C.shape)} must have the batch size of lower ({batch}) first")
    C = C.expand(batch, -1, -1) if C.dim() == 2 else C
    if d is not None:
        if not isinstance(d, Tensor) or tuple(d.shape) not in ((C.shape[1],), (batch, C.shape[1])):
            raise ValueError(f"d must be None or a tensor ({C.shape[1]},) or ({batch}, {C.shape[1]}), got "
                             f"{tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__}")
        d = d.expand(batch, -1)
    for name, t in (("C", C), ("d", d)):
        if t is not None and t.device != lower.device:
            raise ValueError(f"{name} is on {t.device} but lower is on {lower.device}; put both on one device")
    return C, d


def spec_bounds(model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor, d: Optional[Tensor] = None, *,
                method: str = "crown", dtype: Optional[torch.dtype] = None, steps: int = 20, lr: float = 0.5,
                lr_decay: float = 0.98) -> Tensor:
    """Guaranteed lower bounds of the linear functions ``C f(x) + d`` of the model's output for every
    input in the box ``lower <= x <= upper``.

    A VNN-LIB property, a margin ``f_y - f_j``, a bound of one output (a row ``±e_k``: its upper
    bound is minus the lower bound of ``-e_k``) are all such rows. See the module docstring for the
    methods; ``"crown"`` and ``"alpha-crown"`` are the tight ones. alpha-CROWN's bounds carry no
    gradient to the parameters.

    Args:
        model: any nn.Module :func:`pyibp.bounds.graph.bound_graph` captures, in eval mode.
        lower, upper: (B, *input shape) the box, lower <= upper.
        C: (R, K) or (B, R, K) rows over the K (flattened) outputs.  d: None, (R,) or (B, R).
        method: "ibp", "crown-ibp", "crown" or "alpha-crown".
        dtype: compute in this dtype (e.g. torch.float64); default the model's.
        steps, lr, lr_decay: alpha-CROWN's optimisation (:class:`~pyibp.bounds.alpha.AlphaOptions`).
    Returns:
        (B, R). Equals, for ``method="ibp"`` and ``Sequential(Linear(W1, b1), ReLU(), Linear(W2, b2))``::

            l, u = IBP bounds of W1 x + b1;  h_low, h_up = relu(l), relu(u)
            mid, rad = (h_up + h_low) / 2, (h_up - h_low) / 2
            (C @ W2) @ mid - |C @ W2| @ rad + C @ b2 + d

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> lo, hi = torch.zeros(1, 2), torch.ones(1, 2)
        >>> C = torch.tensor([[1.0, -1.0, 0.0]])                 # f_0 - f_1
        >>> low = spec_bounds(model, lo, hi, C, method="alpha-crown")   # (1, 1)
    """
    check_method(method)
    options = AlphaOptions(steps, lr, lr_decay)
    C, d = _check_spec(lower, upper, C, d)
    graph = bound_graph(model)
    _check_model_device(model, lower)
    dtype = compute_dtype(model, lower, dtype)
    work = dtype or lower.dtype
    lower, upper, C = lower.to(work), upper.to(work), C.to(work)
    box = ops.interval_to_center(lower, upper)
    return bound_spec(graph, box, C, None if d is None else d.to(work), method, dtype, options).bounds


def _num_outputs(graph: BoundGraph, model: nn.Module, x: Tensor) -> int:
    """The number of (flattened) outputs: the final Linear's, else those of one forward example."""
    if graph.last_linear is not None and graph.nodes[graph.last_linear].module is not None:
        return int(graph.nodes[graph.last_linear].module.weight.shape[0])
    with torch.no_grad():
        return int(model(x[:1]).flatten(1).shape[1])


def margin_spec_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: Bound = 0.0,
                       upper: Bound = 1.0, method: str = "crown", dtype: Optional[torch.dtype] = None,
                       sound: bool = False, options: AlphaOptions = AlphaOptions()) -> Tensor:
    """(B, K) lower bounds of ``logit_y - logit_j`` (0 at j = y) over the l∞ box around ``x`` by
    ``method`` (rows ``e_y - e_j`` through :func:`bound_spec`); see :func:`pyibp.margin_bounds`.

    Example:
        >>> m = margin_spec_bounds(model, x, y, 0.1, method="alpha-crown")
    """
    check_method(method)
    graph = bound_graph(model)
    eps_t = check_box(x, eps, lower, upper)
    _check_model_device(model, x)
    dtype = compute_dtype(model, x, dtype)
    num_classes = _num_outputs(graph, model, x)
    _check_labels(y, x, num_classes)
    if dtype is not None:
        x, eps_t = x.to(dtype), eps_t.to(dtype)
    y = y.long()
    box = _ChannelsLastBackend().start(x, eps_t, *domain(x, lower, upper))
    others = _other_classes(y, num_classes)
    C = _spec_rows(y, others, num_classes, x.dtype)
    if sound:
        # alpha-CROWN's slopes are searched in float arithmetic; any slope is sound, so the exact
        # bound takes them as they are.
        slopes = bound_spec(graph, box, C, None, method, dtype, options).slopes if method == "alpha-crown" else None
        with _full_precision(x), sound_arithmetic(x.device.type):
            return sound_crown_margins(graph, x, y, outward_eps(eps, eps_t, x.dtype), lower, upper, dtype,
                                       refine=True, slopes=slopes)
    bounds = bound_spec(graph, box, C, None, method, dtype, options).bounds
    return bounds.new_zeros(x.shape[0], num_classes).scatter(1, others, bounds)
