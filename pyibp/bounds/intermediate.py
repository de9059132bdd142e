"""CROWN's intermediate bounds: the box in front of every ReLU, activation and MaxPool by backward passes.

CROWN (Zhang et al., "Efficient Neural Network Robustness Certification with General Activation
Functions", NeurIPS 2018) relaxes each activation on the box of its input, and bounds that box by a
CROWN pass of its own. :func:`crown_trace` does it in one IBP walk over the graph
(:func:`pyibp.bounds.ibp.propagate` with a ``refine`` hook): when the walk reaches a node p that an
activation reads, it runs the backward walker of :mod:`pyibp.bounds.crown` from p, with rows
``+e_i`` (the lower bound of neuron i) and ``-e_i`` (its upper bound), over the relaxations of the
activations before p (already refined), and intersects the result with p's IBP box. The IBP boxes
after p are then propagated from the tighter box.

Only the neurons the cheaper bound leaves open are bounded: for a ReLU, those whose IBP box crosses
0 in some example of the batch (a stable ReLU's relaxation is exact); for the other activations and
MaxPool, every neuron. A node that depends on the input through one Linear or Conv and elementwise
affine maps only is skipped: there IBP's centre-radius form is already exact. Rows run in chunks
that keep every coefficient tensor under a memory budget; the rows of a convolution's neurons carry
only their receptive fields (:mod:`pyibp.bounds.patches`) as far as the graph allows.
"""
from __future__ import annotations

import math
import time
from typing import Any, Collection, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .coefficients import one_hot_rows, rows_per_chunk
from .crown import _crown_bound
from .graph import BoundGraph, Node, linear_params
from .ibp import Trace, _param, propagate
from .patches import patch_neuron_bounds

__all__ = ["crown_trace"]

Pair = Tuple[Tensor, Tensor]


def _largest(trace: Trace, upto: int) -> int:
    return max(math.prod(shape) for i, shape in trace.shapes.items() if i <= upto)


def _neuron_bounds(graph: BoundGraph, trace: Trace, node: Node, index: Tensor, box: Pair,
                   dtype: Optional[torch.dtype], deadline: Optional[float] = None) -> Tensor:
    """(B, 2U): CROWN lower bounds of ``z_i`` then of ``-z_i`` for the U flat neurons ``index`` of node's value."""
    mu = box[0]
    batch, count = mu.shape[0], index.numel()
    shape = trace.shapes[node.index]
    start, weight, bias = node.index, None, None
    if node.kind == "linear" and len(trace.shapes[node.inputs[0]]) == 1:
        # rows of a Linear start at its input: ±W[i] with the constant ±b[i] (no product with e_i)
        weight, bias = (_param(t, dtype) for t in linear_params(node, trace.constants))
        start = node.inputs[0]
    rows = torch.cat([index, index])
    signs = torch.cat([mu.new_ones(count), -mu.new_ones(count)])
    if weight is None:
        # rows of an image's neurons: patches over their receptive fields where the graph allows
        bounds = patch_neuron_bounds(graph, trace, node, rows, signs, box, dtype)
        if bounds is not None:
            return bounds
    chunk = rows_per_chunk(mu, batch * _largest(trace, node.index), 2 * count)
    out: List[Tensor] = []
    for r0 in range(0, 2 * count, chunk):
        r, sign = rows[r0:r0 + chunk], signs[r0:r0 + chunk]
        if weight is not None:
            A = (weight[r] * sign[:, None]).expand(batch, -1, -1)
            const = ((bias[r] * sign) if bias is not None else sign.new_zeros(r.shape)).expand(batch, -1)
        else:
            A = one_hot_rows(mu, batch, r, sign, shape)
            const = mu.new_zeros(batch, r.numel())
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"CROWN's intermediate bounds passed the deadline at node {node.describe()}")
        out.append(_crown_bound(graph, trace, A, const, box, start, dtype))
    return torch.cat(out, 1)


