"""Complete verification: properties (input boxes, linear output constraints), VNN-LIB and ONNX in,
a falsifier, and :func:`complete_verify` (falsify, bound, branch and bound) answering sat/unsat.

    net = load_onnx("mnist-net_256x2.onnx")
    prop = read_vnnlib("prop_0.vnnlib", input_shape=net.onnx_input_shape[1:])
    outcome = complete_verify(net, prop, timeout=120)      # outcome.status: sat, unsat, timeout, unknown
"""
import sys
import types
from typing import Any

from .complete import STATUSES, VerificationOutcome, complete_verify
from .falsify import Counterexample, check_counterexample, falsify
from .onnx import OnnxModelError, load_onnx
from .results import format_results, read_results, write_results
from .spec import Case, Conjunction, Property, robustness_property
from .vnnlib import VNNLibError, format_vnnlib, parse_vnnlib, read_vnnlib, write_vnnlib

__all__ = ["complete_verify", "VerificationOutcome", "STATUSES", "Property", "Case", "Conjunction",
           "robustness_property", "read_vnnlib", "parse_vnnlib", "write_vnnlib", "format_vnnlib", "VNNLibError",
           "load_onnx", "OnnxModelError", "falsify", "check_counterexample", "Counterexample", "format_results",
           "write_results", "read_results"]


class _CallablePackage(types.ModuleType):
    """Importing this package makes ``pyibp.verify`` the package, where it was the function
    :func:`pyibp.certify.verify` (Python sets a parent's attribute to a loaded subpackage); called,
    the package is that function, so ``pyibp.verify(model, data, eps)`` keeps working."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ..certify import verify
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
