"""CROWN's intermediate bounds of convolutional neurons with patches: coefficients the size of a receptive field.

A backward pass from one neuron of a convolution's output starts from a one-hot row, and the
coefficients it carries through the earlier convolutions are non-zero only on the neuron's
receptive field in each layer: a small window of a large image. The dense walker
(:mod:`pyibp.bounds.crown`) still carries them as full images and pays full-image transposed
convolutions per row. Here a row's coefficients at a node of value ``(C, H, W)`` are a patch
``(C, ph, pw)`` (stored channels last, ``(B, R, ph, pw, C)`` for R rows) whose window of the node's
image starts at ``(y S - P, x S - P)``, where ``(y, x)`` is the neuron's position and ``S``, ``P`` the
stride and padding the convolutions on the way compose to (``S = s_1 s_2 ...``, ``P -> P s + q``
through a Conv2d of stride s and padding q), as in auto_LiRPA's ``conv_mode="patches"``. Each rule
is the dense rule restricted to the window:

- Conv2d (W, b, stride s, padding q): the patch becomes ``conv_transpose2d(patch, W, stride=s)``
  (no padding: the window grows to ``(ph - 1) s + k``), its entries over the zero padding of the
  input are dropped, and the constant gains ``sum patch * b`` (per output channel).
- ReLU: CROWN's relaxation (:func:`pyibp.ops.crown_relu_step`) on the box read at the window
  (zero outside the image, where the relaxation is then 0).
- BatchNorm / Normalize (per channel), Identity / Dropout, elementwise affine maps with scalar constants.
- the input: ``Λ mu - |Λ| rad + c`` with the box read at the window.

At any other node (a pooling, a sum of branches, a Linear, a reshape), or once a patch is as large
as its node's image, the patches are placed into full images and the dense walker goes on from
there: a pass that starts at a convolution always saves at least the first transposed convolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .coefficients import rows_per_chunk
from .crown import _crown_bound
from .graph import BoundGraph, Node, affine_scale_shift, conv_params, per_channel
from .ibp import Trace, _param, const_scale_shift

__all__ = ["patch_neuron_bounds"]

Pair = Tuple[Tensor, Tensor]
_CARRIED = ("conv", "relu", "affine", "identity", "const_affine")


@dataclass(frozen=True)
class _Frame:
    """Where the patches lie in the value ``(C, H, W)`` of node ``index``: row r's window starts at
    ``(y_r * stride[0] - padding[0], x_r * stride[1] - padding[1])`` and is ``size`` large;
    ``kind`` is the node's rule here, or ``"dense"``: the walk goes on with the dense walker from it.
    ``pads``: ``(top, bottom, left, right)``, the zeros around the image that the window of every
    neuron position ``grid`` (H, W of the rows' node) lies in."""

    index: int
    kind: str
    shape: Tuple[int, int, int]
    size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    grid: Tuple[int, int]

    @property
    def pads(self) -> Tuple[int, int, int, int]:
        (_, height, width), (ph, pw) = self.shape, self.size
        (sy, sx), (py, px), (grid_h, grid_w) = self.stride, self.padding, self.grid
        return py, max(0, (grid_h - 1) * sy - py + ph - height), px, max(0, (grid_w - 1) * sx - px + pw - width)


def _scalar(c) -> bool:
    return c is None or not isinstance(c, Tensor) or c.numel() == 1


def _carried(node: Node, trace: Trace, dtype: Optional[torch.dtype]) -> bool:
    """Whether a patch goes through ``node`` as a patch (its value and input are ``(C, H, W)`` alike
    where the rule needs it)."""
    if node.kind not in _CARRIED or node.index in trace.extra or len(trace.shapes[node.inputs[0]]) != 3:
        return False
    if node.kind == "conv":
        p = conv_params(node, trace.constants)
        return p.weight.dim() == 4 and p.groups == 1 and list(p.dilation) == [1, 1]
    if node.kind == "relu":
        return node.index not in trace.alphas
    if node.kind == "const_affine":
        same = trace.shapes[node.inputs[0]] == trace.shapes[node.index]
        return same and all(_scalar(c) for c in const_scale_shift(node, trace.constants, dtype))
    return True


def _plan(graph: BoundGraph, trace: Trace, start: int, dtype: Optional[torch.dtype]) -> List[_Frame]:
    """The frames a pass from node ``start`` goes through, back to the input or to the node where
    it turns dense (the last frame)."""
    frames: List[_Frame] = []
    size, stride, padding = (1, 1), (1, 1), (0, 0)
    index, grid = start, trace.shapes[start][1:]
    while True:
        node, shape = graph.nodes[index], trace.shapes[index]
        if node.kind == "input" and index not in trace.extra:
            frames.append(_Frame(index, "input", shape, size, stride, padding, grid))
            return frames
        if size[0] * size[1] >= shape[1] * shape[2] or not _carried(node, trace, dtype):
            frames.append(_Frame(index, "dense", shape, size, stride, padding, grid))
            return frames
        frames.append(_Frame(index, node.kind, shape, size, stride, padding, grid))
        if node.kind == "conv":
            p = conv_params(node, trace.constants)
            kernel = p.weight.shape[2:]
            size = tuple((n - 1) * s + k for n, s, k in zip(size, p.stride, kernel))
            padding = tuple(q * s + pad for q, s, pad in zip(padding, p.stride, p.padding))
            stride = tuple(a * s for a, s in zip(stride, p.stride))
        index = node.inputs[0]


def _offsets(frame: _Frame, ys: Tensor, xs: Tensor) -> Tuple[Tensor, Tensor]:
    """(R,), (R,): where each row's window starts in the frame."""
    return ys * frame.stride[0] - frame.padding[0], xs * frame.stride[1] - frame.padding[1]


def _window_index(frame: _Frame, ys: Tensor, xs: Tensor) -> Tensor:
    """(R, ph * pw): each row's window as flat positions of the image padded by ``frame.pads``."""
    top, bottom, left, right = frame.pads
    oy, ox = _offsets(frame, ys, xs)
    ph, pw = frame.size
    wide = frame.shape[2] + left + right
    iy = (oy + top)[:, None] + torch.arange(ph, device=ys.device)
    ix = (ox + left)[:, None] + torch.arange(pw, device=ys.device)
    return (iy[:, :, None] * wide + ix[:, None, :]).flatten(1)


def _image(maps: Tuple[Tensor, ...], frame: _Frame) -> Tensor:
    """M maps (B, C, H, W) -> (M * B, H' * W', C): zero-padded by ``frame.pads``, channels last."""
    top, bottom, left, right = frame.pads
    stacked = F.pad(torch.stack(maps), (left, right, top, bottom))
    return stacked.permute(0, 1, 3, 4, 2).reshape(-1, stacked.shape[3] * stacked.shape[4], stacked.shape[2])


def _gather(image: Tensor, frame: _Frame, ys: Tensor, xs: Tensor) -> Tensor:
    """An :func:`_image` (M * B, H' * W', C) -> (M * B, R, ph, pw, C): each row's window. Rows at one
    position share a window: it is cut once, then copied whole to each of them."""
    (ys, xs), inverse = torch.unique(torch.stack([ys, xs]), dim=1, return_inverse=True)
    index = _window_index(frame, ys, xs)
    windows = image.index_select(1, index.flatten()).view(image.shape[0], ys.numel(), *frame.size, image.shape[2])
    return windows.index_select(1, inverse)


def _to_dense(patch: Tensor, frame: _Frame, ys: Tensor, xs: Tensor) -> Tensor:
    """(B, R, ph, pw, C) -> (B, R, C, H, W) (laid out channels-last): each row's patch placed at its
    window of the image."""
    index, (top, bottom, left, right) = _window_index(frame, ys, xs), frame.pads
    batch, rows, ph, pw, channels = patch.shape
    height, width = frame.shape[1:]
    tall, wide = height + top + bottom, width + left + right
    out = patch.new_zeros(batch, rows, tall * wide, channels)
    out.scatter_(2, index[None, :, :, None].expand(batch, rows, -1, channels), patch.flatten(2, 3))
    out = out.view(batch, rows, tall, wide, channels)[:, :, top:top + height, left:left + width]
    return out.contiguous().permute(0, 1, 4, 2, 3)


def _inside(frame: _Frame, ys: Tensor, xs: Tensor) -> Tensor:
    """(R, ph, pw, 1): whether each entry of a row's window lies inside the frame's image."""
    oy, ox = _offsets(frame, ys, xs)
    (_, height, width), (ph, pw) = frame.shape, frame.size
    iy = oy[:, None] + torch.arange(ph, device=ys.device)
    ix = ox[:, None] + torch.arange(pw, device=ys.device)
    inside_y, inside_x = (iy >= 0) & (iy < height), (ix >= 0) & (ix < width)
    return (inside_y[:, :, None] & inside_x[:, None, :])[..., None]


def _through(node: Node, frame: _Frame, below: _Frame, patch: Tensor, const: Tensor, trace: Trace,
             dtype: Optional[torch.dtype], images: Dict[int, Tensor], ys: Tensor, xs: Tensor) -> Tuple[Tensor, Tensor]:
    """One rule: the patches ``(B or 1, R, ph, pw, C)`` at ``frame`` (node's value) -> at ``below``
    (its input). Patches shared by the batch stay so up to the first ReLU. Channels last: the
    transposed convolutions run faster so (oneDNN), and a window's copy is one block. ``images``:
    the :func:`_image` of each ReLU's box ``(mu, rad)``."""
    batch, rows = const.shape
    if node.kind == "conv":
        p = conv_params(node, trace.constants)
        weight, bias = _param(p.weight, dtype), _param(p.bias, dtype)
        if bias is not None:
            const = const + patch.sum((2, 3)) @ bias
        out = F.conv_transpose2d(patch.flatten(0, 1).permute(0, 3, 1, 2), weight, None, p.stride)
        patch = out.permute(0, 2, 3, 1).view(patch.shape[:2] + out.shape[2:] + out.shape[1:2])
        patch = patch * _inside(below, ys, xs)
    elif node.kind == "relu":
        patch = patch.expand((batch,) + patch.shape[1:])
        mu, rad = _gather(images[node.index], frame, ys, xs).view(2, batch * rows, -1).unbind(0)
        out, shift = ops.crown_relu_step(patch.reshape(batch * rows, 1, -1), mu, rad)
        patch, const = out.view(patch.shape), const + shift.view(batch, rows)
    elif node.kind == "affine":
        scale, shift = per_channel(affine_scale_shift(node, dtype), patch.shape[-1])
        const = const + patch.sum((2, 3)) @ shift
        patch = patch * scale
    elif node.kind == "const_affine":
        scale, shift = const_scale_shift(node, trace.constants, dtype)
        if shift is not None:
            const = const + patch.sum((2, 3, 4)) * (shift.reshape(()) if isinstance(shift, Tensor) else shift)
        if scale is not None:
            patch = patch * (scale.reshape(()) if isinstance(scale, Tensor) else scale)
    return patch, const


def patch_neuron_bounds(graph: BoundGraph, trace: Trace, node: Node, rows: Tensor, signs: Tensor, box: Pair,
                        dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """Lower bounds of ``sign_r * z_{rows_r}`` for neurons of a node of value ``(C, H, W)``, by CROWN
    backward passes that carry patches; None when the node's rows gain nothing from patches (its
    value is not an image, or the first node on the way back already needs the dense walker).

    Args:
        node: the node ``z`` is the value of; ``trace`` holds the boxes of the activations before it.
        rows: (R,) flat indices of neurons of node's value (C, H, W).  signs: (R,) ±1.
        box: the input box ``(mu, rad)`` (B, *input shape).
    Returns:
        (B, R), equal (up to rounding) to the dense pass ``_crown_bound(graph, trace, A, 0, box,
        node.index, dtype)`` with ``A[:, r]`` the one-hot row ``signs[r] e_{rows[r]}``.

    Example:
        >>> rows = torch.tensor([0, 5, 0, 5]); signs = torch.tensor([1.0, 1.0, -1.0, -1.0])
        >>> bounds = patch_neuron_bounds(graph, trace, graph.nodes[4], rows, signs, box, None)
        >>> lower, upper = bounds[:, :2], -bounds[:, 2:]
    """
    shape = trace.shapes[node.index]
    if len(shape) != 3:
        return None
    frames = _plan(graph, trace, node.index, dtype)
    if frames[0].kind == "dense":
        return None
    mu = box[0]
    batch, (channels, height, width) = mu.shape[0], shape
    largest = max(f.shape[0] * math.prod(f.size) for f in frames)
    last = frames[-1]
    if last.kind == "dense":
        largest = max([largest] + [math.prod(s) for i, s in trace.shapes.items() if i <= last.index])
    chunk = rows_per_chunk(mu, batch * largest, rows.numel())
    # the boxes (mu, rad) of the ReLUs and of the input, cut into windows by every chunk
    images = {f.index: _image(trace.boxes[f.index] if f.kind == "relu" else box, f)
              for f in frames if f.kind in ("relu", "input")}
    out: List[Tensor] = []
    for r0 in range(0, rows.numel(), chunk):
        r, sign = rows[r0:r0 + chunk], signs[r0:r0 + chunk].to(mu.dtype)
        c, ys, xs = r // (height * width), (r // width) % height, r % width
        patch = mu.new_zeros(r.numel(), channels)
        patch[torch.arange(r.numel(), device=r.device), c] = sign
        patch = patch.view(1, r.numel(), 1, 1, channels)
        const = mu.new_zeros(batch, r.numel())
        for frame, below in zip(frames, frames[1:]):
            patch, const = _through(graph.nodes[frame.index], frame, below, patch, const, trace, dtype, images, ys, xs)
        if last.kind == "input":
            mu_w, rad_w = _gather(images[last.index], last, ys, xs).view((2, batch) + patch.shape[1:]).unbind(0)
            out.append(const + (patch * mu_w).sum((2, 3, 4)) - (patch.abs() * rad_w).sum((2, 3, 4)))
        else:
            A = _to_dense(patch.expand((batch,) + patch.shape[1:]), last, ys, xs)
            out.append(_crown_bound(graph, trace, A, const, box, last.index, dtype))
    return torch.cat(out, 1)
