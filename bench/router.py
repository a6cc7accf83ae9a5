#!/usr/bin/python3
"""OpenAI router benchmark: direct vs lmproxy's router vs large-model-proxy's OpenAI port.

    sudo /usr/bin/python3 bench/router.py [--rounds N] [--seconds S] [--quick]

The same fast fake backend behind each path (this file with --backend: uvloop, HTTP/1.1
keep-alive, a 240-byte JSON answer to every POST, or server-sent events, chunked, when the
body asks to "stream"). lmproxy runs in a private systemd user manager (lmproxy.sandbox),
installed with `lmproxy install --user --now`: the model has "OpenAiApi": true and no
ListenPort, so only the router (lmproxy-api@openai, socket-activated) reaches it, through
its shim's unix socket. large-model-proxy (/work/shared/peers) runs as a plain process with
the same config format. Direct goes to lmproxy's backend. Each measure runs every path once
per round, in turn (the order rotates); the table shows medians of the rounds, and
lmproxy / large-model-proxy as the median of the rounds' ratios. wrk's non-2xx answers and
socket errors are printed and noted in the table. Everything it starts is stopped when it
ends, also on Ctrl-C. Not part of the test suite; needs root (the sandbox) and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (str(ROOT), str(BENCH)):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from coldstart import describe, free_ports, stop_peer, tail  # noqa: E402
from relay import as_root, cpu_seconds, loadavg, machine, run_tool, say, status_kib  # noqa: E402

from lmproxy import sandbox as sandbox_module  # noqa: E402
from lmproxy.sandbox import Sandbox  # noqa: E402

PEER = Path("/work/shared/peers/large-model-proxy")
DIRECT, LMPROXY, LMP = "direct", "lmproxy", "large-model-proxy"
PATHS = (DIRECT, LMPROXY, LMP)
SERVICE, MODEL = "fake", "bench-model"
ROUTER, SHIM = "lmproxy-api@openai.service", f"lmproxy-{SERVICE}.service"
URL_PATH = "/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
EVENTS, EVENT_INTERVAL_S, EVENT_STREAMS = 100, 0.001, 3  # streams per path and round
IDLE_STREAMS, IDLE_SECONDS = 1000, 5.0
STEP_TIMEOUT_S = 30.0

# --- the fake backend (--backend PORT) --------------------------------------------------------

ANSWER = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"%b",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2}}' % MODEL.encode()
)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\n%b"
REPLY = HEAD % (b"application/json", b"Content-Length: %d\r\n\r\n%b" % (len(ANSWER), ANSWER))
REPLY_CLOSE = REPLY.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
STREAM_HEAD = HEAD % (b"text/event-stream", b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Backend(asyncio.Protocol):
    """One connection: requests with Content-Length bodies, answered in order. A body with
    "stream" gets n events, interval s apart, then the end, or with "hold" one, then none."""

    def __init__(self) -> None:
        self.buffer, self.left, self.interval, self.hold = b"", 0, 0.0, False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, length = self.buffer[:end].lower(), 0
            if (at := head.find(b"content-length:")) >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = (
                self.buffer[end + 4 : end + 4 + length],
                self.buffer[end + 4 + length :],
            )
            if b'"stream"' in body:
                spec = json.loads(body)
                self.left, self.hold = int(spec.get("n", 1)), bool(spec.get("hold"))
                self.interval = float(spec.get("interval", 0))
                self.transport.write(STREAM_HEAD)
                self.event()
            elif b"connection: close" in head:
                self.transport.write(REPLY_CLOSE)
                self.transport.close()
                return
            else:
                self.transport.write(REPLY)

    def event(self) -> None:
        """The next event, stamped with CLOCK_MONOTONIC (ns) as it is written."""
        assert self.transport is not None
        self.timer = None
        if self.transport.is_closing():
            return
        stamp = b'data: {"t":%d,"choices":[{"delta":{"content":"x"}}]}\n\n' % time.monotonic_ns()
        self.transport.write(chunk(stamp))
        self.left -= 1
        if self.left > 0:
            self.timer = asyncio.get_running_loop().call_later(self.interval, self.event)
        elif not self.hold:  # a held stream pauses here until the client goes
            self.transport.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


def serve_backend(port: int, pidfile: Path | None) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if pidfile is not None:
        pidfile.write_text(str(os.getpid()))
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Backend, "127.0.0.1", port, backlog=4096)
        say(f"fake backend listening on 127.0.0.1:{port}")
        await server.serve_forever()

    asyncio.run(main())


# --- results ----------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    unit: str
    digits: int = 0
    target: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, path: str, value: float) -> None:
        self.samples.setdefault(path, []).append(value)

    def cell(self, path: str) -> str:
        values = self.samples.get(path)
        text = f"{statistics.median(values):,.{self.digits}f}" if values else "—"
        return text + (f" {self.notes[path]}" if path in self.notes else "")

    def ratio(self) -> str:
        """lmproxy / large-model-proxy: the median of the rounds' ratios (throughput rows)."""
        ours, theirs = self.samples.get(LMPROXY, []), self.samples.get(LMP, [])
        if self.unit != "req/s" or not ours or len(ours) != len(theirs) or not all(theirs):
            return ""
        return f"{statistics.median(a / b for a, b in zip(ours, theirs, strict=True)):.2f}"


