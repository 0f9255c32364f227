"""Writes that parallel sweep jobs can race on: a reader sees the whole file (or folder) or none of it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write(path, write) -> Path:
    """``write(tmp)`` into a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_dir(path, write) -> Path:
    """``write(tmp)`` fills a temporary folder next to ``path``, which is then renamed to ``path``. Jobs
    racing to build the same (identical) folder: the first rename wins, the others drop their own copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
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