def _tighten(graph: BoundGraph, trace: Trace, node: Node, value: Any, backend, box: Pair,
             dtype: Optional[torch.dtype], every: bool, deadline: Optional[float]) -> Any:
    lower, upper = backend.bounds(value)
    batch = lower.shape[0]
    low, up = lower.reshape(batch, -1), upper.reshape(batch, -1)
    if every:
        index = torch.arange(low.shape[1], device=low.device)
    else:
        index = ((low < 0) & (up > 0)).any(0).nonzero()[:, 0]
    if index.numel() == 0 or batch == 0:
        return value
    bounds = _neuron_bounds(graph, trace, node, index, box, dtype, deadline)
    count = index.numel()
    low_i, up_i = low[:, index], up[:, index]
    # fmax/fmin: a NaN bound (overflow) leaves IBP's
    new_low = torch.fmax(low_i, bounds[:, :count])
    new_up = torch.fmin(up_i, -bounds[:, count:])
    new_low = torch.minimum(new_low, new_up)           # never crossed by rounding
    if not every:     # each example's own unstable neurons only: its bounds do not depend on the batch
        open_ = (low_i < 0) & (up_i > 0)
        new_low, new_up = torch.where(open_, new_low, low_i), torch.where(open_, new_up, up_i)
    low, up = low.index_copy(1, index, new_low), up.index_copy(1, index, new_up)
    return backend.from_bounds(low.view(lower.shape), up.view(upper.shape))


def crown_trace(graph: BoundGraph, box: Pair, backend, dtype: Optional[torch.dtype], stop: int,
                known: Optional[Dict[int, Pair]] = None, fixed: Collection[int] = (),
                deadline: Optional[float] = None) -> Tuple[Trace, List[Any]]:
    """One IBP walk over the nodes before ``stop`` with CROWN's bounds in front of every activation.

    Args:
        box: the backend's input box, e.g. ``(mu, rad)`` (B, *input shape).
        backend: an IBP backend of :mod:`pyibp.bounds.ibp` (its boxes are ``(mu, rad)``).
        known: ``{node index: (lower, upper)}`` (B, *shape of the node) bounds known to hold for that
            node's value (e.g. a branch and bound's ReLU splits: ``lower = 0`` for a neuron fixed
            active, ``upper = 0`` for one fixed inactive); the node's box is intersected with them
            before anything reads it.
        fixed: nodes of ``known`` whose bounds are already CROWN's on this box (e.g. a branch and
            bound's boxes before its newest split): no backward pass is run for them.
        deadline: a ``time.monotonic()`` value; TimeoutError when a backward pass would start after it.
    Returns:
        ``(trace, env)``: the :class:`~pyibp.bounds.ibp.Trace` of the walk (the refined boxes in
        front of every ReLU, activation and MaxPool), and the value of every node as
        :func:`~pyibp.bounds.ibp.propagate` returns it. Every box is within the IBP box of the same
        walk, so a CROWN pass over this trace is never looser than IBP's box in any layer.

    Example:
        >>> graph = bound_graph(model)
        >>> trace, env = crown_trace(graph, FusedBackend().start(x, torch.tensor(0.1), 0.0, 1.0),
        ...                          FusedBackend(), None, len(graph.nodes))
    """
    trace = Trace()
    needs = graph.refined_nodes(stop)

    known = known or {}

    def refine(node: Node, value: Any) -> Any:
        if node.index in known:
            lower, upper = backend.bounds(value)
            low, up = known[node.index]
            lower, upper = torch.fmax(lower, low), torch.fmin(upper, up)
            value = backend.from_bounds(torch.minimum(lower, upper), upper)
        if node.index not in needs or node.index in fixed:
            return value
        return _tighten(graph, trace, node, value, backend, box, dtype, needs[node.index], deadline)

    env = propagate(graph, box, backend, dtype=dtype, trace=trace, stop=stop, refine=refine)
    return trace, env
