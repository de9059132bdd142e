"""The files of a run folder: their names, atomic writes, the checkpoint, the metrics (one JSON
line per epoch) and the recipe (``config.json``)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .recipe import TrainConfig

__all__ = ["CONFIG", "METRICS", "CHECKPOINT", "CURVES", "RUN_FILES", "CHECKPOINT_FORMAT", "RunFolderError",
           "atomic_write", "write_json", "save_checkpoint", "load_checkpoint", "append_metrics", "read_metrics",
           "truncate_metrics", "read_config"]

PathLike = Union[str, os.PathLike]
Device = Union[str, torch.device]

CONFIG, METRICS, CHECKPOINT, CURVES = "config.json", "metrics.jsonl", "checkpoint.pt", "curves.png"
# Everything pyibp writes into a run folder (``--overwrite`` removes these and nothing else).
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, CURVES, "eval.json", "certify.json")
CHECKPOINT_FORMAT = 1


class RunFolderError(Exception):
    """A run folder cannot be used as asked (exists without --resume/--overwrite, holds no run, ...)."""


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:   # name the file asked for, not the temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
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
    """A checkpoint written by :func:`save_checkpoint` (tensors and plain values only).

    Raises :class:`RunFolderError` naming the file when it cannot be read (truncated, overwritten,
    not a checkpoint), instead of the unpickler's traceback.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:   # not damage: a file that cannot be opened says so itself
        raise
    except Exception as err:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ... on damage
        raise RunFolderError(f"{path} is damaged and cannot be read ({_first_line(err)}); "
                             f"{_restore_hint(path)}") from None
    if not isinstance(state, dict):
        raise RunFolderError(f"{path} is not a pyibp checkpoint; {_restore_hint(path)}")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(f"{path} has checkpoint format {state.get('format')!r}, this pyibp reads "
                             f"{CHECKPOINT_FORMAT}")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _restore_hint(path: Path) -> str:
    return (f"restore it from a copy, or train the run again with: pyibp train --out {path.parent} "
            "--overwrite")


def append_metrics(path: PathLike, record: Dict[str, Any]) -> None:
    """Appends one JSON line and fsyncs it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a kill mid-write) is skipped.

    A line that cannot be read with more lines after it is damage, not a kill: raises
    :class:`RunFolderError` naming the file and the line rather than dropping the records after it.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RunFolderError(f"{path} is damaged at line {number} of {len(lines)}; restore it from a copy "
                                 "(pyibp appends one line per epoch and never rewrites the others)") from None
        records.append(record)
    return records


def truncate_metrics(path: PathLike, epochs: int) -> List[Dict[str, Any]]:
    """Keeps the records of the first ``epochs`` epochs (those the checkpoint covers), atomically.

    Records of later epochs are those of a run killed between its two writes (the metrics line,
    then the checkpoint): they are dropped, and the resumed run computes them again. A record that
    the checkpoint covers but the file lacks (a torn or lost line) cannot be computed again: raises
    :class:`RunFolderError` and leaves the file as it is.
    """
    path = Path(path)
    records = [r for r in read_metrics(path) if r.get("epoch", 0) <= epochs]
    missing = sorted(set(range(1, epochs + 1)) - {r.get("epoch") for r in records})
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise RunFolderError(f"{path} lacks the record of epoch {shown}, which {CHECKPOINT} has trained already "
                             f"(a torn or lost line): resuming would lose it; restore {path.name} from a copy, or "
                             f"start the run over with: pyibp train --out {path.parent} --overwrite")
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records)), binary=False)
    return records


def read_config(folder: PathLike) -> TrainConfig:
    """The recipe in ``folder/config.json``; :class:`RunFolderError` naming the file when there is
    none or it cannot be read."""
    path = Path(folder) / CONFIG
    if not path.exists():
        raise RunFolderError(f"{folder} holds no run (no {CONFIG}); train one with: pyibp train --out {folder}")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is damaged and cannot be read (not JSON: {err}); "
                             f"{_restore_hint(path)}") from None
    if not isinstance(values, dict):
        raise RunFolderError(f"{path} holds no recipe (a JSON {type(values).__name__}, not an object); "
                             f"{_restore_hint(path)}")
    try:
        return TrainConfig.from_json(values)
    except (TypeError, ValueError) as err:
        raise RunFolderError(f"{path}: {err}") from None
