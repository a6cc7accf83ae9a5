"""Runs a command and copies its output to a file as well as to our stdout.

Used as a backend's ExecStart when the config sets LogFilePath: the journal
keeps the output (stdout goes there) and the file gets it too, as
large-model-proxy users expect. Signals are passed on to the command, and its
exit status becomes ours, so systemd sees the model server's own fate.

Usage: python3 -m lmproxy.logtee LOGFILE -- COMMAND [ARG...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python3 -m lmproxy.logtee LOGFILE -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    logfile, command = argv[0], argv[2:]
    log_fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
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
    return 128 - status if status < 0 else status  # killed by a signal: like a shell


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
