"""The model of a run: a named architecture of :mod:`pyibp.models` or a user's factory, and the
IBP initialisation certified training starts from.

A factory is named ``path/to/file.py:function`` or ``package.module:function``; it is called with
the keywords it accepts among ``in_channels``, ``num_classes`` and ``image_size`` and returns an
``nn.Module``. The recipe records it (a file by its absolute path), so that evaluating or resuming
the run builds the same architecture again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models import build_model as build_named_model, check_model, is_factory, is_factory_file
from ..training import ibp_init

__all__ = ["build_model", "check_boundable", "load_factory", "initialise_for_ibp"]

def load_factory(name: str) -> Callable[..., nn.Module]:
    """The function a factory spec ``FILE.py:FACTORY`` / ``MODULE:FACTORY`` names.

    Raises ValueError naming what is missing: the file, the module, or the function in it.
    """
    check_model(name)
    where, _, function = name.rpartition(":")
    if is_factory_file(where):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"model {name!r}: no file {path}")
        # One module per file (a hash of its path): two factories in files of the same name do not clash.
        module_name = f"pyibp_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ValueError(f"model {name!r}: {path} is not a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise ValueError(f"model {name!r}: no module {err.name!r} to import (give a file as "
                             "path/to/file.py:FACTORY, or put the package on PYTHONPATH)") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        found = "nothing" if factory is None else f"a {type(factory).__name__}"
        raise ValueError(f"model {name!r}: {where} has {found} named {function!r}, not a function")
    return factory


def build_model(config: Any, example: Tensor) -> nn.Module:
    """The architecture ``config.model`` (of a :class:`~pyibp.runs.TrainConfig`) sized for images
    like ``example`` (C, H, W)."""
    sizes = dict(in_channels=example.shape[0], num_classes=10, image_size=example.shape[-1])
    if not is_factory(config.model):
        return build_named_model(config.model, **sizes)
    factory = load_factory(config.model)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):   # a builtin or C function: no signature to read
        parameters = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    model = factory(**{k: v for k, v in sizes.items() if takes_all or k in parameters})
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {config.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_boundable(config: Any, example: Tensor) -> None:
    """Builds ``config.model`` and bounds it once at ``example`` (C, H, W): every run verifies
    its model after each epoch, so a model pyibp cannot bound (or whose output is not one logit
    per class) is a ValueError naming it before a run starts, not after its first epoch."""
    from ..bounds import interval_bounds
    model = build_model(config, example).to(example.device).eval()
    try:
        with torch.no_grad():
            lb, _ = interval_bounds(model, example[None], 0.0)
    except TypeError as err:
        raise ValueError(f"model {config.model!r} cannot be bounded by pyibp: {err}") from None
    if lb.shape != (1, 10):
        raise ValueError(f"model {config.model!r} gives outputs of shape {tuple(lb.shape[1:])} for one image, "
                         "not the 10 logits of the classes")


def initialise_for_ibp(model: nn.Module) -> nn.Module:
    """:func:`pyibp.training.ibp_init`, then zero biases in every layer but the last.

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

