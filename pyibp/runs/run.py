"""The training run: :func:`train_run` trains a prepared run folder to its last epoch (resuming
from its checkpoint), :func:`load_run` reads a trained one back."""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .. import __version__
from ..distributed import (AutocastForward, DistContext, ShardedLoader, barrier, broadcast_buffers, init_distributed,
                           on_main, shutdown, wrap_model)
from .data import load_data
from .files import (CHECKPOINT, CHECKPOINT_FORMAT, CURVES, METRICS, Device, PathLike, RunFolderError, append_metrics,
                    load_checkpoint, read_config, save_checkpoint, truncate_metrics)
from .folder import locked, prepare_run_folder, recipe_to_train
from ..training.schedules import ScheduleWarning, eps_shortfall
from .loop import build_method, evaluate_epoch, train_one_epoch
from .model import build_model, check_boundable, initialise_for_ibp
from .optimizer import make_optimizer, make_scheduler
from .plots import plot_curves
from .recipe import TrainConfig
from .seeds import derive_seed, rng_state, seed_everything, set_rng_state

__all__ = ["train", "train_run", "load_run", "format_record", "AMP"]

AMP = ("none", "bf16")   # train_run's mixed-precision modes


def _check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP:
        raise ValueError(f"amp must be one of {AMP}, got {amp!r}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp 'bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} "
                         "has none: use amp='none'")


def train(folder: PathLike, config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          keep: Iterable[str] = (), device: Device = "cpu", data_dir: Optional[PathLike] = None,
          download: bool = False, quiet: bool = False, log: Optional[Callable[[str], None]] = None,
          amp: str = "none", compile: bool = False,
          ctx: Optional[DistContext] = None) -> Tuple[TrainConfig, List[Dict[str, Any]]]:
    """A run from its recipe to its last epoch, as ``pyibp train`` does it: checks the folder and
    the recipe (resuming: the saved one, :class:`~pyibp.runs.folder.RecipeMismatch` when a field
    named in ``keep`` differs), loads the data and builds the model — everything that can fail
    fails before a file is written —, then holds the folder's lock while it prepares the folder
    (:func:`prepare_run_folder`) and trains it (:func:`train_run`). Rank 0 alone touches the folder.

    Returns:
        ``(the recipe trained, all records of metrics.jsonl)``.

    Example:
        >>> config, records = train("runs/ibp", TrainConfig.for_method("ibp", epochs=2), resume=True)
    """
    folder = Path(folder)
    own_group = ctx is None
    if ctx is None:
        ctx = init_distributed(torch.device(device).type)
    device = ctx.device if ctx.enabled else torch.device(device)
    try:
        _check_amp(amp, device)
        config, resuming = on_main(lambda: recipe_to_train(folder, config, resume=resume, overwrite=overwrite,
                                                           keep=keep), ctx)
        data = load_data(config, data_dir=data_dir, download=download, device=device)
        ShardedLoader(data[0], config.batch_size, ctx=ctx)   # a last batch with no example for some rank
        check_boundable(config, data[0].tensors[0][0])       # a factory that fails, a model bounds refuse
        with contextlib.ExitStack() as held:
            # Rank 0 takes the lock (every rank stops when it cannot) and holds it to the end.
            on_main(lambda: held.enter_context(locked(folder)), ctx)
            on_main(lambda: prepare_run_folder(folder, config, resume=resume, overwrite=overwrite), ctx)
            if log is not None and ctx.is_main:
                where = f"{device}" + (f", {ctx.world_size} processes" if ctx.enabled else "")
                where += "".join(f", {flag}" for flag, on in (("bf16 autocast", amp == "bf16"),
                                                              ("torch.compile", compile)) if on)
                log(f"resuming {folder} ({config.method}, {config.epochs} epochs) on {where}" if resuming else
                    f"training {config.method} ({config.model} on {config.dataset}, ε = {config.eps}) "
                    f"into {folder} on {where}")
            records = _train_run(folder, device, ctx, data_dir=data_dir, download=download, data=data,
                                 quiet=quiet, log=log, amp=amp, compile=compile)
        return config, records
    finally:
        if own_group:
            shutdown(ctx)


