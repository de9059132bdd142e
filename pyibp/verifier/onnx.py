"""ONNX networks as torch.fx GraphModules that pyibp's bound graph captures.

:func:`load_onnx` reads an ONNX model with the ``onnx`` package and emits a ``torch.fx.Graph``
made of exactly the layers and functions :mod:`pyibp.bounds.graph` knows: ``nn.Linear`` for Gemm
and MatMul by a constant, ``nn.Conv1d/2d``, ``nn.BatchNorm1d/2d`` (eval mode), the activation and
pooling modules, ``torch.reshape``/``permute``/``squeeze``/``unsqueeze``, ``torch.cat``, ``F.pad``,
``+ - * /`` by constants (buffers, read through ``get_attr``). Every subgraph that depends only on
initializers and ``Constant`` nodes (the ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``
chains of older PyTorch exports, constant normalisations) is folded to a constant while converting:
the converter runs each op on a batch-1 example as it emits it, so every shape is known.

Why not onnx2torch: its recent versions are only on GitHub, and it emits its own modules
(``OnnxGemm``, ``OnnxReshape``, ``OnnxBinaryMathOperation``, ...) whose forwards hold shape logic
pyibp's graph would have to learn one by one; here each ONNX op becomes the plain PyTorch layer
whose bound rules (IBP, CROWN, sound) pyibp already has.

The model's first input dimension is the batch: an ONNX input ``[1, 784, 1]`` gives a module taking
``(B, 784, 1)``; constant reshape targets that name the batch size 1 are rewritten to ``-1``. An op
outside the list (or one used in a way pyibp cannot represent, e.g. a reshape that moves the batch
dimension) is a TypeError naming its ONNX op type and node name.

Supported ONNX ops: Gemm, MatMul, Add, Sub, Mul, Div, Neg, Conv, ConvTranspose (forward only: pyibp
has no bound rule for it), Relu, LeakyRelu, Sigmoid, Tanh, Flatten, Reshape, Transpose, Squeeze,
Unsqueeze, Concat, Pad (constant), MaxPool, AveragePool, GlobalAveragePool, BatchNormalization,
Constant, Identity, Dropout, Cast, Slice, Gather (constant indices), and on constants only Shape,
ConstantOfShape, Range, Equal, Where, Expand, Sqrt, Pow, Min, Max, ReduceProd.
"""
from __future__ import annotations

import gzip
import math
import operator
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["load_onnx", "OnnxModelError"]


class OnnxModelError(ValueError):
    """An ONNX file that cannot be read or has no single float input and output (names the file)."""


class _Traced:
    """A value that depends on the network input: its fx node and its value on a batch-1 example."""

    __slots__ = ("node", "example")

    def __init__(self, node: fx.Node, example: Tensor):
        self.node, self.example = node, example


Value = Union[_Traced, Tensor]


class _Builder:
    def __init__(self):
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def constant(self, t: Tensor) -> Any:
        """A constant argument of a traced op: a Python number for a scalar, else a buffer."""
        if t.numel() == 1 and t.dim() == 0:
            return t.item()
        name = self.name("const")
        self.root.register_buffer(name, t.detach().clone())
        return self.graph.get_attr(name)

    def module(self, base: str, module: nn.Module, x: _Traced) -> _Traced:
        name = self.name(base)
        self.root.add_module(name, module)
        return _Traced(self.graph.call_module(name, (x.node,)), module(x.example))

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Value:
        """``fn(*args, **kwargs)``: computed now when no argument is traced, else emitted."""
        flat = list(args) + list(kwargs.values())
        if not any(isinstance(a, _Traced) or (isinstance(a, (list, tuple)) and any(isinstance(u, _Traced) for u in a))
                   for a in flat):
            return fn(*args, **kwargs)

        def example(a: Any) -> Any:
            if isinstance(a, _Traced):
                return a.example
            if isinstance(a, (list, tuple)):
                return type(a)(example(u) for u in a)
            return a

        def node(a: Any) -> Any:
            if isinstance(a, _Traced):
                return a.node
            if isinstance(a, Tensor):
                return self.constant(a)
            if isinstance(a, (list, tuple)):
                return type(a)(node(u) for u in a)
            return a

        value = fn(*[example(a) for a in args], **{k: example(v) for k, v in kwargs.items()})
        return _Traced(self.graph.call_function(fn, tuple(node(a) for a in args),
                                                {k: node(v) for k, v in kwargs.items()}), value)


