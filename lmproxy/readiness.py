"""Knowing when a backend answers: poll its port with a millisecond backoff,
then run its health check, within the startup deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Connect attempts on loopback cost microseconds; waking this often keeps the
# delay between the port opening and the first relayed byte at a few ms.
FIRST_DELAY_S = 0.001
MAX_DELAY_S = 0.002


@dataclass(frozen=True)
class Target:
    """Where the backend listens, resolved once (getaddrinfo is not free)."""

    family: int
    address: tuple[str, int] | tuple[str, int, int, int]

    def connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect_patiently(self, total: float, attempt: float = 0.02) -> socket.socket:
        """Connects, trying again every `attempt` seconds for up to `total`.

        A backend whose accept queue is full drops the SYN, and the kernel would
        only send it again after a second; a fresh attempt gets through as soon as
        the backend accepts. A refused connection fails at once."""
        deadline = time.monotonic() + total
        while True:
            try:
                return self.connect(timeout=attempt)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise


def resolve(host: str, port: int) -> list[Target]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [
        Target(family, address)
        for family, _, _, _, address in infos
        if isinstance(address[0], str)  # AF_INET and AF_INET6 only
    ]


class ReadinessError(Exception):
    """The backend did not become ready; the message says why."""


def wait_until_ready(
    host: str,
    port: int,
    *,
    deadline: float,
    healthcheck: str | None,
    healthcheck_interval_s: float,
    gone: Callable[[], bool],
) -> Target:
    """Returns the address that answered, or raises ReadinessError.

    gone() tells that the backend unit stopped: no point waiting any longer.
    """
    target = _wait_for_port(host, port, deadline, gone)
    if healthcheck:
        _wait_for_healthcheck(healthcheck, healthcheck_interval_s, deadline, gone)
    return target


def _wait_for_port(host: str, port: int, deadline: float, gone: Callable[[], bool]) -> Target:
    try:
        targets = resolve(host, port)  # once: the poll below runs every few milliseconds
    except OSError as error:
        raise ReadinessError(f"cannot resolve {host}: {error}") from error
    delay = FIRST_DELAY_S
    while True:
        for target in targets:
            try:
                target.connect(timeout=1.0).close()
                return target
            except OSError:
                continue
        if gone():
            raise ReadinessError(f"the backend stopped before it opened {host}:{port}")
        if time.monotonic() >= deadline:
            raise ReadinessError(
                f"{host}:{port} did not accept connections before the startup timeout"
            )
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY_S)


# What a health check inherits from the shim: nothing of the shim's own (its socket,
# its notify socket, its D-Bus address), only what a shell command needs.
HEALTHCHECK_ENVIRONMENT = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ")


def run_shell(
    command: str,
    timeout: float,
    extra: Mapping[str, str] | None = None,
    *,
    with_stderr: bool = True,
) -> tuple[int | None, str]:
    """Runs a config's shell command (HealthcheckCommand, SleepCommand, WakeCommand)
    with /bin/sh; its exit status (None if it ran past timeout) and the end of what it
    printed (on stdout alone without with_stderr).

    It runs inside the shim's sandbox, as the shim's user: with a small environment
    (plus `extra`), no descriptor of the shim's, and in a session of its own, so that
    a command that hangs is killed with everything it started."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key in HEALTHCHECK_ENVIRONMENT or key.startswith("LC_")
    }
    environment.update(extra or {})
    with subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if with_stderr else subprocess.DEVNULL,
        env=environment,
        start_new_session=True,
        close_fds=True,
    ) as check:
        try:
            output, _ = check.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(check.pid, signal.SIGKILL)
            check.communicate()
            return None, ""
        return check.returncode, output.decode(errors="replace").strip()[-200:]


def _wait_for_healthcheck(
    command: str, interval_s: float, deadline: float, gone: Callable[[], bool]
) -> None:
    last = "it never ran"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReadinessError(
                f"the health check did not pass before the startup timeout ({last})"
            )
        returncode, output = run_shell(command, remaining)
        if returncode is None:
            continue
        if returncode == 0:
            return
        last = f"last exit status {returncode}" + (f": {output}" if output else "")
        if gone():
            raise ReadinessError("the backend stopped while its health check was failing")
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
