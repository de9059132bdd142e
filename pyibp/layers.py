"""Which layers pyibp can bound, and the checks that say so before any work is done."""
from __future__ import annotations

from typing import List

from torch import nn

from .distributed import unwrap
from .nn import Normalize, Residual

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d,
                    nn.AvgPool2d, nn.MaxPool2d, nn.Dropout, nn.Identity, Normalize, Residual)
_SUPPORTED_NAMES = ", ".join(c.__name__ for c in SUPPORTED_LAYERS) + " and nested nn.Sequential"


def flatten_layers(model: nn.Module) -> List[nn.Module]:
    """The leaf layers of a (possibly nested) nn.Sequential, in order, checked for support.

    Raises:
        TypeError: a layer pyibp cannot bound, named with its index in the flattened model.
            A DistributedDataParallel wrapper is looked through.
        ValueError: a supported layer in a state that has no sound bound (BatchNorm in training
            mode or without running statistics, a non-zero padding mode).

    Example:
        >>> flatten_layers(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU())))
        [Linear(in_features=2, out_features=2, bias=True), ReLU()]
    """
    model = unwrap(model)
    if not isinstance(model, nn.Sequential) and not isinstance(model, SUPPORTED_LAYERS):
        raise TypeError(f"pyibp bounds nn.Sequential models; got {type(model).__name__}. "
                        f"Supported layers: {_SUPPORTED_NAMES}")
    layers: List[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            for child in module:
                visit(child)
        else:
            layers.append(module)

    visit(model)
    for index, layer in enumerate(layers):
        _check_layer(index, layer)
    return layers


def _check_layer(index: int, layer: nn.Module) -> None:
    name = f"layer {index} ({type(layer).__name__})"
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise TypeError(f"{name} is not supported by pyibp bounds. Supported: {_SUPPORTED_NAMES}")
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if layer.training:
            raise ValueError(f"{name} is in training mode, where it normalises by batch statistics and "
                             "has no fixed per-channel affine map to bound; call model.eval() first")
        if layer.running_mean is None:
            raise ValueError(f"{name} has track_running_stats=False, so it has no fixed affine map "
                             "to bound; use track_running_stats=True")
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise TypeError(f"{name} has padding_mode={layer.padding_mode!r}; only 'zeros' is supported")
        conv_padding(index, layer)
    if isinstance(layer, Residual):
        for branch in ("body", "shortcut"):
            try:
                flatten_layers(getattr(layer, branch))
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name}, branch {branch}: {err}") from None
    if isinstance(layer, nn.MaxPool2d) and layer.return_indices:
        raise TypeError(f"{name} has return_indices=True; only plain max pooling is supported")


def conv_padding(index: int, layer: nn.Conv2d) -> List[int]:
    """The symmetric integer padding of a Conv2d, resolving the string forms 'valid' and 'same'."""
    if not isinstance(layer.padding, str):
        return list(layer.padding)
    if layer.padding == "valid":
        return [0, 0]
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    if any(t % 2 for t in total):
        raise TypeError(f"layer {index} (Conv2d) uses padding='same' with an even kernel extent, which "
                        "pads asymmetrically; use an odd kernel size or explicit integer padding")
    return [t // 2 for t in total]


def batchnorm_scale_shift(layer: nn.modules.batchnorm._BatchNorm):
    """BatchNorm in eval mode as ``x * scale + shift`` per channel."""
    scale = (layer.running_var + layer.eps).rsqrt()
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -layer.running_mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    return scale, shift
