#!/usr/bin/python3
"""Cold starts, lmproxy beside large-model-proxy: what each proxy adds to a model's own start.

    sudo /usr/bin/python3 bench/coldstart.py [--rounds N] [--source DIR ...] [--json]
        [--delay S] [--spread S] [--seed N] [--peer PATH]

Both proxies front the same slow model server, bench/slowstart.py: it notes the
moment its process runs (its first statement), sleeps 0.5 to 0.6 s (--delay, plus
up to --spread, drawn anew each round and the same for every proxy in it), listens,
notes that moment, and answers every request with a 200. lmproxy runs in a private systemd
user manager (lmproxy.sandbox), installed with `lmproxy install --user --now`;
large-model-proxy (the peer build in /work/shared/peers, or --peer) runs as a
plain process beside it, with the same config: one service, its own ports, stopped
after 1 s without a request (ShutDownAfterInactivitySeconds). A trial is one
client at a cold service: no model process, and for lmproxy no shim either. The
client notes t0 right before connect() to the proxy, sends one GET, and notes t3
when the first byte of the answer comes (it must be a 200); the model notes
t1 (running) and t2 (listening), on the same CLOCK_MONOTONIC. Columns:

    (a) client's connect -> model's process runs    t1 - t0
    (b) model listens -> client's first byte        t3 - t2
    (c) all that the proxy adds to the model's start  (a) + (b)
    (s) lmproxy only: client's connect -> StartUnit sent (the shim's journal line
        `started`, LMPROXY_START_SENT_US): the part of (a) that is lmproxy's own

Each proxy gets one warm-up trial that does not count, then --rounds trials, the
proxies taking turns (the order reversed every other round). Before each trial
every service is cold again by the proxies' own idle stop (the bench waits for it,
within a bound), then the bench waits 0.3 s more so that nothing of the stop still
runs. With several --source folders (lmproxy checkouts, for example a `git
worktree` of an older commit), each runs in a manager of its own, on ports of its
own, in the same rounds. Each source's lmproxy/ is byte-compiled beforehand, so
that no trial pays for compiling. Progress goes to stderr, the table (min-max and
median of each column, and lmproxy's medians over large-model-proxy's) to stdout,
or JSON with --json. Everything it starts is stopped when it ends, also on Ctrl-C
or an error. Not part of the test suite; needs root (the sandbox).

large-model-proxy (without a HealthcheckCommand) tries the model's port with a
backoff from 1 µs that doubles up to one attempt every 100 ms: its (b) is the
time from the model's listen() to its next attempt, anywhere from 0 to 100 ms
depending on where the model's own start ends: with one fixed delay its (b) is
lucky or unlucky in every trial alike, so the delay varies by up to --spread
(0.1 s, one period of that backoff) to give every phase its share. lmproxy tries
every 1 to 2 ms. The model's own start (t1 -> t2) is printed for each proxy as
well: a proxy that still works on the CPUs while the model starts slows it.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmproxy import sandbox as sandbox_module  # noqa: E402
from lmproxy.sandbox import Sandbox  # noqa: E402

PEER = Path("/work/shared/peers/large-model-proxy")
BACKEND = BENCH / "slowstart.py"
SERVICE = "cold"
DELAY_S = 0.5  # the model's own start, between its two stamps (--delay)
SPREAD_S = 0.1  # each round adds 0 to this much to DELAY_S (--spread)
IDLE_S = 1  # ShutDownAfterInactivitySeconds, in both configs
SETTLE_S = 0.3  # once cold, so that nothing of the stop still runs on the CPUs
COLD_TIMEOUT_S = 30.0  # the bound on each wait for a service to be cold
STEP_TIMEOUT_S = 30.0  # the bound on a client's answer and on a proxy's start
HTTP_GET = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
COLUMNS = (
    ("a", "(a) connect -> running"),
    ("b", "(b) listening -> 1st byte"),
    ("c", "(c) = (a) + (b)"),
    ("s", "(s) connect -> StartUnit"),
)

# in --json: the columns and the model's own start (t1 -> t2)
COLUMN_KEYS = (*(key for key, _ in COLUMNS), "model")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- one trial ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One cold start, in seconds of CLOCK_MONOTONIC."""

    connect: float  # t0: the client, right before connect()
    running: float  # t1: the model's first statement
    listening: float  # t2: the model, right after listen()
    first_byte: float  # t3: the client, as the answer's first byte comes
    start_sent: float | None = None  # lmproxy: when its shim sent StartUnit

    def ms(self, column: str) -> float:
        """A column (a, b, c, s: NaN without StartUnit's time), or the model's own start
        (model), in ms."""
        a = self.running - self.connect
        b = self.first_byte - self.listening
        model = self.listening - self.running
        sent = math.nan if self.start_sent is None else self.start_sent - self.connect
        return 1000 * {"a": a, "b": b, "c": a + b, "s": sent, "model": model}[column]