def _attributes(node) -> Dict[str, Any]:
    from onnx import helper, numpy_helper
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if a.type == a.TENSOR:
            value = torch.from_numpy(numpy_helper.to_array(value).copy())
        elif isinstance(value, bytes):
            value = value.decode()
        out[a.name] = value
    return out


class _Converter:
    def __init__(self, where: str):
        self.where = where
        self.b = _Builder()

    def unsupported(self, node, why: str = "") -> TypeError:
        return TypeError(f"{self.where}: pyibp cannot convert ONNX node {node.name or '(unnamed)'!r} of op type "
                         f"{node.op_type}{': ' + why if why else ''}")

    @staticmethod
    def shape_of(v: Value) -> Tuple[int, ...]:
        return tuple((v.example if isinstance(v, _Traced) else v).shape)

    def const(self, node, v: Value, what: str) -> Tensor:
        if isinstance(v, _Traced):
            raise self.unsupported(node, f"its {what} must be a constant, not computed from the network input")
        return v

    def traced(self, node, v: Value) -> _Traced:
        if not isinstance(v, _Traced):
            raise self.unsupported(node, "expected a tensor computed from the network input")
        return v

    def axis(self, node, v: Value, axis: int) -> int:
        """A non-negative axis; a traced value's batch axis 0 is refused."""
        rank = len(self.shape_of(v))
        axis = axis + rank if axis < 0 else axis
        if isinstance(v, _Traced) and axis == 0:
            raise self.unsupported(node, "it acts on the batch dimension (axis 0)")
        return axis

    # -- ops ------------------------------------------------------------------------------------
    def run(self, node, inputs: List[Optional[Value]]) -> List[Value]:
        method = getattr(self, "op_" + node.op_type, None)
        if method is None or node.domain not in ("", "ai.onnx"):
            raise self.unsupported(node, "this op is not supported")
        attrs = _attributes(node)
        out = method(node, inputs, attrs)
        return out if isinstance(out, list) else [out]

    def op_Identity(self, node, i, a):
        return i[0]

    op_Dropout = op_Identity

    def op_Constant(self, node, i, a):
        if "value" in a:
            return a["value"]
        for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64),
                           ("value_floats", torch.float32), ("value_ints", torch.int64)):
            if key in a:
                return torch.tensor(a[key], dtype=dtype)
        raise self.unsupported(node, f"attributes {sorted(a)} are not supported")

    def op_Cast(self, node, i, a):
        import numpy as np
        from onnx import helper
        dtype = torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(a["to"]))).dtype
        if isinstance(i[0], _Traced):
            if not dtype.is_floating_point:
                raise self.unsupported(node, f"casts the network's values to {dtype}")
            return i[0]
        return i[0].to(dtype)

    def op_Shape(self, node, i, a):
        shape = torch.tensor(self.shape_of(i[0]), dtype=torch.int64)
        return shape[a.get("start", 0):a.get("end", len(shape))]

    def op_Gemm(self, node, i, a):
        x = self.traced(node, i[0])
        B = self.const(node, i[1], "B").to(torch.float32)
        if a.get("transA", 0) or len(self.shape_of(x)) != 2:
            raise self.unsupported(node, "only Gemm(A, B, C) of a 2-d A (B, K) without transA is supported")
        W = (B if a.get("transB", 0) else B.T) * a.get("alpha", 1.0)
        bias = None
        if len(i) > 2 and i[2] is not None:
            bias = torch.broadcast_to(self.const(node, i[2], "C").to(torch.float32) * a.get("beta", 1.0),
                                      (1, W.shape[0])).reshape(-1)
        return self.linear(W, bias, x)

    def linear(self, W: Tensor, bias: Optional[Tensor], x: _Traced) -> _Traced:
        layer = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(W)
            if bias is not None:
                layer.bias.copy_(bias)
        return self.b.module("linear", layer, x)

    def op_MatMul(self, node, i, a):
        x, W = i
        if not isinstance(x, _Traced) and not isinstance(W, _Traced):
            return torch.matmul(x, W)
        if isinstance(x, _Traced) and not isinstance(W, _Traced) and W.dim() == 2:
            return self.linear(W.to(torch.float32).T, None, x)
        raise self.unsupported(node, "only MatMul(x, W) of the network's values by a constant 2-d W is supported")

    def binary(self, node, i, fn):
        x, y = i
        if isinstance(x, _Traced) and not isinstance(y, _Traced) and y.is_floating_point():
            y = y.to(torch.float32)
        if isinstance(y, _Traced) and not isinstance(x, _Traced) and x.is_floating_point():
            x = x.to(torch.float32)
        if isinstance(x, _Traced) or isinstance(y, _Traced):
            out_shape = torch.broadcast_shapes(self.shape_of(x), self.shape_of(y))
            traced_shape = self.shape_of(x if isinstance(x, _Traced) else y)
            if len(out_shape) != len(traced_shape):
                raise self.unsupported(node, f"a constant of shape {self.shape_of(y)} broadcasts the network's "
                                             f"value of shape {traced_shape} to more dimensions")
        return self.b.call(fn, x, y)

    def op_Add(self, node, i, a):
        return self.binary(node, i, operator.add)

    def op_Sub(self, node, i, a):
        return self.binary(node, i, operator.sub)

    def op_Mul(self, node, i, a):
        return self.binary(node, i, operator.mul)

    def op_Div(self, node, i, a):
        if not isinstance(i[0], _Traced) and not isinstance(i[1], _Traced) and not i[0].is_floating_point():
            return torch.div(i[0], i[1], rounding_mode="trunc")
        return self.binary(node, i, operator.truediv)

    def op_Neg(self, node, i, a):
        return self.b.call(operator.neg, i[0])

    def activation(self, node, x: Value, module: nn.Module) -> Value:
        if not isinstance(x, _Traced):
            return module(x)
        return self.b.module(type(module).__name__.lower(), module, x)

    def op_Relu(self, node, i, a):
        return self.activation(node, i[0], nn.ReLU())

    def op_LeakyRelu(self, node, i, a):
        return self.activation(node, i[0], nn.LeakyReLU(a.get("alpha", 0.01)))

    def op_Sigmoid(self, node, i, a):
        return self.activation(node, i[0], nn.Sigmoid())

    def op_Tanh(self, node, i, a):
        return self.activation(node, i[0], nn.Tanh())

    def op_Flatten(self, node, i, a):
        x = i[0]
        axis = a.get("axis", 1)
        shape = self.shape_of(x)
        axis = axis + len(shape) if axis < 0 else axis
        if not isinstance(x, _Traced):
            return x.reshape(math.prod(shape[:axis]), -1)
        if axis != 1:
            raise self.unsupported(node, f"Flatten with axis={axis} mixes the batch dimension; only axis=1 is "
                                         "supported")
        return self.b.module("flatten", nn.Flatten(), x)

    def reshape(self, node, x: Value, target: Sequence[int]) -> Value:
        if not isinstance(x, _Traced):
            return x.reshape(tuple(target))
        shape = self.shape_of(x)
        resolved = list(torch.empty(shape).reshape(tuple(target)).shape)
        if not resolved or resolved[0] != shape[0] or math.prod(resolved[1:]) != math.prod(shape[1:]):
            raise self.unsupported(node, f"it reshapes {list(shape)} to {resolved}, which moves the batch dimension")
        return self.b.call(torch.reshape, x, (-1, *resolved[1:]))

    def op_Reshape(self, node, i, a):
        target = [int(t) for t in self.const(node, i[1], "shape").tolist()]
        if not a.get("allowzero", 0):
            shape = self.shape_of(i[0])
            target = [shape[k] if t == 0 else t for k, t in enumerate(target)]
        return self.reshape(node, i[0], target)

    def op_Transpose(self, node, i, a):
        rank = len(self.shape_of(i[0]))
        perm = list(a.get("perm", range(rank - 1, -1, -1)))
        if isinstance(i[0], _Traced) and perm[0] != 0:
            raise self.unsupported(node, f"perm={perm} moves the batch dimension")
        return self.b.call(torch.permute, i[0], perm)

    def axes(self, node, i, a) -> Optional[List[int]]:
        if len(i) > 1 and i[1] is not None:
            return [int(t) for t in self.const(node, i[1], "axes").tolist()]
        return list(a["axes"]) if "axes" in a else None

    def op_Squeeze(self, node, i, a):
        shape = self.shape_of(i[0])
        axes = self.axes(node, i, a)
        axes = [k for k, s in enumerate(shape) if s == 1] if axes is None else [self.axis(node, i[0], k)
                                                                                for k in axes]
        if isinstance(i[0], _Traced):
            axes = [k for k in axes if k != 0]
        target = [s for k, s in enumerate(shape) if k not in axes]
        return self.reshape(node, i[0], target)

    def op_Unsqueeze(self, node, i, a):
        shape = list(self.shape_of(i[0]))
        axes = self.axes(node, i, a)
        rank = len(shape) + len(axes)
        for k in sorted(ax + rank if ax < 0 else ax for ax in axes):
            if isinstance(i[0], _Traced) and k == 0:
                raise self.unsupported(node, "it inserts a dimension before the batch dimension")
            shape.insert(k, 1)
        return self.reshape(node, i[0], shape)

    def op_Concat(self, node, i, a):
        values = [v for v in i if v is not None]
        axis = self.axis(node, values[0], a["axis"]) if any(isinstance(v, _Traced) for v in values) else a["axis"]
        if any(isinstance(v, _Traced) for v in values) and not all(isinstance(v, _Traced) for v in values):
            raise self.unsupported(node, "it joins the network's values with constants")
        return self.b.call(torch.cat, values, axis)

    def op_Pad(self, node, i, a):
        mode = a.get("mode", "constant")
        pads = [int(p) for p in (self.const(node, i[1], "pads").tolist() if len(i) > 1 else a["pads"])]
        value = 0.0
        if len(i) > 2 and i[2] is not None and self.const(node, i[2], "value").numel():
            value = float(i[2].item())
        elif "value" in a:
            value = float(a["value"])
        rank = len(self.shape_of(i[0]))
        if len(i) > 3 and i[3] is not None:
            raise self.unsupported(node, "the axes input of Pad is not supported")
        begin, end = pads[:rank], pads[rank:]
        if mode != "constant" or min(pads) < 0 or (isinstance(i[0], _Traced) and (begin[0] or end[0])):
            raise self.unsupported(node, f"only non-negative constant padding of non-batch dimensions is supported, "
                                         f"got mode={mode!r}, pads={pads}")
        torch_pads = [p for k in reversed(range(rank)) for p in (begin[k], end[k])]
        return self.b.call(F.pad, i[0], torch_pads, "constant", value)

    def spatial(self, node, a, x: Value) -> Tuple[List[int], List[int], List[int], List[int]]:
        """(kernel, strides, symmetric pads, dilations) of a conv or pool, refusing what torch lacks."""
        dims = len(self.shape_of(x)) - 2
        kernel = list(a.get("kernel_shape", []))
        pads = list(a.get("pads", [0] * 2 * dims))
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise self.unsupported(node, f"auto_pad={a['auto_pad']!r} is not supported; export with explicit pads")
        if pads[:dims] != pads[dims:]:
            raise self.unsupported(node, f"asymmetric pads {pads} are not supported")
        return kernel, list(a.get("strides", [1] * dims)), pads[:dims], list(a.get("dilations", [1] * dims))

    def op_Conv(self, node, i, a):
        x = self.traced(node, i[0])
        W = self.const(node, i[1], "weight").to(torch.float32)
        bias = self.const(node, i[2], "bias").to(torch.float32) if len(i) > 2 and i[2] is not None else None
        dims = W.dim() - 2
        if dims not in (1, 2):
            raise self.unsupported(node, f"only 1-d and 2-d convolutions are supported, got a {dims}-d one")
        a.setdefault("kernel_shape", list(W.shape[2:]))
        kernel, strides, pads, dilations = self.spatial(node, a, x)
        group = a.get("group", 1)
        layer = (nn.Conv1d if dims == 1 else nn.Conv2d)(W.shape[1] * group, W.shape[0], kernel, stride=strides,
                                                        padding=pads, dilation=dilations, groups=group,
                                                        bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(W)
            if bias is not None:
                layer.bias.copy_(bias)
        return self.b.module("conv", layer, x)

    def op_ConvTranspose(self, node, i, a):
        x = self.traced(node, i[0])
        W = self.const(node, i[1], "weight").to(torch.float32)
        bias = self.const(node, i[2], "bias").to(torch.float32) if len(i) > 2 and i[2] is not None else None
        if W.dim() != 4 or "output_shape" in a:
            raise self.unsupported(node, "only 2-d ConvTranspose without output_shape is supported")
        a.setdefault("kernel_shape", list(W.shape[2:]))
        _, strides, pads, dilations = self.spatial(node, a, x)
        return self.b.call(F.conv_transpose2d, x, W, bias, stride=strides, padding=pads,
                           output_padding=list(a.get("output_padding", [0, 0])), groups=a.get("group", 1),
                           dilation=dilations)

    def op_MaxPool(self, node, i, a):
        x = self.traced(node, i[0])
        kernel, strides, pads, dilations = self.spatial(node, a, x)
        if len(kernel) != 2 or a.get("storage_order", 0) or len(node.output) > 1:
            raise self.unsupported(node, "only 2-d MaxPool without indices is supported")
        return self.b.module("maxpool", nn.MaxPool2d(kernel, strides, pads, dilations,
                                                     ceil_mode=bool(a.get("ceil_mode", 0))), x)

    def op_AveragePool(self, node, i, a):
        x = self.traced(node, i[0])
        kernel, strides, pads, dilations = self.spatial(node, a, x)
        if len(kernel) != 2 or any(d != 1 for d in dilations):
            raise self.unsupported(node, "only 2-d AveragePool without dilation is supported")
        return self.b.module("avgpool", nn.AvgPool2d(kernel, strides, pads, ceil_mode=bool(a.get("ceil_mode", 0)),
                                                     count_include_pad=bool(a.get("count_include_pad", 0))), x)

    def op_GlobalAveragePool(self, node, i, a):
        x = self.traced(node, i[0])
        if len(self.shape_of(x)) != 4:
            raise self.unsupported(node, "only 4-d (B, C, H, W) inputs are supported")
        return self.b.module("avgpool", nn.AdaptiveAvgPool2d(1), x)

    def op_BatchNormalization(self, node, i, a):
        x = self.traced(node, i[0])
        scale, bias, mean, var = (self.const(node, v, name).to(torch.float32)
                                  for v, name in zip(i[1:5], ("scale", "B", "mean", "var")))
        rank = len(self.shape_of(x))
        if rank not in (2, 3, 4) or a.get("training_mode", 0):
            raise self.unsupported(node, "only inference-mode BatchNormalization of 2-d, 3-d or 4-d inputs is "
                                         "supported")
        layer = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(scale.numel(), eps=a.get("epsilon", 1e-5))
        with torch.no_grad():
            layer.weight.copy_(scale)
            layer.bias.copy_(bias)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        return self.b.module("batchnorm", layer.eval(), x)

    def op_Slice(self, node, i, a):
        x = i[0]
        starts, ends = (self.const(node, v, n).tolist() for v, n in zip(i[1:3], ("starts", "ends")))
        rank = len(self.shape_of(x))
        axes = self.const(node, i[3], "axes").tolist() if len(i) > 3 and i[3] is not None else list(range(len(starts)))
        steps = self.const(node, i[4], "steps").tolist() if len(i) > 4 and i[4] is not None else [1] * len(starts)
        index: List[Any] = [slice(None)] * rank
        for s, e, ax, st in zip(starts, ends, axes, steps):
            index[self.axis(node, x, ax)] = slice(s, e, st)
        if not isinstance(x, _Traced):      # numpy clamps out-of-range bounds and takes negative steps as ONNX does
            return torch.from_numpy(x.numpy()[tuple(index)].copy())
        if any(st <= 0 for st in steps):
            raise self.unsupported(node, f"steps {steps} are not supported (only positive ones)")
        size = self.shape_of(x)
        index = [slice(max(-n, min(k.start, n)), max(-n, min(k.stop, n)), k.step) if k.step else k
                 for k, n in zip(index, size)]
        return self.b.call(operator.getitem, x, tuple(index))

    def op_Gather(self, node, i, a):
        x, idx = i
        idx = self.const(node, idx, "indices").to(torch.int64)
        axis = self.axis(node, x, a.get("axis", 0))
        index: List[Any] = [slice(None)] * axis + [idx.item() if idx.dim() == 0 else idx]
        if isinstance(x, _Traced) and idx.dim() > 1:
            raise self.unsupported(node, "only scalar or 1-d indices are supported")
        return self.b.call(operator.getitem, x, tuple(index))

    # Ops on constants only (shape arithmetic of older exports).
    def constant_only(self, node, i, fn):
        return fn(*[self.const(node, v, "input") if v is not None else None for v in i])

    def op_ConstantOfShape(self, node, i, a):
        value = a.get("value", torch.zeros(1))
        return self.constant_only(node, i, lambda s: torch.full(tuple(s.tolist()), value.item(), dtype=value.dtype))

    def op_Range(self, node, i, a):
        return self.constant_only(node, i, lambda s, e, d: torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype))

    def op_Equal(self, node, i, a):
        return self.constant_only(node, i, torch.eq)

    def op_Where(self, node, i, a):
        return self.constant_only(node, i, torch.where)

    def op_Expand(self, node, i, a):
        return self.constant_only(node, i, lambda x, s: x * torch.ones(tuple(s.tolist()), dtype=x.dtype))

    def op_Sqrt(self, node, i, a):
        return self.constant_only(node, i, torch.sqrt)

    def op_Pow(self, node, i, a):
        return self.constant_only(node, i, torch.pow)

    def op_Min(self, node, i, a):
        return self.constant_only(node, i, lambda *v: torch.stack(torch.broadcast_tensors(*v)).amin(0))

    def op_Max(self, node, i, a):
        return self.constant_only(node, i, lambda *v: torch.stack(torch.broadcast_tensors(*v)).amax(0))

    def op_ReduceProd(self, node, i, a):
        return self.constant_only(node, i, lambda x, *_: x.prod().reshape((1,) * x.dim() if a.get("keepdims", 1)
                                                                            else ()))