ROWS = (  # key, label, unit, digits, target
    ("c1", "keep-alive, 1 connection (wrk -c1 -t1, pinned)", "req/s", 0, "≥ 1.0"),
    ("c64", "keep-alive, 64 connections (wrk -c64 -t2)", "req/s", 0, "≥ 1.0"),
    ("close1", "Connection: close, 1 at a time (wrk -c1 -t1, pinned)", "req/s", 0, "≥ 1.0"),
    ("close64", "Connection: close, 64 at a time (wrk -c64 -t2)", "req/s", 0, "≥ 1.0"),
    ("p50", "latency p50, 1 keep-alive connection (wrk)", "µs", 1, ""),
    ("added50", "… added over direct, p50", "µs", 1, "≤ 100"),
    ("p99", "latency p99, 1 keep-alive connection (wrk)", "µs", 1, ""),
    ("added99", "… added over direct, p99", "µs", 1, ""),
    ("cpu", "CPU per request at 64 keep-alive: router / the peer", "µs", 1, ""),
    ("cpu_shim", "… lmproxy's shim (router → backend)", "µs", 1, ""),
    ("cpu_journald", "… journald (the router's line per request)", "µs", 1, ""),
    ("event", f"SSE event: backend's write → client's read ({EVENTS}, 1 ms apart)", "µs", 1, ""),
    ("added_event", "… added per event over direct", "µs", 1, "≤ 1,000"),
    ("idle_open", f"{IDLE_STREAMS:,} idle open streams: began", "streams", 0, ""),
    ("idle_before", "… router's / the peer's RSS before the first 1,000", "MiB", 1, ""),
    ("idle_rss", f"… router's / the peer's RSS with {IDLE_STREAMS:,} open", "MiB", 1, "< 64"),
    ("idle_shim", f"… lmproxy's shim's RSS with {IDLE_STREAMS:,} open", "MiB", 1, ""),
    ("idle_cpu", f"… router's / the peer's CPU in {IDLE_SECONDS:g} s of idling", "ms", 1, "0"),
)


def print_table(rows: Sequence[Row], header: str) -> None:
    columns = [*PATHS, "lmproxy / large-model-proxy", "target"]
    lines = [["", *columns], ["---", *(["---:"] * len(columns))]]
    for row in rows:
        cells = [row.cell(path) for path in PATHS]
        if any(c != "—" for c in cells):
            lines.append([f"{row.label} ({row.unit})", *cells, row.ratio(), row.target])
    print(header + "\n\n" + "\n".join("| " + " | ".join(line) + " |" for line in lines))
    if any(UNANNOUNCED in note for row in rows for note in row.notes.values()):
        print("\n" + UNANNOUNCED_NOTE)


# --- setting up -------------------------------------------------------------------------------


def config(backend: int, router: int, listen: int | None, pidfile: Path) -> dict[str, object]:
    """One service in large-model-proxy's format (lmproxy reads it as it is): listen None
    for lmproxy, where only the router reaches the model."""
    args = f"{Path(__file__).resolve()} --backend {backend} --pidfile {pidfile}"
    service = {"Name": SERVICE, "OpenAiApi": True, "OpenAiApiModels": [MODEL]}
    service |= {"ProxyTargetHost": "127.0.0.1", "ProxyTargetPort": str(backend)}
    service |= {"Command": sys.executable, "Args": args}
    if listen is not None:
        service["ListenPort"] = str(listen)
    top = {"ShutDownAfterInactivitySeconds": 3600, "OpenAiApi": {"ListenPort": str(router)}}
    return top | {"Services": [service]}