@dataclass(frozen=True)
class Stamp:
    pid: int
    moment: float


def read_stamp(path: Path) -> Stamp:
    pid, moment = path.read_text().split()
    return Stamp(int(pid), float(moment))


def ask(port: int) -> tuple[float, float]:
    """One GET through the proxy: (t0, t3). Raises unless the answer is a 200."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.settimeout(STEP_TIMEOUT_S)
        connect = time.monotonic()
        client.connect(("127.0.0.1", port))
        client.sendall(HTTP_GET)
        answer = client.recv(65536)
        first_byte = time.monotonic()
        while chunk := client.recv(65536):
            answer += chunk
    status = answer.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or status[1] != b"200":
        raise RuntimeError(f"the answer is not a 200: {answer[:200]!r}")
    return connect, first_byte


def pid_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


# --- the proxies --------------------------------------------------------------------------------


class Proxy(abc.ABC):
    """A proxy with one service in front of bench/slowstart.py, whose stamps go to stamps."""

    def __init__(self, label: str, port: int, stamps: Path) -> None:
        self.label = label
        self.port = port
        self.stamps = stamps
        self.backend_pid: int | None = None  # the model process of the last trial
        self.trials: list[Trial] = []

    @abc.abstractmethod
    def logs(self) -> str:
        """The proxy's last log lines, to show when a trial fails."""

    @abc.abstractmethod
    def cold(self) -> bool:
        """Whether the service is cold: no model process (nor anything else of it)."""

    def wait_cold(self) -> None:
        deadline = time.monotonic() + COLD_TIMEOUT_S
        while not self.cold():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label}: not cold {COLD_TIMEOUT_S:g} s after its trial")
            time.sleep(0.02)

    def newest_model(self) -> int | None:
        """The PID of the newest model process: of the trial under way, else of the last."""
        with contextlib.suppress(OSError, ValueError):
            return read_stamp(self.stamps / "running").pid
        return self.backend_pid

    def trial(self) -> Trial:
        """One client at the cold service; the stamps are removed first, so the ones read
        after are this trial's (and they must come from one process)."""
        for event in ("running", "listening"):
            (self.stamps / event).unlink(missing_ok=True)
        try:
            connect, first_byte = ask(self.port)
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(f"{self.label}: the client failed: {exc}\n{self.logs()}") from exc
        try:
            running = read_stamp(self.stamps / "running")
            listening = read_stamp(self.stamps / "listening")
        except FileNotFoundError as exc:
            raise RuntimeError(f"{self.label}: no model started ({exc})\n{self.logs()}") from exc
        if running.pid != listening.pid:
            raise RuntimeError(f"{self.label}: stamps of two processes ({running}, {listening})")
        self.backend_pid = running.pid
        return Trial(connect, running.moment, listening.moment, first_byte)


