"""The recipe of a training run: :class:`TrainConfig` (saved as ``config.json``), the published
recipes (:data:`PRESETS`). The methods and their defaults are those of the registry
(:mod:`pyibp.training.registry`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..models import check_model, model_spec
from ..training import method_class, method_names

__all__ = ["TrainConfig", "PRESETS", "REPRODUCE_CERTIFIED"]


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (saved as ``config.json``).

    Schedules are counted in optimizer steps (batches): with the 4,000 training images of
    mnist-5k and batch 100 an epoch is 40 steps. ``None`` for ``warmup_steps`` / ``ramp_steps``
    means one epoch / 35 % of all steps, resolved once the data set size is known.
    Use :meth:`for_method` for the defaults of each method.
    """

    method: str = "ibp"
    dataset: str = "mnist-5k"
    model: str = "tutorial-cnn"
    eps: float = 0.1                      # the ε the run is evaluated at
    train_eps: Optional[float] = None     # the ε it is trained at (default: train_eps_scale * eps)
    train_eps_scale: float = 1.0          # De Palma et al. train MNIST 0.1 at 2 ε
    epochs: int = 20
    batch_size: int = 100
    seed: int = 0
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.9                 # SGD only
    weight_decay: float = 0.0
    lr_schedule: str = "step"             # step | cyclic | constant
    lr_decay_at: Tuple[float, ...] = (0.75, 0.9)   # fractions of all steps (step schedule)
    lr_decay: float = 0.2
    # adversarial training (pgd, fgsm) and the attack of the expressive losses
    attack_steps: int = 10
    attack_alpha: Optional[float] = None  # default: 2.5 ε / steps (pgd), 1.25 ε (fgsm)
    attack_random_start: bool = True      # pgd; fgsm always starts at random (Wong et al.)
    attack_step_scale: float = 10.0       # mtl-ibp, cc-ibp, sabr: step size / attack radius
    attack_eps_scale: float = 1.0         # mtl-ibp, cc-ibp, sabr: attack radius / training ε
    # expressive losses (De Palma et al. 2024; Müller et al. 2023)
    expressive_alpha: float = 0.5         # mtl-ibp, cc-ibp: the IBP share α of the loss
    sabr_lambda: float = 0.4              # sabr: the small box's radius / ε
    # certified training (ibp, crown-ibp)
    warmup_steps: Optional[int] = None
    ramp_steps: Optional[int] = None
    eps_ramp: str = "smooth"              # smooth | linear
    eps_list: Optional[Tuple[float, ...]] = None   # one ε per epoch (the tutorial's recipe)
    kappa_start: float = 1.0
    kappa_end: float = 0.0
    beta_start: float = 1.0
    beta_end: float = 0.0
    loss_fusion: bool = False             # crown-ibp: bound the loss through one CROWN row (Xu et al. 2020)
    bn_stats: str = "batch"               # BatchNorm in the training bounds: batch | running statistics
    ibp_init: bool = True
    grad_clip: Optional[float] = 10.0
    reg_weight: float = 0.5
    # data and per-epoch evaluation
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    eval_pgd_steps: int = 10
    eval_pgd_subset: Optional[int] = 1000

    @staticmethod
    def for_method(method: str, **overrides: Any) -> "TrainConfig":
        """The defaults of ``method`` (its class's ``defaults``, :mod:`pyibp.training`), then ``overrides``.

        Example:
            >>> TrainConfig.for_method("ibp", epochs=2).epochs
            2
        """
        values = {**method_class(method).defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if "model" in values:
            values["model"] = model_spec(values["model"])   # a factory file by its absolute path
        return TrainConfig(method=method, **values).validated()

    def validated(self) -> "TrainConfig":
        """Returns self after checking every field; raises ValueError naming the bad one."""
        def check(ok: bool, name: str, value: Any, want: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {value!r}")

        check(self.method in method_names(), "method", self.method, f"one of {method_names()}")
        options = method_class(self.method).options
        check_model(self.model)
        for name in ("eps", "train_eps", "attack_alpha"):
            v = getattr(self, name)
            check(v is None or (math.isfinite(v) and v >= 0), name, v, "a finite number >= 0")
        for name in ("epochs", "batch_size", "attack_steps"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, v, "an integer >= 1")
        for name in ("warmup_steps", "ramp_steps", "eval_pgd_steps"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and v >= 0), name, v, "an integer >= 0")
        for name in ("train_subset", "test_subset", "eval_pgd_subset"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and v >= 1), name, v, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "> 0")
        check(self.optimizer in ("adam", "sgd"), "optimizer", self.optimizer, "'adam' or 'sgd'")
        check(self.lr_schedule in ("step", "cyclic", "constant"), "lr_schedule", self.lr_schedule,
              "'step', 'cyclic' or 'constant'")
        check(all(0 < f < 1 for f in self.lr_decay_at), "lr_decay_at", self.lr_decay_at,
              "fractions of the training in (0, 1)")
        check(0 < self.lr_decay <= 1, "lr_decay", self.lr_decay, "in (0, 1]")
        check(self.eps_ramp in ("smooth", "linear"), "eps_ramp", self.eps_ramp, "'smooth' or 'linear'")
        check(self.eps_list is None or (len(self.eps_list) > 0 and all(e >= 0 for e in self.eps_list)),
              "eps_list", self.eps_list, "a non-empty list of values >= 0")
        for name in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
            v = getattr(self, name)
            check(0 <= v <= 1, name, v, "in [0, 1]")
        for name in ("train_eps_scale", "attack_step_scale", "attack_eps_scale"):
            v = getattr(self, name)
            check(math.isfinite(v) and v > 0, name, v, "a finite number > 0")
        for name in ("expressive_alpha", "sabr_lambda"):
            v = getattr(self, name)
            check(0 <= v <= 1, name, v, "in [0, 1]")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or None")
        check(self.reg_weight >= 0, "reg_weight", self.reg_weight, ">= 0")
        check(not self.loss_fusion or "loss_fusion" in options, "loss_fusion", self.loss_fusion,
              f"False unless the method reads it (method {self.method!r} does not)")
        check(self.bn_stats in ("batch", "running"), "bn_stats", self.bn_stats, "'batch' or 'running'")
        return self

    @property
    def target_eps(self) -> float:
        """The ε training aims at."""
        return self.eps * self.train_eps_scale if self.train_eps is None else self.train_eps

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config.json has unknown keys {unknown}: written by another pyibp version?")
        values = dict(values)
        values.setdefault("bn_stats", "running")  # how runs written before the option trained
        for name in ("lr_decay_at", "eps_list"):  # JSON has no tuples
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return TrainConfig(**values).validated()


