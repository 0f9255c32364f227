"""Writes that parallel sweep jobs can race on: a reader sees the whole file (or folder) or none of it."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path


def atomic_write(path, write) -> Path:
    """``write(tmp)`` into a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide records from the others on a shared results dir
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(path, write) -> Path:
    """``write(tmp)`` fills a temporary folder next to ``path``, which is then renamed to ``path``. Jobs
    racing to build the same (identical) folder: the first rename wins, the others drop their own copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700, as a plain mkdir would make it
    try:
        write(tmp)
        try:
            tmp.rename(path)
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def replace_dir(path, write) -> Path:
    """``write(tmp)`` fills a temporary folder next to ``path``, which then replaces ``path`` (an older
    folder there is moved aside first and removed after): a reader sees the old folder, the new one, or
    (for a moment between the two renames) none, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700, as a plain mkdir would make it
    old = None
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
            path.rename(old / path.name)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def first_line(error: BaseException | str) -> str:
    """An exception (or a reason) as one short line: its type and the first line of its message."""
    if isinstance(error, str):
        return error
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def warn_corrupt(path, error: BaseException | str, what: str, action: str = "rebuilding it") -> None:
    """The warning for an on-disk cache or asset that no longer reads: it names the file and the cause, so a
    failing disk or a killed writer shows up instead of being silently recomputed (or trusted)."""
    warnings.warn(f"corrupt {what} {path} ({first_line(error)}): {action}", stacklevel=3)


def discard(path) -> None:
    """Remove a corrupt folder: renamed aside first (one atomic step, so a racing job sees it whole or not at
    all), then deleted. A job that raced us to it has already removed it."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.corrupt-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
