#!/usr/bin/python3
"""Swap delay: from a victim's backend becoming inactive to the waiter's model starting.

    sudo /usr/bin/python3 bench/swap.py [--rounds N] [--source DIR ...]

Two models that cannot fit together, A and B, in a private systemd user manager
(lmproxy.sandbox). Each round: a client of A is served, A stops for idleness
(ShutDownAfterInactivitySeconds) and takes 0.5 s to exit (bench/slowstop.py), and a
client of B arrives while it does, so that B's shim queues behind A's stop. The
delay is systemd's own record: B's backend's ExecMainStartTimestamp less A's
InactiveEnterTimestamp, which takes in B's shim noticing, its ledger transaction
and its StartUnit. With several --source folders (lmproxy checkouts, for example
a `git worktree` of an older commit) the rounds alternate between them and one table
compares them. Not part of the test suite; needs root (the sandbox).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmproxy import sandbox as sandbox_module  # noqa: E402
from lmproxy.sandbox import Sandbox  # noqa: E402

STOP_DELAY_S = 0.5
IDLE_S = 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--source",
        action="append",
        type=Path,
        help="an lmproxy checkout to measure (this one by default; repeat to compare)",
    )
    args = parser.parse_args(argv)
    sources = [s.resolve() for s in args.source or [ROOT]]
    results: dict[Path, list[float]] = {s: [] for s in sources}
    for round_ in range(args.rounds):
        for source in sources:
            delay = one_round(source, round_)
            results[source].append(delay)
            print(f"round {round_ + 1}: {source}: {delay:.1f} ms", flush=True)
    print()
    print(f"{'lmproxy source':50} {'median ms':>10} {'min':>8} {'max':>8}")
    for source, delays in results.items():
        print(
            f"{_describe(source):50} {statistics.median(delays):10.1f} "
            f"{min(delays):8.1f} {max(delays):8.1f}"
        )
    return 0


def one_round(source: Path, round_: int) -> float:
    """A fresh manager per round and source, so that no state carries over."""
    with tempfile.TemporaryDirectory(prefix="lmproxy-swap-") as folder:
        with sandbox_module.running(Path(folder) / "sandbox") as sandbox:
            a, b = 20100 + round_ * 2, 20101 + round_ * 2
            config = Path(folder) / "config.json"
            config.write_text(json.dumps(_config(a, b)))
            _lmproxy(sandbox, source, "install", "--user", "--config", str(config), "--now")
            _get(a)
            _wait_for(lambda: _unit(sandbox, "A", "ActiveState") == "deactivating", 10)
            client = threading.Thread(target=_get, args=(b,))
            client.start()
            client.join(30)
            inactive = int(_unit(sandbox, "A", "InactiveEnterTimestampMonotonic"))
            started = int(_unit(sandbox, "B", "ExecMainStartTimestampMonotonic"))
            return (started - inactive) / 1000


def _config(a: int, b: int) -> dict[str, object]:
    def service(name: str, port: int) -> dict[str, object]:
        return {
            "Name": name,
            "ListenPort": port,
            "ProxyTargetHost": "127.0.0.1",
            "ProxyTargetPort": port + 10000,
            "Command": sys.executable,
            "Args": f"{BENCH / 'slowstop.py'} --port {port + 10000} --stop-delay {STOP_DELAY_S}",
            "ResourceRequirements": {"VRAM": 10},
        }

    return {
        "ResourcesAvailable": {"VRAM": 10},
        "ShutDownAfterInactivitySeconds": IDLE_S,
        "Services": [service("A", a), service("B", b)],
    }


def _lmproxy(sandbox: Sandbox, source: Path, *args: str) -> None:
    env = sandbox.env({"PYTHONPATH": str(source)})
    command = sandbox.command([sys.executable, "-m", "lmproxy", *args])
    subprocess.run(command, env=env, cwd=source, check=True, capture_output=True, timeout=60)


def _unit(sandbox: Sandbox, name: str, prop: str) -> str:
    result = sandbox.systemctl("show", "-P", prop, f"lmproxy-backend@{name}.service")
    return result.stdout.strip()


def _get(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
        response.read()


def _wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the model did not begin to stop")
        time.sleep(0.002)


def _describe(source: Path) -> str:
    head = subprocess.run(
        ["git", "-C", str(source), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (head or str(source))[:50]


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/swap.py needs root (it starts a private systemd manager)")
    sys.exit(main(sys.argv[1:]))
