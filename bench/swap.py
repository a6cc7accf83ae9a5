#!/usr/bin/python3
"""Swap delay: from a victim's backend becoming inactive to the waiter's model starting.

    sudo /usr/bin/python3 bench/swap.py [--rounds N] [--source DIR ...]

Two models that cannot fit together, A and B, in a private systemd user manager
(lmproxy.sandbox). Each round: a client of A is served, A stops for idleness
(ShutDownAfterInactivitySeconds) and takes 0.5 s to exit (bench/slowstop.py), and a
client of B arrives while it does, so that B's shim queues behind A's stop. Columns:
from A's process exiting (it notes the moment) to systemd saying A is inactive (on
D-Bus, as B's shim hears it), from there to B's shim sending StartUnit (it logs the
moment), and in all from A's exit to B's process starting (ExecMainStartTimestamp).
The old code (polling) shows only in the last column: it logs no StartUnit time. With
several --source folders (lmproxy checkouts, for example a `git worktree` of an
older commit) the rounds alternate between them and one table compares them.
Not part of the test suite; needs root (the sandbox).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmproxy import sandbox as sandbox_module  # noqa: E402
from lmproxy.paths import Scope  # noqa: E402
from lmproxy.sandbox import Sandbox  # noqa: E402
from lmproxy.systemd import Manager  # noqa: E402

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
    results: dict[Path, list[Round]] = {s: [] for s in sources}
    for round_ in range(args.rounds):
        for source in sources:
            result = one_round(source, round_)
            results[source].append(result)
            print(f"round {round_ + 1}: {source}: {result}", flush=True)
    print()
    print("in ms, median (min-max):")
    print(
        f"{'lmproxy source':42} {'A exits->inactive':>18} {'->B StartUnit':>16} "
        f"{'A exits->B runs':>16}"
    )
    for source, rows in results.items():
        print(
            f"{_describe(source):42} {_spread([r.exit_to_inactive for r in rows]):>18} "
            f"{_spread([r.inactive_to_start_unit for r in rows]):>16} "
            f"{_spread([r.exit_to_process for r in rows]):>16}"
        )
    return 0


def _spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.0f}-{max(values):.0f})"


@dataclass(frozen=True)
class Round:
    exit_to_inactive: float  # A's process exits -> systemd says A is inactive
    inactive_to_start_unit: float  # -> B's shim sends StartUnit
    exit_to_process: float  # A's process exits -> B's process starts


def one_round(source: Path, round_: int) -> Round:
    """A fresh manager per round and source, so that no state carries over."""
    with (
        tempfile.TemporaryDirectory(prefix="lmproxy-swap-") as folder,
        sandbox_module.running(Path(folder) / "sandbox") as sandbox,
    ):
        a, b = 20100 + round_ * 2, 20101 + round_ * 2
        config = Path(folder) / "config.json"
        config.write_text(json.dumps(_config(a, b, Path(folder))))
        _lmproxy(sandbox, source, "install", "--user", "--config", str(config), "--now")
        _get(a)
        _wait_for(lambda: _unit(sandbox, "A", "ActiveState") == "deactivating", 10)
        inactive: list[int] = []
        watcher = threading.Thread(target=_note_inactive, args=(sandbox, inactive))
        watcher.start()
        client = threading.Thread(target=_get, args=(b,))
        client.start()
        client.join(30)
        watcher.join(30)
        stopped_ns = int((Path(folder) / "A.exit").read_text())
        sent_us = _start_sent(sandbox)
        started_us = int(_unit(sandbox, "B", "ExecMainStartTimestampMonotonic"))
        return Round(
            exit_to_inactive=(inactive[0] - stopped_ns) / 1e6,
            inactive_to_start_unit=math.nan
            if sent_us is None
            else (sent_us * 1000 - inactive[0]) / 1e6,
            exit_to_process=(started_us * 1000 - stopped_ns) / 1e6,
        )


def _note_inactive(sandbox: Sandbox, stamps: list[int]) -> None:
    """When systemd says A is inactive, as any D-Bus client (B's shim too) hears it."""
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = sandbox.environ["DBUS_SESSION_BUS_ADDRESS"]
    with Manager.connect(Scope.USER) as manager:
        manager.wait_until_inactive("lmproxy-backend@A.service", 30)
    stamps.append(time.monotonic_ns())


def _start_sent(sandbox: Sandbox) -> int | None:
    """When B's shim sent StartUnit, as it logged (None: an lmproxy that does not say)."""
    for _ in range(100):
        result = sandbox.run(["journalctl", "-o", "json", "LMPROXY_SERVICE=B"])
        for line in result.stdout.splitlines():
            entry = json.loads(line)
            if entry.get("LMPROXY_EVENT") == "started":
                sent = entry.get("LMPROXY_START_SENT_US")
                return None if sent is None else int(sent)
        time.sleep(0.05)
    raise RuntimeError("B's shim logged no start")


def _config(a: int, b: int, folder: Path) -> dict[str, object]:
    def service(name: str, port: int, folder: Path) -> dict[str, object]:
        stamp = folder / f"{name}.exit"
        return {
            "Name": name,
            "ListenPort": port,
            "ProxyTargetHost": "127.0.0.1",
            "ProxyTargetPort": port + 10000,
            "Command": sys.executable,
            "Args": f"{BENCH / 'slowstop.py'} --port {port + 10000} "
            f"--stop-delay {STOP_DELAY_S} --exit-stamp {stamp}",
            "ResourceRequirements": {"VRAM": 10},
        }

    return {
        "ResourcesAvailable": {"VRAM": 10},
        "ShutDownAfterInactivitySeconds": IDLE_S,
        "Services": [service("A", a, folder), service("B", b, folder)],
    }


def _lmproxy(sandbox: Sandbox, source: Path, *args: str) -> None:
    env = sandbox.env({"PYTHONPATH": str(source)})
    # -P: not the working directory first on the path, which would be this checkout.
    command = sandbox.command([sys.executable, "-P", "-m", "lmproxy", *args])
    subprocess.run(command, env=env, cwd=source, check=True, capture_output=True, timeout=60)


def _unit_any(sandbox: Sandbox, unit: str, prop: str) -> str:
    return sandbox.systemctl("show", "-P", prop, unit).stdout.strip()


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
    return (head or str(source))[:42]


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/swap.py needs root (it starts a private systemd manager)")
    sys.exit(main(sys.argv[1:]))
