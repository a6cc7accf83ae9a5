"""A backend that streams slowly and then idles, like a model server's token streams.

bench/relay.py runs it behind each proxy for its 1,000-connections row. Per
connection: the client sends one line; the server sends --tokens lines, one
every --interval seconds, then "end"; the connection then sits idle until the
client sends a second line, which the server answers with "bye" before it
closes. One asyncio loop, a listen backlog of 4096.

    python3 bench/trickle.py --port 18090 --tokens 20 --interval 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys


async def _serve_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int, interval: float
) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        try:
            if not await reader.readline():
                return  # a readiness probe: connected and closed
            for index in range(tokens):
                writer.write(b"tok%d\n" % index)
                await writer.drain()
                await asyncio.sleep(interval)
            writer.write(b"end\n")
            await writer.drain()
            if await reader.readline():
                writer.write(b"bye\n")
                await writer.drain()
        finally:
            writer.close()


async def _main(host: str, port: int, tokens: int, interval: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve_one(r, w, tokens, interval), host, port, backlog=4096
    )
    print(f"trickle: listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 bench/trickle.py", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.host, args.port, args.tokens, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
