"""Sound CROWN-IBP: margin lower bounds that hold for the network computed in exact real arithmetic.

The units and the rounding model are those of :mod:`pyibp.bounds.sound` (``u``, ``η``,
``γ_n = n u / (1 - n u)`` for a sum of n products in any order). The pass:

1. **Sound IBP** (:class:`~pyibp.bounds.sound.SoundBackend`) records the box in front of every
   ReLU and the box of the input of every Linear, Conv and affine node; each encloses the values
   the exact network takes there. Pre-activation bounds are ``l = down(mu - rad)``,
   ``u = up(mu + rad)``; magnitudes ``zmax >= max(|l|, |u|)``.
2. **One backward pass** from the margin specification with coefficients Λ in the compute dtype.
   Its invariant at node i, for every real input x of the box and the exact value ``h`` of node i::

       margin(x) >= Λ h - Σ_k |Λ_k| m_k + c - s

   ``m >= 0`` is a *pending* weight per element (the rounding of how Λ was computed), ``c`` the
   accumulated constant and ``s >= 0`` the accumulated error, per (example, row). Each rule keeps it:

   * Linear/Conv ``z = W h + b``: ``Λ' = fl(Λ W)`` is within ``γ_n |Λ||W| + nη`` of ``Λ W``, so
     ``|Λ W - Λ'| |h| <= γ_n |Λ| (|W| hmax) + nη Σ hmax``; ``|W| hmax`` is a forward product of the
     recorded box (rounded up). The bias term ``fl(Λ b)`` is within ``γ_n |Λ||b| + nη`` of ``Λ b``.
     Both join the pending weight, and **one** reduction ``Σ |Λ| m`` per layer moves it into ``s``:
     when the layer feeds a ReLU, the fused ReLU step (:func:`pyibp.ops.sound_crown_relu_step`)
     computes it in the same pass over Λ that maps Λ through the ReLU.
   * ReLU on ``[l, u]``: dead and active neurons are exact (0 and the identity); an unstable one
     uses the lower line ``α z`` with ``α`` 0 or 1 (exact) and the upper line ``σ z + τ`` with
     ``σ = up(u / down(u - l)) >= u / (u - l)`` and ``τ = up(σ (-l))``, which lies above ReLU on
     ``[l, u]`` for the real ``σ, τ`` (at ``l``: ``σ l + τ >= 0``; at ``u``: ``>= σ (u - l) >= u``).
     ``fl(Λ σ)`` is within ``u' |fl(Λ σ)| + η`` of ``Λ σ`` (``u' = u / (1 - u)``): pending weight
     ``u' zmax``. The intercepts ``Σ Λ⁻ τ`` are terms of one sign, so their float sum bounds its
     own error.
   * BatchNorm / Normalize ``S z + T`` (exact ``S, T`` within known distance of float64 values):
     ``fl(Λ s)`` with ``s = fl(S)``; its distance to ``Λ S`` and that of ``fl(Λ T)`` join the
     pending weight; reshapes and Identity move Λ and m unchanged.
   * The input box ``[mu - rad, mu + rad]`` (rounded outward): ``Λ x >= Λ mu - |Λ| rad`` exactly;
     ``fl(Λ mu)`` and ``fl(|Λ| (rad + m + γ_n |mu|))`` close the bound.

   Every reduction of n terms >= 0 computed in float is bounded above by ``(R + nη) / (1 - γ_n)``.
   ``c`` and ``s`` are sums of float64 terms; their float64 rounding is bounded by
   ``γ_k Σ |terms|`` (``u = 2^-53``, k the number of terms) and subtracted at the end; the result is
   rounded down into the compute dtype.

The products run in :func:`~pyibp.bounds.sound.sound_arithmetic` (no Winograd/FFT, no TF32), as for
sound IBP. The bound is returned as the elementwise maximum with the sound IBP margins from the
same pass (both are sound). Ops without a sound backward rule here (MaxPool, pooling, residual
sums and other multi-user nodes, concatenation, indexing, padding, elementwise constants) raise
TypeError naming the node; sound IBP (``method="ibp"``) covers more of them.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .checks import Bound, domain
from .. import ops
from .coefficients import (_A_channels_last, _back_conv, _channels_last, _examples_per_chunk, _flat_box, _flat_features,
                           _other_classes, _unflatten_features, one_hot_rows,
                           rows_per_chunk)
from .graph import BoundGraph, ConvParams, conv_params, linear_params, per_channel
from .ibp import Trace, _param, ibp_margins, no_nan
from .sound import SoundBackend, gamma, units

__all__ = ["sound_crown_margins", "check_sound_crown"]

Pair = Tuple[Tensor, Tensor]
_U64 = 2.0 ** -53
_SUPPORTED = ("input", "const", "linear", "conv", "relu", "reshape", "identity", "affine")
_RELAXED = 1 + 2.0 ** -50      # covers the float64 rounding of the error bounds computed below


def check_sound_crown(graph: BoundGraph, start: int, shapes: Dict[int, Tuple[int, ...]]) -> None:
    """TypeError naming the first node up to ``start`` the sound CROWN pass cannot bound
    (``shapes``: the per-example shape of each node's value, from the IBP pass)."""
    users: Dict[int, int] = {}
    for node in graph.nodes[:start + 1]:
        for i in set(node.inputs):
            users[i] = users.get(i, 0) + 1
    for node in graph.nodes[:start + 1]:
        if node.kind not in _SUPPORTED:
            raise TypeError(f"sound=True with method='crown-ibp' cannot bound {node.describe()} yet (it supports "
                            "Linear, Conv2d, ReLU, BatchNorm, Normalize, Flatten and reshapes); "
                            "method='ibp' with sound=True bounds more ops")
    for node in graph.nodes[:start + 1]:
        if node.kind == "linear" and len(shapes.get(node.inputs[0], ())) != 1:
            raise TypeError(f"sound=True with method='crown-ibp' cannot bound {node.describe()} yet: it acts on the "
                            f"last dimension of inputs of shape (B, {', '.join(map(str, shapes[node.inputs[0]]))}), "
                            "and the sound CROWN pass takes Linear layers on (B, features); method='ibp' with "
                            "sound=True bounds it")
        if users.get(node.index, 0) > 1 and node.kind != "const":
            raise TypeError(f"sound=True with method='crown-ibp' cannot bound {node.describe()} yet: its value has "
                            "several users (a residual sum or a branch); method='ibp' with sound=True bounds it")


def _upper_sum(r: Tensor, n: int, u: float, eta: float) -> Tensor:
    """float64 upper bound of an exact sum of ``n`` terms >= 0 whose float sum is ``r``."""
    return (r.double() + n * eta) * (_RELAXED / (1 - gamma(n, u)))


def _up_f64(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A float64 tensor rounded up into ``dtype``."""
    r = t.to(dtype)
    return torch.where(r.double() < t, torch.nextafter(r, r.new_tensor(math.inf)), r)


def _add_up(a: Tensor, b: Optional[Tensor]) -> Tensor:
    """``>= a + b`` (b None: a): the float sum rounded up."""
    return a if b is None else (a + b).nextafter_(a.new_tensor(math.inf))


def _magnitude(box: Pair) -> Tensor:
    """``>= |v|`` for every exact value v of the box ``(mu, rad)``."""
    mu, rad = box
    return (mu.abs() + rad).nextafter_(mu.new_tensor(math.inf))


class _Accumulator:
    """``c - s`` as a list of float64 terms (B, R), with the float64 rounding of their sum bounded."""

    def __init__(self) -> None:
        self.terms: List[Tensor] = []

    def add(self, t: Tensor) -> None:
        self.terms.append(t.double())

    def lower(self) -> Tensor:
        terms = torch.stack(torch.broadcast_tensors(*self.terms))
        total, magnitude = terms.sum(0), terms.abs().sum(0)
        k = len(self.terms) + 1
        low = total - magnitude * (gamma(2 * k, _U64) * _RELAXED)
        return torch.where(torch.isfinite(low) & torch.isfinite(magnitude), low, -math.inf)


class _Walk:
    """The state of one backward pass over a chunk of examples (see the module docstring)."""

    def __init__(self, graph: BoundGraph, trace: Trace, dtype: torch.dtype,
                 slopes: Optional[Dict[int, Tensor]] = None) -> None:
        self.graph, self.trace = graph, trace
        self.slopes = slopes or {}         # ReLU node -> lower slopes (b, *shape) of its unstable neurons
        self.u, self.eta = units(dtype)
        self.dtype = dtype
        self.acc = _Accumulator()

    # -- the error bookkeeping ------------------------------------------------------------------
    def reduce(self, lam: Tensor, m: Optional[Tensor]) -> None:
        """Moves ``Σ |Λ| m`` (m (b, *features), >= 0) into the error, bounded above."""
        if m is None:
            return
        cl = _channels_last(lam)
        flat = _flat_features(lam, cl)
        n = flat.shape[2]
        r = torch.bmm(flat.abs(), _flat_box(m, cl)[:, :, None])[..., 0]
        self.acc.add(-_upper_sum(r, n, self.u, self.eta))

    def floor(self, amount: Tensor) -> None:
        """An error independent of Λ: (b,) per example, the same for every row."""
        self.acc.add(-amount.double()[:, None])

    # -- the rules -------------------------------------------------------------------------------
    # A Linear, Conv or affine node adds a pending weight on the Λ of its output (``pending``, which
    # does not depend on Λ) and maps Λ back (``apply``). When Λ comes from the node's ReLU (its only
    # user: check_sound_crown), the fused ReLU step already reduced that weight (see ``relu``).
    def layer(self, node, lam: Tensor, m: Optional[Tensor], after_relu: bool) -> Tensor:
        if not after_relu:
            self.reduce(lam, _add_up(self.pending(node, lam.shape[0]), m))
        return self.apply(node, lam)

    def pending(self, node, batch: int) -> Tensor:
        """The pending weight (b, *output features) of ``node``'s rounding, with its floors added."""
        u, eta = self.u, self.eta
        if node.kind == "affine":
            return self._affine_pending(node, batch)
        box = self.trace.inputs[node.index]
        hmax = _magnitude(box)
        if node.kind == "linear":
            weight, bias = self._linear(node)
            n_out, n_in = weight.shape
            wh = _upper_sum(hmax @ weight.abs().t(), n_in, u, eta)               # (b, n_out) >= |W| hmax
            n_products, n_b = n_out, n_out + 1
            bias_err = None if bias is None else bias.double().abs()
        else:
            p = self._conv(node)
            forward = torch.nn.functional.conv2d(hmax, p.weight.abs(), None, p.stride, p.padding, p.dilation,
                                                 p.groups)
            wh = _upper_sum(forward, p.weight[0].numel(), u, eta)                # (b, C, H, W) >= |W| hmax
            n_products = p.weight.shape[0] * p.weight.shape[2] * p.weight.shape[3]  # per input element of Λ W
            n_b = forward.shape[2] * forward.shape[3] + p.weight.shape[0] + 1
            bias_err = None if p.bias is None else p.bias.double().abs()[:, None, None]
        pending = wh * gamma(n_products, u)
        if bias_err is not None:
            pending = pending + bias_err * gamma(n_b, u)
            self.floor(hmax.new_full((batch,), n_b * eta))
        self.floor(n_products * eta * hmax.double().flatten(1).sum(1) * _RELAXED)
        return _up_f64(pending * _RELAXED, self.dtype)

    def apply(self, node, lam: Tensor) -> Tensor:
        """Λ mapped back through ``node``, the bias term added to the constant."""
        if node.kind == "linear":
            weight, bias = self._linear(node)
            if bias is not None:
                self.acc.add(lam @ bias)
            return lam @ weight
        if node.kind == "affine":
            s, t = self._affine(node, lam.shape[2])[:2]
            sums = lam.sum(tuple(range(3, lam.dim()))) if lam.dim() > 3 else lam
            self.acc.add(sums @ t)
            return lam * s.reshape((-1,) + (1,) * (lam.dim() - 3))
        p = self._conv(node)
        if p.bias is not None:
            self.acc.add(lam.sum((3, 4)) @ p.bias)
        plain = ConvParams(p.weight, None, p.stride, p.padding, p.dilation, p.groups)
        lam, _ = _back_conv(lam, lam.new_zeros(lam.shape[:2]), plain, tuple(self.trace.inputs[node.index][0].shape[1:]))
        return lam

    def _linear(self, node) -> Tuple[Tensor, Optional[Tensor]]:
        weight, bias = linear_params(node, self.trace.constants)
        weight, bias = _param(weight, self.dtype).detach(), _param(bias, self.dtype)
        return weight, None if bias is None else bias.detach()

    def _conv(self, node) -> ConvParams:
        p = conv_params(node, self.trace.constants)
        if p.weight.dim() != 4:
            raise TypeError(f"sound=True with method='crown-ibp' supports Conv2d, not {node.describe()}")
        bias = _param(p.bias, self.dtype)
        return ConvParams(_param(p.weight, self.dtype).detach(), None if bias is None else bias.detach(),
                          p.stride, p.padding, p.dilation, p.groups)

    def _affine(self, node, channels: int):
        """``(s, t, e_s, e_t)``: the float scale and shift and the float64 error weights per channel
        (times zmax of the input, and alone) of ``fl(Λ s)``, ``fl(Λ t)`` against the exact map."""
        scale64, shift64, scale_err, shift_err = per_channel(SoundBackend().affine_map(node, None), channels)
        u = self.u
        s, t = scale64.to(self.dtype), shift64.to(self.dtype)
        # |Λ S - fl(Λ s)| <= |Λ| (|S - s| + u |s|) + η/2 per element; times zmax of the input
        e_s = scale_err + (scale64 - s.double()).abs() + u * s.double().abs()
        e_t = shift_err + (shift64 - t.double()).abs()
        return s, t, e_s, e_t

    def _affine_pending(self, node, batch: int) -> Tensor:
        zmax = _magnitude(self.trace.inputs[node.index]).double()
        s, t, e_s, e_t = self._affine(node, zmax.shape[1])
        view = (-1,) + (1,) * (zmax.dim() - 2)
        n_b = math.prod(zmax.shape[2:]) + t.shape[0] + 1
        e_t = e_t + gamma(n_b, self.u) * t.double().abs()
        self.floor((self.eta * zmax.flatten(1).sum(1) + n_b * self.eta) * _RELAXED)
        return _up_f64((e_s.reshape(view) * zmax + e_t.reshape(view)) * _RELAXED, self.dtype)

    def relu(self, node, lam: Tensor, m: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Λ through the ReLU ``node`` in one fused pass (:func:`pyibp.ops.sound_crown_relu_step`),
        which also reduces the incoming pending weight ``m`` and, when the ReLU's input is a Linear,
        Conv or affine node, the pending weight of the new Λ (the ReLU's rounding and that node's)."""
        mu, rad = self.trace.boxes[node.index]
        alpha, sigma, tau, zmax = _relu_lines(mu, rad, self.slopes.get(node.index))
        u, eta = self.u, self.eta
        m_relu = _up_f64(zmax.double() * (u / (1 - u) * _RELAXED), self.dtype)
        producer = self.graph.nodes[node.inputs[0]]
        fused = producer.kind in ("linear", "conv", "affine")
        m_out = None
        if fused:      # else m_relu is returned and reduced by the node that receives it
            m_out = _add_up(self.pending(producer, lam.shape[0]), m_relu)
        if lam.dim() == 5 and not _channels_last(lam):
            lam = _A_channels_last(lam)      # the transposed convolution that follows is faster so
        cl = _channels_last(lam)
        flat = partial(_flat_box, channels_last=cl)
        out, shift, slack_in, slack_out = ops.sound_crown_relu_step(
            _flat_features(lam, cl), flat(alpha), flat(sigma), flat(tau), None if m is None else flat(m),
            None if m_out is None else flat(m_out))
        n = out.shape[2]
        self.acc.add(shift)
        # its rounding: γ_n Σ|terms| + nη, with Σ|terms| <= (|shift| + nη) / (1 - γ_n)
        self.acc.add(-(gamma(n, u) * _upper_sum(-shift, n, u, eta) + n * eta))
        if m is not None:
            self.acc.add(-_upper_sum(slack_in, n, u, eta))
        if fused:
            self.acc.add(-_upper_sum(slack_out, n, u, eta))
        self.floor(eta * zmax.double().flatten(1).sum(1) * _RELAXED)
        return _unflatten_features(out, lam.shape, cl), None if fused else m_relu

    def concretise(self, lam: Tensor, m: Optional[Tensor], box: Pair) -> Tensor:
        """(b, R): the lower bound of ``Λ x - Σ|Λ| m + c - s`` over the input box (float64)."""
        mu, rad = box
        u, eta = self.u, self.eta
        cl = _channels_last(lam)
        flat = _flat_features(lam, cl)
        n = flat.shape[2]
        mu_f, rad_f = _flat_box(mu, cl), _flat_box(rad, cl)
        width = rad_f.double() + gamma(n, u) * mu_f.double().abs()
        if m is not None:
            width = width + _flat_box(m, cl).double()
        width = _up_f64(width * _RELAXED, self.dtype)
        centre = torch.bmm(flat, mu_f[:, :, None])[..., 0]
        spread = torch.bmm(flat.abs(), width[:, :, None])[..., 0]
        self.acc.add(centre)
        self.acc.add(-_upper_sum(spread, n, u, eta))
        self.floor(lam.new_full((lam.shape[0],), n * eta))
        return self.acc.lower()


def _relu_lines(mu: Tensor, rad: Tensor, slopes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(α, σ, τ, zmax)`` of the ReLUs over the exact boxes ``[mu - rad, mu + rad]``: the lower
    slope (CROWN's 0 or 1, or ``slopes`` in [0, 1] where given: any slope there is sound), the upper
    slope and intercept (rounded up) and ``>= max(|l|, |u|)``."""
    inf = mu.new_tensor(math.inf)
    low = (mu - rad).nextafter_(-inf)
    up = (mu + rad).nextafter_(inf)
    cross = (low < 0) & (up > 0)
    active = low >= 0
    width = torch.where(cross, (up - low).nextafter_(-inf), torch.ones_like(up))
    sigma = torch.where(cross, (up / width).nextafter_(inf), active.to(mu.dtype))
    tau = torch.where(cross, (sigma * -low).nextafter_(inf), torch.zeros_like(up))
    lower_slope = (up > -low).to(mu.dtype) if slopes is None else slopes.clamp(0.0, 1.0)
    alpha = torch.where(cross, lower_slope, active.to(mu.dtype))
    return alpha, sigma, tau, torch.maximum(low.abs(), up.abs())


def _slice(trace: Trace, part: slice) -> Trace:
    """The trace of the examples ``part`` (boxes and recorded inputs)."""
    return Trace(trace.shapes, {k: tuple(t[part] for t in v) for k, v in trace.boxes.items()}, trace.constants,
                 True, {k: tuple(t[part] for t in v) for k, v in trace.inputs.items()})


def _neuron_bounds(graph: BoundGraph, trace: Trace, node, index: Tensor, box: Pair, compute: torch.dtype
                   ) -> Tensor:
    """(B, 2U) float64 lower bounds of the exact ``z_i`` then of ``-z_i`` for the U flat neurons
    ``index`` of node's value, by sound backward passes from one-hot rows (exact)."""
    mu = box[0]
    batch, count = mu.shape[0], index.numel()
    shape = trace.shapes[node.index]
    largest = max(math.prod(sh) for i, sh in trace.shapes.items() if i <= node.index)
    chunk = rows_per_chunk(mu, batch * largest, 2 * count)
    rows = torch.cat([index, index])
    signs = torch.cat([mu.new_ones(count), -mu.new_ones(count)])
    out = []
    for r0 in range(0, 2 * count, chunk):
        r, sign = rows[r0:r0 + chunk], signs[r0:r0 + chunk]
        A = one_hot_rows(mu, batch, r, sign, shape)
        per = _examples_per_chunk(trace, A, batch)
        out.append(torch.cat([_backward(_Walk(graph, _slice(trace, slice(i0, i0 + per)), compute),
                                        A[i0:i0 + per], None, node.index, tuple(t[i0:i0 + per] for t in box))
                              for i0 in range(0, batch, per)]))
    return torch.cat(out, 1)


def _refine(graph: BoundGraph, trace: Trace, backend: SoundBackend, box: Pair, compute: torch.dtype, stop: int):
    """The ``refine`` hook of the walk (:func:`~pyibp.bounds.ibp.propagate`) that tightens the box in
    front of every ReLU by sound CROWN passes, as :mod:`pyibp.bounds.intermediate` does with float ones."""
    needs = graph.refined_nodes(stop)

    def refine(node, value: Pair) -> Pair:
        if node.index not in needs or value[0].shape[0] == 0:
            return value
        check_sound_crown(graph, node.index, trace.shapes)
        lower, upper = backend.bounds(value)
        batch = lower.shape[0]
        low, up = lower.reshape(batch, -1), upper.reshape(batch, -1)
        index = ((low < 0) & (up > 0)).any(0).nonzero()[:, 0]
        if index.numel() == 0:
            return value
        bounds = -_up_f64(-_neuron_bounds(graph, trace, node, index, box, compute), compute)   # rounded down
        count = index.numel()
        low_i, up_i = low[:, index], up[:, index]
        open_ = (low_i < 0) & (up_i > 0)
        new_low = torch.where(open_, torch.fmax(low_i, bounds[:, :count]), low_i)
        new_up = torch.where(open_, torch.fmin(up_i, -bounds[:, count:]), up_i)
        new_low = torch.minimum(new_low, new_up)
        low, up = low.index_copy(1, index, new_low), up.index_copy(1, index, new_up)
        return backend.from_bounds(low.view(lower.shape), up.view(upper.shape))
    return refine


def sound_crown_margins(graph: BoundGraph, x: Tensor, y: Tensor, eps_t: Tensor, lower: Bound, upper: Bound,
                        dtype: Optional[torch.dtype], refine: bool = False,
                        slopes: Optional[Dict[int, Tensor]] = None) -> Tensor:
    """(B, K) lower bounds of the exact network's margins (0 at j = y) on validated arguments, with
    ``eps_t`` already rounded up; inside :func:`~pyibp.bounds.sound.sound_arithmetic`.

    ``refine``: CROWN's boxes in front of the ReLUs (each by sound passes) instead of IBP's.
    ``slopes``: the lower slopes of the unstable ReLUs per margin row, ``{ReLU node: (B, K-1, *shape)}``
    (alpha-CROWN's, found in float arithmetic; any slope in [0, 1] is sound): one pass per row.
    """
    backend = SoundBackend()
    box = backend.start(x, eps_t, *domain(x, lower, upper))
    trace = Trace(keep_inputs=True)
    compute = x.dtype
    hook = _refine(graph, trace, backend, box, compute, len(graph.nodes)) if refine else None
    ibp, state, last = ibp_margins(graph, box, backend, y, dtype, trace, refine=hook)
    y = y.long()
    batch, num_classes = ibp.shape
    u, _ = units(compute)
    others = _other_classes(y, num_classes)
    if last is not None:
        weight, bias = (t.detach() if isinstance(t, Tensor) else t for t in last)
        start = graph.nodes[graph.last_linear].inputs[0]
        A = weight[y][:, None, :] - weight[others]                 # within u' |A| of the exact rows
        pending = _up_f64(_magnitude(state).double() * (u / (1 - u) * _RELAXED), compute)
        const = None
        if bias is not None:
            b_y, b_j = bias.double()[y][:, None], bias.double()[others]
            const = (b_y - b_j, b_y.abs() + b_j.abs())        # the float64 difference and its magnitude
    else:
        start = graph.logits
        A = torch.zeros(others.shape + (num_classes,), dtype=compute, device=x.device)
        A.scatter_(2, y[:, None, None].expand(-1, others.shape[1], 1), 1.0).scatter_(2, others[..., None], -1.0)
        A = A.reshape(others.shape + trace.shapes[start])
        pending, const = None, None
    check_sound_crown(graph, start, trace.shapes)
    rows = [slice(None)] if slopes is None else [slice(r, r + 1) for r in range(A.shape[1])]
    # chunks of examples, as the unsound pass (every tensor below is per example)
    chunk = _examples_per_chunk(trace, A, batch)
    bounds = []
    for i0 in range(0, batch, chunk):
        part = slice(i0, min(batch, i0 + chunk))
        sub = _slice(trace, part)
        per_row = []
        for r in rows:
            walk = _Walk(graph, sub, compute, None if slopes is None else
                         {i: s[part, r.start] for i, s in slopes.items()})
            if const is not None:
                walk.acc.add(const[0][part, r])
                walk.acc.add(-const[1][part, r] * _U64)        # the rounding of that difference
            per_row.append(_backward(walk, A[part, r], None if pending is None else pending[part], start,
                                     tuple(t[part] for t in box)))
        bounds.append(torch.cat(per_row, 1))
    crown = torch.cat(bounds)
    crown = -_up_f64(-crown, compute)                            # rounded down into the compute dtype
    if backend.ok is not None:
        crown = crown.masked_fill(~backend.ok[:, None], -math.inf)
    margins = ibp.new_zeros(batch, num_classes).scatter(1, others, no_nan(crown, -math.inf))
    return torch.maximum(margins, no_nan(ibp, -math.inf))


def _backward(walk: _Walk, A: Tensor, pending: Optional[Tensor], start: int, box: Pair) -> Tensor:
    nodes = walk.graph.nodes
    i, lam, m, previous = start, A, pending, None
    while True:
        node = nodes[i]
        kind = node.kind
        if kind == "input":
            return walk.concretise(lam, m, box)
        if kind in ("linear", "conv", "affine"):
            lam, m = walk.layer(node, lam, m, after_relu=previous == "relu"), None
        elif kind == "relu":
            lam, m = walk.relu(node, lam, m)
        elif kind == "reshape":
            in_shape = walk.trace.shapes[node.inputs[0]]
            lam = lam.reshape(lam.shape[:2] + in_shape)
            m = None if m is None else m.reshape(m.shape[:1] + in_shape)
        i, previous = node.inputs[0], kind
