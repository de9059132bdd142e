"""ONNX -> fx conversion (pyibp.verifier.onnx): every op against onnxruntime on random inputs, the
shapes of VNN-COMP networks, and the converted models bounded by pyibp."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pyibp import interval_bounds  # noqa: E402
from pyibp.verifier import OnnxModelError, load_onnx  # noqa: E402


def model_bytes(nodes, input_shape, output_shape, initializers=(), opset=13) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.int64 if np.asarray(v).dtype.kind == "i" else np.float32),
                                 name) for name, v in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def exported(module: nn.Module, shape, opset: int = 13) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.rand(shape), buffer, dynamo=False, opset_version=opset)
    return buffer.getvalue()


def assert_matches_onnxruntime(data: bytes, batch: int = 3):
    """The converted model equals onnxruntime on random batch-1 inputs, and runs batched."""
    net = load_onnx(data)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = torch.rand(batch, *net.onnx_input_shape[1:]) * 2 - 1
    with torch.no_grad():
        ours = net(x)
    for k in range(batch):
        ref = session.run(None, {name: x[k:k + 1].numpy()})[0]
        np.testing.assert_allclose(ours[k:k + 1].numpy(), ref, rtol=1e-5, atol=1e-5)
    return net


rng = np.random.default_rng(0)
W = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731

# (name, nodes, input shape, output shape, initializers): one or two ops each, built with onnx.helper.
OPS = [
    ("gemm", [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0)], [1, 6], [1, 4],
     [("w", W(4, 6)), ("b", W(4))]),
    ("matmul+add", [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
     [1, 1, 1, 5], [1, 1, 1, 3], [("w", W(5, 3)), ("b", W(3))]),
    ("sub/div normalisation", [helper.make_node("Sub", ["x", "m"], ["h"]), helper.make_node("Div", ["h", "s"], ["y"])],
     [1, 3, 4, 4], [1, 3, 4, 4], [("m", W(1, 3, 1, 1)), ("s", np.abs(W(1, 3, 1, 1)) + 0.1)]),
    ("mul, const - x, neg", [helper.make_node("Mul", ["x", "m"], ["h"]), helper.make_node("Sub", ["m", "h"], ["g"]),
                             helper.make_node("Neg", ["g"], ["y"])], [1, 4], [1, 4], [("m", W(4))]),
    ("add two branches", [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]),
                          helper.make_node("Tanh", ["b"], ["c"]), helper.make_node("Add", ["a", "c"], ["y"])],
     [1, 5], [1, 5], []),
    ("leaky relu", [helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2)], [1, 5], [1, 5], []),
    ("conv pads strides group", [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2],
                                                  group=2)], [1, 4, 7, 7], [1, 6, 4, 4],
     [("w", W(6, 2, 3, 3)), ("b", W(6))]),
    ("conv1d", [helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2])], [1, 2, 9], [1, 3, 5], [("w", W(3, 2, 3))]),
    ("conv asymmetric pads via pad", [helper.make_node("Pad", ["x", "p"], ["h"], mode="constant"),
                                      helper.make_node("Conv", ["h", "w"], ["y"])], [1, 1, 5, 5], [1, 2, 4, 4],
     [("p", np.array([0, 0, 1, 0, 0, 0, 0, 1])), ("w", W(2, 1, 3, 3))]),
    ("conv transpose", [helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                                         output_padding=[1, 1])], [1, 2, 4, 4], [1, 3, 8, 8], [("w", W(2, 3, 3, 3))]),
    ("maxpool", [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
     [1, 2, 6, 6], [1, 2, 3, 3], []),
    ("averagepool", [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
     [1, 2, 6, 6], [1, 2, 3, 3], []),
    ("averagepool padded", [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
     [1, 2, 4, 4], [1, 2, 4, 4], []),
    ("global averagepool", [helper.make_node("GlobalAveragePool", ["x"], ["y"])], [1, 3, 5, 5], [1, 3, 1, 1], []),
    ("batchnorm", [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)],
     [1, 3, 4, 4], [1, 3, 4, 4], [("s", W(3)), ("b", W(3)), ("m", W(3)), ("v", np.abs(W(3)) + 0.5)]),
    ("batchnorm 2d input", [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
     [1, 3], [1, 3], [("s", W(3)), ("b", W(3)), ("m", W(3)), ("v", np.abs(W(3)) + 0.5)]),
    ("flatten", [helper.make_node("Flatten", ["x"], ["y"])], [1, 2, 3, 4], [1, 24], []),
    ("reshape 0 and -1", [helper.make_node("Reshape", ["x", "s"], ["y"])], [1, 2, 3, 4], [1, 2, 12],
     [("s", np.array([0, 2, -1]))]),
    ("reshape constant batch 1", [helper.make_node("Reshape", ["x", "s"], ["y"])], [1, 784, 1], [1, 784],
     [("s", np.array([1, 784]))]),
    ("transpose", [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], [1, 2, 3, 4], [1, 3, 4, 2], []),
    ("squeeze unsqueeze", [helper.make_node("Squeeze", ["x", "a"], ["h"]), helper.make_node("Unsqueeze", ["h", "b"],
                                                                                            ["y"])],
     [1, 4, 1, 3], [1, 4, 3, 1], [("a", np.array([2])), ("b", np.array([-1]))]),
    ("concat", [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Concat", ["x", "a"], ["y"], axis=1)],
     [1, 2, 3], [1, 4, 3], []),
    ("slice gather", [helper.make_node("Slice", ["x", "st", "en", "ax"], ["h"]),
                      helper.make_node("Gather", ["h", "i"], ["y"], axis=2)], [1, 3, 6], [1, 2],
     [("st", np.array([1])), ("en", np.array([100])), ("ax", np.array([1])), ("i", np.array(4))]),
    ("constant, identity, dropout, cast", [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(W(4), "c")),
        helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Dropout", ["a"], ["b"]),
        helper.make_node("Cast", ["b"], ["e"], to=TensorProto.FLOAT), helper.make_node("Add", ["e", "c"], ["y"])],
     [1, 4], [1, 4], []),
    ("shape/gather/unsqueeze/concat reshape chain", [
        helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]), helper.make_node("Concat", ["n1", "minus"], ["t"], axis=0),
        helper.make_node("Cast", ["t"], ["t64"], to=TensorProto.INT64), helper.make_node("Reshape", ["x", "t64"],
                                                                                        ["y"])],
     [1, 2, 3, 3], [1, 18], [("zero", np.array(0)), ("ax", np.array([0])), ("minus", np.array([-1]))]),
]


@pytest.mark.parametrize("name,nodes,shape,out_shape,inits", OPS, ids=[o[0] for o in OPS])
def test_op_matches_onnxruntime(name, nodes, shape, out_shape, inits):
    assert_matches_onnxruntime(model_bytes(nodes, shape, out_shape, inits))


class NormalisedCNN(nn.Module):
    """cifar2020/oval21-like: input normalisation, conv, BatchNorm, pooling, a residual add, linear layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2)
        self.fc1, self.fc2 = nn.Linear(4 * 4 * 4, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = (x - torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.2, 0.26]).view(1, 3, 1, 1)
        h = F.relu(self.bn(self.c1(x)))
        h = F.max_pool2d(h + F.relu(self.c2(h)), 2)
        h = F.avg_pool2d(h, 2)
        return self.fc2(F.relu(self.fc1(h.view(h.size(0), -1))))


