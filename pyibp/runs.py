"""Training runs on disk: one folder per run, checkpointed every epoch, resumable after a kill.

A run folder holds

* ``config.json``    the recipe (:class:`TrainConfig`), written once when the run starts;
* ``metrics.jsonl``  one JSON line per finished epoch (losses, clean / PGD / verified error, ε, κ,
  learning rate, seconds);
* ``checkpoint.pt``  model, optimiser, learning-rate scheduler, RNG states (torch, numpy, python
  ``random``, CUDA), epoch and global step, replaced atomically after every epoch;
* ``curves.png``     the metrics as curves, redrawn after every epoch.

Resuming restores everything that decides what the next epoch computes, so a run killed at any
point and resumed with :func:`train_run` ends with the same ``metrics.jsonl`` as an uninterrupted
run (on the CPU, bit for bit, timings aside): the shuffle order and the attack's random starts of
epoch e come from generators seeded with ``derive_seed(seed, e, ...)``, the ε / κ / β schedules
and the learning rate are functions of the global step, and the global RNGs are restored.

Several processes: launched by ``torchrun --nproc_per_node N`` (one node or several),
:func:`train_run` joins the process group (NCCL on CUDA, each rank on GPU ``LOCAL_RANK``; gloo on
the CPU) and trains with DistributedDataParallel. Every rank takes its slice of the same global
batches of ``batch_size`` examples, shuffled per epoch by the same seed as one process, so N
processes take the steps of one process with the same global batch (up to floating-point
rounding, for models without BatchNorm). Training metrics are reduced over the ranks, the test
set is evaluated in shards whose counts are summed, and rank 0 alone touches the run folder:
it reads the recipe and the checkpoint and sends them to the other ranks, and it writes every file.
The attack's random starts of rank r > 0 come from ``derive_seed(seed, e, "attack", r)``.

``amp="bf16"`` trains under bf16 autocast (meant for CUDA; it works on the CPU too): the forward
passes of training steps and of the training attacks run in bf16, the bounds, the loss and the
per-epoch evaluation in float32. ``compile=True`` runs the clean forward pass of training through
``torch.compile``; bounds and attacks use the model itself. Neither is part of the recipe.

The environment variable ``PYIBP_BATCH_DELAY`` (seconds) makes training sleep after every batch;
the tests use it to kill a run in the middle of an epoch.

Example:
    >>> config = TrainConfig.for_method("ibp", eps=0.1, epochs=20)
    >>> folder = prepare_run_folder("runs/ibp", config, resume=False, overwrite=False)
    >>> records = train_run(folder, device="cpu")
    >>> records[-1]["test_verified_error"]

    The same under ``torchrun --nproc_per_node 2 train.py`` (a script holding the lines above,
    with ``prepare_run_folder`` run by rank 0 only, e.g. through :func:`pyibp.distributed.on_main`)
    trains with 2 processes; ``pyibp train`` does all of this.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from . import __version__
from .certified_training import certified_train_epoch, ibp_init
from .certify import verify
from .data import load_dataset, loader
from .distributed import (AutocastForward, DistContext, ShardedLoader, barrier, broadcast_buffers, init_distributed,
                          on_main, reduce_metrics, shutdown, unwrap, wrap_model)
from .models import MODELS, build_model as build_named_model
from .schedules import LinearRamp, Schedule, SmoothRamp, StepList
from .train import adversarial_train_epoch, cyclic_lr, evaluate, fgsm_train_epoch, train_epoch

__all__ = ["TrainConfig", "METHOD_DEFAULTS", "METHODS", "MODELS", "RUN_FILES", "RunFolderError",
           "check_run_folder", "prepare_run_folder", "train_run", "load_run", "load_data", "read_config",
           "read_metrics", "append_metrics", "truncate_metrics", "save_checkpoint", "load_checkpoint",
           "atomic_write", "write_json", "rng_state", "set_rng_state", "derive_seed", "plot_curves", "subset",
           "eval_batch_size", "build_model", "initialise_for_ibp", "eps_schedules", "lr_factor", "AMP"]

PathLike = Union[str, os.PathLike]
Device = Union[str, torch.device]

CONFIG, METRICS, CHECKPOINT, CURVES = "config.json", "metrics.jsonl", "checkpoint.pt", "curves.png"
# Everything pyibp writes into a run folder (``--overwrite`` removes these and nothing else).
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, CURVES, "eval.json", "certify.json")
METHODS = ("standard", "fgsm", "pgd", "ibp", "crown-ibp")
CERTIFIED = ("ibp", "crown-ibp")
CHECKPOINT_FORMAT = 1
AMP = ("none", "bf16")   # train_run's mixed-precision modes


class RunFolderError(Exception):
    """A run folder cannot be used as asked (exists without --resume/--overwrite, holds no run, ...)."""


# ---------------------------------------------------------------------------------------------
# the recipe
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
    train_eps: Optional[float] = None     # the ε it is trained at (default: eps)
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
    # adversarial training (pgd, fgsm)
    attack_steps: int = 10
    attack_alpha: Optional[float] = None  # default: 2.5 ε / steps (pgd), 1.25 ε (fgsm)
    attack_random_start: bool = True      # pgd; fgsm always starts at random (Wong et al.)
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
        """The defaults of ``method`` (see :data:`METHOD_DEFAULTS`), then ``overrides``."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        values = {**METHOD_DEFAULTS[method], **{k: v for k, v in overrides.items() if v is not None}}
        return TrainConfig(method=method, **values).validated()

    def validated(self) -> "TrainConfig":
        """Returns self after checking every field; raises ValueError naming the bad one."""
        def check(ok: bool, name: str, value: Any, want: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {value!r}")

        check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        check(self.model in MODELS, "model", self.model, f"one of {tuple(MODELS)}")
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
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or None")
        check(self.reg_weight >= 0, "reg_weight", self.reg_weight, ">= 0")
        check(not self.loss_fusion or self.method == "crown-ibp", "loss_fusion", self.loss_fusion,
              "False unless method is 'crown-ibp'")
        check(self.bn_stats in ("batch", "running"), "bn_stats", self.bn_stats, "'batch' or 'running'")
        return self

    @property
    def target_eps(self) -> float:
        """The ε training aims at."""
        return self.eps if self.train_eps is None else self.train_eps

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


# Defaults per method, chosen to train well on the 4,000 images of mnist-5k (40 steps per epoch at
# batch 100). Certified training follows Shi et al. (2021) — IBP initialisation, ε = 0 for a short
# warm-up, a smooth ramp with their warm-up regularisers (weight 0.5), gradient clipping at 10,
# learning rate x0.2 twice near the end — with the κ mixing of Zhang et al. (2020) (1 -> 0 over the
# ramp; Gowal et al.'s 1 -> 0.5 verified worse here) and CROWN-IBP's β (1 -> 0). Their Adam rate
# (5e-4) is for 100 times more steps: on 800 steps 2e-3 verified 13 % where 5e-4 verified 26 %.
# Adversarial training: Madry et al.'s PGD with α = 2.5 ε / steps from a random start; "fast" FGSM
# of Wong et al. (2020) with its cyclic learning rate (Adam, peak 5e-3).
_CERTIFIED_DEFAULTS = dict(epochs=30, lr=2e-3, lr_schedule="step", lr_decay_at=(0.75, 0.9), lr_decay=0.2)
_ADVERSARIAL_DEFAULTS = dict(ibp_init=False, grad_clip=None, reg_weight=0.0)
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "standard": dict(epochs=10, lr=1e-3, lr_schedule="step", lr_decay_at=(0.6, 0.85), lr_decay=0.1,
                     **_ADVERSARIAL_DEFAULTS),
    "fgsm": dict(epochs=10, lr=5e-3, lr_schedule="cyclic", **_ADVERSARIAL_DEFAULTS),
    "pgd": dict(epochs=15, lr=1e-3, lr_schedule="step", lr_decay_at=(0.6, 0.85), lr_decay=0.1, attack_steps=10,
                **_ADVERSARIAL_DEFAULTS),
    "ibp": dict(_CERTIFIED_DEFAULTS),
    # Loss fusion: 12 epochs on mnist-5k verified 16.3 % (CROWN-IBP) against 15.8 % with the K-1
    # margins, in half the training time (an epoch's CROWN steps cost a quarter).
    "crown-ibp": dict(_CERTIFIED_DEFAULTS, loss_fusion=True),
}


def lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the global step (``step`` or ``constant``).

    ``step``: multiplied by ``lr_decay`` at each fraction ``lr_decay_at`` of ``total_steps``.
    Equals ``lr_decay ** sum(step >= round(f * total_steps) for f in lr_decay_at)``.
    """
    milestones = sorted(round(f * total_steps) for f in config.lr_decay_at)
    decay = config.lr_decay if config.lr_schedule == "step" else 1.0

    def factor(step: int) -> float:
        return decay ** sum(step >= m for m in milestones)
    return factor


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per batch (its state_dict holds only numbers, so it checkpoints)."""
    if config.lr_schedule == "cyclic":
        return cyclic_lr(optimizer, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total_steps))


def eps_schedules(config: TrainConfig, steps_per_epoch: int) -> Tuple[Schedule, Schedule, Schedule]:
    """``(ε, κ, β)`` of certified training as functions of the global step.

    ε is 0 for ``warmup_steps`` (default one epoch), then ramps to ``target_eps`` over
    ``ramp_steps`` (default 35 % of all steps); κ and β ramp linearly over the same steps.
    With ``eps_list`` ε is one value per epoch instead, as in the tutorial.
    """
    total = config.epochs * steps_per_epoch
    warmup = steps_per_epoch if config.warmup_steps is None else config.warmup_steps
    ramp = round(0.35 * total) if config.ramp_steps is None else config.ramp_steps
    if config.eps_list is not None:
        eps: Schedule = StepList(config.eps_list, steps_per_epoch)
    elif config.eps_ramp == "smooth":
        eps = SmoothRamp(0.0, config.target_eps, warmup, ramp)
    else:
        eps = LinearRamp(0.0, config.target_eps, warmup, ramp)
    kappa = LinearRamp(config.kappa_start, config.kappa_end, warmup, ramp)
    beta = LinearRamp(config.beta_start, config.beta_end, warmup, ramp)
    return eps, kappa, beta


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


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------------------------
# seeds and random states
def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from ``seed`` and ``keys``, the same in every process (unlike ``hash``).

    Example:
        >>> derive_seed(0, 3, "shuffle") == derive_seed(0, 3, "shuffle") != derive_seed(0, 4, "shuffle")
        True
    """
    text = "/".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def rng_state() -> Dict[str, Any]:
    """The states of torch's, numpy's, python's and CUDA's global generators, as tensors and
    plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# files
