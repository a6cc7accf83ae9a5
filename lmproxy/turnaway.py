"""Why a shim last turned its clients away, for the OpenAI router's 503.

A shim that cannot serve (its model needs more of a resource than exists, its start
failed, it gave up waiting) closes its clients' connections: a raw TCP relay has no way to
say why. The router, which speaks HTTP, reads the reason here when a service closed its
request without an answer, and sends it to its client in OpenAI's error shape. One small
file per service in the runtime directory, replaced whole (written, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from lmproxy import unitnames
from lmproxy.files import write_atomically

FOLDER = "turned-away"
MAX_BYTES = 16 * 1024


def record_path(runtime_dir: Path, name: str) -> Path:
    return runtime_dir / FOLDER / f"{unitnames.component(name)}.json"


def record(runtime_dir: Path, name: str, reason: str) -> None:
    """Best effort: the journal has the reason too."""
    path = record_path(runtime_dir, name)
    data = json.dumps({"at": time.time(), "reason": reason[:4000]}).encode()
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o755, exist_ok=True)
        write_atomically(path, data, 0o644, durable=False)  # a tmpfs


def reason_since(runtime_dir: Path, name: str, since: float) -> str | None:
    """The reason recorded at `since` or later, if any."""
    try:
        with open(record_path(runtime_dir, name), "rb") as file:
            document = json.loads(file.read(MAX_BYTES))
        at, reason = float(document["at"]), str(document["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return reason if at >= since else None