VNNCOMP_SHAPES = [
    ("mnist_fc 784x1", nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)), (1, 784, 1)),
    ("mnist_fc image", nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)), (1, 1, 28, 28)),
    ("cifar2020-like", NormalisedCNN(), (1, 3, 16, 16)),
    ("acasxu-like", nn.Sequential(nn.Flatten(), nn.Linear(5, 50), nn.ReLU(), nn.Linear(50, 5)), (1, 1, 1, 5)),
]


@pytest.mark.parametrize("name,module,shape", VNNCOMP_SHAPES, ids=[v[0] for v in VNNCOMP_SHAPES])
def test_exported_networks_convert_and_bound(name, module, shape):
    net = assert_matches_onnxruntime(exported(module, shape))
    x = torch.rand(2, *shape[1:])
    lb, ub = interval_bounds(net, x, 0.01)
    with torch.no_grad():
        inside = net((x + 0.01 * (2 * torch.rand(64, *x.shape) - 1)).clamp(0, 1).flatten(0, 1)).view(64, 2, -1)
    assert bool((lb <= inside + 1e-4).all() and (inside <= ub + 1e-4).all())


def test_legacy_opset_reshape_chain():
    """Older exports (opset 9) compute the flatten shape with Shape/Gather/Unsqueeze/Concat."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            h = F.relu(self.conv(x))
            return self.fc(h.view(h.size(0), -1))

    data = exported(Net(), (1, 1, 6, 6), opset=9)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert "Reshape" in ops
    assert_matches_onnxruntime(data)


def test_unsupported_node_is_named():
    data = model_bytes([helper.make_node("Softmax", ["x"], ["y"], name="probabilities")], [1, 4], [1, 4])
    with pytest.raises(TypeError, match=r"'probabilities' of op type Softmax"):
        load_onnx(data)


def test_reshape_mixing_the_batch_is_refused():
    data = model_bytes([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")], [1, 4], [2, 2],
                       [("s", np.array([2, 2]))])
    with pytest.raises(TypeError, match="moves the batch dimension"):
        load_onnx(data)


def test_damaged_and_missing_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf" * 3)
    with pytest.raises(OnnxModelError, match="bad.onnx"):
        load_onnx(bad)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_onnx(tmp_path / "missing.onnx")
    two_inputs = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("x", "z")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]))
    with pytest.raises(OnnxModelError, match="one input"):
        load_onnx(two_inputs)


def test_matmul_add_becomes_one_linear_with_bias():
    data = model_bytes([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                       [1, 5], [1, 3], [("w", W(5, 3)), ("b", W(1, 3))])
    net = assert_matches_onnxruntime(data)
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 1 and layers[0].bias is not None
    assert [n.op for n in net.graph.nodes] == ["placeholder", "call_module", "output"]
