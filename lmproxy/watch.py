"""Waking when the ledger changes: inotify on its directory, through libc.

Every transaction that changes the ledger renames a new file into place, so one
IN_MOVED_TO event per change reaches every waiter at once, in the kernel's order,
with no polling. Python has no inotify binding of its own; ctypes reaches libc's
three calls (glibc and musl both have them), and is imported only by a shim that
has something to wait for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

IN_MOVED_TO = 0x00000080
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_READ_SIZE = 4096


class WatchError(OSError):
    """inotify could not be set up (for example: the per-user watch limit)."""


class DirectoryWatch:
    """Readable (poll its fileno) whenever a file is renamed into `directory`. Events
    that come while nobody waits stay queued in the kernel: a change between a
    transaction and the wait that follows it is never lost."""

    # How often a waiter must look without being told: never (see PollingWatch).
    poll_ms: int | None = None

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            raise _error("inotify_init1", ctypes.get_errno())
        if libc.inotify_add_watch(fd, os.fsencode(directory), IN_MOVED_TO) < 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise _error(f"inotify_add_watch({directory})", code)
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def consume(self) -> None:
        """Reads every queued event (their content does not matter: any rename is a
        reason to look at the ledger again)."""
        while True:
            try:
                if not os.read(self.fd, _READ_SIZE):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _error(call: str, code: int) -> WatchError:
    name = errno.errorcode.get(code, str(code))
    return WatchError(code, f"{call} failed: {os.strerror(code)} ({name})")


class PollingWatch:
    """What a shim waits on when inotify cannot be had: never readable, so that waiters
    look again every poll_ms instead (slower swaps, the same decisions)."""

    poll_ms: int | None = 100

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fd = self._read

    def fileno(self) -> int:
        return self.fd

    def consume(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self._read)
            os.close(self._write)
            self.fd = -1


def watch_directory(directory: Path) -> tuple[DirectoryWatch | PollingWatch, WatchError | None]:
    """An inotify watch on directory, or a PollingWatch and the reason there is none
    (the per-user limit on inotify instances or watches, most often)."""
    try:
        return DirectoryWatch(directory), None
    except WatchError as error:
        return PollingWatch(), error
