"""Complete verification: properties (input boxes, linear output constraints), VNN-LIB and ONNX in."""
from .onnx import OnnxModelError, load_onnx
from .spec import Case, Conjunction, Property, robustness_property
from .vnnlib import VNNLibError, format_vnnlib, parse_vnnlib, read_vnnlib, write_vnnlib

__all__ = ["Property", "Case", "Conjunction", "robustness_property", "read_vnnlib", "parse_vnnlib", "write_vnnlib",
           "format_vnnlib", "VNNLibError", "load_onnx", "OnnxModelError"]