def install_lmproxy(sandbox: Sandbox, work: Path, backend: int, router: int) -> None:
    path = work / "lmproxy.json"
    path.write_text(json.dumps(config(backend, router, None, work / "lmproxy.pid"), indent=2))
    argv = [sys.executable, "-m", "lmproxy", "install", "--user", "--config", str(path), "--now"]
    env = sandbox.env({"PYTHONPATH": str(ROOT)})  # this checkout's lmproxy, in the units too
    done = subprocess.run(
        sandbox.command(argv), env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"lmproxy install failed:\n{done.stdout}{done.stderr}")


@contextlib.contextmanager
def large_model_proxy(work: Path, ports: Sequence[int]) -> Iterator[subprocess.Popen[bytes]]:
    """The peer (its OpenAI port, service port, backend port), stopped by SIGINT as it
    expects, killed with its group after 10 s; its backend too, if left."""
    router, listen, backend = ports
    pidfile, path = work / "peer-backend.pid", work / "peer.json"
    path.write_text(json.dumps(config(backend, router, listen, pidfile), indent=2))
    with (work / "peer.log").open("wb") as log:
        argv, out = [str(PEER), "-c", str(path)], subprocess.STDOUT
        process = subprocess.Popen(argv, cwd=work, stdout=log, stderr=out, start_new_session=True)
    try:
        yield process
    finally:
        stop_peer(process)
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            if b"--backend" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


# --- clients ----------------------------------------------------------------------------------