_UMASK = os.umask(0)
os.umask(_UMASK)

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Any], None], *, binary: bool = True) -> None:
    """Writes ``path`` all or nothing: ``write(f)`` fills a temporary file in the same folder,
    which is flushed, fsynced and renamed over ``path``; then the folder is fsynced.

    A reader (or a run resumed after a crash) sees the old file or the new one, never a torn one.

    Example:
        >>> atomic_write("out.json", lambda f: json.dump({"a": 1}, f), binary=False)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make run files private to one user
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path: PathLike, payload: Any) -> None:
    """``payload`` as indented JSON, written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2, sort_keys=False) + "\n"), binary=False)


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: PathLike, map_location: Optional[Device] = None) -> Dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (tensors and plain values only)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(f"{path} has checkpoint format {state.get('format')!r}, this pyibp reads "
                             f"{CHECKPOINT_FORMAT}")
    return state


def append_metrics(path: PathLike, record: Dict[str, Any]) -> None:
    """Appends one JSON line and fsyncs it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a kill mid-write) is skipped."""
    if not Path(path).exists():
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def truncate_metrics(path: PathLike, epochs: int) -> List[Dict[str, Any]]:
    """Keeps the records of the first ``epochs`` epochs (those the checkpoint covers), atomically."""
    records = [r for r in read_metrics(path) if r.get("epoch", 0) <= epochs]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records)), binary=False)
    return records


def read_config(folder: PathLike) -> TrainConfig:
    path = Path(folder) / CONFIG
    if not path.exists():
        raise RunFolderError(f"{folder} holds no run (no {CONFIG}); train one with: pyibp train --out {folder}")
    with open(path) as f:
        return TrainConfig.from_json(json.load(f))


def _holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in (CONFIG, METRICS, CHECKPOINT))


