"""Models used by the tutorial and the certified-training literature: nn.Sequential, and a CIFAR
ResNet written as an ordinary nn.Module with a functional forward (pyibp bounds either); how a
recipe names a model (:func:`check_model`, :func:`model_spec`: a name of the zoo or a user's
factory ``FILE.py:FUNCTION`` / ``MODULE:FUNCTION``); and what every loop asks of a model
(:func:`eval_mode`, :func:`model_device`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import Residual

__all__ = ["tutorial_cnn", "cifar_cnn", "cnn7", "resnet_small", "cifar_resnet", "CifarResNet", "MODELS",
           "build_model", "check_model", "model_spec", "is_factory", "is_factory_file", "eval_mode", "model_device"]


def _four_conv_cnn(in_channels: int, widths: Sequence[int], hidden: int, num_classes: int,
                   image_size: int) -> nn.Sequential:
    """Conv w0 - Conv w1 stride 2 - Conv w2 - Conv w3 stride 2 (3x3, padding 1), Linear hidden, Linear out."""
    c0, c1, c2, c3 = widths
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, c0, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c0, c1, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c3, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c3 * side * side, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def tutorial_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """The CNN of "Adversarial Robustness: Theory and Practice", chapter 4 (``model_cnn``).

    Conv 32 - Conv 32 stride 2 - Conv 64 - Conv 64 stride 2 (3x3, padding 1), Linear 100, Linear 10.

    Shapes:
        (B, 1, 28, 28) -> (B, 10).
    Example:
        >>> tutorial_cnn()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return _four_conv_cnn(in_channels, (32, 32, 64, 64), 100, num_classes, image_size)


