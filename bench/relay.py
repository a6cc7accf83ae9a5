#!/usr/bin/python3
"""Relay benchmark: direct vs systemd-socket-proxyd vs a socket-activated lmproxy shim.

    sudo /usr/bin/python3 bench/relay.py [--rounds N] [--seconds S] [--quick]

Starts a private systemd user manager (lmproxy.sandbox), installs an lmproxy config
into it with `lmproxy install --user --now` (nginx, iperf3 -s, a fake model and a
slow-streaming backend as lmproxy backends) and socket-activated
systemd-socket-proxyd units beside it, then measures each path in interleaved
rounds (every path once per round, in turn) and prints one table of medians.
A second systemd-socket-proxyd (the control) runs in the throughput rows' rounds
too: its ratio to the first shows how far apart equal proxies measure.
Not part of the test suite. Needs root, and the apt packages iperf3, wrk and
nginx-light (or nginx). All traffic stays on 127.0.0.1; everything it starts is
stopped when it ends, also on Ctrl-C or failure.
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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmproxy import sandbox as sandbox_module  # noqa: E402
from lmproxy import unitnames, unitsyntax  # noqa: E402
from lmproxy.sandbox import Sandbox  # noqa: E402

PROXYD = "/lib/systemd/systemd-socket-proxyd"
# binary -> the apt package that ships it
TOOLS = {
    "/usr/bin/iperf3": "iperf3",
    "/usr/bin/wrk": "wrk",
    "/usr/sbin/nginx": "nginx-light",
    "/usr/bin/taskset": "util-linux",
    PROXYD: "systemd",
}

DIRECT, PROXY, LMPROXY = "direct", "systemd-socket-proxyd", "lmproxy"
PATHS = (DIRECT, PROXY, LMPROXY)
# A second, identical systemd-socket-proxyd in the throughput rows: its ratio to the first is
# what two equal proxies measure against each other on this machine in this run, the spread
# that any ratio of those rows carries.
CONTROL = "control"
CONTROL_BACKENDS = ("nginx", "iperf")

# The fake model's load time in the cold-start rows: long enough that lmproxy's readiness
# polling is in its steady state (5 ms) when the port opens, short enough for many trials.
COLD_DELAY_S = 0.15
HERD_CLIENTS = 64
IDLE_CLIENTS = 1000
TRICKLE_TOKENS = 20
TRICKLE_INTERVAL_S = 0.05
IDLE_SECONDS = 3.0
# LimitNOFILE= given to both proxies for the 1,000-streams rows (systemd's default soft
# limit, 1024 descriptors, is too few for 1,000 relayed connections in either proxy).
NOFILE = 65536
# Every wait for a unit, a client or a tool gives up after this long.
STEP_TIMEOUT_S = 60.0
HTTP_GET = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- results ----------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    unit: str
    digits: int = 0
    samples: dict[str, list[float]] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)  # cells that are words, not numbers
    # for count rows (clients served): path -> [served, attempted]
    counts: dict[str, list[int]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # said after the value

    def add(self, path: str, value: float) -> None:
        self.samples.setdefault(path, []).append(value)

    def count(self, path: str, served: int, attempted: int) -> None:
        total = self.counts.setdefault(path, [0, 0])
        total[0] += served
        total[1] += attempted

    def value(self, path: str) -> float | None:
        if path in self.counts:
            served, attempted = self.counts[path]
            return served / attempted if attempted else None
        values = self.samples.get(path)
        return statistics.median(values) if values else None

    def cell(self, path: str) -> str:
        if path in self.fixed:
            return self.fixed[path]
        note = f" {self.notes[path]}" if path in self.notes else ""
        if path in self.counts:
            served, attempted = self.counts[path]
            return f"{served}/{attempted}{note}"
        value = self.value(path)
        return ("—" if value is None else f"{value:,.{self.digits}f}") + note

    def ratio(self, path: str = LMPROXY) -> str:
        """path / systemd-socket-proxyd: the median of the ratios within each round (the
        paths ran one after the other, in the same state of a shared machine) where every
        round measured both, else the ratio of the medians."""
        mine, theirs = self.value(path), self.value(PROXY)
        if mine is None or theirs is None or path in self.fixed or PROXY in self.fixed:
            return "—"
        ours, others = self.samples.get(path, []), self.samples.get(PROXY, [])
        if ours and len(ours) == len(others) and all(others):
            return f"{statistics.median(a / b for a, b in zip(ours, others, strict=True)):.2f}"
        if theirs == 0:
            return "∞" if mine else "—"
        return f"{mine / theirs:.2f}"


# --- the machine --------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    cpus = len(os.sched_getaffinity(0))
    return (
        f"{cpus} CPUs (nproc), {model}{memory}, Linux {os.uname().release}, "
        f"Python {sys.version.split()[0]}"
    )


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def missing_packages() -> list[str]:
    return sorted({package for binary, package in TOOLS.items() if not os.access(binary, os.X_OK)})


# --- processes of units -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# --- the installation ---------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct ports nobody listens on now, just below the ephemeral range.

    Not ports the kernel hands out (bind to port 0): those are ephemeral ports, which
    connect() takes for its own end too. A wrk run with a new connection per request goes
    through the whole range within seconds and leaves it in TIME_WAIT, so a backend stopped
    between trials could not listen on its port again (EADDRINUSE)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for port in range(low - 1, 1024, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports below the ephemeral range ({low})")


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""


@dataclass
class Setup:
    """Where each path's listener is, for each backend."""

    sandbox: Sandbox
    work: Path
    # backend -> path -> port
    ports: dict[str, dict[str, int]] = field(default_factory=dict)

    # names of the lmproxy services and the systemd-socket-proxyd units of each backend
    @staticmethod
    def lmproxy_name(backend: str) -> str:
        return f"bn-{backend}"

    @staticmethod
    def proxyd_name(backend: str, path: str = PROXY) -> str:
        return f"bench-proxyd-{backend}" if path == PROXY else f"bench-proxyd2-{backend}"

    @property
    def unit_dir(self) -> Path:
        return self.sandbox.config_home / "systemd" / "user"

    def stamp(self, path: str) -> Path:
        return self.work / f"listen-{'proxyd' if path == PROXY else 'lmproxy'}.stamp"

    def systemctl(self, *args: str, check: bool = True) -> str:
        result = self.sandbox.systemctl(*args, timeout=STEP_TIMEOUT_S)
        if check and result.returncode != 0:
            raise RuntimeError(f"systemctl --user {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def active_state(self, unit: str) -> str:
        return self.systemctl("show", "-p", "ActiveState", "--value", unit, check=False)

    def wait_state(self, unit: str, states: Sequence[str], timeout: float = STEP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        pause = 0.005
        while (state := self.active_state(unit)) not in states:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{unit} is still {state} after {timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def backend_journal(self, backend: str, lines: int) -> list[str]:
        """The last journal lines of an lmproxy backend: its own output, and what the
        manager said about its unit (a failed start)."""
        name = self.lmproxy_name(backend)
        matches = [
            f"SYSLOG_IDENTIFIER={unitnames.syslog_identifier(name)}",
            "+",
            f"USER_UNIT=lmproxy-backend@{name}.service",
        ]
        return self.journal(*matches, "-n", str(lines))

    def journal(self, *args: str) -> list[str]:
        """Messages of the sandbox's journal (journalctl -o cat with these matches and options)."""
        result = self.sandbox.run(["journalctl", "--no-pager", "-o", "cat", *args], timeout=30)
        return result.stdout.splitlines()

    def main_pid(self, unit: str) -> int:
        return int(self.systemctl("show", "-p", "MainPID", "--value", unit) or 0)

    def stop(self, *units: str) -> None:
        self.systemctl("stop", *units)
        for unit in units:
            self.wait_state(unit, ("inactive", "failed"))


def install(sandbox: Sandbox, work: Path) -> Setup:
    setup = Setup(sandbox, work)
    backends = ("nginx", "iperf", "trickle", "cold")
    ports = iter(free_ports(len(backends) * len(PATHS) + len(CONTROL_BACKENDS) + 1))
    for backend in backends:
        setup.ports[backend] = {path: next(ports) for path in PATHS}
    for backend in CONTROL_BACKENDS:
        setup.ports[backend][CONTROL] = next(ports)
    # The cold rows need a backend of their own per proxy: it is stopped between trials.
    cold_proxyd_backend = next(ports)
    python = sys.executable
    pythonpath = {"PYTHONPATH": str(ROOT)}

    (work / "nginx.conf").write_text(
        NGINX_CONF.format(work=work, port=setup.ports["nginx"][DIRECT])
    )

    def cold_args(path: str, port: int) -> str:
        return (
            f"{BENCH / 'coldmodel.py'} --stamp {setup.stamp(path)} -- "
            f"--name cold --port {port} --delay {COLD_DELAY_S}"
        )

    commands = {
        "nginx": ("/usr/sbin/nginx", f"-p {work} -c {work / 'nginx.conf'} -e stderr"),
        "iperf": ("/usr/bin/iperf3", f"-s -B 127.0.0.1 -p {setup.ports['iperf'][DIRECT]}"),
        "trickle": (
            python,
            f"{BENCH / 'trickle.py'} --port {setup.ports['trickle'][DIRECT]} "
            f"--tokens {TRICKLE_TOKENS} --interval {TRICKLE_INTERVAL_S}",
        ),
        "cold": (python, cold_args(LMPROXY, setup.ports["cold"][DIRECT])),
    }
    services = []
    for backend, (command, args) in commands.items():
        services.append(
            {
                "Name": setup.lmproxy_name(backend),
                "ListenPort": setup.ports[backend][LMPROXY],
                "ProxyTargetHost": "127.0.0.1",
                "ProxyTargetPort": setup.ports[backend][DIRECT],
                "Command": command,
                "Args": args,
                "Environment": pythonpath,
            }
        )
    config = work / "config.json"
    config.write_text(
        json.dumps({"ResourcesAvailable": {"RAM": 1}, "Services": services}, indent=2)
    )

    # systemd-socket-proxyd, socket-activated like lmproxy's shim (same socket settings).
    unit_dir = sandbox.config_home / "systemd" / "user"
    proxyds = [(backend, PROXY) for backend in backends]
    proxyds += [(backend, CONTROL) for backend in CONTROL_BACKENDS]
    for backend, path in proxyds:
        name = setup.proxyd_name(backend, path)
        target = cold_proxyd_backend if backend == "cold" else setup.ports[backend][DIRECT]
        (unit_dir / f"{name}.socket").write_text(
            "[Socket]\n"
            f"ListenStream=127.0.0.1:{setup.ports[backend][path]}\n"
            "Accept=no\nNoDelay=yes\nBacklog=4096\n"
        )
        depends = ""
        if backend == "cold":
            # The usual way to put systemd-socket-proxyd before a server that systemd starts.
            depends = "Requires=bench-cold-backend.service\nAfter=bench-cold-backend.service\n"
        (unit_dir / f"{name}.service").write_text(
            f"[Unit]\n{depends}Requires={name}.socket\nAfter={name}.socket\n"
            "[Service]\n"
            f"ExecStart={PROXYD} --connections-max=4096 127.0.0.1:{target}\n"
        )
    cold_argv = [python, *cold_args(PROXY, cold_proxyd_backend).split()]
    (unit_dir / "bench-cold-backend.service").write_text(
        "[Service]\nType=exec\n"
        + f"ExecStart={unitsyntax.exec_line(cold_argv)}\n"
        + f"Environment={unitsyntax.environment_assignment('PYTHONPATH', str(ROOT))}\n"
    )

    # This checkout's lmproxy, not one installed elsewhere: the units then run it too.
    result = subprocess.run(
        sandbox.command(
            [python, "-m", "lmproxy", "install", "--user", "--config", str(config), "--now"]
        ),
        env=sandbox.env(pythonpath),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"lmproxy install failed:\n{result.stdout}{result.stderr}")
    setup.systemctl("daemon-reload")
    setup.systemctl("start", *(f"{setup.proxyd_name(b, p)}.socket" for b, p in proxyds))
    return setup


# --- clients ------------------------------------------------------------------------------------


def run_tool(argv: Sequence[str], timeout: float) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}: {(result.stdout + result.stderr)[-500:]}"
        )
    return result.stdout


def iperf(port: int, streams: int, seconds: int) -> float:
    """Gbit/s received, iperf3 client -> server."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams)]
    argv += ["-t", str(seconds), "-J"]
    for attempt in range(3):
        try:
            report = json.loads(run_tool(argv, seconds + 30))
            return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
        except (RuntimeError, ValueError, KeyError) as error:
            # "the server is busy": the previous test's connections are still closing.
            if attempt == 2:
                raise
            say(f"    iperf3 failed ({str(error)[:200]}); retrying")
            time.sleep(0.5)
    raise AssertionError("unreachable")


_REQUESTS = re.compile(r"Requests/sec:\s*([\d.]+)")
_ERRORS = re.compile(r"Socket errors: .*|Non-2xx or 3xx responses: \d+")


def wrk(port: int, connections: int, threads: int, seconds: int, close: bool) -> float:
    """Requests per second."""
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"]
    cpus = sorted(os.sched_getaffinity(0))
    if threads == 1 and len(cpus) >= 2:
        # One wrk thread on a CPU of its own: left to the scheduler, where it put wrk, nginx
        # and the proxy made every path flip between two rates (about 26,000 and 60,000
        # req/s with one connection on 2 CPUs) from one run to the next.
        argv = ["taskset", "-c", str(cpus[-1]), *argv]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    output = run_tool(argv, seconds + 30)
    match = _REQUESTS.search(output)
    if not match:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{output}")
    for error in _ERRORS.findall(output):
        say(f"    wrk: {error}")
    return float(match.group(1))


def first_byte(port: int, request: bytes, timeout: float) -> tuple[float | None, bytes]:
    """Connects, sends request; returns (monotonic time of the first byte or None if dropped,
    the whole answer)."""
    answer = b""
    first: float | None = None
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionRefusedError:  # e.g. a reference proxy whose socket systemd gave up on
        return None, b"connection refused"
    with conn:
        try:
            conn.sendall(request)
            chunk = conn.recv(65536)
            if chunk:
                first = time.monotonic()
            answer = chunk
            while chunk:
                chunk = conn.recv(65536)
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return first, answer


def served(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.1 200") and answer.rstrip().endswith((b"}", b"nginx"))


# --- rows -------------------------------------------------------------------------------------


class Bench:
    def __init__(self, setup: Setup, seconds: int) -> None:
        self.setup = setup
        self.seconds = seconds
        self.rows: dict[str, Row] = {
            "bulk1": Row("bulk, 1 stream (iperf3 -P 1)", "Gbit/s", 1),
            "bulk8": Row("bulk, 8 streams (iperf3 -P 8)", "Gbit/s", 1),
            "c1": Row("keep-alive, 1 connection (wrk -c1 -t1, pinned)", "req/s"),
            "c1cpu": Row("… the proxy's CPU time per request (utime + stime)", "µs", 2),
            "c64": Row("keep-alive, 64 connections (wrk -c64 -t2)", "req/s"),
            "close1": Row("new connection per request, 1 at a time (wrk -c1, pinned)", "req/s"),
            "close64": Row("new connection per request, 64 at a time (wrk -c64)", "req/s"),
            "cold": Row("cold start: port opens → client's first byte", "ms", 1),
            "herd": Row(
                f"{HERD_CLIENTS} clients at a cold service at once: served, all trials", "clients"
            ),
            "herd_slowest": Row(f"… the slowest of the {HERD_CLIENTS}: connect → answer", "ms"),
            "herd_warm": Row(
                f"{HERD_CLIENTS} clients at once at the running fake model (1 trial): slowest", "ms"
            ),
            "idle_default": Row(
                f"{IDLE_CLIENTS:,} slow streams at once, default LimitNOFILE: completed",
                "streams",
            ),
            "idle_done": Row(
                f"{IDLE_CLIENTS:,} slow streams at once, LimitNOFILE={NOFILE}: "
                "completed, all trials",
                "streams",
            ),
            "idle_rss": Row(f"… proxy's peak RSS (VmHWM) with {IDLE_CLIENTS:,} open", "MiB", 1),
            "idle_per_conn": Row("… RSS added per connection", "KiB", 1),
            "idle_fds": Row("… file descriptors per connection", "fds", 1),
            "idle_cpu": Row(
                f"… proxy's CPU while {IDLE_CLIENTS:,} sit idle ({IDLE_SECONDS:g} s)", "ms/s", 2
            ),
            "activation": Row("start-up: socket activation → first byte relayed", "ms", 1),
            "import_help": Row("start-up: `-X importtime -m lmproxy shim --help`", "ms", 1),
            "import_shim": Row("start-up: imports of a socket-activated shim", "ms", 1),
        }
        # Cells that do not apply: no proxy to start or to measure, or no Python.
        for key in ("herd", "herd_slowest", "activation", "import_help", "import_shim"):
            self.rows[key].fixed[DIRECT] = "—"
        for key in ("c1cpu", "idle_rss", "idle_per_conn", "idle_fds", "idle_cpu"):
            self.rows[key].fixed[DIRECT] = "—"
        for key in ("import_help", "import_shim"):
            self.rows[key].fixed[PROXY] = "—"
        self.cold_trials: dict[str, list[int]] = {}  # path -> [dropped, trials]

    def port(self, backend: str, path: str) -> int:
        return self.setup.ports[backend][path]

    # --- warm-up -------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Starts the lmproxy backends that direct and systemd-socket-proxyd also use."""
        for path in (LMPROXY, PROXY, CONTROL):
            _, answer = first_byte(self.port("nginx", path), HTTP_GET, STEP_TIMEOUT_S)
            if not served(answer):
                raise RuntimeError(f"nginx through {path} answered {answer[:200]!r}")
            iperf(self.port("iperf", path), 1, 1)
        trickle = asyncio.run(streams(self.port("trickle", LMPROXY), 1, 0, STEP_TIMEOUT_S))
        if trickle != 1:
            raise RuntimeError("the trickle backend did not answer through lmproxy")

    # --- throughput ----------------------------------------------------------------------

    def throughput(self, order: Sequence[str]) -> None:
        s = self.seconds
        measures: list[tuple[str, str, Callable[[int], float]]] = [
            ("bulk1", "iperf", lambda port: iperf(port, 1, s)),
            ("bulk8", "iperf", lambda port: iperf(port, 8, s)),
            ("c1", "nginx", lambda port: wrk(port, 1, 1, s, close=False)),
            ("c64", "nginx", lambda port: wrk(port, 64, 2, s, close=False)),
            ("close1", "nginx", lambda port: wrk(port, 1, 1, s, close=True)),
            ("close64", "nginx", lambda port: wrk(port, 64, 2, s, close=True)),
        ]
        proxies = {
            LMPROXY: f"lmproxy-{self.setup.lmproxy_name('nginx')}.service",
            PROXY: f"{self.setup.proxyd_name('nginx')}.service",
            CONTROL: f"{self.setup.proxyd_name('nginx', CONTROL)}.service",
        }
        for key, backend, measure in measures:
            for path in order:
                # The proxy's own cost, which the rate hides where it is not the bottleneck.
                pid = 0
                if key == "c1" and path in proxies:
                    pid = self.setup.main_pid(proxies[path])
                    if not pid:  # stopped since: one request starts it, outside the measure
                        first_byte(self.port(backend, path), HTTP_GET, STEP_TIMEOUT_S)
                        pid = self.setup.main_pid(proxies[path])
                before = cpu_seconds(pid) if pid else 0.0
                value = measure(self.port(backend, path))
                self.rows[key].add(path, value)
                say(f"    {key:8} {path:22} {value:12,.2f} {self.rows[key].unit}")
                if pid and value > 0:
                    per_request = (cpu_seconds(pid) - before) / (value * s) * 1e6
                    self.rows["c1cpu"].add(path, per_request)
                    say(f"    {'c1cpu':8} {path:22} {per_request:12,.2f} µs")

    # --- cold start --------------------------------------------------------------------------

    def make_cold(self, path: str) -> None:
        """Stops the cold service's backend (and the proxy in front of it)."""
        if path == LMPROXY:
            name = self.setup.lmproxy_name("cold")
            self.setup.stop(f"lmproxy-backend@{name}.service")
            self.setup.wait_state(f"lmproxy-{name}.service", ("inactive", "failed"))
        else:
            self.setup.stop(
                f"{self.setup.proxyd_name('cold')}.service", "bench-cold-backend.service"
            )
        self.setup.stamp(path).unlink(missing_ok=True)

    def cold_start(self, path: str) -> None:
        if path == DIRECT:
            self.cold_start_direct()
            return
        self.make_cold(path)
        first, answer = first_byte(self.port("cold", path), HTTP_GET, STEP_TIMEOUT_S)
        row = self.rows["cold"]
        trials = self.cold_trials.setdefault(path, [0, 0])
        trials[1] += 1
        if first is None or not served(answer):
            trials[0] += 1
            say(f"    cold     {path:22} dropped the client ({answer[:60]!r})")
        if trials[0] == trials[1]:
            row.fixed[path] = f"drops the client ({trials[0]}/{trials[1]})"
        elif trials[0]:
            row.fixed.pop(path, None)
            row.notes[path] = f"(dropped {trials[0]}/{trials[1]})"
        if first is None or not served(answer):
            return
        opened = float(self.setup.stamp(path).read_text())
        delay_ms = (first - opened) * 1000
        row.add(path, delay_ms)
        say(f"    cold     {path:22} {delay_ms:12,.2f} ms")

    def cold_start_direct(self) -> None:
        """The floor: the fake model is started by hand and a client that tries to connect
        every millisecond (as lmproxy's readiness probe does at best) sends the request."""
        self.make_cold(LMPROXY)
        stamp = self.setup.stamp(LMPROXY)
        backend = f"lmproxy-backend@{self.setup.lmproxy_name('cold')}.service"
        self.setup.systemctl("start", "--no-block", backend)
        deadline = time.monotonic() + STEP_TIMEOUT_S
        address = ("127.0.0.1", self.port("cold", DIRECT))
        while True:
            conn = socket.socket()
            try:
                conn.connect(address)
                break
            except OSError:
                conn.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the fake model never listened; {backend} is "
                        f"{self.setup.active_state(backend)}: "
                        + " / ".join(self.setup.backend_journal("cold", 5))
                    ) from None
                time.sleep(0.001)
        with conn:
            conn.settimeout(STEP_TIMEOUT_S)
            conn.sendall(HTTP_GET)
            conn.recv(1)
            first = time.monotonic()
        delay_ms = (first - float(stamp.read_text())) * 1000
        self.rows["cold"].add(DIRECT, delay_ms)
        say(f"    cold     {DIRECT:22} {delay_ms:12,.2f} ms (a client polling every 1 ms)")

    def herd(self, path: str, *, cold: bool = True) -> None:
        """HERD_CLIENTS clients connect at once and send a request each; cold: to a stopped
        service; else to the running fake model (direct: its own port)."""
        if cold:
            self.make_cold(path)
        else:
            self.make_warm(path)
        port = self.port("cold", path)
        barrier = threading.Barrier(HERD_CLIENTS)
        results: list[float | None] = [None] * HERD_CLIENTS

        def client(index: int) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(STEP_TIMEOUT_S)
            started = time.monotonic()
            try:
                _, answer = first_byte(port, HTTP_GET, STEP_TIMEOUT_S)
            except OSError:
                return
            if served(answer):
                results[index] = time.monotonic() - started

        threads = [threading.Thread(target=client, args=(i,)) for i in range(HERD_CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STEP_TIMEOUT_S * 2)
        times = [t for t in results if t is not None]
        slowest_ms = max(times) * 1000 if times else None
        if cold:
            self.rows["herd"].count(path, len(times), HERD_CLIENTS)
            if slowest_ms is not None:
                self.rows["herd_slowest"].add(path, slowest_ms)
        elif slowest_ms is not None and len(times) == HERD_CLIENTS:
            self.rows["herd_warm"].add(path, slowest_ms)
        else:
            self.rows["herd_warm"].notes[path] = "(some were not served)"
        slowest = f", slowest {slowest_ms:,.0f} ms" if slowest_ms is not None else ""
        kind = "herd" if cold else "herd/warm"
        say(f"    {kind:8} {path:22} {len(times)}/{HERD_CLIENTS} served{slowest}")
        if path == LMPROXY and len(times) < HERD_CLIENTS:
            # Not expected of lmproxy: show what its shim said.
            service = f"LMPROXY_SERVICE={self.setup.lmproxy_name('cold')}"
            for line in self.setup.journal("-n", "8", service):
                say(f"      shim: {line}")

    def make_warm(self, path: str) -> None:
        """The cold service's fake model runs and listens, and so does the proxy before it."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        stamp = self.setup.stamp(PROXY if path == PROXY else LMPROXY)
        while True:
            with contextlib.suppress(OSError):
                # The first clients of systemd-socket-proxyd may be dropped: try again.
                _, answer = first_byte(self.port("cold", path), HTTP_GET, STEP_TIMEOUT_S)
                if served(answer) and stamp.exists():
                    return
                if answer == b"connection refused" and path == PROXY:
                    # Dropped clients made its service hit the start limit, and systemd
                    # closed the socket: open it again.
                    proxyd = self.setup.proxyd_name("cold")
                    self.setup.systemctl(
                        "reset-failed", f"{proxyd}.socket", f"{proxyd}.service", check=False
                    )
                    self.setup.systemctl("start", f"{proxyd}.socket")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fake model did not answer through {path}")
            time.sleep(0.05)

    # --- start-up --------------------------------------------------------------------------

    def activation(self, path: str) -> None:
        """Socket activation of a stopped proxy in front of a running backend (nginx)."""
        if path == LMPROXY:
            self.setup.stop(f"lmproxy-{self.setup.lmproxy_name('nginx')}.service")
        else:
            self.setup.stop(f"{self.setup.proxyd_name('nginx')}.service")
        started = time.monotonic()
        first, answer = first_byte(self.port("nginx", path), HTTP_GET, STEP_TIMEOUT_S)
        if first is None or not served(answer):
            raise RuntimeError(f"nginx through a fresh {path} answered {answer[:200]!r}")
        delay_ms = (first - started) * 1000
        self.rows["activation"].add(path, delay_ms)
        say(f"    start-up {path:22} {delay_ms:12,.2f} ms")

    def import_times(self) -> None:
        argv = [sys.executable, "-X", "importtime", "-m", "lmproxy", "shim", "--help"]
        totals = []
        for _ in range(5):
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=True, cwd=ROOT
            )
            totals.append(import_total_ms(result.stderr.splitlines()))
        value = statistics.median(totals)
        self.rows["import_help"].add(LMPROXY, value)
        say(f"    importtime of shim --help   {value:8,.1f} ms")

    def shim_imports(self) -> None:
        """What a real shim imports, socket-activated by systemd, with PYTHONPROFILEIMPORTTIME
        set by a drop-in (its stderr goes to the journal)."""
        unit = f"lmproxy-{self.setup.lmproxy_name('nginx')}.service"
        drop_in = self.setup.unit_dir / f"{unit}.d" / "bench-importtime.conf"
        drop_in.parent.mkdir(exist_ok=True)
        drop_in.write_text("[Service]\nEnvironment=PYTHONPROFILEIMPORTTIME=1\n")
        try:
            self.setup.systemctl("daemon-reload")
            self.setup.stop(unit)
            _, answer = first_byte(self.port("nginx", LMPROXY), HTTP_GET, STEP_TIMEOUT_S)
            if not served(answer):
                raise RuntimeError(f"nginx through lmproxy answered {answer[:200]!r}")
            pid = self.setup.main_pid(unit)
            deadline = time.monotonic() + 10
            lines: list[str] = []
            while time.monotonic() < deadline:  # journald may still be writing
                lines = self.setup.journal(f"_PID={pid}")
                if any(line.endswith("| lmproxy.shim") for line in lines):
                    break
                time.sleep(0.1)
            value = import_total_ms(lines)
            self.rows["import_shim"].add(LMPROXY, value)
            say(f"    importtime of a real shim   {value:8,.1f} ms")
        finally:
            drop_in.unlink(missing_ok=True)
            self.setup.systemctl("daemon-reload")
            self.setup.stop(unit)

    # --- many slow connections -------------------------------------------------------------

    def set_nofile(self, limit: int | None) -> None:
        """LimitNOFILE= for both proxies' trickle units (None: systemd's default, soft 1024),
        by a drop-in, as a user would; the running processes keep theirs until restarted."""
        for unit in self.idle_units().values():
            drop_in = self.setup.unit_dir / f"{unit}.d" / "bench-nofile.conf"
            if limit is None:
                drop_in.unlink(missing_ok=True)
            else:
                drop_in.parent.mkdir(exist_ok=True)
                drop_in.write_text(f"[Service]\nLimitNOFILE={limit}\n")
        self.setup.systemctl("daemon-reload")

    def idle_units(self) -> dict[str, str]:
        return {
            LMPROXY: f"lmproxy-{self.setup.lmproxy_name('trickle')}.service",
            PROXY: f"{self.setup.proxyd_name('trickle')}.service",
        }

    def idle(self, path: str, *, default_limits: bool = False) -> None:
        """IDLE_CLIENTS streams at once through a freshly started proxy: they all get their
        tokens, sit idle for IDLE_SECONDS (the proxy's CPU time is taken meanwhile), end."""
        port = self.port("trickle", path)
        unit = self.idle_units().get(path)
        pid = before_kib = before_fds = 0
        if unit is not None:
            self.setup.stop(unit)
            # One stream first: the proxy is up, and its RSS before the crowd is known.
            if asyncio.run(streams(port, 1, 0, STEP_TIMEOUT_S)) != 1:
                raise RuntimeError(f"the trickle backend did not answer through {path}")
            pid = self.setup.main_pid(unit)
            before_kib = status_kib(pid, "VmRSS")
            before_fds = len(os.listdir(f"/proc/{pid}/fd"))
        cpu: list[float] = []
        peak: list[int] = []
        fds: list[int] = []

        def idle_phase() -> None:
            with contextlib.suppress(OSError):
                if pid:
                    cpu.append(cpu_seconds(pid))
                    fds.append(len(os.listdir(f"/proc/{pid}/fd")))
                time.sleep(IDLE_SECONDS)
                if pid:
                    cpu.append(cpu_seconds(pid))
                    peak.append(status_kib(pid, "VmHWM"))

        done = asyncio.run(streams(port, IDLE_CLIENTS, IDLE_SECONDS, STEP_TIMEOUT_S, idle_phase))
        alive = not pid or os.path.exists(f"/proc/{pid}")
        row = self.rows["idle_default" if default_limits else "idle_done"]
        row.count(path, done, IDLE_CLIENTS)
        line = f"    {'idle/1024' if default_limits else 'idle':8} {path:22} {done}/{IDLE_CLIENTS}"
        if not alive:
            row.notes[path] = "(the proxy died)"
            line += ", the proxy died"
        if pid and len(peak) == 1 and len(cpu) == 2 and not default_limits:
            self.rows["idle_rss"].add(path, peak[0] / 1024)
            self.rows["idle_per_conn"].add(path, (peak[0] - before_kib) / IDLE_CLIENTS)
            self.rows["idle_fds"].add(path, (fds[0] - before_fds) / IDLE_CLIENTS)
            per_s = (cpu[1] - cpu[0]) * 1000 / IDLE_SECONDS
            self.rows["idle_cpu"].add(path, per_s)
            line += f", RSS {before_kib / 1024:.1f} → peak {peak[0] / 1024:.1f} MiB"
            line += f", CPU while idle {per_s:.2f} ms/s"
        say(line)


def import_total_ms(lines: Sequence[str]) -> float:
    """The sum of the cumulative column of the top-level imports in -X importtime output."""
    total_us = 0
    for line in lines:
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3:
            name = parts[2]
            top_level = name.startswith(" ") and not name.startswith("  ")
            if top_level and parts[1].strip().isdigit():
                total_us += int(parts[1])
    return total_us / 1000


async def streams(
    port: int,
    count: int,
    idle_s: float,
    timeout: float,
    during_idle: Callable[[], None] | None = None,
) -> int:
    """count trickle streams at once: each gets all its tokens; once all have (or failed),
    they sit idle for idle_s (or while during_idle runs, in a thread), then end.
    Returns how many completed with every byte in order."""
    arrived = [0]
    everyone = asyncio.Event()
    release = asyncio.Event()

    async def one() -> bool:
        counted = False

        def arrive() -> None:
            nonlocal counted
            if not counted:
                counted = True
                arrived[0] += 1
                if arrived[0] == count:
                    everyone.set()

        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        except OSError:
            arrive()
            raise
        try:
            writer.write(b"go\n")
            await writer.drain()
            lines = [await reader.readline() for _ in range(TRICKLE_TOKENS + 1)]
            ok = lines == [b"tok%d\n" % i for i in range(TRICKLE_TOKENS)] + [b"end\n"]
            arrive()
            await release.wait()
            writer.write(b"stop\n")
            await writer.drain()
            return ok and await reader.readline() == b"bye\n" and await reader.read() == b""
        finally:
            arrive()
            writer.close()

    async def run() -> list[bool | BaseException]:
        tasks = [asyncio.ensure_future(one()) for _ in range(count)]

        async def conduct() -> None:
            await everyone.wait()
            if during_idle is not None:
                await asyncio.to_thread(during_idle)
            elif idle_s:
                await asyncio.sleep(idle_s)
            release.set()

        conductor = asyncio.ensure_future(conduct())
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            conductor.cancel()

    try:
        results = await asyncio.wait_for(run(), timeout + idle_s)
    except TimeoutError:
        say(f"    streams: not done after {timeout + idle_s:g} s")
        return 0
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        say(f"    {len(failures)} stream(s) failed, e.g. {failures[0]!r}")
    return sum(1 for r in results if r is True)


# --- the run ------------------------------------------------------------------------------------


def print_table(bench: Bench, header: str) -> None:
    columns = [*PATHS, "lmproxy / systemd-socket-proxyd", "control / systemd-socket-proxyd"]
    lines = [
        [
            f"{row.label} ({row.unit})",
            *(row.cell(p) for p in PATHS),
            row.ratio(),
            row.ratio(CONTROL),
        ]
        for row in bench.rows.values()
        if any(row.cell(p) != "—" for p in PATHS)  # rows that were not measured are left out
    ]
    print(header)
    print()
    print("| | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print()
    print(
        "control: a second systemd-socket-proxyd unit, the same as the first, measured in the "
        "same rounds: how far apart two equal proxies measure here."
    )


def rotated(round_index: int) -> list[str]:
    shift = round_index % len(PATHS)
    return [*PATHS[shift:], *PATHS[:shift]]


def throughput_order(round_index: int) -> list[str]:
    """Each proxy measured next to systemd-socket-proxyd, which both ratios divide by (the
    machine's pace moves within a round), in an order reversed from one round to the next
    so that neither side of a ratio is always the one measured first."""
    order = [DIRECT, LMPROXY, PROXY, CONTROL]
    return order if round_index % 2 == 0 else order[::-1]


def run(args: argparse.Namespace) -> int:
    missing = missing_packages()
    if missing:
        say(
            f"bench/relay.py: missing apt packages: {', '.join(missing)}\n"
            f"  install them with: sudo apt-get install -y {' '.join(missing)}"
        )
        return 2
    reason = sandbox_module.unavailable_reason()
    if reason:
        say(f"bench/relay.py: {reason}")
        return 2
    rounds = args.rounds
    herd_trials = args.herd
    header = (
        f"Machine: {machine()}\n"
        f"Run: {rounds} interleaved rounds of {args.seconds:g} s per measure; "
        f"up to {herd_trials} cold-herd trials per proxy within {args.herd_budget:g} s; "
        f"load average at start {loadavg()}"
    )
    say(header)
    # On tmpfs where there is one, as $XDG_RUNTIME_DIR (the ledger's home) is under systemd.
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="lmproxy-bench-", dir=shm if shm.is_dir() else None))
    os.chmod(work, 0o755)
    started = time.monotonic()
    try:
        with sandbox_module.running(work / "sandbox") as sandbox:
            # The user manager keeps the default limits that its units inherit; only this
            # process, which holds a thousand client sockets at once, raises its own.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
            setup = install(sandbox, work)
            bench = Bench(setup, args.seconds)
            say("warming up (starts nginx, iperf3 -s and the trickle backend through lmproxy)")
            bench.warm_up()
            bench.import_times()
            herd_left = herd_trials
            herd_spent = 0.0
            for index in range(rounds):
                order = rotated(index)
                proxies = [path for path in order if path != DIRECT]
                say(f"round {index + 1}/{rounds} (order: {', '.join(order)})")
                bench.throughput(throughput_order(index))
                for _ in range(args.cold):
                    for path in order:
                        bench.cold_start(path)
                for _ in range(2):
                    for path in proxies:
                        bench.activation(path)
                bench.shim_imports()
                # The cold herds: their share of the trials and of the time left for them.
                share = herd_left // (rounds - index)
                allowance = (args.herd_budget - herd_spent) / (rounds - index)
                herd_started = time.monotonic()
                for _ in range(share):
                    if time.monotonic() - herd_started >= allowance:
                        break
                    for path in proxies:
                        bench.herd(path)
                    herd_left -= 1
                herd_spent += time.monotonic() - herd_started
                if index == 0 and args.warm_herd:
                    for path in order:
                        bench.herd(path, cold=False)
                if index == 0:
                    bench.set_nofile(None)
                    for path in proxies:
                        bench.idle(path, default_limits=True)
                    bench.set_nofile(NOFILE)
                if index < args.idle_rounds:
                    for path in order:
                        bench.idle(path)
            header += (
                f"; at the end {loadavg()}; took {time.monotonic() - started:.0f} s; "
                f"{herd_trials - herd_left} cold-herd trials per proxy"
            )
            print_table(bench, header)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sudo /usr/bin/python3 bench/relay.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of 1 s, fewer trials (about 2 minutes)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 3)")
    parser.add_argument(
        "--seconds", type=int, help="seconds per throughput measure (default 3; quick 1)"
    )
    parser.add_argument(
        "--herd",
        type=int,
        help="cold-herd trials per proxy, at most (default 50; quick 20), within --herd-budget",
    )
    parser.add_argument(
        "--herd-budget",
        type=float,
        help="seconds for all cold-herd trials together (default 150; quick 30)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.seconds is None:
        args.seconds = 1 if args.quick else 3
    if args.herd is None:
        args.herd = 20 if args.quick else 50
    if args.herd_budget is None:
        args.herd_budget = 30.0 if args.quick else 150.0
    if not 1 <= args.rounds <= 50 or not 1 <= args.seconds <= 60 or not 0 <= args.herd <= 500:
        parser.error("--rounds must be 1..50, --seconds 1..60 and --herd 0..500")
    if not 0 <= args.herd_budget <= 3600:
        parser.error("--herd-budget must be 0..3600")
    args.cold = 2 if args.quick else 3  # cold-start trials per path per round
    args.idle_rounds = 1 if args.quick else min(args.rounds, 3)
    # A herd at the running fake model directly waits out SYN retransmissions (30 s): once.
    args.warm_herd = not args.quick
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def as_root(script: str, run: Callable[[], int]) -> int:
    """Runs a benchmark that needs root (the systemd sandbox) from the checkout; SIGTERM
    and SIGHUP end it as Ctrl-C does, and everything it started is stopped."""
    if os.geteuid() != 0:
        say(f"{script} needs root (the systemd sandbox); run it with sudo")
        return 2
    os.chdir(ROOT)  # `python3 -m lmproxy` finds this checkout first
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        return run()
    except KeyboardInterrupt:
        say("interrupted; everything it started has been stopped")
        return 130


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    return as_root("bench/relay.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