class Lmproxy(Proxy):
    """lmproxy from one checkout, in a private systemd user manager of its own."""

    def __init__(
        self, label: str, port: int, stamps: Path, *, source: Path, sandbox: Sandbox, about: str
    ) -> None:
        super().__init__(label, port, stamps)
        self.source = source
        self.sandbox = sandbox
        self.about = about  # its commit, and whether lmproxy/ had changes, at install

    def cold(self) -> bool:
        socket_unit, shim, backend = (
            f"lmproxy-{SERVICE}.socket",
            f"lmproxy-{SERVICE}.service",
            f"lmproxy-backend@{SERVICE}.service",
        )
        states = self.unit_states(socket_unit, shim, backend)
        for unit in (shim, backend):
            if states[unit][0] == "failed":
                raise RuntimeError(f"{self.label}: {unit} failed (see its journal)")
        return (
            states[shim][0] == "inactive"
            and states[backend][0] == "inactive"
            and states[socket_unit] == ("active", "listening")
            and (self.backend_pid is None or pid_gone(self.backend_pid))
        )

    def trial(self) -> Trial:
        trial = super().trial()
        return dataclasses.replace(trial, start_sent=self.start_sent())

    def start_sent(self) -> float | None:
        """When the shim sent the backend's StartUnit, from its newest `started` line."""
        self.sandbox.run(["journalctl", "--sync"])
        shown = self.sandbox.run(
            ["journalctl", "--no-pager", "-o", "json", "-n", "1", "LMPROXY_EVENT=started"]
        )
        with contextlib.suppress(ValueError, KeyError):
            return int(json.loads(shown.stdout)["LMPROXY_START_SENT_US"]) / 1e6
        return None

    def logs(self) -> str:
        journal = self.sandbox.run(
            ["journalctl", "--no-pager", "-n", "40", "-o", "short-monotonic"]
        )
        return journal.stdout.strip() or journal.stderr.strip()

    def unit_states(self, *units: str) -> dict[str, tuple[str, str]]:
        """unit -> (ActiveState, SubState), in one `systemctl show`."""
        shown = self.sandbox.systemctl("show", "--property=Id,ActiveState,SubState", *units)
        if shown.returncode != 0:
            raise RuntimeError(f"systemctl show failed: {shown.stderr.strip()}")
        states = {}
        for block in shown.stdout.strip().split("\n\n"):
            fields = dict(line.split("=", 1) for line in block.splitlines())
            states[fields["Id"]] = (fields["ActiveState"], fields["SubState"])
        return states


class LargeModelProxy(Proxy):
    """The peer, a plain process (its own session) with its management API on management."""

    def __init__(
        self,
        label: str,
        port: int,
        stamps: Path,
        *,
        process: subprocess.Popen[bytes],
        management: int,
        log: Path,
    ) -> None:
        super().__init__(label, port, stamps)
        self.process = process
        self.management = management
        self.log = log

    def status(self) -> str:
        """Its service's status as its management API says (stopped, starting, running...)."""
        if self.process.poll() is not None:
            code = self.process.returncode
            raise RuntimeError(f"large-model-proxy exited ({code}):\n{tail(self.log)}")
        url = f"http://127.0.0.1:{self.management}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            services = json.load(response)["services"]
        (service,) = (s for s in services if s["name"] == SERVICE)
        return str(service["status"])

    def logs(self) -> str:
        return tail(self.log, 40)

    def cold(self) -> bool:
        return self.status() == "stopped" and (
            self.backend_pid is None or pid_gone(self.backend_pid)
        )


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


# --- setting up ---------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct random ports that nobody listens on now, below the ephemeral range, where
    no client's connect() takes them for its own end."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for port in random.sample(range(20000, low), min(500, low - 20000)):
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))  # large-model-proxy listens on every address
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports found between 20000 and {low}")


def service_config(port: int, target: int, stamps: Path, delay: float) -> dict[str, object]:
    """The one service, in large-model-proxy's format, which lmproxy reads as it is."""
    return {
        "Name": SERVICE,
        "ListenPort": str(port),
        "ProxyTargetHost": "127.0.0.1",
        "ProxyTargetPort": str(target),
        "Command": sys.executable,
        "Args": f"{BACKEND} --port {target} --delay {delay} --stamps {stamps}",
        "ShutDownAfterInactivitySeconds": IDLE_S,
    }


