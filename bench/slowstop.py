"""A model server for bench/swap.py: answers any GET at once, and takes its time to stop.

On SIGTERM it goes on for --stop-delay seconds before it exits, as a real model
server does while it frees its memory: long enough for a waiter to queue behind it.
With --exit-stamp it notes the moment it exits (systemd marks the unit inactive
as soon as it reaps the process).
Standalone (no lmproxy import), so that the benchmark can run any lmproxy version.

    python3 bench/slowstop.py --port 18081 --stop-delay 0.5
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stop-delay", type=float, default=0.0)
    parser.add_argument(
        "--exit-stamp", type=Path, help="write CLOCK_MONOTONIC (ns) here as it exits"
    )
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)

    def on_term(signum: int, frame: FrameType | None) -> None:
        def later() -> None:
            time.sleep(args.stop_delay)
            if args.exit_stamp is not None:
                args.exit_stamp.write_text(str(time.monotonic_ns()))
            os._exit(0)

        threading.Thread(target=later, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
