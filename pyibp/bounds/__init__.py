"""The bound engine: any traceable nn.Module as a graph, one IBP walker, one CROWN walker.

* :mod:`~pyibp.bounds.graph`: nn.Module -> bound graph (torch.fx, captured once per model,
  parameters read live), the ops it supports and the errors for those it does not.
* :mod:`~pyibp.bounds.ibp`: :func:`interval_bounds`, IBP margins; the IBP rule of each op.
* :mod:`~pyibp.bounds.crown`: CROWN-IBP margins and the loss-fusion bound; the CROWN rule of each op.
* :mod:`~pyibp.bounds.intermediate`: CROWN's bounds in front of every activation.
* :mod:`~pyibp.bounds.alpha`: alpha-CROWN's optimised ReLU slopes.
* :mod:`~pyibp.bounds.specs`: :func:`spec_bounds`, any linear specification over any box, by any method.
* :mod:`~pyibp.bounds.relaxations`: the linear relaxations of the activations (and MaxPool).
* :mod:`~pyibp.bounds.sound`: the sound mode's backend (bounds of the exact-arithmetic network).
* :mod:`~pyibp.bounds.sound_crown`: the sound mode's CROWN-IBP backward pass.
* :mod:`~pyibp.bounds.checks`: validation of the input box, labels and devices.

:func:`margin_bounds`, here, picks between IBP, CROWN-IBP, CROWN and alpha-CROWN.
"""
from typing import Optional

import torch
from torch import Tensor, nn

# the checks are shared with the attacks (same box, same messages)
from .checks import Bound, Eps, _check_labels, _check_model_device, check_box, per_example_tensor  # noqa: F401
from .crown import (MarginPass, crown_ibp_margin_bounds, crown_ibp_mixed_margins, crown_ibp_robust_ce,
                    margin_pass)
from .graph import SUPPORTED_LAYERS, batch_statistics, bound_graph
from .ibp import ibp_margin_bounds, interval_bounds
from .alpha import AlphaOptions
from .specs import METHODS, margin_spec_bounds, spec_bounds

__all__ = ["interval_bounds", "margin_bounds", "spec_bounds", "METHODS", "AlphaOptions", "ibp_margin_bounds", "margin_pass", "MarginPass",
           "crown_ibp_margin_bounds", "crown_ibp_mixed_margins", "crown_ibp_robust_ce", "batch_statistics",
           "bound_graph", "SUPPORTED_LAYERS", "check_box", "per_example_tensor", "Eps", "Bound"]


def margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, lower: Bound = 0.0,
                  upper: Bound = 1.0, method: str = "ibp", backend: str = "fused",
                  dtype: Optional[torch.dtype] = None, sound: bool = False,
                  alpha: AlphaOptions = AlphaOptions()) -> Tensor:
    """Lower bounds of the margins ``logit_y - logit_j`` over the l∞ box around ``x``.

    A point is *verified* when every entry with ``j != y`` is > 0. Methods, from the cheapest:

    * ``"ibp"``: :func:`~pyibp.bounds.ibp.ibp_margin_bounds` (the specification folded into a final
      Linear, tighter than subtracting logit bounds); ``backend`` applies to it.
    * ``"crown-ibp"``: :func:`~pyibp.bounds.crown.crown_ibp_margin_bounds` (IBP for the intermediate
      layers, a CROWN backward pass for the margins).
    * ``"crown"``: CROWN bounds in front of every activation too (:mod:`pyibp.bounds.intermediate`).
    * ``"alpha-crown"``: CROWN with the ReLUs' lower slopes optimised per margin
      (:mod:`pyibp.bounds.alpha`; ``alpha`` sets steps and learning rate).

    Each is never looser than the ones before it. ``sound=True``: bounds of the network in exact
    real arithmetic, whatever the float rounding (:mod:`pyibp.bounds.sound`, :mod:`pyibp.bounds.sound_crown`).

    Args:
        model: any nn.Module whose forward torch.fx can trace, of the ops :mod:`pyibp.bounds.graph` lists.
        x: (B, *) inputs in [lower, upper].  y: (B,) integer labels.  eps: float, () or (B,).
        lower, upper: floats, or tensors per channel (C,) or broadcastable to x.
    Returns:
        (B, n_classes), 0 at j = y.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> m = margin_bounds(model, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), 1 / 255,
        ...                   method="crown")
        >>> verified = (m.scatter(1, torch.tensor([[0], [1], [2], [3]]), 1.0) > 0).all(1)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method == "crown-ibp":
        return crown_ibp_margin_bounds(model, x, y, eps, lower=lower, upper=upper, dtype=dtype, sound=sound)
    if method == "ibp":
        return ibp_margin_bounds(model, x, y, eps, lower=lower, upper=upper, backend=backend, dtype=dtype,
                                 sound=sound)
    return margin_spec_bounds(model, x, y, eps, lower=lower, upper=upper, method=method, dtype=dtype,
                              sound=sound, options=alpha)
