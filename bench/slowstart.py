"""A model server for bench/coldstart.py: slow to start, noting when it runs and listens.

Its very first statements note CLOCK_MONOTONIC (system-wide, so comparable with
the client's clock); it writes that moment to STAMPS/running, sleeps --delay
seconds, or as many as STAMPS/delay says when there is one (loading its weights;
bench/coldstart.py varies it from trial to trial), listens on --port, writes STAMPS/listening right
after listen(), then answers every HTTP request with a small 200. Each stamp is
one line, "PID SECONDS", written atomically (a temporary file, then a rename);
a later start overwrites them. Standalone and stdlib-only (no lmproxy import),
so that any lmproxy version and any other proxy can run it.

    python3 bench/slowstart.py --port 18081 --delay 0.5 --stamps DIR
"""

import os
import sys
import time

RUNNING = time.monotonic()


def stamp(folder: str, event: str, moment: float) -> None:
    temporary = os.path.join(folder, f".{event}.{os.getpid()}")
    with open(temporary, "w") as file:
        file.write(f"{os.getpid()} {moment:.9f}\n")
    os.replace(temporary, os.path.join(folder, event))


def options(argv: list[str]) -> dict[str, str]:
    """--name value pairs: no argparse, whose import would come before the first stamp."""
    if len(argv) % 2 or not all(name.startswith("--") for name in argv[::2]):
        sys.exit(__doc__)
    return dict(zip(argv[::2], argv[1::2], strict=True))


def main(argv: list[str]) -> int:
    given = options(argv)
    try:
        stamps, port, delay = given["--stamps"], int(given["--port"]), float(given["--delay"])
    except (KeyError, ValueError):
        sys.exit(__doc__)
    stamp(stamps, "running", RUNNING)
    try:
        with open(os.path.join(stamps, "delay")) as file:
            delay = float(file.read())
    except (OSError, ValueError):
        pass

    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b'{"ok": true}\n'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class StampingServer(ThreadingHTTPServer):
        daemon_threads = True

        def server_activate(self) -> None:
            super().server_activate()  # listen(): from now on connections complete
            stamp(stamps, "listening", time.monotonic())

    time.sleep(delay)
    with StampingServer(("127.0.0.1", port), Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