def check_run_folder(folder: PathLike, *, resume: bool, overwrite: bool) -> None:
    """Raises :class:`RunFolderError` when :func:`prepare_run_folder` would refuse ``folder``;
    changes nothing (so that a command can fail before it writes anything)."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run or start it over")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} exists and is not a folder")
    if folder.is_dir() and _holds_run(folder):
        if resume and not (folder / CONFIG).exists():
            raise RunFolderError(f"{folder} holds run files but no {CONFIG}: cannot resume it; start over "
                                 "with --overwrite")
        if not resume and not overwrite:
            raise RunFolderError(f"{folder} already holds a run: pass --resume to continue it or --overwrite "
                                 "to start it over")


def prepare_run_folder(folder: PathLike, config: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Creates (or reopens, or clears) the run folder and returns it.

    * new or empty folder: ``config.json`` is written;
    * ``resume``: a folder holding a run keeps its ``config.json`` (the caller reads it back);
      one holding none starts fresh;
    * ``overwrite``: pyibp's files in the folder (:data:`RUN_FILES`) are removed first;
    * otherwise an existing run raises :class:`RunFolderError`: a run is never overwritten silently.
    """
    check_run_folder(folder, resume=resume, overwrite=overwrite)
    folder = Path(folder)
    if folder.is_dir() and _holds_run(folder):
        if resume:
            return folder
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG, config.to_json())
    return folder


# ---------------------------------------------------------------------------------------------
# curves
def plot_curves(records: Sequence[Dict[str, Any]], path: PathLike, title: str = "") -> None:
    """Training curves of ``metrics.jsonl`` records: losses, errors (%), ε and learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in records], marker=".", label="train loss")
    if any("train_robust_loss" in r for r in records):
        ax.plot(epochs, [r.get("train_robust_loss", math.nan) for r in records], marker=".",
                label="train robust loss")
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.legend()
    ax = axes[1]
    for key, label in (("train_error", "train"), ("train_verified_error", "train verified"),
                       ("test_clean_error", "test clean"), ("test_pgd_error", "test PGD"),
                       ("test_verified_error", "test IBP-verified")):
        if any(r.get(key) is not None for r in records):
            ax.plot(epochs, [100 * r[key] if r.get(key) is not None else math.nan for r in records],
                    marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax = axes[2]
    ax.plot(epochs, [r["train_eps"] for r in records], marker=".", color="tab:purple", label="ε (train)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ε at the epoch's last step")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [r["lr"] for r in records], marker=".", color="tab:gray", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_yscale("log")
    fig.legend(*[sum(z, []) for z in zip(ax.get_legend_handles_labels(), lr_ax.get_legend_handles_labels())],
               loc="upper right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# data
def subset(dataset: TensorDataset, n: Optional[int], seed: int = 0) -> TensorDataset:
    """``n`` examples drawn without replacement by a generator seeded with ``seed`` (in data order).

    mnist-5k is stored grouped by class, so the first n examples would hold one digit only.
    """
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=g)[:n].sort().values
    return TensorDataset(*(t[index.to(t.device)] for t in dataset.tensors))


def load_data(config: TrainConfig, *, data_dir: Optional[PathLike] = None, download: bool = False,
              device: Optional[Device] = None) -> Tuple[TensorDataset, TensorDataset]:
    """The run's (train, test) sets, cut to ``train_subset`` / ``test_subset``, on ``device``."""
    train, test = load_dataset(config.dataset, data_dir=data_dir, download=download, device=device)
    return subset(train, config.train_subset), subset(test, config.test_subset)


class _Throttled:
    """Sleeps ``delay`` seconds after each batch of ``batches`` (for interruption tests)."""

    def __init__(self, batches: Any, delay: float):
        self.batches, self.delay = batches, delay

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield batch
            time.sleep(self.delay)


def _batch_delay() -> float:
    value = os.environ.get("PYIBP_BATCH_DELAY", "")
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        raise ValueError(f"PYIBP_BATCH_DELAY must be a number of seconds, got {value!r}") from None