def _read(source: Union[str, Path, bytes, Any], where: str):
    import onnx
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        try:
            raw = path.read_bytes()
            # VNN-COMP's benchmark repositories ship networks gzip-compressed (.onnx.gz)
            return onnx.load_from_string(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        except Exception as err:   # protobuf's DecodeError, a truncated gzip stream: a damaged file
            raise OnnxModelError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    if isinstance(source, bytes):
        try:
            return onnx.load_from_string(source)
        except Exception as err:
            raise OnnxModelError(f"{where}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    return source


def load_onnx(source: Union[str, Path, bytes, Any], *, check_batch: bool = True) -> fx.GraphModule:
    """An ONNX network as an eval-mode ``torch.fx.GraphModule`` of the ops pyibp can bound.

    Args:
        source: a path to a ``.onnx`` (or gzip-compressed ``.onnx.gz``) file, its bytes, or an
            ``onnx.ModelProto``.
        check_batch: run a batch of two random inputs and require each example's output to equal
            its batch-1 output (a network that mixes examples across the batch is refused).
    Returns:
        A float32 module taking ``(B, *input_shape[1:])`` and returning ``(B, *output_shape[1:])``;
        ``module.onnx_input_shape`` and ``module.onnx_output_shape`` hold the ONNX shapes (batch 1).
    Raises:
        FileNotFoundError (no such file), OnnxModelError (a damaged file, not one float input and
        one output), TypeError (an unsupported node, named by op type and name).
    Example:
        >>> net = load_onnx("mnist-net_256x2.onnx")
        >>> net(torch.rand(5, 1, 28, 28)).shape
        torch.Size([5, 10])
    """
    where = str(source) if isinstance(source, (str, Path)) else "<onnx model>"
    from onnx import numpy_helper
    proto = _read(source, where)
    g = proto.graph
    consts: Dict[str, Value] = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in g.initializer}
    inputs = [v for v in g.input if v.name not in consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise OnnxModelError(f"{where}: pyibp verifies networks with one input and one output, got inputs "
                             f"{[v.name for v in inputs]} and outputs {[v.name for v in g.output]}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    if not shape or shape[0] != 1:
        raise OnnxModelError(f"{where}: the input {inputs[0].name!r} has shape {shape}; pyibp needs a leading batch "
                             "dimension of size 1 (or a symbolic one)")
    conv = _Converter(where)
    example = torch.rand(shape)
    env: Dict[str, Value] = dict(consts)
    env[inputs[0].name] = _Traced(conv.b.graph.placeholder("x"), example)
    for node in g.node:
        args = []
        for name in node.input:
            if name == "":
                args.append(None)
            elif name not in env:
                raise OnnxModelError(f"{where}: node {node.name!r} ({node.op_type}) reads {name!r}, which no earlier "
                                     "node computes (the graph is not in topological order)")
            else:
                args.append(env[name])
        outputs = conv.run(node, args)
        for name, value in zip(node.output, outputs):
            env[name] = value
    result = env.get(g.output[0].name)
    if not isinstance(result, _Traced):
        raise OnnxModelError(f"{where}: the output {g.output[0].name!r} does not depend on the input")
    conv.b.graph.output(result.node)
    module = fx.GraphModule(conv.b.root, conv.b.graph, class_name="OnnxNetwork").eval()
    _fold_biases(module)
    module.onnx_input_shape, module.onnx_output_shape = tuple(shape), tuple(result.example.shape)
    if check_batch:
        _check_batch(module, shape, where)
    return module


def _fold_biases(module: fx.GraphModule) -> None:
    """``MatMul`` then ``Add`` of a constant vector (how many exporters write a linear layer) becomes
    one ``nn.Linear`` with that bias: a final layer is then the Linear the bounds fold the
    specification into."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not operator.add or len(node.args) != 2:
            continue
        layer_node, bias_node = node.args
        if not (isinstance(layer_node, fx.Node) and layer_node.op == "call_module" and len(layer_node.users) == 1
                and isinstance(bias_node, fx.Node) and bias_node.op == "get_attr"):
            continue
        layer, bias = module.get_submodule(layer_node.target), getattr(module, bias_node.target)
        if not isinstance(layer, nn.Linear) or layer.bias is not None or bias.shape[-1:] != (layer.out_features,) \
                or bias.numel() != layer.out_features:
            continue
        layer.bias = nn.Parameter(bias.reshape(-1).to(layer.weight.dtype).clone())
        node.replace_all_uses_with(layer_node)
        graph.erase_node(node)
        if not bias_node.users:
            graph.erase_node(bias_node)
            delattr(module, bias_node.target)
    module.recompile()


def _check_batch(module: fx.GraphModule, shape: List[int], where: str) -> None:
    with torch.no_grad():
        x = torch.rand(2, *shape[1:])
        together = module(x)
        alone = torch.cat([module(x[k:k + 1]) for k in range(2)])
    if together.shape != alone.shape or not torch.allclose(together, alone, rtol=1e-4, atol=1e-5):
        raise OnnxModelError(f"{where}: the converted network mixes the examples of a batch (its outputs for a "
                             "batch of 2 differ from those of each example alone); pyibp cannot verify it")
