"""A small typed client for systemd's D-Bus API (org.freedesktop.systemd1).

lmproxy's shim starts and stops model servers on demand, so it has to know when
a job has really finished (not merely been queued, as `systemctl --no-block`
would) and must not fork a `systemctl` per request. jeepney is pure Python and
Debian ships it, so this talks D-Bus directly, with jeepney 0.8's blocking API.

Every failure comes out as a `SystemdError` that names the unit and what was
being done with it, with systemd's own D-Bus error when there is one, so that
callers can log it as it is.

Signals are trusted only from systemd itself. The bus delivers a signal addressed
to one connection (a unicast signal) whatever that connection's match rules say,
so any local user could otherwise tell a shim that its backend stopped or that a
job failed. A signal is therefore taken only from the unique name that owns
org.freedesktop.systemd1 (asked of the bus, which no one can impersonate), its
body is never trusted to be well formed, and a unit's state is read back from
systemd rather than from the signal that announced a change.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from jeepney import (
    AuthenticationError,
    DBusAddress,
    DBusErrorResponse,
    HeaderFields,
    MatchRule,
    Message,
    MessageType,
    Properties,
    new_method_call,
)
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from lmproxy.paths import Scope

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"
SERVICE_INTERFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"

NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"

# systemd answers most calls at once; this only bounds a hung or overloaded manager.
CALL_TIMEOUT = 30.0
# A daemon-reload re-reads every unit file, which takes long on big systems.
RELOAD_TIMEOUT = 120.0
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"

RUNNING_STATES = frozenset({"active", "activating", "deactivating", "reloading"})
STOPPED_STATES = frozenset({"inactive", "failed"})

# What a JobRemoved result other than "done" means, for error messages.
_JOB_RESULT_HINTS = {
    "failed": "the unit failed",
    "timeout": "the job or the unit timed out",
    "canceled": "the job was canceled, usually by a conflicting job queued after it",
    "dependency": "a unit it depends on failed",
    "skipped": "the job does not apply to the unit in its current state",
    "assert": "an Assert*= setting of the unit failed",
    "unsupported": "the unit type does not support this operation",
}


class SystemdError(RuntimeError):
    """A systemd operation failed.

    The message always says what was being done (`operation`) to which unit
    (`unit`, None for manager-wide operations such as a reload), and why;
    `dbus_error` is systemd's D-Bus error name, when the failure is one, so that
    callers can tell e.g. a missing unit (NoSuchUnit) from other failures.
    """

    def __init__(
        self, operation: str, unit: str | None, detail: str, *, dbus_error: str | None = None
    ) -> None:
        self.operation = operation
        self.unit = unit
        self.detail = detail
        self.dbus_error = dbus_error
        target = f" {unit}" if unit else ""
        super().__init__(f"cannot {operation}{target}: {detail}")


class BusUnavailable(SystemdError):  # noqa: N818 (the name says what callers check for)
    """No connection to the bus that systemd listens on (or systemd is not on it)."""


@dataclass(frozen=True)
class UnitState:
    """A unit's state as systemd reports it (the columns of `systemctl list-units`)."""

    name: str
    load_state: str  # "loaded", "not-found", "masked", "error", ...
    active_state: str  # "active", "inactive", "activating", "deactivating", "failed", ...
    sub_state: str  # type-specific: "running", "dead", "exited", "listening", ...

    @property
    def running(self) -> bool:
        """True while the unit has (or is getting, or is losing) processes or resources."""
        return self.active_state in RUNNING_STATES

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> UnitState:
        """From one `(ssssssouso)` entry of ListUnits*: name, description, load, active, sub, ..."""
        return cls(
            name=str(row[0]),
            load_state=str(row[2]),
            active_state=str(row[3]),
            sub_state=str(row[4]),
        )


def bus_address(scope: Scope) -> str:
    """The D-Bus address of scope's manager, found the way sd-bus finds it.

    jeepney 0.8 reads only DBUS_SESSION_BUS_ADDRESS; sd-bus (and so systemctl)
    falls back to $XDG_RUNTIME_DIR/bus, which is all that `sudo -u`, cron and
    ssh sessions without a login session may have.
    """
    if scope is Scope.SYSTEM:
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return f"unix:path={runtime_dir}/bus"
    raise _bus_unavailable(
        scope, "(none)", "neither DBUS_SESSION_BUS_ADDRESS nor XDG_RUNTIME_DIR is set"
    )


