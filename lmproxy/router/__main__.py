"""The router's process: the listening socket from systemd, the event loop, reloads."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from lmproxy.activation import inherited_listener, notify, raise_descriptor_limit
from lmproxy.paths import Scope, paths_for
from lmproxy.router.requestlog import RequestLog
from lmproxy.router.server import Router
from lmproxy.router.settings import KeysFileError, Settings, settings_of

# How long a stopping router lets requests in flight finish (its unit's TimeoutStopSec is
# longer).
STOP_GRACE_S = 10.0


def load(config_path: Path, scope: Scope, log: RequestLog) -> Settings:
    from lmproxy.origin import load_installed_config

    config = load_installed_config(config_path)
    created = int(config_path.stat().st_mtime)
    settings = settings_of(config, paths_for(scope), created)
    if isinstance(settings.keys, KeysFileError):
        log.send("error", f"refusing every request: {settings.keys}", event="keys-unreadable")
    return settings


async def serve(config_path: Path, scope: Scope) -> None:
    loop = asyncio.get_running_loop()
    log = RequestLog()
    router = Router(loop, load(config_path, scope, log), log)
    server = await loop.create_server(router.client, sock=inherited_listener("lmproxy's router"))
    stopping = asyncio.Event()

    def reload() -> None:
        notify("RELOADING=1")
        try:
            router.reload(load(config_path, scope, log))
        except Exception as error:
            log.send("error", f"reload failed, serving as before: {error}", event="reload-failed")
        else:
            count = len(router.settings.catalog.listing)
            log.send("info", f"reloaded: {count} model id(s)", event="reloaded")
        notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    notify("READY=1", f"STATUS=routing {len(router.settings.catalog.listing)} model id(s)")
    await stopping.wait()
    notify("STOPPING=1")
    server.close()  # no new connections; those open finish what they are doing
    router.close_idle()
    deadline = time.monotonic() + STOP_GRACE_S
    while router.busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in ("--user", "--system") or args[1] != "--config":
        raise SystemExit("usage: python3 -m lmproxy.router --user|--system --config PATH")
    scope = Scope.SYSTEM if args[0] == "--system" else Scope.USER
    raise_descriptor_limit()  # two per request in flight: 1024 would stop it near 500
    try:
        import uvloop
    except ImportError:  # Debian's python3-uvloop is recommended, not required
        asyncio.run(serve(Path(args[2]), scope))
    else:
        uvloop.install()
        asyncio.run(serve(Path(args[2]), scope))


if __name__ == "__main__":
    main()
