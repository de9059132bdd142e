"""The bound engine: any traceable nn.Module as a graph, one IBP walker, one CROWN walker.

* :mod:`~pyibp.bounds.graph`: nn.Module -> bound graph (torch.fx, captured once per model,
  parameters read live), the ops it supports and the errors for those it does not.
* :mod:`~pyibp.bounds.ibp`: :func:`interval_bounds`, :func:`margin_bounds`; the IBP rule of each op.
* :mod:`~pyibp.bounds.crown`: CROWN-IBP margins and the loss-fusion bound; the CROWN rule of each op.
* :mod:`~pyibp.bounds.relaxations`: the linear relaxations of the activations.
* :mod:`~pyibp.bounds.checks`: validation of the input box, labels and devices.
"""
from .checks import Eps, _check_labels, _check_model_device, check_box, per_example_tensor
from .crown import (MarginPass, crown_ibp_margin_bounds, crown_ibp_mixed_margins, crown_ibp_robust_ce,
                    margin_pass)
from .graph import SUPPORTED_LAYERS, batch_statistics, bound_graph
from .ibp import interval_bounds, margin_bounds

__all__ = ["interval_bounds", "margin_bounds", "margin_pass", "MarginPass", "crown_ibp_margin_bounds",
           "crown_ibp_mixed_margins", "crown_ibp_robust_ce", "batch_statistics", "bound_graph", "SUPPORTED_LAYERS",
           "check_box", "per_example_tensor", "Eps"]