# ---------------------------------------------------------------------------------------------
# the run
def _train_one_epoch(config: TrainConfig, model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, schedules: Tuple[Schedule, ...],
                     epoch: int, step: int, device: torch.device, quiet: bool, ctx: DistContext,
                     amp: str) -> Tuple[Dict[str, Any], int]:
    """One epoch of ``config.method``; returns (metrics of all ranks in metrics.jsonl's names, new global step).

    ``model`` is the training model (DDP, compiled, ...); with ``amp`` a certified model arrives
    wrapped in :class:`AutocastForward` already, and the other methods' epoch runs under autocast
    here (their attacks are forward and backward passes like the training step).
    """
    if config.method in CERTIFIED:
        eps, kappa, beta = schedules
        m, new_step = certified_train_epoch(
            model, batches, optimizer, eps_schedule=eps, kappa_schedule=kappa,
            beta_schedule=beta if config.method == "crown-ibp" else None, method=config.method,
            loss_fusion=config.loss_fusion, bn_stats=config.bn_stats, step_offset=step,
            grad_clip=config.grad_clip, scheduler=scheduler, reg_tightness=config.reg_weight,
            reg_relu=config.reg_weight, quiet=quiet, device=device)
        m = reduce_metrics(m, ctx)
        out = {"train_loss": m["loss"], "train_robust_loss": m["robust_loss"], "train_error": m["clean_error"],
               "train_verified_error": m["verified_error"], "train_eps": m["eps"], "kappa": m["kappa"]}
        if config.method == "crown-ibp":
            out["beta"] = m["beta"]
        return {**out, "lr": m["lr"], "seconds": m["seconds"]}, new_step
    eps = config.target_eps
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16"
                else contextlib.nullcontext())
    with autocast:
        if config.method == "standard":
            m = train_epoch(model, batches, optimizer, scheduler=scheduler, device=device, quiet=quiet)
            eps = 0.0
        else:
            # The random starts of epoch e come from their own generator: a resumed epoch draws the
            # same. Rank 0 keeps the one-process seed; the other ranks attack other examples.
            keys = ("attack",) if ctx.rank == 0 else ("attack", ctx.rank)
            g = torch.Generator(device).manual_seed(derive_seed(config.seed, epoch, *keys))
            if config.method == "pgd":
                alpha = (config.attack_alpha if config.attack_alpha is not None
                         else 2.5 * eps / config.attack_steps)
                m = adversarial_train_epoch(model, batches, optimizer, eps=eps, alpha=alpha,
                                            steps=config.attack_steps, random_start=config.attack_random_start,
                                            scheduler=scheduler, device=device, quiet=quiet, generator=g)
            else:
                m = fgsm_train_epoch(model, batches, optimizer, eps=eps, alpha=config.attack_alpha,
                                     scheduler=scheduler, device=device, quiet=quiet, generator=g)
    m = reduce_metrics(m, ctx)
    return {"train_loss": m["loss"], "train_error": m["error"], "train_eps": eps, "lr": m["lr"],
            "seconds": m["seconds"]}, step + len(batches)


def eval_batch_size(device: Device) -> int:
    """Examples per evaluation batch: small on the CPU (batches of 100 attack 2x faster than 500
    there, staying in cache), large on a GPU."""
    return 100 if torch.device(device).type == "cpu" else 500


def _shard(dataset: TensorDataset, ctx: DistContext) -> TensorDataset:
    """Rank r's examples ``r, r + N, ...`` of ``dataset`` (all of it for one process)."""
    if not ctx.enabled:
        return dataset
    return TensorDataset(*(t[ctx.rank::ctx.world_size] for t in dataset.tensors))


def evaluate_epoch(config: TrainConfig, model: nn.Module, test: TensorDataset, device: torch.device,
                   quiet: bool, ctx: Optional[DistContext] = None) -> Dict[str, Any]:
    """Test metrics after an epoch: clean error, IBP-verified error at ``config.eps`` (whole test
    set), and PGD error (``eval_pgd_steps`` steps, α = 2.5 ε / steps) on ``eval_pgd_subset`` examples.

    Runs on ``unwrap(model)`` in float32 (never under autocast). With several processes (``ctx``)
    each rank evaluates its shard of the examples and the errors are combined over the ranks.
    """
    ctx = ctx if ctx is not None else DistContext(device=device)
    model = unwrap(model)
    start = time.perf_counter()
    batch = eval_batch_size(device)
    with torch.autocast(device.type, enabled=False):
        result = verify(model, loader(_shard(test, ctx), batch), config.eps, method="ibp", device=device,
                        quiet=quiet)
        # An empty shard (a test set smaller than the number of processes) adds nothing.
        counted = reduce_metrics({"clean_error": result.clean_error if len(result) else 0.0,
                                  "verified_error": result.verified_error if len(result) else 0.0,
                                  "examples": len(result)}, ctx)
        out: Dict[str, Any] = {"test_clean_error": counted["clean_error"],
                               "test_verified_error": counted["verified_error"], "test_pgd_error": None}
        if config.eval_pgd_steps > 0 and config.eps > 0:
            pgd_set = _shard(subset(test, config.eval_pgd_subset), ctx)
            adv = evaluate(model, loader(pgd_set, batch), attack="pgd", eps=config.eps,
                           alpha=2.5 * config.eps / config.eval_pgd_steps, steps=config.eval_pgd_steps,
                           device=device, quiet=quiet)
            counted = reduce_metrics({"pgd_error": adv["adv_error"] if adv["examples"] else 0.0,
                                      "examples": adv["examples"]}, ctx)
            out["test_pgd_error"] = counted["pgd_error"]
    seconds = reduce_metrics({"seconds": time.perf_counter() - start, "examples": 0}, ctx)["seconds"]
    out["eval_seconds"] = seconds
    return out


