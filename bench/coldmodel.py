"""lmproxy's fake model server, noting the moment it starts listening.

bench/relay.py runs it as a backend unit to time cold starts: the gap between
this stamp (CLOCK_MONOTONIC, right after listen()) and the client's first byte
is what the proxy in front adds once the model is up.

    python3 bench/coldmodel.py --stamp FILE -- FAKEMODEL-ARGS...
"""

from __future__ import annotations

import os
import sys
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from lmproxy import fakemodel


def _stamping_server(stamp: Path) -> type[ThreadingHTTPServer]:
    class StampingServer(ThreadingHTTPServer):
        def server_activate(self) -> None:
            super().server_activate()  # listen(): from now on connections complete
            now = time.monotonic()
            temp = stamp.with_name(stamp.name + ".tmp")
            temp.write_text(f"{now:.9f}\n")
            os.replace(temp, stamp)

    return StampingServer


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "--stamp" or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    stamp = Path(argv[1])
    setattr(fakemodel, "ThreadingHTTPServer", _stamping_server(stamp))  # noqa: B010
    return fakemodel.main(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
