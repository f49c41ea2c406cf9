"""A null TCP relay: bytes in, bytes out, nothing parsed. The bench's baseline for "one more
process between the client and the upstream", so what cvi-agent adds can be told apart from
what any extra hop costs on the machine (scheduling, loopback, wake-ups).

`python -m cvi_agent.devtools.fakes.relay --port P --to 127.0.0.1:UPSTREAM_PORT`

Several `--to` make it a round-robin balancer: each new connection goes to the next target (one
connection per request, as the bench and the scale-out tests send, is one request per target in
turn), the way a plain L4 load balancer spreads a Procfile app's web processes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import Iterator, Sequence


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection; writes what it receives to its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


class _Downstream(_Pipe):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.target = (host, port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Pipe, *self.target)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        assert upstream.transport is not None
        for data in self.pending:
            upstream.transport.write(data)
        self.pending.clear()
        if self.transport is None or self.transport.is_closing():
            upstream.transport.close()


async def serve(host: str, port: int, targets: Sequence[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    turn: Iterator[tuple[str, int]] = itertools.cycle(targets)
    server = await loop.create_server(lambda: _Downstream(*next(turn)), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvi_agent.devtools.fakes.relay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--to",
        required=True,
        action="append",
        help="HOST:PORT to relay to (repeat: round robin per connection)",
    )
    args = parser.parse_args(argv)
    targets = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in args.to]
    main_coro = serve(args.host, args.port, targets)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main_coro)
        else:
            uvloop.run(main_coro)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
