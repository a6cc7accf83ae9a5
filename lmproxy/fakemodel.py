"""A fake model server for the demo and the tests: no GPU, same behaviour.

It "loads" for --delay seconds (prints progress, like llama-server), then
opens its port and answers HTTP: GET /health, GET /v1/models, and any other
request with a small JSON document naming the model and its PID; POST
/v1/completions streams --tokens tokens, one every --token-interval seconds.

    python3 -m lmproxy.fakemodel --name small --port 18081 --delay 1.5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m lmproxy.fakemodel", description=__doc__)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before listening")
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument("--token-interval", type=float, default=0.01)
    parser.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops it")
    parser.add_argument("--exit-after", type=float, default=None, help="crash after N seconds")
    parser.add_argument(
        "--stop-listening-after",
        type=float,
        default=None,
        help="close the port after N seconds but keep running (a hung server)",
    )
    return parser.parse_args(argv)


def make_handler(args: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._reply(200, {"object": "list", "data": [{"id": args.name}]})
            else:
                self._reply(200, {"model": args.name, "pid": os.getpid()})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for index in range(args.tokens):
                event = json.dumps({"model": args.name, "token": f"tok{index}"})
                self._chunk(f"data: {event}\n\n".encode())
                time.sleep(args.token_interval)
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _reply(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *values: object) -> None:
            print(f"{args.name}: {format % values}", flush=True)

    return Handler


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"{args.name}: loading model (pid {os.getpid()}, {args.delay:g} s)", flush=True)
    time.sleep(args.delay)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args))
    server.daemon_threads = True
    print(f"{args.name}: model loaded, listening on {args.host}:{args.port}", flush=True)
    if args.exit_after is not None:
        signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
        signal.setitimer(signal.ITIMER_REAL, args.exit_after)
    if args.stop_listening_after is None:
        server.serve_forever()
        return 0
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    time.sleep(args.stop_listening_after)
    server.shutdown()
    server.server_close()
    print(f"{args.name}: stopped listening, still running", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
