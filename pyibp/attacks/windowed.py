"""Forward passes that recompute only what one window changes, for Square's l∞ queries.

A Square query changes one s x s window of the input (the same window for the whole batch). In a
convolutional prefix of the model (convolutions, pooling and elementwise layers) the change
reaches, at each layer, only the outputs whose receptive field meets it; :class:`WindowedForward`
keeps every stage's activations at the current best input and recomputes just those outputs (the
stage's op on the needed input rectangle, padded as the layer pads), then runs the rest of the
model (from its first non-local layer, typically ``Flatten``) on the whole activation. The logits
are those of the full forward pass up to the float rounding of a different blocking: the
candidates and their acceptance are Square's own, and AutoAttack re-checks every perturbation it
reports with a full forward pass.

It applies to an ``nn.Sequential`` (nested ones are flattened) in eval mode whose leading layers
are Conv2d (zero padding, numeric padding), MaxPool2d / AvgPool2d (no ceil mode) and elementwise
layers; :meth:`WindowedForward.of` returns None for any other model, which then runs in full.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Normalize

__all__ = ["WindowedForward"]

Region = Tuple[int, int, int, int]      # rows [r0, r1), columns [c0, c1)

# Batch-independent elementwise layers (in eval mode): a window of their input maps to the same window.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
                nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout,
                nn.Dropout2d, Normalize)


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass
class _Stage:
    """One windowed op (None: elementwise layers only) and the elementwise layers after it."""

    op: Optional[nn.Module]
    after: List[nn.Module] = field(default_factory=list)

    def geometry(self) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
        op = self.op
        if isinstance(op, nn.Conv2d):
            return op.kernel_size, op.stride, op.padding, op.dilation
        stride = op.stride if op.stride is not None else op.kernel_size
        dilation = op.dilation if isinstance(op, nn.MaxPool2d) else 1
        return _pair(op.kernel_size), _pair(stride), _pair(op.padding), _pair(dilation)

    def apply(self, z: Tensor) -> Tensor:
        """The op on an input already padded (so with padding 0), then the elementwise layers."""
        op = self.op
        if isinstance(op, nn.Conv2d):
            z = F.conv2d(z, op.weight, op.bias, op.stride, 0, op.dilation, op.groups)
        elif isinstance(op, nn.MaxPool2d):
            z = F.max_pool2d(z, op.kernel_size, op.stride, 0, op.dilation)
        elif isinstance(op, nn.AvgPool2d):
            z = F.avg_pool2d(z, op.kernel_size, op.stride, 0)
        for layer in self.after:
            z = layer(z)
        return z

    def fill(self) -> float:
        return float("-inf") if isinstance(self.op, nn.MaxPool2d) else 0.0


def _flatten(model: nn.Module) -> List[nn.Module]:
    out: List[nn.Module] = []
    for child in model:
        out.extend(_flatten(child) if isinstance(child, nn.Sequential) else [child])
    return out


def _windowed(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    if isinstance(layer, nn.MaxPool2d):
        return not layer.ceil_mode and not layer.return_indices
    if isinstance(layer, nn.AvgPool2d):
        return not layer.ceil_mode and layer.divisor_override is None and (
            layer.count_include_pad or _pair(layer.padding) == (0, 0))
    return False


def _elementwise(layer: nn.Module) -> bool:
    if isinstance(layer, nn.BatchNorm2d):      # running statistics: a per-channel affine map
        return layer.track_running_stats and layer.running_mean is not None
    return isinstance(layer, _ELEMENTWISE)


def _span(lo: int, hi: int, size_out: int, k: int, st: int, p: int, d: int) -> Tuple[int, int]:
    """The outputs [j0, j1) whose receptive field meets the inputs [lo, hi) (empty: j0 >= j1)."""
    j0 = max(0, -((-(lo + p - d * (k - 1))) // st))
    j1 = min(size_out, (hi - 1 + p) // st + 1)
    return j0, j1


def _gather(z: Tensor, rows: Tensor) -> Tensor:
    """A copy of the rows ``rows`` (sorted, distinct) of z: a clone when they are all of them.
    index_select, not advanced indexing: several times faster on strided views."""
    return z.clone() if rows.numel() == z.shape[0] else z.index_select(0, rows)


class WindowedForward:
    """Logits of inputs that differ from cached ones in one window (see the module).

    ``cache`` is a list: the input, then each stage's output, all (B, C, H, W) at the current
    best input of every example.
    """

    def __init__(self, stages: List[_Stage], rest: nn.Module, dtype: Optional[torch.dtype]):
        self.stages, self.rest, self.dtype = stages, rest, dtype

    @staticmethod
    def of(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Optional["WindowedForward"]:
        """The windowed forward of ``model``, or None where it does not apply."""
        if not isinstance(model, nn.Sequential) or any(m.training for m in model.modules()):
            return None
        layers = _flatten(model)
        stages: List[_Stage] = []
        i = 0
        while i < len(layers) and (_windowed(layers[i]) or _elementwise(layers[i])):
            if _windowed(layers[i]):
                stages.append(_Stage(layers[i]))
            elif stages:
                stages[-1].after.append(layers[i])
            else:
                stages.append(_Stage(None, [layers[i]]))
            i += 1
        if not any(s.op is not None for s in stages) or i == len(layers):
            return None
        return WindowedForward(stages, nn.Sequential(*layers[i:]), dtype)

    def _cast(self, t: Tensor) -> Tensor:
        return t if self.dtype is None else t.to(self.dtype)

    def start(self, inputs: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """``(logits, cache)`` of the full forward pass of ``inputs`` (B, C, H, W)."""
        z = self._cast(inputs)
        cache = [z]
        for stage in self.stages:
            if stage.op is None:        # an in-place activation (ReLU(inplace=True)) must not write the cache
                z = z.clone()
            for layer in ([stage.op] if stage.op is not None else []) + stage.after:
                z = layer(z)
            cache.append(z)
        return self.rest(z), cache

    def query(self, cache: Sequence[Tensor], rows: Tensor, values: Tensor, region: Region
              ) -> Tuple[Tensor, List[Tuple[Region, Tensor]]]:
        """Logits of the inputs of ``rows`` with ``region`` replaced by ``values`` (n, C, h, w),
        and the patch of every cached tensor that accepting it would write (:meth:`commit`)."""
        patch = self._cast(values)
        patches: List[Tuple[Region, Tensor]] = [(region, patch)]
        for stage, z in zip(self.stages, cache[:-1]):
            r0, r1, c0, c1 = region
            if stage.op is None:
                patch = stage.apply(patch.clone())      # the previous patch is kept for commit
            else:
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = stage.geometry()
                H, W = z.shape[-2:]
                out_h, out_w = cache[len(patches)].shape[-2:]
                j0, j1 = _span(r0, r1, out_h, kh, sh, ph, dh)
                i0, i1 = _span(c0, c1, out_w, kw, sw, pw, dw)
                if j0 >= j1 or i0 >= i1:            # nothing downstream changes
                    return self._finish(cache, rows, patches, None)
                a0, a1 = j0 * sh - ph, (j1 - 1) * sh - ph + dh * (kh - 1) + 1
                b0, b1 = i0 * sw - pw, (i1 - 1) * sw - pw + dw * (kw - 1) + 1
                top, bottom, left, right = max(a0, 0), min(a1, H), max(b0, 0), min(b1, W)
                src = _gather(z[:, :, top:bottom, left:right], rows)
                # the changed inputs no output reads (beyond the last receptive field) are left out
                pr0, pr1, pc0, pc1 = max(r0, top), min(r1, bottom), max(c0, left), min(c1, right)
                src[:, :, pr0 - top:pr1 - top, pc0 - left:pc1 - left] = patch[:, :, pr0 - r0:pr1 - r0, pc0 - c0:pc1 - c0]
                pads = (left - b0, b1 - right, top - a0, a1 - bottom)
                if any(pads):
                    src = F.pad(src, pads, value=stage.fill())
                patch, region = stage.apply(src), (j0, j1, i0, i1)
            patches.append((region, patch))
        return self._finish(cache, rows, patches, region)

    def _finish(self, cache: Sequence[Tensor], rows: Tensor, patches: List[Tuple[Region, Tensor]],
                region: Optional[Region]) -> Tuple[Tensor, List[Tuple[Region, Tensor]]]:
        last = _gather(cache[-1], rows)
        if region is not None:                          # else the change stopped before the last stage
            r0, r1, c0, c1 = region
            last[:, :, r0:r1, c0:c1] = patches[-1][1]
        return self.rest(last), patches

    @staticmethod
    def commit(cache: Sequence[Tensor], rows: Tensor, keep: Tensor, patches: Sequence[Tuple[Region, Tensor]]) -> None:
        """Write the accepted (``keep``, over ``rows``) patches of a :meth:`query` into the cache."""
        if not bool(keep.any()):
            return
        kept = keep.nonzero()[:, 0]
        chosen = rows.index_select(0, kept)
        for z, ((r0, r1, c0, c1), patch) in zip(cache, patches):
            z[:, :, r0:r1, c0:c1].index_copy_(0, chosen, patch.index_select(0, kept))