def cifar_cnn(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """A CIFAR-size CNN: 4 convolutions (64-64s2-128-128s2) and 2 linear layers (512, 10).

    Shapes:
        (B, 3, 32, 32) -> (B, 10).
    Example:
        >>> cifar_cnn()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _four_conv_cnn(in_channels, (64, 64, 128, 128), 512, num_classes, image_size)


def cnn7(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 64,
         linear_size: int = 512) -> nn.Sequential:
    """The 7-layer CNN with BatchNorm of Shi et al. 2021 ("Fast certified robust training with short
    warmup", ``cnn_7layer_bn``): Conv w-w-2w(s2)-2w-2w, Linear 512, Linear 10, BN after each hidden layer.

    Shapes:
        (B, 3, 32, 32) -> (B, 10).
    Example:
        >>> cnn7()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    def conv_bn(c_in: int, c_out: int, stride: int = 1):
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    side = (image_size + 1) // 2
    return nn.Sequential(
        *conv_bn(in_channels, width), *conv_bn(width, width), *conv_bn(width, 2 * width, stride=2),
        *conv_bn(2 * width, 2 * width), *conv_bn(2 * width, 2 * width),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, linear_size), nn.BatchNorm1d(linear_size), nn.ReLU(),
        nn.Linear(linear_size, num_classes),
    )


def resnet_small(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 16,
                 stages: Sequence[int] = (1, 1)) -> nn.Sequential:
    """A ResNet small enough for IBP: a conv stem, then per stage ``stages[i]`` residual blocks
    (Conv-BN-ReLU-Conv-BN plus identity, or a strided 1x1 Conv-BN shortcut when the shape changes,
    then ReLU), doubling the width and halving the resolution at each new stage; Linear head.

    Blocks are :class:`pyibp.nn.Residual` in an nn.Sequential (see :func:`cifar_resnet` for the same
    structure as an ordinary module with a functional forward).

    Shapes:
        (B, 3, 32, 32) -> (B, 10).
    Example:
        >>> resnet_small()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    layers: list = [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    channels, side = width, image_size
    for stage, blocks in enumerate(stages):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out = width * 2 ** stage
            body = nn.Sequential(nn.Conv2d(channels, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out),
                                 nn.ReLU(), nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out))
            shortcut = None if stride == 1 and out == channels else nn.Sequential(
                nn.Conv2d(channels, out, 1, stride=stride), nn.BatchNorm2d(out))
            layers += [Residual(body, shortcut), nn.ReLU()]
            channels, side = out, (side - 1) // stride + 1
    layers += [nn.AvgPool2d(2), nn.Flatten(), nn.Linear(channels * (side // 2) ** 2, num_classes)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus the shortcut (identity, or a strided 1x1 Conv-BN), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet (He et al. 2016, the 3-stage CIFAR variant) as users write one: a plain
    nn.Module whose forward calls ``F.relu``, adds the shortcut with ``+``, pools with
    ``F.adaptive_avg_pool2d`` and flattens with ``view``. See :func:`cifar_resnet`."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 blocks: Sequence[int] = (1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, channels = [], width
        for stage, count in enumerate(blocks):
            out = width * 2 ** stage
            for block in range(count):
                stages.append(_BasicBlock(channels, out, 2 if stage > 0 and block == 0 else 1))
                channels = out
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(out.view(out.size(0), -1))


def cifar_resnet(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 16,
                 blocks: Sequence[int] = (1, 1, 1)) -> CifarResNet:
    """A CIFAR ResNet with a functional forward: stem, 3 stages of ``blocks[i]`` basic blocks
    (widths w, 2w, 4w; stride 2 between stages), global average pooling, Linear.
    ``blocks=(3, 3, 3)`` is ResNet-20; the default (1, 1, 1) is small enough for IBP.
    ``image_size`` is accepted for the zoo's common signature (global pooling takes any size).

    Shapes:
        (B, 3, H, W) -> (B, 10).
    Example:
        >>> cifar_resnet()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return CifarResNet(in_channels, num_classes, width, blocks)


MODELS = {"tutorial-cnn": tutorial_cnn, "cifar-cnn": cifar_cnn, "cnn7": cnn7, "resnet-small": resnet_small,
          "cifar-resnet": cifar_resnet}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A model of the zoo by name, for data of the given shape.

    Example:
        >>> build_model("tutorial-cnn", 1, 10, 28)(torch.rand(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)


_SPEC_FORM = "FILE.py:FACTORY or MODULE:FACTORY"


def is_factory(name: str) -> bool:
    """Whether a model name is a factory spec (``where:function``) rather than a name of the zoo."""
    return ":" in name


def is_factory_file(where: str) -> bool:
    """Whether the ``where`` of a factory spec is a file (else a module to import)."""
    return where.endswith(".py") or "/" in where or os.sep in where


def check_model(name: str) -> None:
    """Raises ValueError unless ``name`` is a model of the zoo or has the form of a factory.

    Example:
        >>> check_model("tutorial-cnn"); check_model("my_models.py:small_cnn")
    """
    if not isinstance(name, str) or not (name in MODELS or is_factory(name)):
        raise ValueError(f"model must be one of {tuple(MODELS)} or a factory {_SPEC_FORM}, got {name!r}")
    if is_factory(name):
        where, _, function = name.rpartition(":")
        if not where or not function.isidentifier():
            raise ValueError(f"model must be a factory {_SPEC_FORM}, got {name!r}")


def model_spec(name: str) -> str:
    """``name`` as a recipe records it: a factory file by its absolute path (evaluating or resuming
    the run from another folder finds the same file), anything else unchanged.

    Example:
        >>> model_spec("tutorial-cnn")
        'tutorial-cnn'
    """
    check_model(name)
    where, _, function = name.rpartition(":")
    if is_factory(name) and is_factory_file(where):
        return f"{Path(where).expanduser().resolve()}:{function}"
    return name


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; every submodule gets its own mode back afterwards.

    Example:
        >>> with eval_mode(model):
        ...     logits = model(x)                # BatchNorm with running statistics, no dropout
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither).

    Example:
        >>> model_device(tutorial_cnn())
        device(type='cpu')
    """
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")
