"""Complete verification: properties (input boxes, linear output constraints), VNN-LIB and ONNX in,
a falsifier, and :func:`complete_verify` (falsify, bound, branch and bound) answering sat/unsat.

    net = load_onnx("mnist-net_256x2.onnx")
    prop = read_vnnlib("prop_0.vnnlib", input_shape=net.onnx_input_shape[1:])
    outcome = complete_verify(net, prop, timeout=120)      # outcome.status: sat, unsat, timeout, unknown
"""
from .bab import BabOutcome, relu_split_bab
from .complete import STATUSES, VerificationOutcome, complete_verify
from .falsify import Counterexample, check_counterexample, falsify
from .onnx import OnnxModelError, load_onnx
from .results import format_results, read_results, write_results
from .robustness import RobustnessOutcome, verify_robustness
from .spec import Case, Conjunction, Property, robustness_property
from .vnnlib import VNNLibError, format_vnnlib, parse_vnnlib, read_vnnlib, write_vnnlib

__all__ = ["complete_verify", "VerificationOutcome", "STATUSES", "relu_split_bab", "BabOutcome",
           "verify_robustness", "RobustnessOutcome", "Property", "Case", "Conjunction",
           "robustness_property", "read_vnnlib", "parse_vnnlib", "write_vnnlib", "format_vnnlib", "VNNLibError",
           "load_onnx", "OnnxModelError", "falsify", "check_counterexample", "Counterexample", "format_results",
           "write_results", "read_results"]
