"""The coefficients of a CROWN backward pass: their layout, and the adjoints of the linear maps that
both backward passes (:mod:`pyibp.bounds.crown`, :mod:`pyibp.bounds.sound_crown`) push them through.

A pass carries ``A`` (B, R, *shape of a node's value): R specification rows per example. Behind a
convolution it may be laid out channels-last (``conv_transpose2d`` runs about twice as fast on CPU
that way); the flat views below put the features in the order of that layout so that ``A`` and a
box (B, *shape) flatten alike without copies.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ibp import Trace

# Larger CPU tensors are mmapped afresh by glibc's allocator at every allocation and page-faulted in,
# which costs more than the arithmetic on them (its dynamic mmap threshold stops at 32 MiB).
_CPU_CHUNK_BYTES = 8 * 2**20
# The coefficient tensors of the passes that bound one node's neurons (many rows): at most this many
# bytes on the CPU, else the CUDA budget.
_CPU_ROWS_BUDGET = 32 * 2**20
_CUDA_ROWS_BUDGET = 1024 * 2**20


def one_hot_rows(like: Tensor, batch: int, index: Tensor, signs: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """(batch, R, *shape) coefficients whose row r is ``signs[r]`` at flat position ``index[r]`` and 0
    elsewhere: the rows ``±e_i`` that bound single neurons of a node of per-example ``shape``."""
    A = like.new_zeros(batch, index.numel(), math.prod(shape))
    A[:, torch.arange(index.numel(), device=like.device), index] = signs
    return A.view((batch, index.numel()) + tuple(shape))


def rows_per_chunk(like: Tensor, elements_per_row: int, rows: int) -> int:
    """How many of ``rows`` rows of ``elements_per_row`` elements (the whole batch's) to push back at once."""
    budget = _CPU_ROWS_BUDGET if like.device.type == "cpu" else _CUDA_ROWS_BUDGET
    return max(1, min(rows, budget // max(elements_per_row * like.element_size(), 1)))


def _feature_dims(t: Tensor) -> Tuple[int, ...]:
    return tuple(range(2, t.dim()))


def _sum_over_features(t: Tensor) -> Tensor:
    """(B, K', *) -> (B, K')."""
    return t.sum(_feature_dims(t)) if t.dim() > 2 else t


def _channels_last(A: Tensor) -> bool:
    """Whether A (B, K', C, H, W) is laid out channels-last, as conv_transpose2d leaves it."""
    return A.dim() == 5 and A.stride(2) == 1 and A.shape[2] > 1


def _box_channels_last(t: Tensor) -> bool:
    """Whether a box tensor (B, C, H, W) is laid out channels-last (see :class:`_ChannelsLastBackend`)."""
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1


def _A_channels_last(A: Tensor) -> Tensor:
    """A (B, K', C, H, W) laid out channels-last (a view when it already is)."""
    batch, rows = A.shape[:2]
    return A.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(A.shape) if batch * rows else A


def _back_conv(A: Tensor, const: Tensor, p, in_shape: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    """Through a Conv1d/Conv2d with parameters ``p`` (:class:`pyibp.bounds.graph.ConvParams`):
    its adjoint, a transposed convolution. A Conv1d runs as a Conv2d over a height of 1."""
    weight, stride, padding, dilation = p.weight, p.stride, p.padding, p.dilation
    one_d = weight.dim() == 3
    if one_d:
        A, in_shape = A.unsqueeze(3), (in_shape[0], 1, in_shape[1])
        weight, stride, padding, dilation = weight.unsqueeze(2), [1] + stride, [0] + padding, [1] + dilation
    batch, rows = A.shape[:2]
    if p.bias is not None:
        const = const + A.sum((3, 4)) @ p.bias
    # conv_transpose2d cannot know how many rows/columns a strided convolution dropped at the end.
    kernel = weight.shape[2:]
    out_padding = [size - ((o - 1) * s - 2 * q + d * (k - 1) + 1)
                   for size, o, s, q, d, k in zip(in_shape[1:], A.shape[3:], stride, padding, dilation, kernel)]
    # Channels-last: the transposed convolution runs about twice as fast on CPU (oneDNN) that way.
    A = _A_channels_last(A).flatten(0, 1)
    A = F.conv_transpose2d(A, weight, None, stride, padding, out_padding, p.groups, dilation)
    A = A.view(batch, rows, *in_shape)
    return (A.squeeze(3) if one_d else A), const


def _flat_features(t: Tensor, channels_last: bool) -> Tensor:
    """(B, R, *features) -> (B, R, n), features in the order (H, W, C) when ``channels_last``
    (a view when t is laid out that way), else in their natural order."""
    return t.permute(0, 1, 3, 4, 2).flatten(2) if channels_last else t.flatten(2)


def _flat_box(t: Tensor, channels_last: bool) -> Tensor:
    """(B, *features) -> (B, n) in the feature order of :func:`_flat_features`."""
    return t.permute(0, 2, 3, 1).flatten(1) if channels_last else t.flatten(1)


def _unflatten_features(flat: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """The inverse of :func:`_flat_features`, for a tensor of ``shape``."""
    if channels_last:
        b, r, c, h, w = shape
        return flat.view(b, r, h, w, c).permute(0, 1, 4, 2, 3)
    return flat.view(shape)


def _examples_per_chunk(trace: Trace, A: Tensor, batch: int) -> int:
    """How many examples the backward pass takes at a time: on CPU, as many as keep every A tensor
    under ``_CPU_CHUNK_BYTES``; with one row (loss fusion) or elsewhere (CUDA's caching allocator)
    the whole batch."""
    if A.device.type != "cpu" or A.shape[1] == 1:   # one row: A is no larger than the IBP boxes
        return max(batch, 1)
    largest = max(math.prod(shape) for shape in trace.shapes.values())
    per_example = A.shape[1] * largest * A.element_size()
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