def request(body: dict[str, object], *, close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {URL_PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n" + ("Connection: close\r\n" if close else "")
    return (head + "\r\n").encode() + data


def post(port: int, body: dict[str, object]) -> bytes:
    """One POST on a new connection (Connection: close): the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT_S) as conn:
        conn.sendall(request(body, close=True))
        answer = b""
        while part := conn.recv(65536):
            answer += part
    return answer


def wait_served(port: int, what: str, logs: Callable[[], str]) -> None:
    deadline, answer = time.monotonic() + STEP_TIMEOUT_S, b""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if (answer := post(port, BODY)).startswith(b"HTTP/1.1 200") and ANSWER in answer:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer with a 200 ({answer[:300]!r}):\n{logs()}")


_REQUESTS = re.compile(r"(\d+) requests in (?:.|\n)*Requests/sec:\s*([\d.]+)")
_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_SCALE = {"us": 1.0, "ms": 1e3, "s": 1e6}
UNANNOUNCED = "closes unannounced*"
UNANNOUNCED_NOTE = (
    "* The connection closed after each answer, which did not say Connection: close: wrk "
    "counts a read error for each, after the answer, whole, was counted."
)
WRK_SCRIPT = (
    'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\n'
)


@dataclass
class Wrk:
    rate: float
    p50_us: float
    p99_us: float
    problems: str  # non-2xx answers and socket errors, else ""
    errors: str  # wrk's line


def wrk(script: Path, port: int, connections: int, seconds: int, close: bool) -> Wrk:
    threads = 1 if connections == 1 else 2
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    cpus = sorted(os.sched_getaffinity(0))
    if threads == 1 and len(cpus) >= 2:  # as bench/relay.py: one wrk thread on a CPU of its own
        argv = ["taskset", "-c", str(cpus[-1]), *argv]
    argv += ["-H", "Connection: close"] if close else []
    output = run_tool(
        [*argv, "-s", str(script), f"http://127.0.0.1:{port}{URL_PATH}"], seconds + 30
    )
    rate = _REQUESTS.search(output)
    latency = {p: float(v) * _SCALE[u] for p, v, u in _LATENCY.findall(output)}
    if rate is None or set(latency) != {"50", "99"}:
        raise RuntimeError(f"wrk printed no Requests/sec or latency:\n{output}")
    problems = [f"{m.group(1)} non-2xx" for m in _NON_2XX.finditer(output)]
    if errors := _ERRORS.search(output):
        connect, read, write, timeout = (int(n) for n in errors.groups())
        if close and read <= int(rate.group(1)) + connections and not connect + write + timeout:
            problems.append(UNANNOUNCED)  # not errors: see UNANNOUNCED_NOTE
        else:
            problems.append(errors.group(0))
    line = errors.group(0) if errors else ""
    return Wrk(float(rate.group(2)), latency["50"], latency["99"], "; ".join(problems), line)


def event_delays(port: int) -> list[float]:
    """EVENT_STREAMS streams of EVENTS events, one after the other: for every event, µs
    from the backend's write (its stamp) to this client's read."""
    body = {**BODY, "stream": True, "n": EVENTS, "interval": EVENT_INTERVAL_S}
    delays: list[float] = []
    for _ in range(EVENT_STREAMS):
        with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT_S) as conn:
            conn.sendall(request(body))
            pending, seen, tail_ = b"", 0, b""
            while not tail_.endswith(b"0\r\n\r\n"):
                part = conn.recv(65536)
                now = time.monotonic_ns()
                if not part:
                    raise RuntimeError(f"a stream broke off after {seen} events: {tail_!r}")
                tail_ = (tail_ + part)[-200:]
                *events, pending = (pending + part).split(b"\n\n")
                for event in events:
                    if (stamp := re.search(rb'"t":(\d+)', event)) is not None:
                        delays.append((now - int(stamp.group(1))) / 1000)
                        seen += 1
            if seen != EVENTS:
                raise RuntimeError(f"{seen} events of {EVENTS} came")
    return delays


async def idle_streams(port: int, during: Callable[[], None]) -> int:
    """IDLE_STREAMS held streams at once (each has its first event, then nothing); while
    they are open, during() runs in a thread. Returns how many began with a 200."""
    held = request({**BODY, "stream": True, "n": 1, "hold": True})
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(100)

    async def one() -> bool:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(held)
            got = await asyncio.wait_for(reader.readuntil(b"data: "), 10)
            return got.startswith(b"HTTP/1.1 200")

    try:
        results = await asyncio.gather(
            *(one() for _ in range(IDLE_STREAMS)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            say(f"    {len(failures)} idle stream(s) failed, e.g. {failures[0]!r}")
        await asyncio.to_thread(during)
        return sum(1 for r in results if r is True)
    finally:
        for writer in writers:
            writer.close()
        await asyncio.sleep(1.0)  # the proxies close their ends


# --- the measures -----------------------------------------------------------------------------


class Bench:
    def __init__(self, sandbox: Sandbox, peer: int, ports: dict[str, int], script: Path,
                 seconds: int) -> None:  # fmt: skip
        self.sandbox, self.peer, self.ports = sandbox, peer, ports
        self.script, self.seconds = script, seconds
        self.rows = {
            key: Row(label, unit, digits, target) for key, label, unit, digits, target in ROWS
        }

    def pid(self, path: str, unit: str = ROUTER) -> int:
        if path == LMP:
            return self.peer
        shown = self.sandbox.systemctl("show", "-p", "MainPID", "--value", unit)
        return int(shown.stdout.strip() or 0)

    def throughput(self, order: Sequence[str]) -> None:
        latency: dict[str, Wrk] = {}
        for key in ("c1", "c64", "close1", "close64"):
            for path in order:
                post(self.ports[path], BODY)  # the router is up (it may have exited while idle)
                pids = {"cpu": self.pid(path)} if key == "c64" and path != DIRECT else {}
                if pids and path == LMPROXY:
                    journald = int((self.sandbox.root / "journald.pid").read_text())
                    pids |= {"cpu_shim": self.pid(path, SHIM), "cpu_journald": journald}
                before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                connections, close = (1 if key.endswith("1") else 64), key.startswith("close")
                result = wrk(self.script, self.ports[path], connections, self.seconds, close)
                self.rows[key].add(path, result.rate)
                line = f"    {key:8} {path:18} {result.rate:12,.0f} req/s"
                if result.problems:
                    self.rows[key].notes[path] = f"({result.problems})"
                    line += f" ({result.problems}: {result.errors})"
                for k, pid in pids.items():
                    per_request = (cpu_seconds(pid) - before[k]) / (result.rate * self.seconds)
                    self.rows[k].add(path, per_request * 1e6)
                    line += f", {k} {per_request * 1e6:.1f} µs/req"
                if key == "c1":
                    latency[path] = result
                    line += f", p50 {result.p50_us:.1f} µs, p99 {result.p99_us:.1f} µs"
                say(line)
        for path, result in latency.items():
            self.rows["p50"].add(path, result.p50_us)
            self.rows["p99"].add(path, result.p99_us)
            if path != DIRECT:
                self.rows["added50"].add(path, result.p50_us - latency[DIRECT].p50_us)
                self.rows["added99"].add(path, result.p99_us - latency[DIRECT].p99_us)

    def events(self, order: Sequence[str]) -> None:
        medians = {path: statistics.median(event_delays(self.ports[path])) for path in order}
        for path, value in medians.items():
            self.rows["event"].add(path, value)
            if path != DIRECT:
                self.rows["added_event"].add(path, value - medians[DIRECT])
        say("    events   " + ", ".join(f"{p} {v:,.1f} µs" for p, v in medians.items()))

    def idle(self, path: str) -> None:
        """IDLE_STREAMS held streams through path: memory, and CPU while they idle."""
        post(self.ports[path], BODY)
        pid = self.pid(path)
        before = status_kib(pid, "VmRSS") / 1024
        seen: list[float] = []  # RSS (MiB), the shim's (lmproxy), CPU while idle (ms)

        def during() -> None:
            seen.append(status_kib(pid, "VmRSS") / 1024)
            if path == LMPROXY:
                seen.append(status_kib(self.pid(path, SHIM), "VmRSS") / 1024)
            start = cpu_seconds(pid)
            time.sleep(IDLE_SECONDS)
            seen.append((cpu_seconds(pid) - start) * 1000)

        began = asyncio.run(idle_streams(self.ports[path], during))
        died = "" if os.path.exists(f"/proc/{pid}") else " (the process died)"
        line = f"    idle     {path:18} {began}/{IDLE_STREAMS} began"
        if path not in self.rows["idle_before"].samples:  # a fresh router (restarted)
            self.rows["idle_before"].add(path, before)
        self.rows["idle_open"].add(path, began)
        self.rows["idle_rss"].add(path, seen[0])
        self.rows["idle_cpu"].add(path, seen[-1])
        if path == LMPROXY:
            self.rows["idle_shim"].add(path, seen[1])
        if died:
            self.rows["idle_open"].notes[path] = died.strip()
        say(f"{line}; RSS {before:.1f} → {seen[0]:.1f} MiB; CPU {seen[-1]:.1f} ms idle{died}")


# --- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None or not os.access(PEER, os.X_OK):
        say(f"bench/router.py needs wrk (apt-get install -y wrk) and {PEER}")
        return 2
    if reason := sandbox_module.unavailable_reason():
        say(f"bench/router.py: {reason}")
        return 2
    commit, dirty = describe(ROOT)
    header = (
        f"Machine: {machine()}\nCommit: {commit}{' + changes to lmproxy/' if dirty else ''}\n"
        f"Peer: {PEER} (large-model-proxy d07fa21)\n"
        f"Run: {args.rounds} interleaved rounds of {args.seconds} s per wrk measure; "
        f"load average at start {loadavg()}"
    )
    say(header)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    work = Path(tempfile.mkdtemp(prefix="lmproxy-router-bench-", dir="/dev/shm"))  # a tmpfs
    os.chmod(work, 0o755)
    started = time.monotonic()
    try:
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=json.dumps(BODY)))
        backend, router, *peer_ports = free_ports(5)
        with (
            sandbox_module.running(work / "sandbox") as sandbox,
            large_model_proxy(work, peer_ports) as peer,
        ):
            say("installing lmproxy; starting large-model-proxy; warming both up")
            install_lmproxy(sandbox, work, backend, router)
            journal = lambda: sandbox.run(["journalctl", "--no-pager", "-n", "30"]).stdout  # noqa: E731
            wait_served(router, "lmproxy's router", journal)
            wait_served(peer_ports[0], "large-model-proxy", lambda: tail(work / "peer.log"))
            wait_served(backend, "the backend", journal)
            ports = {DIRECT: backend, LMPROXY: router, LMP: peer_ports[0]}
            bench = Bench(sandbox, peer.pid, ports, script, args.seconds)
            for path in PATHS:  # warm-up: not counted
                wrk(script, ports[path], 64, 1, close=False)
            for index in range(args.rounds):
                order = [*PATHS[index % 3 :], *PATHS[: index % 3]]
                say(f"round {index + 1}/{args.rounds} (order: {', '.join(order)})")
                bench.throughput(order)
                bench.events(order)
                proxies = [p for p in order if p != DIRECT]
                for path in proxies if index < args.idle_rounds else []:
                    bench.idle(path)
            header += f"; at the end {loadavg()}; took {time.monotonic() - started:.0f} s"
            print_table(list(bench.rows.values()), header)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sudo /usr/bin/python3 bench/router.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 s, idle streams once")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 3)")
    parser.add_argument("--seconds", type=int, help="seconds per wrk measure (default 3; quick 1)")
    parser.add_argument("--backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--pidfile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # (--backend: this file as the fake backend)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.seconds = args.seconds or (1 if args.quick else 3)
    if not 1 <= args.rounds <= 50 or not 1 <= args.seconds <= 60:
        parser.error("--rounds must be 1..50 and --seconds 1..60")
    args.idle_rounds = 1 if args.quick else min(args.rounds, 3)
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.backend is not None:
        serve_backend(args.backend, args.pidfile)
        return 0
    return as_root("bench/router.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
