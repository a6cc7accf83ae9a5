"""A fake model server for the demo and the tests: no GPU, same behaviour.

It "loads" for --delay seconds (prints progress, like llama-server), then
opens its port and answers HTTP: GET /health, GET /v1/models, and any other
request with a small JSON document naming the model and its PID; POST
/v1/completions streams --tokens tokens, one every --token-interval seconds.

With --sleep-mode it also serves vLLM's sleep API (POST /sleep?level=1|2,
POST /wake_up[?tags=weights|kv_cache], POST /collective_rpc, GET /is_sleeping)
and reports its memory at GET /memory: --memory MiB awake, a tenth of it asleep
at level 1 (the KV cache gone, the weights in RAM), none at level 2. Asleep, it
answers completions with 503, as a model without its weights would fail.

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
    parser.add_argument(
        "--first-token-delay",
        type=float,
        default=0.0,
        help="seconds before a completion's answer begins (a long prompt being read)",
    )
    parser.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops it")
    parser.add_argument("--exit-after", type=float, default=None, help="crash after N seconds")
    parser.add_argument(
        "--stop-listening-after",
        type=float,
        default=None,
        help="close the port after N seconds but keep running (a hung server)",
    )
    parser.add_argument("--sleep-mode", action="store_true", help="serve vLLM's sleep API")
    parser.add_argument("--sleep-delay", type=float, default=0.0, help="seconds a sleep takes")
    parser.add_argument("--wake-delay", type=float, default=0.0, help="seconds a wake takes")
    parser.add_argument("--fail-sleep", action="store_true", help="answer /sleep with 500")
    parser.add_argument("--fail-wake", action="store_true", help="answer /wake_up with 500")
    parser.add_argument("--memory", type=int, default=1000, help="MiB in use while awake")
    # llama-server's, taken and reported (GET /) as it would use them.
    parser.add_argument("-m", "--model", default=None, help="the model file (llama-server's)")
    parser.add_argument("-ts", "--tensor-split", default=None, help="(llama-server's)")
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=None, help="(llama-server's)")
    parser.add_argument("-c", "--ctx-size", type=int, default=None, help="(llama-server's)")
    return parser.parse_args(argv)


class Sleeper:
    """The fake's sleep state, shared by its request threads."""

    def __init__(self, memory_mib: int) -> None:
        self.lock = threading.Lock()
        self.level = 0  # 0: awake
        self.weights_loaded = True
        self.memory_mib = memory_mib

    def memory(self) -> int:
        with self.lock:
            if self.level == 0:
                return self.memory_mib
            return self.memory_mib // 10 if self.level == 1 else 0


def make_handler(args: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    sleeper = Sleeper(args.memory)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.startswith("/probe/"):
                # Said on arrival, before any answer: the tests learn which requests
                # reached a model, whatever happened to their answers.
                print(f"{args.name}: received {self.path}", flush=True)
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._reply(200, {"object": "list", "data": [{"id": args.name}]})
            elif self.path == "/memory":
                self._reply(200, {"memory_mib": sleeper.memory()})
            elif self.path == "/is_sleeping" and args.sleep_mode:
                self._reply(200, {"is_sleeping": sleeper.level != 0})
            else:
                asleep = sleeper.level != 0
                answer: dict[str, object] = {
                    "model": args.name,
                    "pid": os.getpid(),
                    "asleep": asleep,
                }
                if args.model is not None:  # as llama-server was told to place it
                    answer["split"] = {
                        "tensor_split": args.tensor_split,
                        "n_gpu_layers": args.n_gpu_layers,
                        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    }
                self._reply(200, answer)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path, _, query = self.path.partition("?")
            if args.sleep_mode and path in ("/sleep", "/wake_up", "/collective_rpc"):
                self._sleep_api(path, query, body)
                return
            if sleeper.level != 0 or not sleeper.weights_loaded:
                self._reply(503, {"error": f"{args.name} is asleep"})
                return
            time.sleep(args.first_token_delay)
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

        def _sleep_api(self, path: str, query: str, body: bytes) -> None:
            if path == "/sleep":
                level = 2 if query == "level=2" else 1
                time.sleep(args.sleep_delay)
                if args.fail_sleep:
                    self._reply(500, {"error": "sleep failed (--fail-sleep)"})
                    return
                with sleeper.lock:
                    sleeper.level = level
                    sleeper.weights_loaded = level == 1
                print(f"{args.name}: asleep at level {level}", flush=True)
            elif path == "/wake_up":
                time.sleep(args.wake_delay)
                if args.fail_wake:
                    self._reply(500, {"error": "wake failed (--fail-wake)"})
                    return
                with sleeper.lock:
                    if query == "tags=weights":
                        sleeper.level = max(sleeper.level, 1)
                    else:
                        sleeper.level = 0
                print(f"{args.name}: awake ({query or 'all'})", flush=True)
            else:
                with sleeper.lock:
                    if json.loads(body or b"{}").get("method") == "reload_weights":
                        sleeper.weights_loaded = True
            self._reply(200, {})

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