def _check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP:
        raise ValueError(f"amp must be one of {AMP}, got {amp!r}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp 'bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} "
                         "has none: use amp='none'")


def train_run(folder: PathLike, *, device: Device = "cpu", data_dir: Optional[PathLike] = None,
              download: bool = False, data: Optional[Tuple[TensorDataset, TensorDataset]] = None,
              quiet: bool = False, log: Optional[Callable[[str], None]] = None, amp: str = "none",
              compile: bool = False, ctx: Optional[DistContext] = None) -> List[Dict[str, Any]]:
    """Trains the run in ``folder`` (prepared by :func:`prepare_run_folder`) to its last epoch.

    Starts from ``checkpoint.pt`` when there is one (resuming), otherwise from scratch. After every
    epoch: one line appended to ``metrics.jsonl``, ``checkpoint.pt`` replaced atomically,
    ``curves.png`` redrawn. ``log`` receives one line per epoch. ``data``: the run's (train, test)
    sets as :func:`load_data` returns them, when the caller has them already (on this rank's device).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Under torchrun only its kind counts: each
            rank trains on ``cuda:LOCAL_RANK`` (or the CPU).
        amp: ``"none"`` or ``"bf16"`` (bf16 autocast for the training forward passes, see the
            module docstring; meant for CUDA).
        compile: ``torch.compile`` the model of the training step's clean forward pass.
        ctx: the process group joined already (:func:`pyibp.distributed.init_distributed`);
            default: joined here when torchrun launched this process, and left on return.
    Returns:
        All records of ``metrics.jsonl`` (one per epoch), on every rank.

    Example (``torchrun --nproc_per_node 2 -m pyibp train --out runs/ibp`` does the same)::

        >>> records = train_run("runs/ibp", device="cuda", amp="bf16", compile=True)
    """
    own_group = ctx is None
    if ctx is None:
        ctx = init_distributed(torch.device(device).type)
    try:
        return _train_run(Path(folder), ctx.device if ctx.enabled else torch.device(device), ctx,
                          data_dir=data_dir, download=download, data=data, quiet=quiet, log=log, amp=amp,
                          compile=compile)
    finally:
        if own_group:
            shutdown(ctx)


