"""The run-folder policy: a run is never overwritten without ``overwrite``, a resumed run keeps
its recipe."""
from __future__ import annotations

from pathlib import Path

from .files import CHECKPOINT, CONFIG, METRICS, RUN_FILES, PathLike, RunFolderError, write_json
from .recipe import TrainConfig

__all__ = ["check_run_folder", "prepare_run_folder"]


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

