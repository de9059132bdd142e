"""The registry of training methods: one line per method, read by the recipe
(:class:`pyibp.runs.TrainConfig`), the run loop and ``pyibp train`` (its ``--method`` choices and
its help table).

Example:
    >>> method_class("sabr").defaults["sabr_lambda"]
    0.4
    >>> register("my-method", MyMethod)        # then pyibp train --method my-method
"""
from __future__ import annotations

from typing import Dict, Tuple, Type

from .adversarial import FGSMTraining, PGDTraining, Standard
from .certified import CROWNIBP, IBP
from .expressive import CCIBP, MTLIBP, SABR
from .method import Method

__all__ = ["METHODS", "register", "method_class", "method_names"]

METHODS: Dict[str, Type[Method]] = {}


def register(name: str, cls: Type[Method]) -> Type[Method]:
    """Registers the method class ``cls`` under ``name`` (``pyibp train --method NAME``); returns ``cls``.

    Example:
        >>> register("clean", Clean)
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"a training method must be a subclass of pyibp.training.Method, got {cls!r}")
    if not isinstance(name, str) or not name or name in METHODS:
        raise ValueError(f"name must be a new method name (taken: {tuple(METHODS)}), got {name!r}")
    METHODS[name] = cls
    cls.name = name
    return cls


def method_class(name: str) -> Type[Method]:
    """The class registered as ``name``; ValueError naming the registered ones otherwise.

    Example:
        >>> method_class("ibp").certified
        True
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return METHODS[name]


def method_names() -> Tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(METHODS)


register("standard", Standard)
register("fgsm", FGSMTraining)
register("pgd", PGDTraining)
register("ibp", IBP)
register("crown-ibp", CROWNIBP)
register("mtl-ibp", MTLIBP)
register("cc-ibp", CCIBP)
register("sabr", SABR)