def _bus_unavailable(scope: Scope, address: str, why: str) -> BusUnavailable:
    """A BusUnavailable that says which bus, where, why, and what to check next."""
    if scope is Scope.SYSTEM:
        hint = (
            "check that this machine runs systemd and D-Bus "
            "(`systemctl status dbus.socket dbus.service`), or use the user scope"
        )
    else:
        hint = (
            "check that your user manager and its bus run (`systemctl --user status dbus.socket`;"
            " Debian needs the dbus-user-session package) and that DBUS_SESSION_BUS_ADDRESS or"
            " XDG_RUNTIME_DIR point at them: without a login session (sudo, cron, su) export"
            " XDG_RUNTIME_DIR=/run/user/$(id -u)"
            " DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$(id -u)/bus,"
            " and `loginctl enable-linger` keeps the manager running after logout"
        )
    bus = "system" if scope is Scope.SYSTEM else "session"
    return BusUnavailable(f"connect to the {bus} bus", None, f"{why} (address {address}); {hint}")


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until deadline (a time.monotonic() value); None means no limit."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _seconds(timeout: float | None) -> str:
    return "ever" if timeout is None else f"{timeout:g} s"


@dataclass(frozen=True)
class _Signal:
    """Which signal to listen for: one member of one interface on one of systemd's objects."""

    path: str
    interface: str
    member: str
    arg0: str | None = None

    def rule(self, sender: str | None = None) -> MatchRule:
        """The match rule; the bus matches sender by well-known name, jeepney's local filter
        only by the unique name in the header, so the local rule goes without one."""
        rule = MatchRule(
            type="signal",
            sender=sender,
            path=self.path,
            interface=self.interface,
            member=self.member,
        )
        if self.arg0 is not None:
            rule.add_arg_condition(0, self.arg0)
        return rule