def train_run(folder: PathLike, *, device: Device = "cpu", data_dir: Optional[PathLike] = None,
              download: bool = False, data: Optional[Tuple[TensorDataset, TensorDataset]] = None,
              quiet: bool = False, log: Optional[Callable[[str], None]] = None, amp: str = "none",
              compile: bool = False, ctx: Optional[DistContext] = None) -> List[Dict[str, Any]]:
    """Trains the run in ``folder`` (prepared by :func:`prepare_run_folder`) to its last epoch,
    holding the folder's lock (:func:`~pyibp.runs.folder.locked`) on rank 0.

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
    with contextlib.ExitStack() as held:
        on_main(lambda: held.enter_context(locked(folder)), ctx)
        return _train_locked(folder, device, ctx, data_dir=data_dir, download=download, data=data, quiet=quiet,
                             log=log, amp=amp, compile=compile)


def _train_locked(folder: Path, device: torch.device, ctx: DistContext, *, data_dir: Optional[PathLike],
                  download: bool, data: Optional[Tuple[TensorDataset, TensorDataset]], quiet: bool,
                  log: Optional[Callable[[str], None]], amp: str, compile: bool) -> List[Dict[str, Any]]:
    # Rank 0 alone reads the folder: the recipe, the checkpoint (on the CPU, whatever device it
    # was saved from) and the records it covers; the other ranks receive them.
    config, state, records = on_main(lambda: _read_run_state(folder), ctx)
    quiet = quiet or not ctx.is_main
    train, test = data if data is not None else load_data(config, data_dir=data_dir, download=download,
                                                          device=device)
    seed_everything(config.seed)
    model = build_model(config, train.tensors[0][0]).to(device)
    batches = ShardedLoader(train, config.batch_size, ctx=ctx)
    steps_per_epoch = len(batches)
    method = build_method(config, steps_per_epoch)
    if method.certified and config.ibp_init:
        initialise_for_ibp(model)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, config.epochs * steps_per_epoch)
    shortfall = eps_shortfall(config, steps_per_epoch) if method.certified else None
    if shortfall is not None and ctx.is_main:
        warnings.warn(f"{folder}: {shortfall}", ScheduleWarning, stacklevel=3)

    epoch, step = 0, 0
    if state is not None:
        _load_weights(model, state, folder / CHECKPOINT, config)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        epoch, step = state["epoch"], state["step"]
    del state
    # The model of the training step: bf16 clean forward pass (certified methods; the others run
    # their epoch under autocast), DDP, torch.compile. Checkpoints and evaluation use `model`.
    train_model: nn.Module = model
    if amp == "bf16" and method.certified:
        train_model = AutocastForward(train_model, device.type)
    train_model = wrap_model(train_model, ctx)
    if compile:
        train_model = torch.compile(train_model)

    title = f"{folder.name}: {config.method}, {config.model} on {config.dataset}, ε = {config.eps}"
    bar = tqdm(total=config.epochs, initial=epoch, desc="epochs", unit="epoch", dynamic_ncols=True,
               disable=quiet or not sys.stdout.isatty())
    while epoch < config.epochs:
        batches.set_epoch(epoch, seed=derive_seed(config.seed, epoch, "shuffle"))
        metrics, step = train_one_epoch(config, method, train_model, batches, optimizer, scheduler, epoch, step,
                                        device, quiet, ctx, amp)
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
    state = (_checkpoint(folder / CHECKPOINT, "cpu", RESUME_KEYS) if (folder / CHECKPOINT).exists()
             else None)
    records = truncate_metrics(folder / METRICS, state["epoch"] if state is not None else 0)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return config, state, records


# What a checkpoint must hold to rebuild its model, and to resume its run.
MODEL_KEYS = ("epoch", "step", "input_shape", "model")
RESUME_KEYS = MODEL_KEYS + ("optimizer", "scheduler", "rng")


def _checkpoint(path: Path, device: Device, keys: Tuple[str, ...]) -> Dict[str, Any]:
    state = load_checkpoint(path, map_location=device)
    missing = [key for key in keys if key not in state]
    if missing:
        raise RunFolderError(f"{path} is not a complete pyibp checkpoint (it lacks {', '.join(missing)}); restore "
                             f"it from a copy, or train the run again with: pyibp train --out {path.parent} "
                             "--overwrite")
    return state


def _load_weights(model: nn.Module, state: Dict[str, Any], path: Path, config: TrainConfig) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:   # a factory's code changed since the run was trained
        first = str(err).strip().splitlines()[0]
        raise RunFolderError(f"{path} does not fit the model {config.model!r} builds now ({first}); was its code "
                             "changed after the run was trained?") from None


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
    state = _checkpoint(path, device, MODEL_KEYS)
    model = build_model(config, torch.zeros(state["input_shape"])).to(device)
    _load_weights(model, state, path, config)
    return config, model.eval(), {"epoch": state["epoch"], "step": state["step"], "pyibp": state.get("pyibp")}
