"""Exact references for the sound-mode tests: small networks evaluated in rational arithmetic.

Every weight and input is a float, so ``fractions.Fraction`` evaluates the network exactly; the
sound bounds must contain every exact value. Also the networks built to break round-to-nearest.
"""
import itertools
from fractions import Fraction

import torch
from torch import nn

from pyibp.nn import Normalize


def fractions(t: torch.Tensor):
    return [Fraction(v) for v in t.double().flatten().tolist()]


def _dense_conv(layer: nn.Conv2d, shape):
    """The convolution as an exact (out, in) matrix: each entry is one weight or 0 (float64 exact)."""
    n = shape[0] * shape[1] * shape[2]
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    w = layer.weight.detach().double()
    out = nn.functional.conv2d(basis, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return out.flatten(1).t(), tuple(out.shape[1:])


def exact_forward(model: nn.Sequential, x: list, shape=None) -> list:
    """The model on one input (a flat list of Fractions; ``shape`` (C, H, W) for convolutions),
    in exact rational arithmetic. Layers: Normalize (one channel), Linear, Conv2d, ReLU, Flatten."""
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            if isinstance(layer, nn.Conv2d):
                w, shape = _dense_conv(layer, shape)
                per = shape[1] * shape[2]
                bias = ([Fraction(float(b)) for b in layer.bias.detach().double() for _ in range(per)]
                        if layer.bias is not None else [Fraction(0)] * w.shape[0])
            else:
                w = layer.weight.detach().double()
                bias = fractions(layer.bias.detach()) if layer.bias is not None else [Fraction(0)] * w.shape[0]
            rows = [fractions(r) for r in w]
            x = [sum((wi * xi for wi, xi in zip(r, x) if wi), Fraction(0)) + bi for r, bi in zip(rows, bias)]
        elif isinstance(layer, nn.ReLU):
            x = [max(v, Fraction(0)) for v in x]
        elif isinstance(layer, Normalize):        # one channel
            mean, std = Fraction(float(layer.mean[0])), Fraction(float(layer.std[0]))
            x = [(v - mean) / std for v in x]
        elif isinstance(layer, nn.Flatten):
            pass
        else:
            raise TypeError(layer)
    return x


def contains(lb, ub, values) -> bool:
    return all(Fraction(float(l)) <= v <= Fraction(float(u)) for l, u, v in zip(lb.tolist(), ub.tolist(), values))


def vertices(x: torch.Tensor, eps: float, count: int, gen: torch.Generator):
    """Up to ``count`` vertices of the box x ± eps ∩ [0, 1] (all of them for few inputs), exact."""
    lo = [max(Fraction(v) - Fraction(eps), Fraction(0)) for v in x.flatten().tolist()]
    hi = [min(Fraction(v) + Fraction(eps), Fraction(1)) for v in x.flatten().tolist()]
    if len(lo) <= 6:
        return [list(c) for c in itertools.product(*zip(lo, hi))]
    picks = torch.randint(0, 2, (count, len(lo)), generator=gen).tolist()
    return [[h if p else l for l, h, p in zip(lo, hi, row)] for row in picks]


def tiny(seed: int, n_in: int, hidden: int, n_out: int, normalize: bool) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = ([Normalize([0.3], [0.7])] if normalize else []) + [
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers).eval()


def cancelling(seed: int, n: int = 64) -> nn.Sequential:
    """Large weights of opposite sign that cancel, and a small one whose contribution the float sum loses."""
    g = torch.Generator().manual_seed(seed)
    big = 2.0 ** 20 * (1 + torch.rand(n // 2, generator=g))
    w1 = torch.stack([big, -big], 1).flatten()[None] + torch.rand(1, n, generator=g) * 1e-3
    model = nn.Sequential(nn.Linear(n, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[0].bias.fill_(1 / 3)
        model[2].weight.copy_(torch.tensor([[1.0], [-1.0]]) * (1 + 2.0 ** -23))
        model[2].bias.zero_()
    return model.eval()


def long_sum(seed: int, n: int = 4096) -> nn.Sequential:
    """One large term and thousands of tiny ones: the tiny ones vanish one by one in a float sum."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(1 + torch.rand(3, n, generator=g) * 2.0 ** -20)
        model[0].bias.copy_(torch.tensor([2.0 ** 10, -0.1, 0.7]))
        model[2].weight.copy_(torch.randn(2, 3, generator=g))
    return model.eval()


def rounding_cases(build):
    """``(model, x, generator)`` for seeds 0-2 of a network built to break rounding (cancelling,
    long_sum), with inputs that trigger it; the generator continues the seed's stream."""
    for seed in range(3):
        model = build(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(2, model[0].in_features, generator=g) * 0.5 + 0.25
        if build is long_sum:
            x[:, 1:] *= 2.0 ** -12       # tiny terms after one large one
        yield model, x, g
