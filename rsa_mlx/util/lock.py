"""One process at a time in a folder: a sweep folder, a training run.

:func:`folder_lock` takes an advisory lock (``flock``) on ``<folder>/.lock``
and writes this process's id into it. The kernel drops the lock when the
process ends, however it ends, so a lock left by a killed process is stale
by construction: the next process takes it (and is told whose it was: the
id is still in the file, since only a clean release empties it). A second
process that finds the lock held is refused at once, in one line naming
the holder; it never waits.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rsa_mlx.util.errors import InputError, quote

__all__ = ["LOCK_FILE", "Busy", "check_free", "folder_lock"]

LOCK_FILE = ".lock"


class Busy(InputError):
    """The folder is in use by another process."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return text if text.isdigit() else ""


def _refuse(folder: Path, what: str, hint: str, fd: int) -> Busy:
    pid = _holder(fd)
    who = f"process {pid}" if pid else "another process"
    return Busy(f"{quote(folder)}: in use by another {what} ({who}); {hint}")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def folder_lock(folder: str | Path, what: str, hint: str) -> Iterator[int | None]:
    """Hold ``folder``'s lock (the folder is created if need be) for the
    body, or raise :class:`Busy` (``in use by another <what> (process N);
    <hint>``). Yields the id of a process whose lock was stale (it ended
    without releasing it: killed), else None."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(folder / LOCK_FILE, flags, 0o666)
    try:
        if not _try_lock(fd):
            raise _refuse(folder, what, hint, fd)
        stale = _holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield int(stale) if stale and int(stale) != os.getpid() else None
        finally:
            os.ftruncate(fd, 0)  # a clean release: no id left behind
    finally:
        os.close(fd)  # closing drops the lock


def check_free(folder: str | Path, what: str, hint: str) -> None:
    """Raise :class:`Busy` if another process holds ``folder``'s lock now
    (without taking it or creating anything)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return
    try:
        if not _try_lock(fd):
            raise _refuse(Path(folder), what, hint, fd)
    finally:
        os.close(fd)