# The certified method `pyibp reproduce` trains by default (its table beside the tutorial's IBP row).
REPRODUCE_CERTIFIED = "mtl-ibp"


def _published(method: str, dataset: str, eps: float, *, epochs: int, decay_at: Tuple[int, int],
               warmup_epochs: int, ramp_epochs: int, **values: Any) -> Dict[str, Any]:
    """A published recipe on CNN-7 (Shi et al.'s architecture, BatchNorm after each layer), epochs
    counted as the papers do and turned into steps of the full data set: Adam at 5e-4 decayed x0.2
    at the epochs ``decay_at``, Shi et al.'s initialisation and regularisers, gradients clipped at
    10, ε = 0 for ``warmup_epochs`` then ramped over ``ramp_epochs``, κ = 0 (no clean term)."""
    batch = 256 if dataset == "mnist" else 128
    steps_per_epoch = math.ceil((60_000 if dataset == "mnist" else 50_000) / batch)
    base = dict(method=method, dataset=dataset, model="cnn7", eps=eps, epochs=epochs, batch_size=batch,
                optimizer="adam", lr=5e-4, lr_schedule="step", lr_decay_at=tuple(e / epochs for e in decay_at),
                lr_decay=0.2, ibp_init=True, reg_weight=0.5, grad_clip=10.0, kappa_start=0.0, kappa_end=0.0,
                warmup_steps=warmup_epochs * steps_per_epoch, ramp_steps=ramp_epochs * steps_per_epoch)
    return {**base, **values}


_MNIST = dict(epochs=70, decay_at=(50, 60), warmup_epochs=1, ramp_epochs=20)
_CIFAR_2 = dict(epochs=160, decay_at=(120, 140), warmup_epochs=2, ramp_epochs=80)
_CIFAR_8 = dict(epochs=260, decay_at=(180, 220), warmup_epochs=2, ramp_epochs=80)
_FGSM_10 = dict(attack_steps=1, attack_step_scale=10.0)            # one step of 10 ε from a random start
_PGD_8_WIDE = dict(attack_steps=8, attack_step_scale=0.25, attack_eps_scale=2.1)
_SABR_PGD = dict(attack_steps=8, attack_step_scale=0.5)
# Published recipes by name (``pyibp train --preset NAME``; options given beside it win). MTL-IBP and
# CC-IBP: De Palma et al. (ICLR 2024), the commands of their repository (without its L1 penalty,
# which pyibp does not have); SABR: Müller et al. (ICLR 2023), with the schedule above. The README
# lists the numbers they target.
PRESETS: Dict[str, Dict[str, Any]] = {
    "mtl-ibp-mnist-0.1": _published("mtl-ibp", "mnist", 0.1, **_MNIST, **_FGSM_10, train_eps_scale=2.0,
                                    expressive_alpha=0.01),
    "mtl-ibp-mnist-0.3": _published("mtl-ibp", "mnist", 0.3, **_MNIST, **_FGSM_10, train_eps_scale=1.334,
                                    expressive_alpha=0.08),
    "mtl-ibp-cifar10-2": _published("mtl-ibp", "cifar10", 2 / 255, **_CIFAR_2, **_PGD_8_WIDE, expressive_alpha=0.004),
    "mtl-ibp-cifar10-8": _published("mtl-ibp", "cifar10", 8 / 255, **_CIFAR_8, **_FGSM_10, expressive_alpha=0.5),
    "cc-ibp-mnist-0.1": _published("cc-ibp", "mnist", 0.1, **_MNIST, **_FGSM_10, train_eps_scale=2.0,
                                   expressive_alpha=0.1),
    "cc-ibp-mnist-0.3": _published("cc-ibp", "mnist", 0.3, **_MNIST, **_FGSM_10, train_eps_scale=1.334,
                                   expressive_alpha=0.3),
    "cc-ibp-cifar10-2": _published("cc-ibp", "cifar10", 2 / 255, **_CIFAR_2, **_PGD_8_WIDE, expressive_alpha=0.01),
    "cc-ibp-cifar10-8": _published("cc-ibp", "cifar10", 8 / 255, **_CIFAR_8, **_FGSM_10, expressive_alpha=0.5),
    "sabr-mnist-0.1": _published("sabr", "mnist", 0.1, **_MNIST, **_SABR_PGD, sabr_lambda=0.4),
    "sabr-mnist-0.3": _published("sabr", "mnist", 0.3, **_MNIST, **_SABR_PGD, sabr_lambda=0.6),
    "sabr-cifar10-2": _published("sabr", "cifar10", 2 / 255, **_CIFAR_2, **_SABR_PGD, sabr_lambda=0.1),
    "sabr-cifar10-8": _published("sabr", "cifar10", 8 / 255, **_CIFAR_2, **_SABR_PGD, sabr_lambda=0.7),
}