def _train_run(folder: Path, device: torch.device, ctx: DistContext, *, data_dir: Optional[PathLike], download: bool,
               data: Optional[Tuple[TensorDataset, TensorDataset]], quiet: bool,
               log: Optional[Callable[[str], None]], amp: str, compile: bool) -> List[Dict[str, Any]]:
    _check_amp(amp, device)
    # Rank 0 alone reads the folder: the recipe, the checkpoint (on the CPU, whatever device it
    # was saved from) and the records it covers; the other ranks receive them.
    config, state, records = on_main(lambda: _read_run_state(folder), ctx)
    quiet = quiet or not ctx.is_main
    train, test = data if data is not None else load_data(config, data_dir=data_dir, download=download,
                                                          device=device)
    seed_everything(config.seed)
    model = build_model(config, train.tensors[0][0]).to(device)
    if config.method in CERTIFIED and config.ibp_init:
        initialise_for_ibp(model)
    batches = ShardedLoader(train, config.batch_size, ctx=ctx)
    steps_per_epoch = len(batches)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, config.epochs * steps_per_epoch)
    schedules = eps_schedules(config, steps_per_epoch)

    epoch, step = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        epoch, step = state["epoch"], state["step"]
    del state
    # The model of the training step: bf16 clean forward pass (certified methods; the others run
    # their epoch under autocast), DDP, torch.compile. Checkpoints and evaluation use `model`.
    train_model: nn.Module = model
    if amp == "bf16" and config.method in CERTIFIED:
        train_model = AutocastForward(train_model, device.type)
    train_model = wrap_model(train_model, ctx)
    if compile:
        train_model = torch.compile(train_model)

    delay = _batch_delay()
    title = f"{folder.name}: {config.method}, {config.model} on {config.dataset}, ε = {config.eps}"
    bar = tqdm(total=config.epochs, initial=epoch, desc="epochs", unit="epoch", dynamic_ncols=True,
               disable=quiet or not sys.stdout.isatty())
    while epoch < config.epochs:
        batches.set_epoch(epoch, seed=derive_seed(config.seed, epoch, "shuffle"))
        epoch_batches: Any = _Throttled(batches, delay) if delay else batches
        metrics, step = _train_one_epoch(config, train_model, epoch_batches, optimizer, scheduler, schedules, epoch,
                                         step, device, quiet, ctx, amp)
        epoch += 1
        broadcast_buffers(model, ctx)  # rank 0's BatchNorm statistics, for evaluation and the checkpoint
        record = {"epoch": epoch, "step": step, **metrics, **evaluate_epoch(config, model, test, device, quiet, ctx)}
        records.append(record)
        if ctx.is_main:
            append_metrics(folder / METRICS, record)
            save_checkpoint(folder / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT, "pyibp": __version__, "epoch": epoch, "step": step,
                "config": config.to_json(), "input_shape": list(train.tensors[0].shape[1:]),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state()})
            plot_curves(records, folder / CURVES, title)
        bar.update(1)
        bar.set_postfix({"loss": f"{record['train_loss']:.3f}", "clean": _percent(record["test_clean_error"]),
                         "verified": _percent(record["test_verified_error"])})
        if log is not None and ctx.is_main:
            with tqdm.external_write_mode():  # a line above the bar, not through it
                log(format_record(record, config.epochs))
    bar.close()
    barrier(ctx)  # every rank returns once rank 0 has written the last epoch
    return records


def _read_run_state(folder: Path) -> Tuple[TrainConfig, Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(config, checkpoint or None, records the checkpoint covers)`` of a run folder; drops the
    lines of epochs the checkpoint does not cover (killed between the two writes) and temporary
    files of writes a kill interrupted."""
    config = read_config(folder)
    state = load_checkpoint(folder / CHECKPOINT, map_location="cpu") if (folder / CHECKPOINT).exists() else None
    records = truncate_metrics(folder / METRICS, state["epoch"] if state is not None else 0)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return config, state, records


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_record(record: Dict[str, Any], epochs: int) -> str:
    """One human line for an epoch's record."""
    def pct(key: str) -> str:
        v = record.get(key)
        return "   -  " if v is None else f"{100 * v:5.2f}%"

    return (f"epoch {record['epoch']:>3}/{epochs}  step {record['step']:>5}  ε {record['train_eps']:.4f}  "
            f"lr {record['lr']:.2e}  loss {record['train_loss']:.4f}  train err {pct('train_error')}  "
            f"test clean {pct('test_clean_error')}  PGD {pct('test_pgd_error')}  "
            f"verified {pct('test_verified_error')}  {record['seconds'] + record['eval_seconds']:.1f}s")


def load_run(folder: PathLike, device: Device = "cpu") -> Tuple[TrainConfig, nn.Module, Dict[str, Any]]:
    """``(config, model in eval mode, checkpoint metadata)`` of a trained run.

    Example:
        >>> config, model, meta = load_run("runs/ibp")
        >>> meta["epoch"], config.epochs
    """
    folder = Path(folder)
    config = read_config(folder)
    path = folder / CHECKPOINT
    if not path.exists():
        raise RunFolderError(f"{folder} has no {CHECKPOINT} yet: no epoch has finished (train it with "
                             f"pyibp train --out {folder} --resume)")
    state = load_checkpoint(path, map_location=device)
    model = build_model(config, torch.zeros(state["input_shape"])).to(device)
    model.load_state_dict(state["model"])
    return config, model.eval(), {"epoch": state["epoch"], "step": state["step"], "pyibp": state.get("pyibp")}
