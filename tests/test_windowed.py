"""The windowed forward pass of Square's l∞ queries: the logits of the full forward pass, for every
window position and size, through padding, strides, dilation, pooling and BatchNorm; the cache it
keeps equals a fresh full pass after any sequence of accepted queries; Square gives the same
perturbations with it as without it; models it does not apply to are recognised."""
import importlib

import pytest
import torch
from torch import nn

import pyibp
from pyibp.attacks.windowed import WindowedForward
from pyibp.models import tutorial_cnn
from pyibp.nn import Normalize

square_module = importlib.import_module("pyibp.attacks.square")


def _odd_net():
    return nn.Sequential(nn.Hardtanh(0.1, 0.8, inplace=True), Normalize([0.5, 0.4], [0.2, 0.3]), nn.Conv2d(2, 4, 3, stride=3),
                         nn.ReLU(inplace=True),
                         nn.MaxPool2d(2, padding=1), nn.Conv2d(4, 5, 2, stride=2, dilation=2), nn.Tanh(),
                         nn.AvgPool2d(3, stride=1, padding=1), nn.BatchNorm2d(5),
                         nn.Sequential(nn.Conv2d(5, 3, (3, 1), padding=(2, 0), groups=1), nn.ReLU()),
                         nn.Flatten(), nn.LazyLinear(7))


@pytest.mark.parametrize("build,channels", [(tutorial_cnn, 1), (_odd_net, 2)])
def test_windowed_logits_and_cache_match_the_full_forward(build, channels):
    torch.manual_seed(0)
    model = build()
    x = torch.rand(6, channels, 28, 28)
    model(x)                                          # materialises LazyLinear
    model.eval()
    if isinstance(model[8], nn.BatchNorm2d):
        model[8].running_mean.uniform_(-1, 1), model[8].running_var.uniform_(0.5, 2)
    forward = WindowedForward.of(model)
    assert forward is not None
    with torch.no_grad():
        given = x.clone()
        logits, cache = forward.start(x)
        assert torch.equal(x, given)                  # in-place activations do not write the caller's tensors
        torch.testing.assert_close(logits, model(x.clone()), rtol=0, atol=0)
        for rows in (torch.arange(6), torch.tensor([0, 2, 3])):
            for s in (1, 2, 3, 7, 25, 28):
                for top, left in ((0, 0), (28 - s, 28 - s), (5, 11), (13, 0)):
                    if top + s > 28 or left + s > 28:
                        continue
                    values = torch.rand(rows.numel(), channels, s, s)
                    given = values.clone()
                    out, patches = forward.query(cache, rows, values, (top, top + s, left, left + s))
                    assert torch.equal(values, given)
                    changed = x[rows].clone()
                    changed[:, :, top:top + s, left:left + s] = values
                    torch.testing.assert_close(out, model(changed.clone()), rtol=1e-6, atol=1e-6)
                    keep = torch.rand(rows.numel()) < 0.5
                    forward.commit(cache, rows, keep, patches)
                    x[rows[keep], :, top:top + s, left:left + s] = values[keep]
                    for kept, fresh in zip(cache, forward.start(x.clone())[1]):
                        torch.testing.assert_close(kept, fresh, rtol=1e-6, atol=1e-6)


def test_models_it_does_not_apply_to():
    conv = nn.Conv2d(1, 2, 3)
    assert WindowedForward.of(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()) is None
    assert WindowedForward.of(nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).train()) is None
    assert WindowedForward.of(nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect"), nn.Flatten(),
                                            nn.Linear(1352, 3)).eval()) is None
    assert WindowedForward.of(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()) is None   # nothing after
    assert WindowedForward.of(pyibp.nn.Residual(nn.Conv2d(1, 1, 3, padding=1)).eval()) is None


def test_square_finds_the_same_perturbations_with_and_without_it(monkeypatch):
    torch.manual_seed(0)
    model = tutorial_cnn().eval()
    with torch.no_grad():
        model[-1].weight.mul_(30), model[-1].bias.zero_(), model[-3].bias.zero_()   # fragile: some break
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    run = lambda: pyibp.square(model, x, y, 0.3, n_queries=120, generator=torch.Generator().manual_seed(1))  # noqa: E731
    windowed = run()
    monkeypatch.setattr(square_module.WindowedForward, "of", staticmethod(lambda *args, **kwargs: None))
    full = run()
    torch.testing.assert_close(windowed, full, rtol=0, atol=0)
    with torch.no_grad():
        assert (model(x + full).argmax(1) != y).any()     # the check has broken examples to compare
