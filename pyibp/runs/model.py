"""The model of a run: a named architecture of :mod:`pyibp.models` or a user's factory, and the
IBP initialisation certified training starts from."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..certified_training import ibp_init
from ..models import MODELS, build_model as build_named_model

if TYPE_CHECKING:
    from .recipe import TrainConfig

__all__ = ["build_model", "check_model", "initialise_for_ibp"]


def check_model(name: str) -> None:
    """Raises ValueError unless ``name`` is a model of the zoo."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")


def build_model(config: TrainConfig, example: Tensor) -> nn.Sequential:
    """The architecture ``config.model`` sized for images like ``example`` (C, H, W)."""
    return build_named_model(config.model, in_channels=example.shape[0], num_classes=10, image_size=example.shape[-1])


def initialise_for_ibp(model: nn.Module) -> nn.Module:
    """:func:`pyibp.certified_training.ibp_init`, then zero biases in every layer but the last.

    IBP initialisation makes the weights about ``1 / fan_in`` small, so PyTorch's default biases
    (up to ``1 / sqrt(fan_in)``) dominate the pre-activations: a unit whose bias is negative is
    dead for every input, and without BatchNorm some seeds start with whole layers dead (training
    stalls at loss log 10). With zero biases about half the units of each layer are active.
    """
    ibp_init(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in layers[:-1]:
            if layer.bias is not None:
                layer.bias.zero_()
    return model

