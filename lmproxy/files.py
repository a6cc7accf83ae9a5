"""Files that no reader and no crash sees half of, and files no other user can slip in."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Writes to a temporary file in the same directory, then renames it into place.

    durable: fsync before the rename, so that the new contents survive a power
    loss. Not needed for files on a tmpfs (the ledger), where it only costs time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


class UnsafeFile(Exception):  # noqa: N818 (it is what callers check for)
    """A file another user could have put or changed where ours should be."""


def writable_by_others(info: os.stat_result) -> bool:
    """Whether the group or others may write it: a folder that is sticky (/tmp) does
    not count, since nobody may replace in it what someone else owns."""
    if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX:
        return False
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def open_own_regular(
    path: str | os.PathLike[str], flags: int, mode: int, *, owner: int, single_name: bool = False
) -> int:
    """Opens path without following a symbolic link or blocking on a FIFO, and refuses
    (UnsafeFile, saying why) anything but a regular file that owner owns; with
    single_name, also one with other names (a hard link to someone else's file)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != owner:
        problem = f"is owned by uid {info.st_uid}, not {owner}"
    elif single_name and info.st_nlink != 1:
        problem = f"has {info.st_nlink} names (hard links)"
    if problem:
        os.close(fd)
        raise UnsafeFile(problem)
    os.set_blocking(fd, True)
    return fd