class Manager:
    """One D-Bus connection to one systemd manager. Not thread-safe: one per thread.

    jeepney's blocking connection reads replies and signals on the calling
    thread; two threads on one connection would steal each other's messages.
    """

    def __init__(
        self, connection: DBusConnection, scope: Scope, warn: Callable[[str], None] | None = None
    ) -> None:
        self._conn = connection
        self._scope = scope
        self._closed = False
        self._subscribed = False
        self._systemd: str | None = None  # the unique bus name systemd has now
        self._warn = warn or (lambda _message: None)

    @classmethod
    def connect(
        cls, scope: Scope, *, timeout: float = 5.0, warn: Callable[[str], None] | None = None
    ) -> Manager:
        """Connects to scope's bus; BusUnavailable says what to check when that fails.
        warn hears of signals that were ignored (not from systemd, or malformed)."""
        address = bus_address(scope)
        try:
            connection = open_dbus_connection(bus=address, auth_timeout=timeout)
        except (OSError, ValueError, RuntimeError, AuthenticationError, DBusErrorResponse) as exc:
            raise _bus_unavailable(scope, address, f"{type(exc).__name__}: {exc}") from exc
        manager = cls(connection, scope, warn)
        try:
            manager._check_systemd_on_bus(address, timeout)
        except BaseException:
            manager.close()
            raise
        return manager

    def _check_systemd_on_bus(self, address: str, timeout: float) -> None:
        """Asks systemd for its version, so that a bus without systemd (a dbus-launch bus, a
        container) fails here rather than at each call later.

        A call rather than NameHasOwner: a user bus that was just socket-activated
        comes up before systemd has joined it, and its dbus-daemon holds calls to
        org.freedesktop.systemd1 until systemd does (dbus-daemon --systemd-activation).
        """
        manager = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD_BUS_NAME, interface=MANAGER_INTERFACE)
        try:
            self._call(Properties(manager).get("Version"), "connect to", None, timeout)
        except SystemdError as exc:
            why = f"systemd is not on it: {exc.detail}"
            raise _bus_unavailable(self._scope, address, why) from exc

    @property
    def unique_name(self) -> str:
        """This connection's name on the bus (":1.42"), where signals for it are addressed."""
        return str(self._conn.unique_name)

    def close(self) -> None:
        """Closes the connection; systemd drops its match rules and subscription with it."""
        if not self._closed:
            self._closed = True
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- jobs -------------------------------------------------------------------------------

    def start_unit(self, name: str, timeout: float) -> None:
        """Starts name and returns once its start job is done (the unit is up, as systemd
        defines it for the unit's Type=), or raises SystemdError with the job's result."""
        self._run_job("StartUnit", "start", name, timeout)

    def reload_unit(self, name: str, timeout: float) -> None:
        """Reloads name (its ExecReload=) and returns once the reload job is done."""
        self._run_job("ReloadUnit", "reload", name, timeout)

    def stop_unit(self, name: str, timeout: float) -> None:
        """Stops name and returns once its processes are gone; a unit that is not loaded
        or already inactive is already stopped, which is success."""
        try:
            self._run_job("StopUnit", "stop", name, timeout)
        except SystemdError as exc:
            if exc.dbus_error != NO_SUCH_UNIT:
                raise

    def _run_job(self, method: str, verb: str, name: str, timeout: float) -> None:
        """Queues a job (mode "replace") and waits for its JobRemoved signal.

        The match is in place before the call is sent, so a job that finishes
        at once cannot end before we listen for it.
        """
        deadline = time.monotonic() + timeout
        self._subscribe(verb, name, _remaining(deadline))
        job_removed = _Signal(MANAGER_PATH, MANAGER_INTERFACE, "JobRemoved")
        with self._signals(job_removed, verb, name, _remaining(deadline)) as queue:
            call = self._manager_call(method, "ss", (name, "replace"))
            (job,) = self._call(call, verb, name, _remaining(deadline))
            result = self._job_result(
                queue, str(job), verb, name, deadline=deadline, timeout=timeout
            )
        if result != "done":
            hint = _JOB_RESULT_HINTS.get(result, "see systemd.job(5)")
            raise SystemdError(
                verb,
                name,
                f"the {verb} job ended with result {result!r} ({hint});"
                f" see {self._status_command(name)} and the unit's journal",
            )

    def _job_result(
        self,
        queue: deque[Message],
        job: str,
        verb: str,
        name: str,
        *,
        deadline: float,
        timeout: float,
    ) -> str:
        """Waits for JobRemoved(id, job, unit, result) of this job; others' are skipped."""
        while True:
            signal = self._next_signal(queue, verb, name, deadline)
            if signal is None:
                raise SystemdError(
                    verb,
                    name,
                    f"the {verb} job {job} did not finish within"
                    f" {timeout:g} s; it may still be running, see"
                    f" {self._status_command(name)}",
                )
            body = signal.body
            if not (isinstance(body, tuple) and len(body) == 4):
                self._warn(f"ignored a JobRemoved signal with the body {body!r}")
                continue
            _id, removed_job, _unit, result = body
            if removed_job == job:
                return str(result)

    def wait_until_inactive(self, name: str, timeout: float | None = None) -> UnitState | None:
        """Blocks until name is inactive or failed and returns its state; None on timeout.

        Listens to the unit's PropertiesChanged rather than polling, so that it
        returns as soon as the process is gone; the state is read once after
        the match is in place, so a change just before cannot be missed. A signal
        only says that something changed: the state is read back from systemd each
        time, never taken from the signal's body.
        timeout bounds the wait for the change; timeout=0 only checks the state.
        """
        operation = "wait for the end of"
        deadline = None if timeout is None else time.monotonic() + timeout
        self._subscribe(operation, name, CALL_TIMEOUT)
        load = self._manager_call("LoadUnit", "s", (name,))
        (path,) = self._call(load, operation, name, CALL_TIMEOUT)
        changes = _Signal(str(path), PROPERTIES_INTERFACE, "PropertiesChanged", UNIT_INTERFACE)
        with self._signals(changes, operation, name, CALL_TIMEOUT) as queue:
            state = self._unit_states([name], operation, CALL_TIMEOUT)[name]
            while state.active_state not in STOPPED_STATES:
                if self._next_signal(queue, operation, name, deadline) is None:
                    return None
                state = self._unit_states([name], operation, CALL_TIMEOUT)[name]
            return state

    # --- queries ----------------------------------------------------------------------------

    def unit_states(self, names: Sequence[str]) -> dict[str, UnitState]:
        """The states of names, keyed by the names as given, in one call.

        Units that systemd has never loaded come back as "not-found"/"inactive".
        For an alias, the UnitState's name is the unit's own name.
        """
        return self._unit_states(names, "query the state of", CALL_TIMEOUT)

    def _unit_states(
        self, names: Sequence[str], operation: str, timeout: float | None
    ) -> dict[str, UnitState]:
        if not names:
            return {}
        what = ", ".join(names)
        call = self._manager_call("ListUnitsByNames", "as", (list(names),))
        (rows,) = self._call(call, operation, what, timeout)
        states = [UnitState.from_row(row) for row in rows]
        if len(states) != len(names):
            # systemd skips names that are not valid unit names, so rows no longer line up.
            returned = {state.name for state in states}
            skipped = ", ".join(name for name in names if name not in returned)
            raise SystemdError(operation, what, f"not valid unit names: {skipped}")
        return dict(zip(names, states, strict=True))

    def running(self, names: Sequence[str]) -> dict[str, bool]:
        """Whether each of names runs (UnitState.running), keyed by the names as given, in
        one call that loads no unit: a unit that is not loaded does not run.

        Cheaper than unit_states, which has systemd load every unit that is not loaded
        (from disk, every call: about 0.1 ms a unit, which every ledger transaction paid
        for each configured service). names are units' own names (an alias reads as not
        running), without shell wildcards (they are matched as patterns)."""
        wild = [name for name in names if not name or any(c in name for c in "*?[")]
        if wild:
            raise ValueError(f"not unit names: {', '.join(map(repr, wild))}")
        if not names:
            return {}
        runs = {state.name for state in self.list_units_by_patterns(names) if state.running}
        return {name: name in runs for name in names}

    def unit_state(self, name: str) -> UnitState:
        """The state of one unit (see unit_states)."""
        return self.unit_states([name])[name]

    def main_pid(self, name: str) -> int:
        """The PID of a service's main process; 0 when it has none (not running, not loaded)."""
        operation = "read the main PID of"
        try:
            (path,) = self._call(
                self._manager_call("GetUnit", "s", (name,)), operation, name, CALL_TIMEOUT
            )
        except SystemdError as exc:
            if exc.dbus_error == NO_SUCH_UNIT:
                return 0
            raise
        service = DBusAddress(str(path), bus_name=SYSTEMD_BUS_NAME, interface=SERVICE_INTERFACE)
        ((_signature, pid),) = self._call(
            Properties(service).get("MainPID"), operation, name, CALL_TIMEOUT
        )
        return int(pid)

    def list_units_by_patterns(self, patterns: Sequence[str]) -> list[UnitState]:
        """The loaded units whose names match any of the shell-style patterns, in any state."""
        call = self._manager_call("ListUnitsByPatterns", "asas", ([], list(patterns)))
        (rows,) = self._call(call, "list", ", ".join(patterns), CALL_TIMEOUT)
        return [UnitState.from_row(row) for row in rows]

    # --- unit files -------------------------------------------------------------------------

    def reload(self, *, timeout: float = RELOAD_TIMEOUT) -> None:
        """daemon-reload: systemd re-reads unit files; it answers once the reload is done."""
        operation = f"reload the systemd {self._scope.value} manager"
        self._call(self._manager_call("Reload"), operation, None, timeout)

    def enable_unit_files(self, names: Sequence[str]) -> None:
        """Creates the [Install] symlinks of names (like `systemctl enable`, without its
        daemon-reload: call reload() after the last change). Existing links are replaced."""
        call = self._manager_call("EnableUnitFiles", "asbb", (list(names), False, True))
        self._call(call, "enable", ", ".join(names), CALL_TIMEOUT)

    def disable_unit_files(self, names: Sequence[str]) -> None:
        """Removes the [Install] symlinks of names (like `systemctl disable`, without reload)."""
        call = self._manager_call("DisableUnitFiles", "asb", (list(names), False))
        self._call(call, "disable", ", ".join(names), CALL_TIMEOUT)

    # --- D-Bus plumbing ---------------------------------------------------------------------

    def _manager_call(
        self, method: str, signature: str | None = None, body: tuple[Any, ...] = ()
    ) -> Message:
        manager = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD_BUS_NAME, interface=MANAGER_INTERFACE)
        return new_method_call(manager, method, signature, body)

    def _call(
        self, message: Message, operation: str, unit: str | None, timeout: float | None
    ) -> tuple[Any, ...]:
        """Sends a method call and returns the reply's body; every failure is a SystemdError.

        Signals that arrive while waiting go to the connection's filters
        (jeepney does that in send_and_get_reply), so none is lost.
        """
        self._check_open(operation, unit)
        try:
            reply = self._conn.send_and_get_reply(message, timeout=timeout)
        except TimeoutError as exc:
            member = message.header.fields.get(HeaderFields.member)
            raise SystemdError(
                operation,
                unit,
                f"no answer to {member} within {_seconds(timeout)}"
                " (is the manager hung or overloaded?)",
            ) from exc
        except OSError as exc:
            raise self._lost(operation, unit, exc) from exc
        if reply.header.message_type is MessageType.error:
            name = str(reply.header.fields.get(HeaderFields.error_name, "unknown error"))
            text = str(reply.body[0]) if reply.body else ""
            raise SystemdError(operation, unit, f"[{name}] {text}", dbus_error=name)
        return tuple(reply.body)

    def _next_signal(
        self, queue: deque[Message], operation: str, unit: str, deadline: float | None
    ) -> Message | None:
        """The next message filtered into queue that systemd sent; None when deadline
        passes first. Signals from anyone else are dropped (and warned about)."""
        while True:
            self._check_open(operation, unit)
            try:
                message: Message = self._conn.recv_until_filtered(
                    queue, timeout=_remaining(deadline)
                )
            except TimeoutError:
                return None
            except OSError as exc:
                raise self._lost(operation, unit, exc) from exc
            if self._from_systemd(message, operation, unit):
                return message

    def _from_systemd(self, message: Message, operation: str, unit: str) -> bool:
        """Whether message was sent by systemd: by the unique name that owns
        org.freedesktop.systemd1. The owner is asked again when a sender does not
        match, since systemd gets a new name when it re-executes."""
        sender = message.header.fields.get(HeaderFields.sender)
        if sender is not None and sender == self._systemd:
            return True
        call = message_bus.GetNameOwner(SYSTEMD_BUS_NAME)
        (self._systemd,) = self._call(call, operation, unit, CALL_TIMEOUT)
        if sender == self._systemd:
            return True
        member = message.header.fields.get(HeaderFields.member)
        self._warn(
            f"ignored a {member} signal from {sender}, which is not systemd ({self._systemd})"
        )
        return False

    @contextmanager
    def _signals(
        self, signal: _Signal, operation: str, unit: str, timeout: float | None
    ) -> Iterator[deque[Message]]:
        """Collects the signal (from systemd only) while the block runs.

        The bus is asked to route them here for the block's length only, so a
        long-lived, idle connection does not pile up signals it never reads.
        The queue is unbounded: jeepney's default of one would drop messages.
        """
        bus_rule = signal.rule(sender=SYSTEMD_BUS_NAME)
        with self._conn.filter(signal.rule(), queue=deque()) as queue:
            self._call(message_bus.AddMatch(bus_rule), operation, unit, timeout)
            try:
                yield queue
            finally:
                with suppress(SystemdError):
                    self._call(message_bus.RemoveMatch(bus_rule), operation, unit, CALL_TIMEOUT)

    def _subscribe(self, operation: str, unit: str, timeout: float | None) -> None:
        """Asks systemd to emit job and unit signals (it skips them when nobody listens)."""
        if self._subscribed:
            return
        try:
            self._call(self._manager_call("Subscribe"), operation, unit, timeout)
        except SystemdError as exc:
            if exc.dbus_error != ALREADY_SUBSCRIBED:
                raise
        self._subscribed = True

    def _check_open(self, operation: str, unit: str | None) -> None:
        if self._closed:
            raise SystemdError(operation, unit, "the connection to systemd is closed")

    def _lost(self, operation: str, unit: str | None, exc: OSError) -> SystemdError:
        """The connection is unusable after a socket error (half a message may be read)."""
        self.close()
        return SystemdError(
            operation, unit, f"lost the connection to systemd's bus ({exc}); connect again"
        )

    def _status_command(self, name: str) -> str:
        return f"`systemctl {self._scope.systemctl_flag} status {name}`"
