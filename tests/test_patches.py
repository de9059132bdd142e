"""CROWN's intermediate bounds with patches (pyibp.bounds.patches): equal to the dense backward passes
neuron by neuron and in the final margins (float64), through strides, paddings, BatchNorm, scalar
affine maps and the hand-over to the dense walker; sound at sampled points."""
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

import pyibp
import pyibp.bounds.coefficients as coefficients
import pyibp.bounds.intermediate as intermediate
from pyibp.bounds.crown import _ChannelsLastBackend, _crown_bound
from pyibp.bounds.graph import bound_graph
from pyibp.bounds.intermediate import crown_trace
from pyibp.bounds.patches import patch_neuron_bounds
from pyibp.nn import Normalize
from pyibp.testing import random_model, randomize_batchnorm, sample_box


class _Shift(nn.Module):
    """An elementwise map with scalar constants (node kind "const_affine")."""

    def forward(self, x):
        return 0.5 * x - 0.25


def _conv_stack(spec: List[Tuple[int, int, int, int]], in_channels: int, size: int, batchnorm: bool,
                extra: Dict[int, nn.Module] = None, seed: int = 0) -> nn.Sequential:
    """Conv(c_out, kernel, stride, padding) + [BatchNorm] + ReLU per entry of ``spec`` (``extra[k]``
    inserted after block k), then Flatten and Linear(., 4); float64, eval, random BatchNorm statistics."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = [Normalize([0.4] * in_channels, [0.3] * in_channels)] if batchnorm else []
    channels = in_channels
    for k, (c_out, kernel, stride, padding) in enumerate(spec):
        layers.append(nn.Conv2d(channels, c_out, kernel, stride=stride, padding=padding))
        layers += [nn.BatchNorm2d(c_out)] if batchnorm else []
        layers.append(nn.ReLU())
        layers += [extra[k]] if extra and k in extra else []
        channels = c_out
    body = nn.Sequential(*layers, nn.Flatten())
    features = body(torch.zeros(1, in_channels, size, size)).shape[1]
    model = nn.Sequential(*body, nn.Linear(features, 4))
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed)).double().eval()


# (model, input shape): strides and paddings that leave rows and columns out at the borders, odd sizes
_STRIDES = [(4, 3, 2, 1), (5, 4, 1, 2), (3, 3, 2, 0), (4, 2, 1, 1)]
_MODELS = {
    "strides": lambda: (_conv_stack(_STRIDES, 2, 11, False), (2, 11, 11)),
    "strides-batchnorm": lambda: (_conv_stack(_STRIDES, 2, 11, True, seed=1), (2, 11, 11)),
    "wide-kernels": lambda: (_conv_stack([(3, 5, 1, 2), (4, 3, 3, 1), (3, 2, 1, 0)], 1, 13, True, seed=2), (1, 13, 13)),
    # a scalar affine map on the way; a MaxPool where the patches turn dense
    "pool-shift": lambda: (_conv_stack([(3, 3, 1, 1), (4, 3, 1, 1), (4, 3, 1, 1), (3, 3, 1, 1)], 2, 8, False,
                                       {0: _Shift(), 1: nn.MaxPool2d(2)}, seed=3), (2, 8, 8)),
    # patches that outgrow a 4x4 image before the input
    "tiny-image": lambda: (_conv_stack([(3, 3, 1, 1)] * 3, 2, 4, True, seed=4), (2, 4, 4)),
}


def _box(x: torch.Tensor, eps: float):
    backend = _ChannelsLastBackend()
    return backend, backend.start(x, torch.tensor(eps, dtype=x.dtype), 0.0, 1.0)


def _dense(monkeypatch):
    monkeypatch.setattr(intermediate, "patch_neuron_bounds", lambda *args, **kwargs: None)


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_patch_bounds_equal_dense_bounds_of_every_neuron(name, monkeypatch):
    model, shape = _MODELS[name]()
    x = torch.rand((3,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    graph = bound_graph(model)
    backend, box = _box(x, 0.08)
    neuron_bounds, patch_bounds = intermediate._neuron_bounds, intermediate.patch_neuron_bounds
    compared, used = [], []

    def both(graph, trace, node, index, box, dtype):
        bounds = neuron_bounds(graph, trace, node, index, box, dtype)
        with monkeypatch.context() as m:
            _dense(m)
            dense = neuron_bounds(graph, trace, node, index, box, dtype)
        compared.append(index.numel())
        torch.testing.assert_close(bounds, dense, rtol=0, atol=1e-9)
        return bounds

    def patches(*args):
        out = patch_bounds(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(intermediate, "_neuron_bounds", both)
    monkeypatch.setattr(intermediate, "patch_neuron_bounds", patches)
    crown_trace(graph, box, backend, None, len(graph.nodes))
    assert sum(compared) > 0 and any(used)


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_crown_margins_with_patches_equal_dense_ones_and_are_sound(name, monkeypatch):
    model, shape = _MODELS[name]()
    gen = torch.Generator().manual_seed(6)
    x = torch.rand((4,) + shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (4,), generator=gen)
    eps = 0.05
    margins = pyibp.margin_bounds(model, x, y, eps, method="crown")
    with monkeypatch.context() as m:
        _dense(m)
        dense = pyibp.margin_bounds(model, x, y, eps, method="crown")
    torch.testing.assert_close(margins, dense, rtol=0, atol=1e-9)
    points = sample_box(x, torch.tensor(eps, dtype=x.dtype), 64, generator=gen)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(64, 4, -1)
    true = logits.gather(2, y[None, :, None].expand(64, -1, 1)) - logits
    assert bool((margins <= true.min(0).values + 1e-9).all())


@pytest.mark.parametrize("name", ["strides-batchnorm", "pool-shift"])
def test_intermediate_boxes_contain_sampled_pre_activations(name):
    model, shape = _MODELS[name]()
    gen = torch.Generator().manual_seed(7)
    x = torch.rand((2,) + shape, dtype=torch.float64, generator=gen)
    graph = bound_graph(model)
    backend, box = _box(x, 0.1)
    trace, _ = crown_trace(graph, box, backend, None, len(graph.nodes))
    seen: Dict[int, torch.Tensor] = {}
    relus = {node.module: node.index for node in graph.relus()}
    hooks = [m.register_forward_pre_hook(lambda m, inputs: seen.__setitem__(relus[m], inputs[0]))
             for m in relus]
    points = sample_box(x, torch.tensor(0.1, dtype=x.dtype), 64, generator=gen)
    try:
        for point in points:
            with torch.no_grad():
                model(point)
            for i, z in seen.items():
                mu, rad = trace.boxes[i]
                assert bool(((z - mu).abs() <= rad + 1e-9).all()), f"ReLU node {i}"
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("seed", range(6))
def test_random_models_with_patches_match_dense(seed, monkeypatch):
    """Dilations, groups, pools, Linear layers: whatever patches do not carry goes dense, same bounds."""
    model, shape = random_model(seed, in_channels=2, size=9, conv_blocks=3)
    model = model.double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((2,) + shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (2,), generator=gen)
    margins = pyibp.margin_bounds(model, x, y, 0.03, method="crown")
    with monkeypatch.context() as m:
        _dense(m)
        dense = pyibp.margin_bounds(model, x, y, 0.03, method="crown")
    torch.testing.assert_close(margins, dense, rtol=0, atol=1e-9)


def test_patch_bounds_equal_one_hot_dense_passes_with_slopes_and_lagrangian_terms(monkeypatch):
    """The passes from all neurons of the last convolution equal the dense walker's from one-hot rows;
    a ReLU with given slopes (alpha-CROWN) or a node with an added term (beta-CROWN) is walked dense."""
    model, shape = _MODELS["strides-batchnorm"]()
    x = torch.rand((2,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    graph = bound_graph(model)
    backend, box = _box(x, 0.05)
    trace, _ = crown_trace(graph, box, backend, None, len(graph.nodes))
    node = [n for n in graph.nodes if n.kind == "conv"][-1]
    n = trace.shapes[node.index]
    count = torch.Size(n).numel()
    rows = torch.arange(count).repeat(2)
    signs = torch.cat([torch.ones(count), -torch.ones(count)]).double()
    one_hot = torch.zeros(2 * count, count, dtype=torch.float64)
    one_hot[torch.arange(2 * count), rows] = signs
    A = one_hot.view((1, 2 * count) + n).expand(2, -1, -1, -1, -1)
    gen = torch.Generator().manual_seed(9)
    relus = [r.index for r in graph.relus() if r.index < node.index]
    monkeypatch.setattr(coefficients, "_CPU_ROWS_BUDGET", 2**14)        # several chunks of rows
    for change in ("none", "alpha", "extra"):
        if change == "alpha":
            trace.alphas[relus[-1]] = torch.rand((2, 1) + trace.shapes[relus[-1]], generator=gen, dtype=torch.float64)
        if change == "extra":
            trace.alphas.clear()
            trace.extra[relus[0]] = torch.randn((1, 1) + trace.shapes[relus[0]], generator=gen, dtype=torch.float64)
        bounds = patch_neuron_bounds(graph, trace, node, rows, signs, box, None)
        dense = _crown_bound(graph, trace, A, torch.zeros(2, 2 * count, dtype=torch.float64), box, node.index, None)
        torch.testing.assert_close(bounds, dense, rtol=0, atol=1e-9)
