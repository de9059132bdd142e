"""The arithmetic a bound is computed in: IEEE float32 (or wider), whatever the user's settings.

A bound computed in reduced precision is not a bound of the float32 network. Two global settings
can silently lower the precision of a float32 product:

* **autocast** (``torch.autocast``) runs convolutions and matmuls in bf16/fp16;
* **TF32 and bf16 fp32-precision modes**: cuDNN convolutions and cuBLAS matmuls on Ampere/Hopper
  round their inputs to a 10-bit mantissa when TF32 is allowed (cuDNN's default), and oneDNN on the
  CPU can be told to compute float32 products in bf16 (``torch.backends.mkldnn.*.fp32_precision``).

:func:`full_precision` switches all of them to IEEE for the duration of a block and restores the
user's own values afterwards, so the clean forward pass of training keeps the speed the user chose.
Every path that produces a bound (IBP, elision, CROWN, loss fusion, verification) runs inside it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch

__all__ = ["full_precision", "FP32_PRECISION_SETTINGS"]

# (backend, op) pairs of torch's fp32-precision settings that feed float32 convolutions and matmuls.
# "generic"/"all" is the root the others inherit from when they say "none".
# Every leaf is set, RNNs included: torch's legacy getters (``torch.backends.cudnn.allow_tf32``) raise
# when the leaves of one backend disagree, and user code may read them inside the block.
FP32_PRECISION_SETTINGS: Tuple[Tuple[str, str], ...] = tuple(
    (backend, op) for backend in ("generic", "cuda", "mkldnn") for op in ("all", "matmul", "conv", "rnn")
    if backend != "generic" or op == "all")


def _has_precision_api() -> bool:
    return hasattr(torch._C, "_get_fp32_precision_getter")


def _read() -> List:
    """The user's settings, in the order :func:`_write` takes them."""
    # Only the per-op API where it exists: the legacy getters raise on settings made with it.
    if _has_precision_api():
        return [torch._C._get_fp32_precision_getter(b, o) for b, o in FP32_PRECISION_SETTINGS]
    # torch < 2.9: only the legacy switches exist
    return [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32]


def _write(state: List) -> None:
    if _has_precision_api():
        for (backend, op), value in zip(FP32_PRECISION_SETTINGS, state):
            torch._C._set_fp32_precision_setter(backend, op, value)
    else:
        torch.set_float32_matmul_precision(state[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state[1:]


def _ieee_state() -> List:
    if _has_precision_api():
        return ["ieee"] * len(FP32_PRECISION_SETTINGS)
    return ["highest", False, False]


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Runs the block with autocast off and every float32 product in IEEE float32.

    Restores the caller's autocast state and precision settings on exit, also when the block
    raises. Inside ``torch.compile`` only autocast is switched (changing global flags would break
    the graph); verification never runs compiled.

    Args:
        device_type: the device type of the tensors the block computes on (``x.device.type``).
    Example:
        >>> torch.backends.cudnn.conv.fp32_precision = "tf32"
        >>> with full_precision("cuda"):
        ...     lb, ub = pyibp.interval_bounds(model, x, 0.1)   # cuDNN convolutions in IEEE float32
        >>> torch.backends.cudnn.conv.fp32_precision
        'tf32'
    """
    with torch.autocast(device_type=device_type, enabled=False):
        if torch.compiler.is_compiling():
            yield
            return
        saved = _read()
        _write(_ieee_state())
        try:
            yield
        finally:
            _write(saved)
