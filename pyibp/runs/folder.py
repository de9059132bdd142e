"""The run-folder policy: one writer at a time (an advisory lock held for the run), a run is never
overwritten without ``overwrite``, a resumed run keeps its recipe."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Tuple

from .files import CHECKPOINT, CONFIG, METRICS, RUN_FILES, PathLike, RunFolderError, read_config, write_json
from .recipe import TrainConfig

__all__ = ["LOCK", "locked", "check_run_folder", "prepare_run_folder", "recipe_to_train", "RecipeMismatch"]

LOCK = ".pyibp.lock"   # holds "PID HOST" of the process that writes the run
_HELD: Dict[Path, int] = {}   # folder -> lock file descriptor: the locks this process holds


@contextlib.contextmanager
def locked(folder: PathLike) -> Iterator[Path]:
    """Holds the advisory lock of the run folder ``folder`` (created if needed) while the block runs.

    A second process asking for it gets :class:`RunFolderError` naming the holder's pid; the same
    process may nest. The lock is the kernel's (``flock``), so a killed holder releases it with its
    last breath; the lock file is removed when the block ends.

    Example:
        >>> with locked("runs/ibp"):
        ...     train_run("runs/ibp")
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:   # nested: the outermost block releases it
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = _acquire(path)
    _HELD[key] = fd
    try:
        yield folder
    finally:
        del _HELD[key]
        # Removed while still locked: a process that opened the old file finds it gone and retries.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(path.parent, holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fd)):
            break
        os.close(fd)   # the previous holder removed the file after we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _holder(fd: int) -> Tuple[str, str]:
    text = os.pread(fd, 256, 0).decode(errors="replace").split()
    return (text[0] if text else "unknown", text[1] if len(text) > 1 else "")


def _in_use(folder: Path, holder: Tuple[str, str]) -> RunFolderError:
    pid, host = holder
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return RunFolderError(f"{folder} is in use by another pyibp process (pid {pid}{where}): wait for it to end, "
                          "or stop it first")


def _check_unlocked(folder: Path) -> None:
    """Raises when another process holds the folder's lock; takes nothing."""
    if folder.resolve() in _HELD:
        return
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, _holder(fd)) from None
    finally:
        os.close(fd)   # closing releases a lock taken here


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
    if folder.is_dir():
        _check_unlocked(folder)
    if folder.is_dir() and _holds_run(folder):
        if resume and not (folder / CONFIG).exists():
            raise RunFolderError(f"{folder} holds run files but no {CONFIG}: cannot resume it; start over "
                                 "with --overwrite")
        if not resume and not overwrite:
            raise RunFolderError(f"{folder} already holds a run: pass --resume to continue it or --overwrite "
                                 "to start it over")


class RecipeMismatch(RunFolderError):
    """Resuming with recipe fields that contradict the run's ``config.json``; ``clashes`` holds
    ``(field, value asked, value saved)``."""

    def __init__(self, folder: Path, clashes: List[Tuple[str, Any, Any]]):
        self.folder, self.clashes = folder, clashes
        shown = ", ".join(f"{name} ({asked!r} here, {saved!r} saved)" for name, asked, saved in clashes)
        super().__init__(f"{folder} was started with another recipe: {shown}; a resumed run keeps its "
                         f"{CONFIG}")


def recipe_to_train(folder: PathLike, config: TrainConfig, *, resume: bool, overwrite: bool,
                    keep: Iterable[str] = ()) -> Tuple[TrainConfig, bool]:
    """``(recipe, resuming)``: ``config``, or the saved recipe when resuming a run; raises
    :class:`RecipeMismatch` when a field named in ``keep`` (those the user set) differs from it.
    Checks the folder like :func:`check_run_folder`; writes nothing."""
    check_run_folder(folder, resume=resume, overwrite=overwrite)
    folder = Path(folder)
    if not (resume and (folder / CONFIG).exists()):
        return config, False
    saved = read_config(folder)
    clashes = [(name, getattr(config, name), getattr(saved, name)) for name in keep
               if getattr(config, name) != getattr(saved, name)]
    if clashes:
        raise RecipeMismatch(folder, clashes)
    return saved, True


def prepare_run_folder(folder: PathLike, config: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Creates (or reopens, or clears) the run folder and returns it.

    * new or empty folder: ``config.json`` is written;
    * ``resume``: a folder holding a run keeps its ``config.json`` (the caller reads it back);
      one holding none starts fresh;
    * ``overwrite``: pyibp's files in the folder (:data:`RUN_FILES`) are removed first;
    * otherwise an existing run raises :class:`RunFolderError`: a run is never overwritten silently;
    * a folder another process is writing (:func:`locked`) raises :class:`RunFolderError`.
    """
    check_run_folder(folder, resume=resume, overwrite=overwrite)   # before creating anything
    with locked(folder) as folder:
        check_run_folder(folder, resume=resume, overwrite=overwrite)   # what the folder holds now
        if _holds_run(folder):
            if resume:
                return folder
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
        write_json(folder / CONFIG, config.to_json())
    return folder

