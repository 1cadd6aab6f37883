"""A run directory: its file names, atomic writes (one scheme for every file) and its history.

A run directory (``daqkd teacher|train --out RUN``, one student of a sweep) holds:

- ``config.json``: the options that made it (enough to rerun or resume it);
- ``metrics.jsonl``: one JSON line per epoch (train loss terms, test figures when evaluated, LR, time);
- ``model.safetensors`` (best test top-1) and ``last.safetensors``: daqkd checkpoints;
- ``state.pt``: everything a resume needs (model, optimizers, schedulers, RNG state, position);
- ``rank.json``: the ranking of ``--aug auto``; ``train.log``: a sweep worker's output; ``tensorboard/``.

Every file is written to a temporary name in the same directory and renamed over the target, so a
reader or a killed process never sees half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DaqkdError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"
BEST_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
RANK_FILE = "rank.json"
TRAIN_LOG = "train.log"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block succeeds,
    delete it when the block fails.

    The new contents reach the disk (fsync) before the rename, and the rename before return
    (fsync of the directory): after a power loss ``path`` holds the old file or the new one, never
    an empty one, and the file a caller just wrote is there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        _fsync(tmp)
        os.replace(tmp, path)
        if os.name == "posix":  # a directory cannot be opened for fsync on Windows
            _fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: str | Path) -> None:
    """fsync a directory where the file system supports it: some network and FUSE file systems
    refuse it (EINVAL, ENOTSUP), and after the rename the write has happened, so only a real I/O
    error (EIO, ENOSPC) is worth failing the command for."""
    try:
        _fsync(path)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES):
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_option(given: Any, stored: Any, start: str | None, is_path: bool) -> bool:
    """Whether an option given now is the one a run stored. Paths compare as the files they name:
    ``given`` relative to this process's directory, ``stored`` relative to ``start``, the directory
    the run started in (config.json's cwd; None: this one), so ``../d`` from a run's parent and
    ``d`` from where it started are the same."""
    if is_path and isinstance(given, str) and isinstance(stored, str):
        base = Path(start) if start else Path.cwd()
        return Path(given).expanduser().resolve() == (base / Path(stored).expanduser()).resolve()
    return given == stored


def check_output(path: str | Path, kind: str, option: str = "--out") -> None:
    """Before any work: ``path`` can become a ``kind`` ("file" or "directory") we may write.

    Refuses an existing path of the other kind, a path below a file, and a place without write
    permission, each with one DaqkdError naming the option.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise DaqkdError(f"{option} {path} is a directory: pass a file name (e.g. {path / 'report.json'})")
    if kind == "directory" and path.exists() and not path.is_dir():
        raise DaqkdError(f"{option} {path} is a file: pass a directory for the run")
    parent = path if kind == "directory" and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DaqkdError(f"{option} {path} lies below {parent}, which is a file: pass a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DaqkdError(f"{option} {path}: {parent} is not writable (read-only or no permission): pass another path")


def remove_partial_files(run: str | Path) -> list[Path]:
    """Delete the temporary files a kill during a write leaves in RUN (``NAME.*.tmp`` and the older
    ``NAME.tmp``/``NAMEXXXX.tmp`` forms); returns what was removed."""
    run = Path(run)
    removed = []
    for name in (CONFIG_FILE, METRICS_FILE, STATE_FILE, BEST_FILE, LAST_FILE, RANK_FILE):
        for partial in run.glob(f"{name}*.tmp"):
            partial.unlink(missing_ok=True)
            removed.append(partial)
    return removed


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def store_python_scalars(config: Any) -> None:
    """Replace a dataclass's numpy scalar fields (a notebook's np.arange, a pandas row) by their
    Python values, in place: JSON (config.json, checkpoint metadata) cannot hold numpy's, and that
    would fail only when the first file is written, after the teacher, the ranking or an epoch."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, np.generic):
            setattr(config, item.name, value.item())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_history(run: str | Path) -> list[dict[str, Any]]:
    """The epochs recorded in RUN/metrics.jsonl, in order ([] without the file)."""
    metrics = Path(run) / METRICS_FILE
    if not metrics.is_file():
        return []
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    history = []
    for number, line in enumerate(lines, 1):
        try:
            history.append(json.loads(line))
        except ValueError as exc:
            if number == len(lines):  # a write cut short by a kill: that epoch is not in the log
                break
            raise DaqkdError(f"{metrics} line {number} is not JSON: the run's log is damaged; delete the run "
                             "or repair the line") from exc
    return history


def append_history(run: str | Path, record: dict[str, Any]) -> None:
    with open(Path(run) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_history(run: str | Path, history: list[dict[str, Any]]) -> None:
    """Replace RUN/metrics.jsonl by ``history``, atomically."""
    write_text_atomic(Path(run) / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in history))


def finished_run(run: str | Path, epochs: int) -> dict[str, Any] | None:
    """Top-1/top-5 after the last epoch, the best evaluated top-1, the training time and the epochs of
    a run that reached ``epochs``; None otherwise."""
    history = read_history(run)  # metrics, not weights: committed sweeps keep only the former
    if not history or history[-1]["epoch"] < epochs:
        return None
    return {"top1": history[-1]["test_top1"], "top5": history[-1]["test_top5"],
            "best_top1": max(h["test_top1"] for h in history if "test_top1" in h),
            "train_seconds": sum(h["seconds"] for h in history), "epochs": history[-1]["epoch"]}


def stored_ranking(path: str | Path, names: list[str], fields: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The ranking kept in ``path`` if it ranks exactly ``names``, each candidate holding a number
    under every key of ``fields`` (what the caller reads: a sweep's report needs the rank and the
    figures); None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:  # written atomically by daqkd, but README invites copying one in: it may be anything
        ranking = json.loads(path.read_text())
        ranked = sorted(c["name"] for c in ranking["candidates"])
        selected = ranking["selected"]
        for candidate in ranking["candidates"]:
            for field in fields:
                if isinstance(candidate[field], bool) or not isinstance(candidate[field], (int, float)):
                    raise TypeError(f"{candidate['name']}'s {field} is {candidate[field]!r}, not a number")
    except (ValueError, KeyError, TypeError) as exc:
        raise DaqkdError(f"{path} is not a daqkd ranking ({type(exc).__name__}: {exc}): delete it to rank "
                         "again") from exc
    if ranked != sorted(names) or selected not in names:
        raise DaqkdError(f"{path} ranks other candidates than --augs: use another --out, or delete it")
    return ranking
