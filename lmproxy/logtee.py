"""Runs a command and copies its output to a file as well as to our stdout.

Used as a backend's ExecStart when the config sets LogFilePath: the journal
keeps the output (stdout goes there) and the file gets it too, as
large-model-proxy users expect. Signals are passed on to the command, and its
exit status (or the signal that killed it) becomes ours, so systemd sees the model
server's own fate.

The file is opened as the backend's user, root included, so it is opened with
care: a symbolic link or a hard link planted where the log goes would otherwise make
that user append model output to any file (see `open_log`).

Usage: python3 -m lmproxy.logtee LOGFILE -- COMMAND [ARG...]
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from types import FrameType

from lmproxy.files import UnsafeFile, open_own_regular, writable_by_others


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python3 -m lmproxy.logtee LOGFILE -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    logfile, command = argv[0], argv[2:]
    try:
        log_fd = open_log(logfile)
    except (OSError, UnsafeLog) as error:
        print(f"lmproxy.logtee: cannot use {logfile} as LogFilePath: {error}", file=sys.stderr)
        return 1
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    assert child.stdout is not None
    out = sys.stdout.fileno()
    while chunk := os.read(child.stdout.fileno(), 65536):
        _write_all(out, chunk)
        _write_all(log_fd, chunk)
    status = child.wait()
    if status < 0:
        die_by_signal(-status)
    return status


def die_by_signal(signum: int) -> None:
    """Ends this process by the signal that ended the command: systemd counts a main
    process killed by SIGTERM as a clean stop, but not an exit status of 143."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    sys.exit(128 + signum)  # a signal whose default is not to end a process


class UnsafeLog(Exception):  # noqa: N818 (it is what the caller reports)
    """The log file or its folder could be someone else's trap."""


def open_log(path: str) -> int:
    """Opens path to append, refusing what another user could have planted: the
    folder must be ours or root's and writable by nobody else (unless sticky), the
    file a regular file of ours with no other name (a hard link to a file of root's
    in a shared folder), and a symbolic link is never followed."""
    folder = os.stat(os.path.dirname(path) or ".")
    me = os.geteuid()
    if folder.st_uid not in (0, me):
        raise UnsafeLog(f"its folder belongs to uid {folder.st_uid}, not to uid {me} or root")
    if writable_by_others(folder):
        raise UnsafeLog(
            f"its folder is writable by others (mode {stat.S_IMODE(folder.st_mode):04o})"
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    try:
        return open_own_regular(path, flags, 0o640, owner=me, single_name=True)
    except UnsafeFile as problem:
        raise UnsafeLog(f"it {problem}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