def describe(source: Path) -> tuple[str, bool]:
    """("6fed4df README: ...", whether lmproxy/ has uncommitted changes)."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(source), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout

    return git("log", "-1", "--format=%h %s").strip(), bool(
        git("status", "--porcelain", "--", "lmproxy").strip()
    )


def start_lmproxy(source: Path, folder: Path, delay: float, stack: contextlib.ExitStack) -> Lmproxy:
    """A fresh user manager with source's lmproxy installed, the service cold."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(source / "lmproxy")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    stamps = folder / "stamps"
    stamps.mkdir(parents=True)
    port, target = free_ports(2)
    config = folder / "config.json"
    services = [service_config(port, target, stamps, delay)]
    config.write_text(json.dumps({"Services": services}, indent=2))
    sandbox = sandbox_module.start(folder / "sandbox")
    stack.callback(sandbox.stop)
    env = sandbox.env({"PYTHONPATH": str(source)})
    # -P: not the working directory first on the path, which would be this checkout.
    install = [sys.executable, "-P", "-m", "lmproxy", "install", "--user"]
    installed = subprocess.run(
        sandbox.command([*install, "--config", str(config), "--now"]),
        env=env,
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if installed.returncode != 0:
        raise RuntimeError(f"lmproxy install failed for {source}:\n{installed.stderr.strip()}")
    commit, dirty = describe(source)
    label = f"lmproxy {commit.split()[0] if commit else source.name}{'+' if dirty else ''}"
    about = commit if len(commit) <= 60 else commit[:57] + "..."
    about = (about or "not a git checkout") + (" + uncommitted changes to lmproxy/" * dirty)
    proxy = Lmproxy(label, port, stamps, source=source, sandbox=sandbox, about=about)
    proxy.wait_cold()
    return proxy


def stop_peer(process: subprocess.Popen[bytes]) -> None:
    """large-model-proxy stopped with SIGINT, as it expects (it stops its services);
    killed with its process group after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def large_model_proxy(peer: Path, folder: Path, delay: float) -> Iterator[LargeModelProxy]:
    """The peer, running in folder (its logs/ go there), stopped with SIGINT as it expects
    (it stops its services), and killed with its group after 10 s."""
    stamps = folder / "stamps"
    stamps.mkdir(parents=True)
    port, target, management = free_ports(3)
    config = folder / "config.json"
    config.write_text(
        json.dumps(
            {
                "ManagementApi": {"ListenPort": str(management)},
                "Services": [service_config(port, target, stamps, delay)],
            },
            indent=2,
        )
    )
    log = folder / "large-model-proxy.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(peer), "-c", str(config)],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proxy = LargeModelProxy(
        "large-model-proxy", port, stamps, process=process, management=management, log=log
    )
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError):
                if proxy.cold():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"large-model-proxy did not come up:\n{tail(log)}")
            time.sleep(0.05)
        yield proxy
    finally:
        stop_peer(process)
        # It starts its services in process groups of their own: the last one, if it is left.
        pid = proxy.newest_model()
        if pid is not None and not pid_gone(pid):
            with contextlib.suppress(OSError):
                if str(BACKEND).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


# --- the run ------------------------------------------------------------------------------------


def run_trial(proxies: Sequence[Proxy], proxy: Proxy) -> Trial:
    """Every service cold (so that none is still stopping), a pause, then one trial."""
    for each in proxies:
        each.wait_cold()
    time.sleep(SETTLE_S)
    return proxy.trial()


def show(trial: Trial) -> str:
    return "  ".join(
        f"({column}) {trial.ms(column):6.1f} ms"
        for column, _ in COLUMNS
        if not math.isnan(trial.ms(column))
    )


def spread(values: Sequence[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "—"
    return f"{min(values):.1f}-{max(values):.1f} ({statistics.median(values):.1f})"


def median(proxy: Proxy, column: str) -> float:
    return statistics.median(t.ms(column) for t in proxy.trials)


def ratio(proxy: Proxy, peer: Proxy, column: str) -> str:
    mine, theirs = median(proxy, column), median(peer, column)
    return "—" if math.isnan(mine) or math.isnan(theirs) else f"{mine / theirs:.2f}"


def table(lmproxies: Sequence[Lmproxy], peer: LargeModelProxy) -> str:
    rows = [["in ms, min-max (median)", *(title for _, title in COLUMNS)]]
    for proxy in [*lmproxies, peer]:
        rows.append([proxy.label, *(spread([t.ms(c) for t in proxy.trials]) for c, _ in COLUMNS)])
    for proxy in lmproxies:
        rows.append([f"{proxy.label} / {peer.label}", *(ratio(proxy, peer, c) for c, _ in COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            [
                row[0].ljust(widths[0]),
                *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
            ]
        )
        for row in rows
    )


def as_json(
    lmproxies: Sequence[Lmproxy], peer: LargeModelProxy, delay: float, spread: float
) -> dict[str, object]:
    def entry(proxy: Proxy) -> dict[str, object]:
        return {
            "label": proxy.label,
            "source": str(proxy.source) if isinstance(proxy, Lmproxy) else None,
            "ms": {
                c: [None if math.isnan(t.ms(c)) else round(t.ms(c), 3) for t in proxy.trials]
                for c in COLUMN_KEYS
            },
            "median_ms": {
                c: None if math.isnan(m := median(proxy, c)) else round(m, 3) for c in COLUMN_KEYS
            },
        }

    return {
        "model_delay_s": delay,
        "model_delay_spread_s": spread,
        "proxies": [entry(p) for p in [*lmproxies, peer]],
        "ratio_of_medians": {
            p.label: {c: round(median(p, c) / median(peer, c), 3) for c in ("a", "b", "c")}
            for p in lmproxies
        },
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9, help="cold starts per proxy")
    parser.add_argument(
        "--source",
        action="append",
        type=Path,
        help="an lmproxy checkout to measure (this one by default; repeat to compare)",
    )
    parser.add_argument("--peer", type=Path, default=PEER, help="large-model-proxy's binary")
    parser.add_argument(
        "--delay",
        type=float,
        default=DELAY_S,
        help="the model's sleep before it listens, in s (default %(default)s)",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=SPREAD_S,
        help="each round adds 0 to this much to --delay, in s (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="for the delays drawn (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.delay < 0 or args.spread < 0:
        parser.error("--delay and --spread must not be negative")
    sources = [s.resolve() for s in args.source or [ROOT]]
    if not os.access(args.peer, os.X_OK):
        parser.error(f"{args.peer} is not an executable (--peer)")
    reason = sandbox_module.unavailable_reason()
    if reason:
        parser.error(reason)

    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="lmproxy-coldstart-", dir=_work_parent()) as work,
        contextlib.ExitStack() as stack,
    ):
        lmproxies: list[Lmproxy] = []
        for index, source in enumerate(sources):
            say(f"installing lmproxy from {source} (byte-compiled first)")
            lmproxy = start_lmproxy(source, Path(work) / f"lmproxy-{index}", args.delay, stack)
            if any(other.label == lmproxy.label for other in lmproxies):
                lmproxy.label += f" ({index + 1})"  # the same commit twice
            lmproxies.append(lmproxy)
        say(f"starting {args.peer}")
        peer = stack.enter_context(large_model_proxy(args.peer, Path(work) / "peer", args.delay))
        proxies: list[Proxy] = [*lmproxies, peer]
        for proxy in proxies:
            say(f"warm-up: {proxy.label}: {show(run_trial(proxies, proxy))}")
        draw = random.Random(args.seed)
        for round_ in range(args.rounds):
            delay = args.delay + draw.uniform(0, args.spread)
            for proxy in proxies:
                (proxy.stamps / "delay").write_text(f"{delay:.6f}\n")
            for proxy in proxies if round_ % 2 == 0 else proxies[::-1]:
                trial = run_trial(proxies, proxy)
                proxy.trials.append(trial)
                say(f"round {round_ + 1}/{args.rounds}: {proxy.label}: {show(trial)}")
        for proxy in proxies:
            proxy.wait_cold()

    if args.json:
        print(json.dumps(as_json(lmproxies, peer, args.delay, args.spread), indent=2))
        return 0
    print(f"Cold starts through each proxy: {args.rounds} each, in alternating rounds, after")
    print(
        f"one warm-up each; model: bench/slowstart.py, its own start {args.delay:g} s plus"
        f" 0-{args.spread:g} s drawn each round (seed {args.seed})."
    )
    for proxy in lmproxies:
        print(f"  {proxy.label}: {proxy.source}: {proxy.about}")
    print(f"  {peer.label}: {args.peer}")
    print("Each source's lmproxy/ was byte-compiled beforehand (python3 -m compileall -q).")
    print(
        "The model's own start (t1 -> t2), median: "
        + ", ".join(f"{p.label} {median(p, 'model'):.1f} ms" for p in proxies)
    )
    print(f"{time.monotonic() - started:.0f} s; load average now {_loadavg()}.")
    print()
    print(table(lmproxies, peer))
    return 0


def _work_parent() -> str | None:
    """/dev/shm when there is one: a tmpfs, as $XDG_RUNTIME_DIR is under systemd."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: everything started is stopped


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/coldstart.py needs root (it starts a private systemd manager)")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        sys.exit(130)
