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

