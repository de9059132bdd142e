"""Which layers pyibp can bound, and the checks that say so before any work is done."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, List, Optional, Tuple

from torch import Tensor, nn

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
        stats = _BATCH_STATISTICS.get()
        if layer.running_mean is None and (stats is None or layer not in stats):
            raise ValueError(f"{name} has track_running_stats=False, so it has no fixed affine map "
                             "to bound; use track_running_stats=True (or train with batch statistics, "
                             "pyibp.layers.batch_statistics)")
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


# BatchNorm layer -> (mean, biased variance) of its input in the last training-mode forward pass.
_BATCH_STATISTICS: contextvars.ContextVar[Optional[Dict[nn.Module, Tuple[Tensor, Tensor]]]] = \
    contextvars.ContextVar("pyibp_batch_statistics", default=None)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[Dict[nn.Module, Tuple[Tensor, Tensor]]]:
    """Bounds inside the block treat each BatchNorm of ``model`` as the affine map of the batch
    statistics its last training-mode forward pass in the block normalised with, instead of its
    running statistics (Shi et al. 2021, like auto_LiRPA in training mode).

    That is the map the clean forward pass of a training step applies, so during certified
    training the bounds follow the network being trained rather than the running averages, which
    lag behind it. The statistics keep their graph: gradients flow through them as through the
    clean pass. The bounds are those of the network with the statistics fixed: a training signal,
    not a certificate for the model in eval mode (verify in eval mode, with running statistics).

    Yields:
        The dict ``layer -> (mean, variance)`` (C,) being filled.
    Example:
        >>> with batch_statistics(model) as stats:
        ...     logits = model.train()(x)                           # records each BatchNorm's statistics
        ...     with eval_mode(model):
        ...         m = pyibp.margin_bounds(model, x, y, 0.1)       # bounds with those statistics
    """
    stats: Dict[nn.Module, Tuple[Tensor, Tensor]] = {}

    def record(layer: nn.Module, inputs: Tuple[Tensor, ...]) -> None:
        if layer.training:
            x = inputs[0]
            dims = [0] + list(range(2, x.dim()))
            stats[layer] = (x.mean(dims), x.var(dims, unbiased=False))

    layers = [m for m in unwrap(model).modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    token = _BATCH_STATISTICS.set(stats)
    try:
        yield stats
    finally:
        _BATCH_STATISTICS.reset(token)
        for handle in handles:
            handle.remove()


def batchnorm_scale_shift(layer: nn.modules.batchnorm._BatchNorm):
    """BatchNorm as ``x * scale + shift`` per channel: with its running statistics (eval mode), or
    inside :func:`batch_statistics` with the batch statistics recorded there."""
    stats = _BATCH_STATISTICS.get()
    mean, var = stats[layer] if stats is not None and layer in stats else (layer.running_mean, layer.running_var)
    scale = (var + layer.eps).rsqrt()
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    return scale, shift
