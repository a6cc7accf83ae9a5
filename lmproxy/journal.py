"""The shim's decisions, to the journal with structured fields.

Each message carries SYSLOG_IDENTIFIER=lmproxy-shim, LMPROXY_SERVICE=NAME and
LMPROXY_EVENT (reserved, evict, started, ready, idle-stop, failed, ...), so
`journalctl LMPROXY_SERVICE=NAME` or `LMPROXY_EVENT=evict` finds them. Outside
systemd (no journal socket) the messages go to stderr instead.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmproxy.world import Log

IDENTIFIER = "lmproxy-shim"
_PRIORITIES = {"error": 3, "warning": 4, "info": 6}


class Logger:
    def __init__(self, service: str) -> None:
        self.service = service
        try:
            from systemd import journal

            self._send: Any = journal.send
        except ImportError:  # pragma: no cover - systemd-python is a dependency
            self._send = None

    def info(self, message: str, *, event: str, **fields: object) -> None:
        self._log("info", message, event, fields)

    def warning(self, message: str, *, event: str, **fields: object) -> None:
        self._log("warning", message, event, fields)

    def error(self, message: str, *, event: str, **fields: object) -> None:
        self._log("error", message, event, fields)

    def note(self, line: Log) -> None:
        """A line of the lifecycle's (lmproxy.lifecycle's Log effect)."""
        fields = {} if line.victim is None else {"victim": line.victim}
        self.info(line.message, event=line.event, **fields)

    def _log(self, level: str, message: str, event: str, fields: dict[str, object]) -> None:
        extra = {f"LMPROXY_{key.upper()}": str(value) for key, value in fields.items()}
        if self._send is not None:
            try:
                self._send(
                    message,
                    PRIORITY=_PRIORITIES[level],
                    SYSLOG_IDENTIFIER=IDENTIFIER,
                    LMPROXY_SERVICE=self.service,
                    LMPROXY_EVENT=event,
                    **extra,
                )
                return
            except OSError:
                pass  # no journal here: fall through to stderr
        print(f"lmproxy-shim[{self.service}] {level}: {message}", file=sys.stderr, flush=True)
