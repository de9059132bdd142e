"""Training runs on disk: one folder per run, checkpointed every epoch, resumable after a kill.

A run folder holds

* ``config.json``    the recipe (:class:`TrainConfig`), written once when the run starts;
* ``metrics.jsonl``  one JSON line per finished epoch (losses, clean / PGD / verified error, ε, κ,
  learning rate, seconds);
* ``checkpoint.pt``  model, optimiser, learning-rate scheduler, RNG states (torch, numpy, python
  ``random``, CUDA), epoch and global step, replaced atomically after every epoch;
* ``curves.png``     the metrics as curves, redrawn after every epoch.

A run folder has one writer: :func:`train` and :func:`train_run` hold its advisory lock
(:func:`locked`, ``.pyibp.lock``) on rank 0 while they write, and a second process is refused
with the holder's pid. A damaged file is named (:class:`RunFolderError`), never silently
replaced, and a resume never drops a record the checkpoint covers.

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

The package, one concern per module (each calls only the ones listed before it):

* :mod:`~pyibp.runs.model`      the architecture (zoo name or user factory), IBP initialisation;
* :mod:`~pyibp.runs.recipe`     :class:`TrainConfig` (its methods and their defaults: :mod:`pyibp.training`);
* :mod:`~pyibp.runs.optimizer`  optimiser and learning rate as functions of the step;
* :mod:`~pyibp.runs.seeds`      per-epoch seeds and the global generators' states;
* :mod:`~pyibp.runs.files`      file names, atomic writes, checkpoint, metrics, config I/O;
* :mod:`~pyibp.runs.folder`     the run-folder policy (one writer, new, resume, overwrite);
* :mod:`~pyibp.runs.plots`      curves.png;
* :mod:`~pyibp.runs.data`       the run's data subsets;
* :mod:`~pyibp.runs.loop`       the recipe's method, one epoch (:func:`pyibp.training.train_epoch`), then the
                                 per-epoch test;
* :mod:`~pyibp.runs.run`        :func:`train` (check, prepare, train), :func:`train_run`, :func:`load_run`.

Example:
    >>> config = TrainConfig.for_method("ibp", eps=0.1, epochs=20)
    >>> folder = prepare_run_folder("runs/ibp", config, resume=False, overwrite=False)
    >>> records = train_run(folder, device="cpu")
    >>> records[-1]["test_verified_error"]
    >>> config, records = train("runs/ibp", config, resume=True)   # all of it in one call, as pyibp train

    The same under ``torchrun --nproc_per_node 2 train.py`` (a script holding the lines above,
    with ``prepare_run_folder`` run by rank 0 only, e.g. through :func:`pyibp.distributed.on_main`)
    trains with 2 processes; ``pyibp train`` does all of this.
"""
from .data import checked_subset, load_data, subset
from .files import (CHECKPOINT, CHECKPOINT_FORMAT, CONFIG, CURVES, METRICS, RUN_FILES, RunFolderError, append_metrics,
                    atomic_write, load_checkpoint, read_config, read_metrics, save_checkpoint, truncate_metrics,
                    write_json)
from .folder import LOCK, RecipeMismatch, check_run_folder, locked, prepare_run_folder, recipe_to_train
from .loop import build_method, eval_batch_size, evaluate_epoch, train_one_epoch
from .model import build_model, initialise_for_ibp, load_factory
from .optimizer import lr_factor, make_optimizer, make_scheduler
from .plots import plot_curves
from .recipe import PRESETS, REPRODUCE_CERTIFIED, TrainConfig
from .run import AMP, format_record, load_run, train, train_run
from .seeds import derive_seed, rng_state, seed_everything, set_rng_state

__all__ = ["TrainConfig", "PRESETS", "REPRODUCE_CERTIFIED", "RUN_FILES", "RunFolderError", "RecipeMismatch", "LOCK",
           "locked", "check_run_folder", "prepare_run_folder", "recipe_to_train", "train", "train_run", "load_run",
           "load_factory", "checked_subset", "load_data", "read_config", "read_metrics", "append_metrics",
           "truncate_metrics", "save_checkpoint", "load_checkpoint", "atomic_write", "write_json", "rng_state",
           "set_rng_state", "derive_seed", "plot_curves", "subset", "eval_batch_size", "build_model",
           "initialise_for_ibp", "build_method", "lr_factor", "make_optimizer", "make_scheduler", "AMP"]
